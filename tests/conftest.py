import os

import pytest
import torch

# Kernels are checked against their references on the CPU through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
