"""The shipped YAML configs name only arguments that exist, so `dit-cache-train fit --config X` parses."""

import importlib
import inspect
from pathlib import Path

import lightning as L
import pytest
import yaml

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


@pytest.mark.parametrize("path", ROUTER_CONFIGS, ids=lambda p: p.stem)
def test_router_config_arguments_exist(path):
    config = yaml.safe_load(path.read_text())
    assert set(config) <= {"seed_everything", "model", "data", "trainer", "ckpt_path"}
    assert set(config["model"]) <= _parameters(RouterModule.__init__)
    assert set(config["data"]) <= _parameters(RouterDataModule.__init__)
    trainer = dict(config["trainer"])
    callbacks = trainer.pop("callbacks", [])
    logger = trainer.pop("logger", None)
    assert set(trainer) <= _parameters(L.Trainer.__init__)
    for spec in callbacks + ([logger] if isinstance(logger, dict) else []):
        assert set(spec.get("init_args", {})) <= _parameters(_import(spec["class_path"]).__init__)
    assert "dit_cache.training.callbacks.ExportRouter" in [c["class_path"] for c in callbacks]


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
