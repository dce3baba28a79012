"""Multi-Concept T2I-Zero inside a PixArt pipeline call: corrected prompt embeddings + Cross-Token NMS."""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

import torch

from dit_cache.concepts import (apply_cross_token_nms, check_fraction, concept_token_groups, correct_by_similarities,
                                remove_cross_token_nms)


def _setting(default, help: str):
    """A config field with its help text: ``dit-cache generate`` turns each field into a flag with this help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MultiConceptConfig:
    """Parameters of the two training-free fixes; ``correction_alpha=0`` and ``nms=False`` turn them off.

    Each field's help is in its metadata (``dataclasses.fields(MultiConceptConfig)``).
    """

    correction_alpha: float = _setting(0.25, "strength of Correction by Similarities (0 = off)")
    correction_threshold: float = _setting(0.5, "tau, similarity threshold after normalising by the maximum")
    correction_window: int = _setting(2, "gamma, how many tokens on each side of a concept may contribute")
    nms: bool = _setting(True, "apply Cross-Token Non-Maximum Suppression in every cross-attention")
    nms_suppression: float = _setting(0.0, "scale of the losing concepts' attention (0 = the paper's hard "
                                           "suppression)")
    nms_step_fraction: float = _setting(0.5, "NMS runs for this fraction of the first denoising steps")
    nms_renormalize: bool = _setting(True, "rescale attention rows to sum to 1 after suppression")
    nms_blocks: tuple[int, ...] | None = _setting(None, "indices of the transformer blocks whose cross-attention "
                                                        "gets NMS (None = every block)")

    def __post_init__(self):
        # Checked here, so a bad value fails when the config is built rather than midway through a call.
        for name in ("correction_alpha", "nms_suppression", "nms_step_fraction"):
            check_fraction(name, getattr(self, name))
        if not math.isfinite(self.correction_threshold):  # NaN compares False: no token would ever be corrected
            raise ValueError(f"correction_threshold (tau) must be a finite number, got {self.correction_threshold}")
        if self.correction_window < 0:
            raise ValueError(f"correction_window (gamma) must be >= 0, got {self.correction_window}")
        if self.nms_blocks is not None:
            if not self.nms_blocks or not all(isinstance(b, int) and b >= 0 for b in self.nms_blocks):
                raise ValueError(f"nms_blocks must be a non-empty tuple of block indices >= 0 (or None for every "
                                 f"block), got {self.nms_blocks!r}")
            object.__setattr__(self, "nms_blocks", tuple(self.nms_blocks))  # a list from a config file


def concept_positions(pipe, prompt, concepts, clean_caption: bool = True) -> list[list[list[int]]]:
    """The token positions of each concept in each prompt as the pipeline's text encoder reads it.

    ``concepts`` is one list of words or phrases for every prompt, or one such list per prompt. PixArt pipelines
    lowercase every prompt (and with ``clean_caption`` and its packages, clean it) before tokenizing, so positions
    are taken from that text: in the raw "A Red Circle" they would point elsewhere.
    """
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("concepts= needs text prompts (prompt='a cat and a dog'), not prompt embeddings.")
    if all(isinstance(c, str) for c in concepts):
        per_prompt = [list(concepts)] * len(prompts)
    elif all(isinstance(c, (list, tuple)) and c and all(isinstance(w, str) for w in c) for c in concepts):
        if len(concepts) != len(prompts):
            raise ValueError(f"concepts= has {len(concepts)} lists for {len(prompts)} prompts; pass one list of "
                             "concept words per prompt, or one list for all of them")
        per_prompt = [list(c) for c in concepts]
    else:
        raise ValueError(f"concepts= takes words or phrases (['cat', 'dog']) or one non-empty list of them per "
                         f"prompt ([['cat', 'dog'], ['red car', 'bike']]); got {concepts!r}")
    prompts = pipe._text_preprocessing(prompts, clean_caption=clean_caption)
    return [concept_token_groups(pipe.tokenizer, p, words) for p, words in zip(prompts, per_prompt)]


def multi_concept_call(pipe, call, concepts, config: MultiConceptConfig):
    """Wrap ``call`` (the pipeline's stock ``__call__``) so it runs with both fixes."""
    if not all(hasattr(pipe, name) for name in ("encode_prompt", "tokenizer", "_text_preprocessing")):
        raise TypeError(f"concepts= needs a text-to-image pipeline with cross-attention, not {type(pipe).__name__}.")

    @functools.wraps(call)
    def wrapped(*args, **kwargs):
        signature = inspect.signature(call)
        kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)

        def argument(name):
            return kwargs.get(name, signature.parameters[name].default)

        clean_caption = argument("clean_caption")
        per_prompt = concept_positions(pipe, kwargs.get("prompt"), concepts, clean_caption)
        # encode_prompt repeats each prompt's embeddings num_images_per_prompt times in a row
        per_image = [groups for groups in per_prompt for _ in range(argument("num_images_per_prompt"))]
        shared = all(groups == per_image[0] for groups in per_image)
        guidance = argument("guidance_scale")
        with torch.no_grad():  # as the stock call encodes: same preprocessing of prompt and negative prompt
            embeds, mask, negative, negative_mask = pipe.encode_prompt(
                kwargs.get("prompt"), do_classifier_free_guidance=guidance > 1.0,
                negative_prompt=argument("negative_prompt"), num_images_per_prompt=argument("num_images_per_prompt"),
                device=pipe._execution_device, clean_caption=clean_caption,
                max_sequence_length=argument("max_sequence_length"),
            )
        if config.correction_alpha > 0:
            indices = [[t for group in groups for t in group] for groups in per_image]
            embeds = correct_by_similarities(embeds, mask, indices, tau=config.correction_threshold,
                                             gamma=config.correction_window, alpha=config.correction_alpha)
        kwargs.update(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                      negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
        if not config.nms:
            return call(**kwargs)
        transformer = pipe.transformer
        processors = apply_cross_token_nms(
            transformer, per_image[0] if shared else per_image, 1, 1, per_sample=not shared,
            suppression=config.nms_suppression, renormalize=config.nms_renormalize,
            step_fraction=config.nms_step_fraction, cfg_batch=guidance > 1.0, blocks=config.nms_blocks,
        )
        num_steps = argument("num_inference_steps")
        step = {"index": 0}

        def before_step(module, module_args, module_kwargs):
            latents = module_kwargs.get("hidden_states", module_args[0] if module_args else None)
            patch = transformer.config.patch_size
            for processor in processors:
                processor.height, processor.width = latents.shape[-2] // patch, latents.shape[-1] // patch
                processor.set_step(step["index"], num_steps)
            step["index"] += 1

        hook = transformer.register_forward_pre_hook(before_step, with_kwargs=True)
        try:
            return call(**kwargs)
        finally:
            hook.remove()
            remove_cross_token_nms(transformer)

    return wrapped
