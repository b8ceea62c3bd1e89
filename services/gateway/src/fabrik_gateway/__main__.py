from fabrik_gateway.app import main

main()
