import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton builds its language for the interpreter or the compiler when first imported (torch.compile may import
    # it before lit_gpt.kernels does): without a GPU only the interpreter can run the fused kernels' tests
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test when the shared data is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny float64 models: thread start-up costs more than the maths (and
    the CPUs are shared). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def variant_id(overrides: dict) -> str:
    """A readable pytest id for a dict of Config overrides."""
    return ",".join(f"{k}={x}" for k, x in overrides.items()) or "default"
