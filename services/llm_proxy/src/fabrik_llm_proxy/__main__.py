from fabrik_llm_proxy.app import main

main()
