from fabrik_backup.app import main

main()
