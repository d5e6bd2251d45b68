"""Shared fixtures: tiny random Hugging Face models built offline, and 8 fake CPU devices."""

import atexit
import os
import shutil
import tempfile

# Must be set before JAX initializes its backend: tests that need a mesh use 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A persistent compilation cache for the test run, which the processes the tests start inherit:
# trainers killed and resumed, the pipeline run three times, all compile the same tiny programs.
# The first pytest process makes it and removes it when the run ends; each pytest-xdist worker
# keeps a folder of its own in it (JAX writes its entries unlocked).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qed-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"],
                                                          os.environ["PYTEST_XDIST_WORKER"])

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests.helpers import make_hf_model  # noqa: E402,F401


@pytest.fixture
def fresh_jit_caches():
    """Clears jit's caches before and after a test that changes what a traced function does
    (compiled decode loops of other tests would be reused, or this test's kept)."""
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """A tiny tied Qwen3 saved as a Hugging Face folder, with a tokenizer."""
    return make_hf_model(tmp_path_factory.mktemp("hf_tiny"))


@pytest.fixture(scope="session")
def libtpu():
    """The compile-only devices of a v5p-8 slice (libtpu compiles for TPU topologies without any
    chips); skips where libtpu is missing."""
    from qed_jax import plan
    from qed_jax.config import ConfigError

    try:
        return plan.topology_devices(plan.parse_slice("v5p-8"))
    except ConfigError as e:
        pytest.skip(str(e))
