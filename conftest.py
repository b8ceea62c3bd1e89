pytest_plugins = ["fabrik_common.testing.plugin"]
