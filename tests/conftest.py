import os

import pytest
import torch

# Kernels are checked against their references on the CPU through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: thread start-up costs more than it saves, and far more on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
