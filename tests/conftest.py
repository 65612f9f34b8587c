"""Test-wide settings: one intra-op thread, since tiny tensors run slower with more on a shared 2-core CPU."""
import torch

torch.set_num_threads(1)
