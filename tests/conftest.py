"""Test-suite setup shared by every module.

Private caches: before anything else runs, MOERUN_CACHE, HF_HOME, HF_HUB_CACHE and
XDG_CACHE_HOME point into one temporary folder for the whole run (removed at its end),
so no test, and no `moerun` process a test starts, reads or writes the user's
~/.cache/moerun or Hugging Face cache. A test that wants its own cache still sets it.

Without CUDA, Triton kernels run on the CPU through Triton's interpreter, which must be
switched on before triton is first imported; with CUDA they compile for real. Tests
marked `gpu` are skipped without CUDA. Tests marked `slow` are deselected by default
(pyproject's addopts); `make test-all` (`pytest -m ""`) runs them too.
"""

import os
import shutil
import tempfile

# Set at import, before moerun or huggingface_hub are imported by any test module (the
# Hub library reads HF_HOME once, at its own import).
PRIVATE_HOME = tempfile.mkdtemp(prefix="moerun-tests-")
PRIVATE_ENV = {
    "MOERUN_CACHE": os.path.join(PRIVATE_HOME, "moerun"),
    "HF_HOME": os.path.join(PRIVATE_HOME, "huggingface"),
    "HF_HUB_CACHE": os.path.join(PRIVATE_HOME, "huggingface", "hub"),
    "XDG_CACHE_HOME": os.path.join(PRIVATE_HOME, "xdg-cache"),
}
os.environ.update(PRIVATE_ENV)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)  # the old name huggingface_hub still reads

import pytest  # noqa: E402
import torch  # noqa: E402

from moerun.kernels import cpu_experts  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """MOERUN_CACHE of this test's own: the quantized experts one test's load writes are
    not what the next test's load reads. A module takes it for all its tests with
    `pytestmark = pytest.mark.usefixtures("private_cache")`."""
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "moerun-cache"))


ISAS = ("scalar", "avx2", "avx512", "avx512bf16")
# The machine's best and those below it, read before any test narrows the kernels' choice.
RUNNABLE_ISAS = list(ISAS[: ISAS.index(cpu_experts.isa()) + 1]) if cpu_experts.available() else []


@pytest.fixture(params=ISAS)
def isa(request):
    """Each instruction-set path of the C kernels this CPU can run (the others skipped),
    forced for the test and given back after."""
    if request.param not in RUNNABLE_ISAS:
        pytest.skip(f"this CPU cannot run the {request.param} path")
    cpu_experts.set_isa(request.param)
    yield request.param
    cpu_experts.set_isa(RUNNABLE_ISAS[-1])


def pytest_collection_modifyitems(config, items):
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_unconfigure(config):
    shutil.rmtree(PRIVATE_HOME, ignore_errors=True)


@pytest.fixture
def free_disk_bytes(monkeypatch):
    """Call with a byte count: the quantized expert cache then sees that much free space
    (no test can fill a real disk); the comparison and its message stay real."""
    from moerun.moe import store

    def set_free(n: int) -> None:
        monkeypatch.setattr(store, "free_bytes", lambda folder: n)

    return set_free
