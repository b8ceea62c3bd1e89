from fabrik_optimizer.app import main

main()
