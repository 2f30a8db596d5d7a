import os
import tempfile

# Eight simulated CPU devices for the sharding tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests build the same small trainers and pipelines: a persistent compilation cache (keyed by the program)
# compiles each distinct program once per machine instead of once per test.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "FLOWJAX_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "flowjax-test-compile-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
