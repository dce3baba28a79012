"""Concept accuracy of the embedded model, scored by the exact detector; optionally writes the figures into the
model's provenance.json.

    python experiments/evaluate_embedded_model.py             # 200 one-object + 200 two-object prompts
    python experiments/evaluate_embedded_model.py --guidance_scales "[3.0, 4.5, 6.0]"

The shipped figures (provenance.json of the embedded model, docs/images/embedded_model_grid.png) came from

    OMP_NUM_THREADS=1 python experiments/evaluate_embedded_model.py --write_provenance true \
        --grid_path docs/images/embedded_model_grid.png
"""

import json
import shlex
import sys
from pathlib import Path

from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

from dit_cache import EMBEDDED_GUIDANCE_SCALE, embedded_model_path
from dit_cache.toy.evaluation import generate, grid, prompt_set
from dit_cache.toy.shapes import concept_accuracy


def main(model: str | None = None, count: int = 200, steps: int = 20,
         guidance_scales: list[float] = [EMBEDDED_GUIDANCE_SCALE],
         seed: int = 10_000,
         write_provenance: bool = False, grid_path: str = "outputs/embedded_model_grid.png"):
    """Args:
        model: a pipeline folder or hub id (default: the embedded model).
        count: prompts per set (one-object and two-object), each with its own seed.
        steps: DPM-Solver steps.
        guidance_scales: guidance scales to evaluate; the first is recorded as the model's default.
        write_provenance: record the figures in the model folder's provenance.json (for the embedded model a
            tracked file, hence off by default).
        grid_path: where to save a grid of 8 one-object and 8 two-object images ("" for none).
    """
    model = model or embedded_model_path()
    pipe = PixArtAlphaPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    single, double = prompt_set(1, count, seed), prompt_set(2, count, seed + 1)
    seeds = list(range(seed, seed + count))
    results = {}
    for guidance in guidance_scales:
        call = {"num_inference_steps": steps, "guidance_scale": guidance}
        one = generate(pipe, single, seeds, desc=f"one object, cfg {guidance}", **call)
        two = generate(pipe, double, seeds, desc=f"two objects, cfg {guidance}", **call)
        results[guidance] = {
            "single_object_concept_accuracy": concept_accuracy(one.images, single),
            "two_object_both_present_rate": concept_accuracy(two.images, double),
            "seconds_per_image": (one.seconds + two.seconds) / (2 * count),
        }
        print(f"cfg {guidance}: {json.dumps(results[guidance])}")
        if guidance == guidance_scales[0] and grid_path:
            picks = list(range(8))
            images = [one.images[i] for i in picks] + [two.images[i] for i in picks]
            Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
            grid(images, [single[i] for i in picks] + [double[i] for i in picks]).save(grid_path)
    path = Path(model) / "provenance.json"
    if write_provenance and not path.exists():
        print(f"{model} has no local provenance.json; the figures above are not written anywhere")
    elif write_provenance:
        provenance = json.loads(path.read_text())
        provenance["evaluation"] = {
            "command": shlex.join(["python", *sys.argv]),
            "steps": steps, "prompts_per_set": count, "scheduler": "DPMSolverMultistepScheduler",
            "default_guidance_scale": guidance_scales[0],
            "results_by_guidance_scale": {str(k): v for k, v in results.items()},
        }
        path.write_text(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    CLI(main, as_positional=False)
