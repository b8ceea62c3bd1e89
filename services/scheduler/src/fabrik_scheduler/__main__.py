from fabrik_scheduler.app import main

main()
