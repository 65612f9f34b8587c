"""Test-wide settings, and the `stages` marker (`make test-fast` leaves those tests out).

Helpers for the tests that start the stage scripts live in tests/stages.py.
"""
import os

import pytest
import torch

# Tiny tensors run slower with several intra-op threads on a shared 2-core CPU (up to 10x);
# the environment variable carries the setting to the stage scripts the tests start
# (a tiny stage 1 took 38 s with the default threads, 4 s with one, on a busy machine).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stages: starts the stage scripts or runs whole stages (minutes); `make test-fast` deselects them"
    )
    config.addinivalue_line("markers", "cuda: runs on the CPU and, where torch sees CUDA, on the GPU too; `make gpu-check` selects them")
