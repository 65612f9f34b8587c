"""Test-wide settings."""
import pytest
import torch

# Tiny tensors run slower with several intra-op threads on a shared 2-core CPU (up to 10x).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)
