import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, PixArtAlphaPipeline

import dit_cache
from dit_cache import CacheRouter, CacheSchedule, cache_units
from dit_cache.pipelines import AcceleratedDiTPipeline, AcceleratedPixArtAlphaPipeline, accelerate, decelerate
from dit_cache.testing import tiny_dit_pipeline, tiny_pixart_pipeline
from dit_cache.units import unit_layout

STEPS = 6
PIXART_CALL = dict(num_inference_steps=STEPS, output_type="np")


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def pixart():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _router(pipe, steps=STEPS, scheduler="DPMSolverMultistepScheduler", cache_everything_after=2):
    units = len(cache_units(pipe.transformer))
    router = CacheRouter(steps, units, metadata={"unit_layout": unit_layout(pipe.transformer),
                                                  "scheduler_class": scheduler})
    with torch.no_grad():  # compute on the first steps, reuse afterwards: a real, non-trivial schedule
        router.logits.fill_(-5.0)
        router.logits[:cache_everything_after] = 5.0
        router.logits[:, 0] = 5.0
    return router


def test_from_pipe_and_accelerate_give_identical_images(pixart):
    stock = pixart("a red circle", generator=_generator(), **PIXART_CALL).images
    router = _router(pixart)
    accelerated = AcceleratedPixArtAlphaPipeline.from_pipe(pixart, router=router)
    from_pipe = accelerated("a red circle", generator=_generator(), **PIXART_CALL).images
    # The stock pipeline shares the transformer but keeps running uncached.
    assert np.array_equal(pixart("a red circle", generator=_generator(), **PIXART_CALL).images, stock)
    assert accelerated.cache_stats.reused > 0 and not np.array_equal(from_pipe, stock)
    in_place = accelerate(tiny_pixart_pipeline(), router=router)
    in_place.set_progress_bar_config(disable=True)
    assert np.array_equal(in_place("a red circle", generator=_generator(), **PIXART_CALL).images, from_pipe)


def test_cache_false_and_no_cache_schedule_match_the_stock_pipeline(pixart):
    stock = pixart("a blue square", generator=_generator(1), **PIXART_CALL).images
    accelerate(pixart, router=_router(pixart))
    uncached = pixart("a blue square", generator=_generator(1), cache=False, **PIXART_CALL).images
    assert np.array_equal(uncached, stock) and pixart.cache_stats is None
    decelerate(pixart)
    accelerate(pixart, schedule=CacheSchedule.full(STEPS, len(cache_units(pixart.transformer))))
    assert np.array_equal(pixart("a blue square", generator=_generator(1), **PIXART_CALL).images, stock)
    assert pixart.cache_stats.reused == 0
    decelerate(pixart)
    assert type(pixart) is PixArtAlphaPipeline and dit_cache.get_cache_handle(pixart.transformer) is None


def test_cache_stats_reset_every_call(pixart):
    router = _router(pixart)
    accelerate(pixart, router=router)
    for _ in range(2):
        pixart("a red circle", generator=_generator(), **PIXART_CALL)
        stats = pixart.cache_stats
        assert stats.steps == STEPS
        assert stats.reused == int((~router.schedule().mask).sum())
        assert stats.cache_ratio == pytest.approx(router.schedule().cache_ratio)
        assert stats.cache_bytes > 0
    assert pixart.transformer._dit_cache_handle.cache_bytes == 0  # freed between calls


@pytest.mark.parametrize("kwargs", [
    dict(num_images_per_prompt=2),
    dict(prompt=["a red circle", "a green triangle"]),
    dict(generator=[_generator(0), _generator(1)], num_images_per_prompt=2),
    dict(output_type="latent"),
    dict(output_type="pil"),
])
def test_batches_generators_and_output_types(pixart, kwargs):
    accelerate(pixart, router=_router(pixart))
    call = {"prompt": "a red circle", "num_inference_steps": STEPS, "output_type": "np", **kwargs}
    images = pixart(**call).images
    expected = 2 if (call.get("num_images_per_prompt", 1) == 2 or isinstance(call["prompt"], list)) else 1
    assert len(images) == expected
    assert pixart.cache_stats.reused > 0


def test_batch_rows_match_single_generations(pixart):
    accelerate(pixart, router=_router(pixart))
    batch = pixart(["a red circle", "a blue square"], generator=[_generator(0), _generator(1)], **PIXART_CALL).images
    single = pixart("a blue square", generator=_generator(1), **PIXART_CALL).images
    np.testing.assert_allclose(batch[1], single[0], atol=2e-3)


def test_a_call_that_raises_midway_frees_the_cache_and_the_next_call_is_unaffected(pixart):
    accelerate(pixart, router=_router(pixart))
    expected = pixart("a red circle", generator=_generator(), **PIXART_CALL).images

    def fail_at_step_3(step, timestep, latents):  # PixArt-alpha's callback runs after each step
        if step == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        pixart("a red circle", generator=_generator(), callback=fail_at_step_3, **PIXART_CALL)
    handle = dit_cache.get_cache_handle(pixart.transformer)
    assert handle.cache_bytes == 0 and pixart.cache_stats.steps == 4
    assert np.array_equal(pixart("a red circle", generator=_generator(), **PIXART_CALL).images, expected)


def test_a_scheduler_with_two_model_calls_per_step_is_refused_before_generating(pixart):
    from diffusers import HeunDiscreteScheduler

    accelerate(pixart, router=_router(pixart))
    pixart.scheduler = HeunDiscreteScheduler.from_config(pixart.scheduler.config)
    calls = []
    hook = pixart.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="HeunDiscreteScheduler calls the transformer 2 times per step"):
        pixart("a red circle", **PIXART_CALL)
    hook.remove()
    assert not calls  # refused before the first step
    assert pixart("a red circle", generator=_generator(), cache=False, **PIXART_CALL).images.shape[0] == 1


def test_router_for_another_model_is_rejected_and_nothing_applied(pixart):
    other = tiny_pixart_pipeline(num_layers=3)
    router = _router(other)
    with pytest.raises(ValueError, match="trained for PixArtTransformer2DModel:3x.*PixArtTransformer2DModel:2x"):
        accelerate(pixart, router=router)
    assert type(pixart) is PixArtAlphaPipeline and dit_cache.get_cache_handle(pixart.transformer) is None


def test_step_count_mismatch_names_the_fix(pixart):
    accelerate(pixart, router=_router(pixart))
    with pytest.raises(ValueError, match=r"6 denoising steps but 4 .*resample\(4\)"):
        pixart("a red circle", num_inference_steps=4)
    resampled = AcceleratedPixArtAlphaPipeline.from_pipe(pixart, router=_router(pixart).resample(4))
    resampled.set_progress_bar_config(disable=True)
    resampled("a red circle", num_inference_steps=4, output_type="latent")
    assert resampled.cache_stats.steps == 4


def test_a_file_that_is_not_a_router_is_refused(pixart, tmp_path):
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, tmp_path / "weights.safetensors")
    (tmp_path / "notes.txt").write_text("not a router")
    for path in (tmp_path / "weights.safetensors", tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match="not a dit-cache router"):
            accelerate(pixart, router=path)
    with pytest.raises(FileNotFoundError):
        accelerate(pixart, router=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="exactly one of router= .* or schedule="):
        accelerate(pixart)
    assert type(pixart) is PixArtAlphaPipeline


def test_a_router_trained_with_another_scheduler_warns(pixart):
    with pytest.warns(UserWarning, match="trained with DDIMScheduler"):
        accelerate(pixart, router=_router(pixart, scheduler="DDIMScheduler"))


def test_an_accelerated_pipeline_saves_as_the_stock_one(tmp_path, pixart):
    from diffusers import DiffusionPipeline

    accelerate(pixart, router=_router(pixart))
    pixart.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "model")) is PixArtAlphaPipeline


def test_saved_router_round_trips_through_from_pretrained(tmp_path):
    pipe = tiny_pixart_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    router = _router(pipe)
    router.save(tmp_path / "router.safetensors")
    loaded = AcceleratedPixArtAlphaPipeline.from_pretrained(tmp_path / "model", router=tmp_path / "router.safetensors")
    loaded.set_progress_bar_config(disable=True)
    loaded("a red circle", **PIXART_CALL)
    assert loaded.cache_stats.cache_ratio == pytest.approx(router.schedule().cache_ratio)
    plain = AcceleratedPixArtAlphaPipeline.from_pretrained(tmp_path / "model")
    plain.set_progress_bar_config(disable=True)
    plain("a red circle", **PIXART_CALL)
    assert plain.cache_stats is None


def test_dit_pipeline_with_cache():
    stock = tiny_dit_pipeline()
    stock.set_progress_bar_config(disable=True)
    expected = stock(class_labels=[0, 1], num_inference_steps=STEPS, generator=_generator(), output_type="np").images
    schedule = CacheSchedule.uniform(STEPS, len(cache_units(stock.transformer)), interval=2)
    accelerated = AcceleratedDiTPipeline.from_pipe(stock, schedule=schedule)
    cached = accelerated(class_labels=[0, 1], num_inference_steps=STEPS, generator=_generator(), output_type="np")
    assert accelerated.cache_stats.cache_ratio == pytest.approx(schedule.cache_ratio)
    assert np.isfinite(cached.images).all() and not np.array_equal(cached.images, expected)
    uncached = accelerated(class_labels=[0, 1], num_inference_steps=STEPS, generator=_generator(), output_type="np",
                           cache=False)
    assert np.array_equal(uncached.images, expected)


def test_concepts_with_everything_off_reproduce_the_baseline(pixart):
    from dit_cache.pipelines import MultiConceptConfig

    accelerate(pixart, router=_router(pixart))
    prompt = "a red circle and a blue square"
    baseline = pixart(prompt, generator=_generator(), **PIXART_CALL).images
    off = MultiConceptConfig(correction_alpha=0.0, nms=False)
    same = pixart(prompt, generator=_generator(), concepts=["circle", "square"], concept_config=off, **PIXART_CALL)
    assert np.array_equal(same.images, baseline)
    on = pixart(prompt, generator=_generator(), concepts=["circle", "square"], **PIXART_CALL).images
    assert not np.array_equal(on, baseline)
    with pytest.raises(ValueError, match="'dog'"):
        pixart(prompt, concepts=["dog"], **PIXART_CALL)
    # Phrases are one NMS concept each, not four competing words.
    nms_only = MultiConceptConfig(correction_alpha=0.0)
    phrases = pixart(prompt, generator=_generator(), concepts=["red circle", "blue square"], concept_config=nms_only,
                     **PIXART_CALL).images
    words = pixart(prompt, generator=_generator(), concepts=["red", "circle", "blue", "square"],
                   concept_config=nms_only, **PIXART_CALL).images
    assert not np.array_equal(phrases, words) and not np.array_equal(phrases, baseline)
    with pytest.raises(ValueError, match="overlap"):
        pixart(prompt, concepts=["red circle", "circle"], **PIXART_CALL)
    # The NMS processors are gone after the call.
    assert all(type(b.attn2.processor).__name__ == "AttnProcessor2_0" for b in pixart.transformer.transformer_blocks)


def test_concepts_are_found_in_the_prompt_the_text_encoder_reads(pixart):
    # PixArt lowercases prompts before tokenizing; positions taken from the raw text would point elsewhere.
    accelerate(pixart, router=_router(pixart))
    concepts = ["red circle", "blue square"]
    lower = pixart("a red circle and a blue square", generator=_generator(), concepts=concepts, **PIXART_CALL).images
    mixed = pixart("  A Red CIRCLE and a Blue square", generator=_generator(), concepts=concepts, **PIXART_CALL).images
    assert np.array_equal(mixed, lower)


def test_a_batch_may_have_its_concepts_at_different_positions(pixart):
    from dit_cache.pipelines import MultiConceptConfig

    accelerate(pixart, router=_router(pixart))
    prompts = ["a red circle and a blue square", "a blue square next to a red circle"]
    concepts = ["red circle", "blue square"]
    batch = pixart(prompts, generator=[_generator(0), _generator(1)], concepts=concepts, **PIXART_CALL).images
    for row, prompt in enumerate(prompts):
        alone = pixart(prompt, generator=_generator(row), concepts=concepts, **PIXART_CALL).images
        np.testing.assert_allclose(batch[row], alone[0], atol=2e-3)
    off = MultiConceptConfig(correction_alpha=0.0, nms=False)
    baseline = pixart(prompts, generator=[_generator(0), _generator(1)], concepts=concepts, concept_config=off,
                      **PIXART_CALL).images
    assert np.abs(batch - baseline).max() > 1e-2  # the fixes acted on both rows of the batch
    assert np.abs(batch[1] - baseline[1]).max() > 1e-2


def test_each_prompt_of_a_batch_may_have_its_own_concepts(pixart):
    accelerate(pixart, router=_router(pixart))
    prompts = ["a red circle and a blue square", "a green triangle and a yellow circle"]
    concepts = [["red circle", "blue square"], ["green triangle", "yellow circle"]]
    batch = pixart(prompts, generator=[_generator(0), _generator(1)], concepts=concepts, **PIXART_CALL).images
    for row, (prompt, words) in enumerate(zip(prompts, concepts)):
        alone = pixart(prompt, generator=_generator(row), concepts=words, **PIXART_CALL).images
        np.testing.assert_allclose(batch[row], alone[0], atol=2e-3)
    with pytest.raises(ValueError, match="one list of concept words per prompt"):
        pixart(prompts, concepts=concepts[:1], **PIXART_CALL)
    with pytest.raises(ValueError, match="one non-empty list of them per prompt"):
        pixart(prompts, concepts=["red circle", ["green triangle"]], **PIXART_CALL)
    with pytest.raises(ValueError, match="'green triangle' is not .* 'a red circle"):  # looked up in its own prompt
        pixart(prompts, concepts=[concepts[1], concepts[0]], **PIXART_CALL)


def test_concepts_with_everything_off_clean_captions_as_the_stock_call(pixart, monkeypatch):
    from dit_cache.pipelines import MultiConceptConfig

    # Stand-ins for beautifulsoup4 + ftfy and PixArt's caption cleaner, so the cleaning path runs here.
    module = type(pixart).__module__
    monkeypatch.setattr(f"{module}.is_bs4_available", lambda: True)
    monkeypatch.setattr(f"{module}.is_ftfy_available", lambda: True)
    monkeypatch.setattr(pixart, "_clean_caption", lambda text: text.lower().replace("blue", "red"), raising=False)
    call = dict(negative_prompt="a BLUE square", clean_caption=True, **PIXART_CALL)
    stock = pixart("a red circle and a blue square", generator=_generator(), **call).images
    accelerate(pixart, router=_router(pixart))
    off = MultiConceptConfig(correction_alpha=0.0, nms=False)
    same = pixart("a red circle and a blue square", generator=_generator(), cache=False, concepts=["circle"],
                  concept_config=off, **call).images
    assert np.array_equal(same, stock)
    with pytest.raises(ValueError, match="'blue'"):  # the cleaned prompt no longer has it
        pixart("a red circle and a blue square", concepts=["blue"], **call)


def test_bfloat16_pipeline_caches_in_its_own_dtype():
    pipe = tiny_pixart_pipeline().to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    accelerate(pipe, router=_router(pipe))
    latents = pipe("a red circle", generator=_generator(), num_inference_steps=STEPS, output_type="latent").images
    assert latents.dtype == torch.bfloat16 and torch.isfinite(latents.float()).all()
    assert pipe.cache_stats.reused > 0
    units = pipe.transformer._dit_cache_handle.units
    assert pipe.cache_stats.cache_bytes == len(units) * 2 * 64 * 16 * 2  # units x CFG batch x tokens x width x 2 B


@pytest.mark.parametrize("bad, message", [
    (dict(correction_alpha=1.5), "correction_alpha must be in"), (dict(nms_suppression=-0.1), "nms_suppression"),
    (dict(nms_step_fraction=2.0), "nms_step_fraction"), (dict(correction_window=-1), "correction_window"),
    (dict(nms_blocks=()), "nms_blocks must be a non-empty"), (dict(nms_blocks=(0, -1)), "nms_blocks"),
])
def test_a_bad_multi_concept_config_fails_when_built(bad, message):
    from dit_cache.pipelines import MultiConceptConfig

    with pytest.raises(ValueError, match=message):
        MultiConceptConfig(**bad)
    assert MultiConceptConfig(nms_blocks=[0, 2]).nms_blocks == (0, 2)  # a list from a config file becomes a tuple
