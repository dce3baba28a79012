"""Router, plan (with LINEAR forecaster weights) and schedule files are checked as a whole when loaded: a damaged
file is refused in one line naming the file, the field and the fix, never accepted with arbitrary results."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from dit_cache import CachePlan, CacheRouter, CacheSchedule
from dit_cache.plan import Action

STEPS, UNITS = 4, 3
ROUTER = {"format": "dit-cache/router"}


def _router_tensors(**changes):
    tensors = {"logits": torch.zeros(STEPS, UNITS), "fixed_rows": torch.tensor([1, 0, 0, 0], dtype=torch.uint8),
               "cheap_actions": torch.full((STEPS, UNITS), int(Action.REUSE), dtype=torch.int8),
               "unit_flops": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    tensors.update(changes)
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def _save_router(path, tensors=None, **metadata):
    header = {**ROUTER, **{key: json.dumps(value) for key, value in metadata.items()}}
    save_file(tensors or _router_tensors(), str(path), metadata=header)
    return path


# Each: (tensors, metadata, the field named, what today's code did with it).
DAMAGED_ROUTERS = {
    "unit_flops_inf": (_router_tensors(unit_flops=torch.tensor([1.0, float("inf"), 3.0], dtype=torch.float64)),
                       {"flops_range": [0.0, 0.5]}, "tensor 'unit_flops' holds NaN or infinite", "accepted"),
    "unit_flops_2d": (_router_tensors(unit_flops=torch.ones(1, UNITS, dtype=torch.float64)), {},
                      r"tensor 'unit_flops' has shape \(1, 3\), shape \(3,\) expected", "no file named"),
    "logits_int": (_router_tensors(logits=torch.zeros(STEPS, UNITS, dtype=torch.int32)), {},
                   "tensor 'logits' has dtype torch.int32, a floating-point", "accepted"),
    "logits_3d": (_router_tensors(logits=torch.zeros(STEPS, UNITS, 1)), {},
                  r"tensor 'logits' has shape \(4, 3, 1\)", "blamed fixed_rows"),
    "fixed_rows_two": (_router_tensors(fixed_rows=torch.tensor([1, 2, 0, 0], dtype=torch.uint8)), {},
                       "tensor 'fixed_rows' holds values other than 0 and 1", "accepted"),
    "unknown_tensor": (_router_tensors(extra=torch.zeros(2)), {}, "tensor 'extra' is not part of the format",
                       "ignored"),
    "range_nan": (None, {"flops_range": [float("nan"), 0.5]}, "metadata 'flops_range' is", "every budget refused"),
    "range_text": (None, {"flops_range": "0-0.5"}, "metadata 'flops_range' is '0-0.5'", "traceback"),
    "range_reversed": (None, {"flops_range": [0.6, 0.2]}, "metadata 'flops_range' is", "every budget refused"),
    "range_without_flops": (_router_tensors(unit_flops=None), {"flops_range": [0.0, 0.5]},
                            "metadata 'flops_range' needs the tensor 'unit_flops'", "said 'serves one budget'"),
    "threshold_text": (None, {"threshold": "0.5"}, "metadata 'threshold' is '0.5', a number", "accepted"),
    "guidance_list": (None, {"guidance_scale": [2.0]}, r"metadata 'guidance_scale' is \[2.0\], a number",
                      "accepted"),
    "guidance_inf": (None, {"guidance_scale": float("inf")}, "metadata 'guidance_scale' is inf", "accepted"),
    "layout_number": (None, {"unit_layout": 5}, "metadata 'unit_layout' is 5, a string", "'trained for 5'"),
    "steps_mismatch": (None, {"num_steps": 20}, "metadata 'num_steps' is 20 but the logits have 4 rows",
                       "accepted"),
    "steps_float": (None, {"num_steps": 4.5}, "metadata 'num_steps' is 4.5, a whole number", "accepted"),
}


@pytest.mark.parametrize("name", DAMAGED_ROUTERS)
def test_a_damaged_router_file_is_refused_naming_the_file_and_the_field(tmp_path, name):
    tensors, metadata, field, _today = DAMAGED_ROUTERS[name]
    path = _save_router(tmp_path / f"{name}.safetensors", tensors, **metadata)
    with pytest.raises(ValueError) as error:
        CacheRouter.load(path)
    message = str(error.value)
    assert message.startswith(f"{path} is a damaged router: ") and "\n" not in message
    assert re.search(field, message), message
    assert re.search(r"; (re-save|retrain|re-export|upgrade)", message), message  # the fix follows the problem


def test_a_valid_router_file_with_every_part_loads_unchanged(tmp_path):
    path = _save_router(tmp_path / "ok.safetensors", flops_range=[0.0, 0.5], guidance_scale=2.0, num_steps=STEPS)
    router = CacheRouter.load(path)
    assert router.flops_range == (0.0, 0.5) and router.metadata["guidance_scale"] == 2.0
    assert torch.equal(router.unit_flops, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def _plan_file(path, tensors, kind="dit-cache/plan"):
    save_file(tensors, str(path), metadata={"format": kind})
    return path


@pytest.mark.parametrize("tensors, field", [
    ({"actions": torch.zeros(3, 2)}, "tensor 'actions' has dtype torch.float32, an integer"),
    ({"actions": torch.zeros(3, 2, 1, dtype=torch.int8)}, r"tensor 'actions' has shape \(3, 2, 1\)"),
    ({"actions": torch.full((3, 2), int(Action.LINEAR), dtype=torch.int8).index_fill_(0, torch.tensor([0]), 0),
      "linear_weights": torch.full((3, 2, 1), float("nan"))}, "tensor 'linear_weights' holds NaN or infinite"),
    ({"actions": torch.zeros(3, 2, dtype=torch.int8), "linear_weights": torch.ones(3, 5, 1)},
     r"tensor 'linear_weights' has shape \(3, 5, 1\), shape \(3, 2, any\)"),
    ({"actions": torch.zeros(3, 2, dtype=torch.int8), "notes": torch.zeros(1)}, "tensor 'notes' is not part"),
    ({"actions": torch.full((3, 2), 9, dtype=torch.int8)}, r"Unknown action code\(s\) \[9\]"),
])
def test_a_damaged_plan_file_is_refused_naming_the_file(tmp_path, tensors, field):
    path = _plan_file(tmp_path / "plan.safetensors", tensors)
    with pytest.raises(ValueError, match=f"^{path} is a damaged plan: .*{field}"):
        CachePlan.load(path)


@pytest.mark.parametrize("tensors, field", [
    ({"mask": torch.tensor([[1, 1], [2, 0]], dtype=torch.uint8)}, "tensor 'mask' holds values other than 0 and 1"),
    ({"mask": torch.ones(3, dtype=torch.uint8)}, r"tensor 'mask' has shape \(3,\)"),
])
def test_a_damaged_schedule_file_is_refused_naming_the_file(tmp_path, tensors, field):
    path = _plan_file(tmp_path / "schedule.safetensors", tensors, kind="dit-cache/schedule")
    for load, kind in ((CacheSchedule.load, "schedule"), (CachePlan.load, "schedule")):
        with pytest.raises(ValueError, match=f"^{path} is a damaged {kind}: {field}"):
            load(path)


def test_a_schedule_file_without_its_mask_or_missing_is_refused_in_words(tmp_path):
    path = _plan_file(tmp_path / "empty.safetensors", {"other": torch.ones(2, 2)}, kind="dit-cache/schedule")
    with pytest.raises(ValueError, match="is not a dit-cache schedule: it has no mask tensor"):
        CacheSchedule.load(path)
    with pytest.raises(FileNotFoundError, match="No schedule file at .*nothing"):
        CacheSchedule.load(tmp_path / "nothing.safetensors")


def test_plan_and_schedule_files_written_by_save_load_back_equal(tmp_path):
    plan = CachePlan.linear(5, 2, interval=2, order=2)
    plan.save(tmp_path / "plan.safetensors")
    assert CachePlan.load(tmp_path / "plan.safetensors") == plan
    schedule = CacheSchedule.uniform(5, 2, interval=2)
    schedule.save(tmp_path / "schedule.safetensors")
    assert CacheSchedule.load(tmp_path / "schedule.safetensors") == schedule
    assert CachePlan.load(tmp_path / "schedule.safetensors") == CachePlan.from_schedule(schedule)
