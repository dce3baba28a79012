import os

import pytest
import torch

# Kernels are checked against their references on the CPU through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402  (after TRITON_INTERPRET: lightning imports triton through torch)
# The test models are tiny: thread start-up costs more than it saves, and far more on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


class KillAt(L.Callback):
    """Simulates a crash at the start of training batch ``batch`` (a trajectory, or a search move), for resume tests;
    the CLI finds it as ``conftest.KillAt``."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        if batch_index == self.batch:
            raise RuntimeError("simulated crash")


def train_cli(args: list[str]) -> None:
    """``dit-cache-train ARGS`` as called from a shell (LightningCLI would warn about pytest's own sys.argv)."""
    import sys

    from dit_cache.training.cli import main

    saved = sys.argv
    sys.argv = ["dit-cache-train"]
    try:
        main(args)
    finally:
        sys.argv = saved
