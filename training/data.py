"""Image-free training data for routers: prompts (or class labels) and a seed per trajectory.

Text embeddings are computed once with the pipeline's own ``encode_prompt``; the text encoder is then freed. A batch
is one trajectory: ``(conditioning rows, seed)``, the rows of its prompts' embeddings (or its class labels).
"""

from __future__ import annotations

import gc
from pathlib import Path

import lightning as L
import torch
from diffusers import DiffusionPipeline

from dit_cache.toy import shapes
from dit_cache.embedded import resolve_model

from .denoising import conditioning_rows, encode_prompts

DEFAULT_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road at sunset",
    "a bowl of ramen with a soft-boiled egg", "an astronaut riding a horse on the moon",
    "a lighthouse on a cliff during a storm", "a watercolor painting of a fox in the snow",
    "a cozy library with tall wooden shelves", "a close-up of a hummingbird drinking nectar",
    "a futuristic city skyline at night with neon lights", "a plate of pancakes with blueberries and syrup",
    "a sailboat on a calm lake at dawn", "a portrait of an old fisherman with a white beard",
    "a field of sunflowers under a blue sky", "a steaming cup of coffee on a rustic table",
    "a dragon made of clouds flying over a castle", "a corgi wearing sunglasses on the beach",
]


def embedded_model_prompts(count: int = 64, seed: int = 1234) -> list[str]:
    """Captions of the embedded model's training distribution (one- and two-object scenes)."""
    return [scene.caption for scene in shapes.sample_scenes(seed, count, two_object_fraction=0.4,
                                                            three_object_fraction=0.0)]


def _is_embedded_model(model: str) -> bool:
    from dit_cache.embedded import ASSETS

    return Path(model).exists() and Path(model).resolve() == (ASSETS / "embedded_model").resolve()


class TrajectorySeeds(torch.utils.data.Dataset):
    """Item i = (indices of the prompts of trajectory ``offset + i``, its noise seed): reproducible by seed.

    ``offset`` lets a resumed run continue with the trajectories it had not reached yet.
    """

    def __init__(self, num_prompts: int, batch_size: int, num_trajectories: int, seed: int, offset: int = 0):
        self.num_prompts, self.batch_size, self.num_trajectories = num_prompts, batch_size, num_trajectories
        self.seed, self.offset = seed, offset

    def __len__(self):
        return self.num_trajectories

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        prompts = torch.randint(0, self.num_prompts, (self.batch_size,), generator=generator)
        return prompts, torch.randint(0, 2**62, (1,), generator=generator)


class RouterDataModule(L.LightningDataModule):
    """Prompts (PixArt) or class labels (DiT) for Step-Wise Denoising Training.

    Args:
        model: the same diffusers folder or hub id as the router module's.
        prompts: prompts to train on; default: the embedded model's captions for the embedded model, else a
            built-in list of 16 varied prompts.
        prompt_file: a text file with one prompt per line (overrides ``prompts``).
        num_classes: for class-conditional DiT models, labels are drawn from ``range(num_classes)``.
        batch_size: samples per trajectory (CFG doubles the model batch).
        num_trajectories: trajectories per epoch.
        seed: seeds prompt choice and noise.
    """

    def __init__(self, model: str, prompts: list[str] | None = None, prompt_file: str | None = None,
                 num_classes: int = 1000, batch_size: int = 8, num_trajectories: int = 200,
                 max_sequence_length: int = 120, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("num_classes", num_classes), ("batch_size", batch_size),
                            ("num_trajectories", num_trajectories), ("max_sequence_length", max_sequence_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
        self.model = resolve_model(model)
        self.prompts = prompts
        if prompt_file is not None:
            if not Path(prompt_file).is_file():
                raise FileNotFoundError(f"No prompt file at {prompt_file} (a text file, one prompt per line).")
            lines = Path(prompt_file).read_text().splitlines()
            self.prompts = [line.strip() for line in lines if line.strip()]
            if not self.prompts:
                raise ValueError(f"{prompt_file} holds no prompts (one per line expected).")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts is empty: give at least one prompt, or leave it out for the defaults.")
        self.conditioning: dict[str, torch.Tensor] = {}
        self._resume_offset = 0

    def setup(self, stage: str | None = None) -> None:
        if self.conditioning:
            return
        config = DiffusionPipeline.load_config(self.model)
        if "text_encoder" not in config:
            self.conditioning = {"class_labels": torch.arange(self.hparams.num_classes)}
            return
        if self.prompts is None:
            self.prompts = embedded_model_prompts() if _is_embedded_model(self.model) else DEFAULT_PROMPTS
        pipe = DiffusionPipeline.from_pretrained(self.model, transformer=None, vae=None)
        self.conditioning = encode_prompts(pipe, config["transformer"][1], self.prompts,
                                           self.hparams.max_sequence_length)
        del pipe
        gc.collect()

    def state_dict(self) -> dict:
        # Checkpoints are written at the end of a batch, before Lightning counts it as completed.
        return {"trajectories_done_in_epoch": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_offset = int(state.get("trajectories_done_in_epoch", 0))

    @property
    def num_conditions(self) -> int:
        key = "class_labels" if "class_labels" in self.conditioning else "prompt_embeds"
        return self.conditioning[key].shape[0]

    def calibration_conditioning(self, count: int, start: int = 0) -> dict:
        """The conditioning rows of ``count`` prompts (or labels) from the ``start``-th, repeated if there are
        fewer: a fixed batch that does not depend on where a run resumes (``objective: search`` calibrates on the
        first ones and validates on the next ones)."""
        return conditioning_rows(self.conditioning, torch.arange(start, start + count) % self.num_conditions)

    def _with_conditioning(self, trajectory):
        prompt_indices, seed = trajectory
        return conditioning_rows(self.conditioning, prompt_indices), seed

    def train_dataloader(self):
        # After a mid-epoch resume Lightning goes on counting batches but restarts the loader: shift the loader
        # to where the interrupted run stopped (see state_dict). Every epoch also gets trajectories of its own.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        offset = epoch * self.hparams.num_trajectories + self._resume_offset
        self._resume_offset = 0
        dataset = TrajectorySeeds(self.num_conditions, self.hparams.batch_size, self.hparams.num_trajectories,
                                  self.hparams.seed, offset)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=self._with_conditioning)
