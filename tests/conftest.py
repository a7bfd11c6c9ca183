import os
import tempfile

# Before anything imports Keras: the package runs on JAX; 8 simulated CPU
# devices let sharding tests build meshes.
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Most of the suite's time is XLA:CPU compiling small programs, and each new
# model brings new jitted functions that JAX's in-memory cache misses even
# when their programs are ones compiled before. The persistent cache (keyed
# by the program, the flags and JAX's version) lets a test reuse what an
# earlier test, the other xdist worker or a notebook's kernel compiled;
# children (CLI and notebook tests) inherit it through the environment.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"keras-paligemma2-tests-xla-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402
import zlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import TINY_CONFIG  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir():
    return FIXTURES


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)


@pytest.fixture(autouse=True)
def _seed_module_rng(request):
    """A test module's `rng`, and Keras' global seed (what initialisers such as
    LoRA's draw from when given no seed), are reseeded from each test's id
    before the test: what a test draws does not depend on which tests ran
    before it in its worker (`-n 2`, any order)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    keras.utils.set_random_seed(seed % 2**31)
    if hasattr(request.module, "rng"):
        request.module.rng = np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    """`PG2_TEST_ORDER_SEED=N` runs the tests in a shuffled order (seeded by N):
    the suite must pass in any order (README, Test)."""
    seed = os.environ.get("PG2_TEST_ORDER_SEED")
    if seed is not None:
        np.random.default_rng(int(seed)).shuffle(items)
