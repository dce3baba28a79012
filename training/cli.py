"""``dit-cache-train``: the Lightning CLI for cache routers.

    dit-cache-train fit --config training/configs/embedded.yaml
    dit-cache-train fit --config training/configs/pixart_alpha_256.yaml --trainer.devices 4
    dit-cache-train fit --config training/configs/embedded.yaml --ckpt_path last   # resume a killed run

One setting places a run, the run directory ``trainer.default_root_dir`` (the working directory if unset); the
CLI derives every output from it:

    <run dir>/router.safetensors          the exported router (ExportRouter; its settings: ``export.*``)
    <run dir>/checkpoints/last.ckpt       what ``--ckpt_path last`` resumes (ModelCheckpoint: ``checkpoint.*``)
    <run dir>/lightning_logs/version_N/   metrics.csv and the run's config.yaml (CSVLogger)

A config then holds only what differs from the defaults (``TRAINER_DEFAULTS``, ``CHECKPOINT_DEFAULTS``): the
model, the data, the run directory and the trainer settings of its hardware. A ModelCheckpoint or ExportRouter
given in ``trainer.callbacks`` replaces the derived one, ``--trainer.enable_checkpointing false`` writes no
checkpoints, and ``--trainer.logger`` picks another logger.
"""

import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .callbacks import ExportRouter
from .data import RouterDataModule
from .router_module import RouterModule

# A router trains in one pass over its trajectories, on one device unless told otherwise.
TRAINER_DEFAULTS = {"devices": 1, "max_epochs": 1, "log_every_n_steps": 10}
# `last.ckpt` is what `--ckpt_path last` resumes; a checkpoint holds the router's state only (a few KB).
CHECKPOINT_DEFAULTS = {"save_last": True, "every_n_train_steps": 500}


def _in_run_dir(name: str):
    def path(run_dir) -> str:
        return str(Path(run_dir or ".") / name)  # unset: Lightning's default_root_dir, the working directory

    return path


class RouterCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # The data module encodes prompts with the same model the router is trained for.
        parser.link_arguments("model.model", "data.model")
        # Instantiated here, added to the trainer in instantiate_trainer (unless the run brings its own).
        parser.add_class_arguments(ModelCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.set_defaults({f"checkpoint.{key}": value for key, value in CHECKPOINT_DEFAULTS.items()})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_in_run_dir("checkpoints"))
        parser.add_class_arguments(ExportRouter, "export", fail_untyped=False, sub_configs=True)
        parser.link_arguments("trainer.default_root_dir", "export.path",
                              compute_fn=_in_run_dir("router.safetensors"))

    def instantiate_classes(self):
        # Bad settings (num_steps 0, a missing prompt file, ...) are refused when the classes are built: one
        # readable line, as for a bad flag, rather than a traceback through jsonargparse.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            print(f"dit-cache-train: error: {error}", file=sys.stderr)
            sys.exit(2)

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if trainer.get("enable_checkpointing") is not False and not _has(callbacks, ModelCheckpoint):
            callbacks.append(self._get(self.config_init, "checkpoint"))
        if not _has(callbacks, ExportRouter):
            callbacks.append(self._get(self.config_init, "export"))
        if trainer.get("logger") in (None, True):
            # Lightning's default would be TensorBoard where it is installed: the run's logs are CSV everywhere.
            kwargs.setdefault("logger", CSVLogger(trainer.get("default_root_dir") or "."))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)


def _has(callbacks, kind) -> bool:
    return any(isinstance(callback, kind) for callback in callbacks)


def main(args=None):
    # Both describe what router training does on purpose: the frozen transformer stays in eval mode, and a
    # checkpoint holds the router after its last optimizer step (what a resumed run continues from).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    RouterCLI(RouterModule, RouterDataModule, trainer_defaults=TRAINER_DEFAULTS,
              save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
