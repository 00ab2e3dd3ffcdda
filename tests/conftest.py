"""Shared fixtures: tiny SD-1.x-shaped (epsilon) and SD-2.x-shaped (v_prediction) checkpoints.

They are built from configs, written with ``save_pretrained`` and loaded back by the code under test,
so the real loading path runs. Nothing is downloaded.
"""

import os

# Kernel tests exercise the Triton kernels on CPU through the interpreter; it must be set before
# triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Producers share the node's latent cache by default; the suite keeps its own, removed at exit (spawned
# producers and launched scripts inherit the variable).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "FUSIONLOADER_LATENT_CACHE" not in os.environ:
    os.environ["FUSIONLOADER_LATENT_CACHE"] = _LATENTS = tempfile.mkdtemp(prefix="fusionloader-test-latents-")
    atexit.register(shutil.rmtree, _LATENTS, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton binds each @triton.jit kernel to the interpreter or to a GPU driver when its module is imported:
# import them now, while TRITON_INTERPRET=1 holds, so a test that unsets it for spawned producers cannot
# leave them bound to a driver this machine does not have.
import fusionloader.kernels  # noqa: E402, F401
from fusionloader.testing import save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory):
    """Path of a saved tiny SD-1.x-shaped pipeline (epsilon prediction, 32 px images, 16 px latents)."""
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd1")), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory):
    """Path of a saved tiny SD-2.x-shaped pipeline (v_prediction, linear-projection attention)."""
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd2")), prediction_type="v_prediction")


@pytest.fixture(params=["epsilon", "v_prediction"])
def tiny_path(request, tiny_sd1_path, tiny_sd2_path):
    """Both tiny checkpoints, one after the other."""
    return tiny_sd1_path if request.param == "epsilon" else tiny_sd2_path


# Tiny models on a 2-core machine: one intra-op thread is several times faster than two when other
# processes (producers, DataLoader workers) share the cores. Producers set their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
