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


@pytest.fixture
def train_router(tmp_path):
    """``train_router(pipe, folder, latent_size=None)``: save ``pipe``, train a router on it for one epoch of two
    3-step trajectories (SDT objective), check it learned something, and return the exported ``CacheRouter``."""

    def train(pipe, folder, latent_size=None):
        from dit_cache import CacheRouter
        from dit_cache.training.callbacks import ExportRouter
        from dit_cache.training.data import RouterDataModule
        from dit_cache.training.router_module import RouterModule

        model = folder / "model"
        pipe.save_pretrained(model)
        module = RouterModule(str(model), num_steps=3, objective="sdt", guidance_scale=3.0, learning_rate=0.5,
                              latent_size=latent_size)
        data = RouterDataModule(str(model), prompts=["a red circle", "a blue square and a cat"], batch_size=2,
                                num_trajectories=2, max_sequence_length=8, num_classes=2)
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[ExportRouter(str(folder / "router.safetensors"))])
        before = module.router.logits.detach().clone()
        trainer.fit(module, data)
        assert not torch.equal(module.router.logits.detach(), before)  # it learned something
        return CacheRouter.load(folder / "router.safetensors")

    return train
