def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real GGUF models (fetched and converted once into the cache)")
