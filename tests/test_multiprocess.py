"""Multi-process runs on this CPU (2 processes, gloo): router training with Lightning DDP, and ``dit-cache
generate`` under ``accelerate launch``. Each test starts real processes; select them with ``-m multiprocess``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from dit_cache import CacheRouter
from dit_cache.cli import output_stem
from dit_cache.testing import tiny_pixart_pipeline

pytestmark = pytest.mark.multiprocess
PROMPTS = ["a red circle", "a blue square", "a cat"]


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pixart"
    tiny_pixart_pipeline().save_pretrained(folder)
    return str(folder)


def _run(command, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class RankLogits(L.Callback):
    """Each process writes its router logits when training ends, to check the ranks trained one router."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, module):
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "world_size": trainer.world_size, "logits": module.router.logits.detach().tolist(),
            "global_step": trainer.global_step}))


def test_router_training_with_ddp_over_two_cpu_processes_exports_one_router_that_loads(pixart_folder, tmp_path):
    _run([sys.executable, "-m", "dit_cache.training.cli", "fit", "--model.model", pixart_folder,
          "--model.num_steps", "3", "--model.proxy_interval", "1", "--data.batch_size", "1",
          "--data.num_trajectories", "2", "--data.prompts", json.dumps(PROMPTS), "--trainer.max_epochs", "1",
          "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing",
          "false", "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--trainer.callbacks+=dit_cache.training.callbacks.ExportRouter",
          "--trainer.callbacks.path", str(tmp_path / "router.safetensors"),
          "--trainer.callbacks+=test_multiprocess.RankLogits", "--trainer.callbacks.folder", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert ranks[0]["global_step"] == 2  # one trajectory per process, 2 trained steps
    assert ranks[0]["logits"] == ranks[1]["logits"]  # gradients were averaged: one router, not two
    router = CacheRouter.load(tmp_path / "router.safetensors")
    assert router.num_steps == 3 and torch.equal(router.logits, torch.tensor(ranks[0]["logits"]))


def test_accelerate_launch_splits_prompts_across_two_cpu_processes_and_writes_each_image_once(pixart_folder,
                                                                                              tmp_path):
    # On the CPU, `accelerate launch --cpu` starts one process whatever --num_processes says (accelerate forms a
    # CPU group only through mpirun); --multi_gpu starts them with torch.distributed.run, and the CLI joins a
    # gloo group when there is no GPU.
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dit_cache.cli",
          "generate", *PROMPTS, "--model", pixart_folder, "--no-cache", "--out", str(tmp_path)])
    expected = {output_stem(prompt, 0) for prompt in PROMPTS}
    assert {path.stem for path in tmp_path.glob("*.png")} == expected
    assert {path.stem for path in tmp_path.glob("*.json")} == expected and len(list(tmp_path.iterdir())) == 6
    made_by = {json.loads((tmp_path / f"{stem}.json").read_text())["prompt"]:
               json.loads((tmp_path / f"{stem}.json").read_text())["process"] for stem in expected}
    assert made_by == {"a red circle": 0, "a blue square": 0, "a cat": 1}  # split, not each process doing all
