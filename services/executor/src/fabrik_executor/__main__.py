from fabrik_executor.app import main

main()
