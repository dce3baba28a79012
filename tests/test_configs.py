"""The shipped YAML configs name only arguments that exist, so `dit-cache-train fit --config X` parses, and hold
only what differs from the CLI's defaults: the run directory places every output."""

import importlib
import inspect
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from dit_cache.training.cli import TRAINER_DEFAULTS, RouterCLI
from dit_cache.training.data import RouterDataModule
from dit_cache.training.router_module import RouterModule

CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))
ROUTER_CONFIGS = [c for c in CONFIGS if not c.name.startswith("embedded_model")]


def _parameters(callable_):
    return set(inspect.signature(callable_).parameters) - {"self"}


def _import(class_path: str):
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_router_config_is_covered():
    names = {c.stem for c in ROUTER_CONFIGS}
    assert {"embedded", "embedded_l2c", "dit_xl_256", "pixart_alpha_256", "pixart_alpha_512",
            "pixart_sigma_1024"} <= names


class ParseOnly(RouterCLI):
    """The router CLI up to its parsed config: builds no model, data module or trainer."""

    def instantiate_classes(self):
        pass


def _parse(path, *flags):
    return ParseOnly(RouterModule, RouterDataModule, trainer_defaults=TRAINER_DEFAULTS, run=False,
                     args=["--config", str(path), *flags]).config


@pytest.mark.parametrize("path", ROUTER_CONFIGS, ids=lambda p: p.stem)
def test_router_config_arguments_exist(path):
    config = yaml.safe_load(path.read_text())
    assert set(config) <= {"seed_everything", "model", "data", "trainer", "checkpoint", "export"}
    assert set(config["model"]) <= _parameters(RouterModule.__init__)
    assert set(config["data"]) <= _parameters(RouterDataModule.__init__)
    assert set(config.get("checkpoint", {})) <= _parameters(ModelCheckpoint.__init__)
    trainer = dict(config["trainer"])
    callbacks = trainer.pop("callbacks", [])
    assert set(trainer) <= _parameters(L.Trainer.__init__)
    for spec in callbacks:
        spec = {"class_path": spec} if isinstance(spec, str) else spec
        assert set(spec.get("init_args", {})) <= _parameters(_import(spec["class_path"]).__init__)


@pytest.mark.parametrize("path", ROUTER_CONFIGS, ids=lambda p: p.stem)
def test_router_config_parses_and_places_every_output_in_its_run_dir(path):
    config = _parse(path)
    run_dir = f"runs/router/{path.stem}"
    assert config.trainer.default_root_dir == run_dir
    assert config.checkpoint.dirpath == f"{run_dir}/checkpoints" and config.checkpoint.save_last
    assert config.export.path == f"{run_dir}/router.safetensors"
    assert config.data.model == config.model.model
    assert config.trainer.max_epochs == 1 and config.trainer.devices == 1  # the CLI's defaults


def test_configs_hold_only_their_differences():
    for path in ROUTER_CONFIGS:
        trainer = yaml.safe_load(path.read_text())["trainer"]
        assert "logger" not in trainer, path.name  # derived from the run dir, as the callbacks below
        derived = {"lightning.pytorch.callbacks.ModelCheckpoint", "dit_cache.training.callbacks.ExportRouter"}
        assert not derived & {c if isinstance(c, str) else c["class_path"] for c in trainer.get("callbacks", [])}
        assert all(trainer[key] != value for key, value in TRAINER_DEFAULTS.items() if key in trainer), path.name
    # The shipped HarmoniCa router differs from the paper's cost in its cost alone.
    units, flops = (yaml.safe_load((CONFIGS[0].parent / name).read_text())
                    for name in ("embedded.yaml", "embedded_flops.yaml"))
    for config in (units, flops):
        config["trainer"].pop("default_root_dir")
    assert flops["model"].pop("cost") == "flops" and flops == units


def test_the_run_dir_flag_moves_every_output_and_the_paths_are_not_set_apart(tmp_path, capsys):
    config = _parse(CONFIGS[0].parent / "embedded.yaml", "--trainer.default_root_dir", str(tmp_path))
    assert config.checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert config.export.path == str(tmp_path / "router.safetensors")
    with pytest.raises(SystemExit):  # one setting: a derived path given on its own is refused by the parser
        _parse(CONFIGS[0].parent / "embedded.yaml", "--export.path", str(tmp_path / "elsewhere.safetensors"))
    assert "export.path" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["embedded_model.yaml", "embedded_model_patch2.yaml",
                                  "embedded_model_two_objects.yaml"])
def test_embedded_model_config_matches_the_training_function(name):
    from dit_cache.training.embedded_model import SceneMix, TextToImageStage, VaeStage, train_embedded_model

    config = yaml.safe_load((Path(__file__).parents[1] / "training/configs" / name).read_text())
    assert set(config) <= _parameters(train_embedded_model)
    assert set(config.get("vae", {})) <= _parameters(VaeStage)
    assert set(config["text_to_image"]) <= _parameters(TextToImageStage)
    assert set(config.get("scene_mix", {})) <= _parameters(SceneMix)


@pytest.mark.parametrize("name", ["embedded.yaml", "embedded_l2c.yaml", "embedded_flops.yaml"])
def test_embedded_router_configs_use_the_embedded_guidance_scale(name):
    from dit_cache import EMBEDDED_GUIDANCE_SCALE

    config = yaml.safe_load((Path(__file__).parents[1] / "training/configs" / name).read_text())
    assert config["model"]["model"] == "embedded"
    assert config["model"]["guidance_scale"] == EMBEDDED_GUIDANCE_SCALE


def test_callbacks_a_run_brings_replace_the_derived_ones(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from dit_cache.testing import tiny_pixart_pipeline
    from dit_cache.training.callbacks import ExportRouter

    tiny_pixart_pipeline().save_pretrained(tmp_path / "pixart")

    def trainer(*flags):
        args = ["--model.model", str(tmp_path / "pixart"), "--trainer.default_root_dir", str(tmp_path / "run"),
                "--trainer.accelerator", "cpu", *flags]
        return RouterCLI(RouterModule, RouterDataModule, trainer_defaults=TRAINER_DEFAULTS, run=False,
                         args=args).trainer

    def of(trainer, kind):
        return [callback for callback in trainer.callbacks if isinstance(callback, kind)]

    derived = trainer()
    (checkpoint,), (export,) = of(derived, ModelCheckpoint), of(derived, ExportRouter)
    assert checkpoint.dirpath == str(tmp_path / "run" / "checkpoints") and checkpoint.save_last
    assert export.path == str(tmp_path / "run" / "router.safetensors")
    assert isinstance(derived.logger, CSVLogger) and derived.logger.save_dir == str(tmp_path / "run")

    given = trainer("--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
                    "--trainer.callbacks+=dit_cache.training.callbacks.ExportRouter",
                    "--trainer.callbacks.path", str(tmp_path / "mine.safetensors"), "--trainer.logger", "false")
    assert [c.dirpath for c in of(given, ModelCheckpoint)] == [str(tmp_path / "ckpt")]
    assert [c.path for c in of(given, ExportRouter)] == [str(tmp_path / "mine.safetensors")]
    assert given.logger is None

    assert not of(trainer("--trainer.enable_checkpointing", "false"), ModelCheckpoint)
