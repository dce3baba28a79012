"""What one model family is: the ``ModelFamily`` record, and looking a family up.

One record per diffusers transformer class holds every fact the engine, the pipelines, router training and the
benchmark need about the family; none of them keeps a table of its own. Adding a family is one record in
:mod:`dit_cache.families.registry` plus, where its blocks or inputs are unusual, a small function next to it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch


class CFGLayout(enum.Enum):
    """How the family's pipeline runs classifier-free guidance in one denoising step."""

    UNCONDITIONAL_FIRST = "one call on the batch [unconditional, conditional]"
    CONDITIONAL_FIRST = "one call on the batch [conditional, unconditional]"
    SEPARATE_CALLS = "two calls, in transformer.cache_context('cond') and ('uncond')"
    NONE = "one conditional call (guidance-distilled, or no CFG)"

    @property
    def conditional_half(self) -> int | None:
        """Which half of the model batch is conditional: what CFG_SHARE computes. None: no CFG batch."""
        return {CFGLayout.UNCONDITIONAL_FIRST: 1, CFGLayout.CONDITIONAL_FIRST: 0}.get(self)

    @property
    def batch(self) -> int:
        """Model batch per image of one transformer call."""
        return 2 if self.conditional_half is not None else 1

    @property
    def calls_per_step(self) -> int:
        return 2 if self is CFGLayout.SEPARATE_CALLS else 1


@dataclass(frozen=True)
class Branch:
    """A cacheable branch of a block: its attribute, and how many tensors it returns (joint attention: 2)."""

    name: str
    outputs: int = 1


@dataclass(frozen=True)
class SecondCall:
    """A pipeline option that adds a transformer call per step the cache cannot follow: refused while cached."""

    keyword: str
    is_on: Callable[[dict], bool]  # the call's keyword arguments -> does this call make the extra call?
    fix: str
    # What the option does that the cache cannot follow (the refusal's wording; another batch per step, too).
    effect: str = "call the transformer twice per denoising step, but cache plans and routers count one call per step"


def _identity_timestep(t: torch.Tensor, config) -> torch.Tensor:
    return t


def classifier_free_guidance(conditional, unconditional, scale):
    return unconditional + scale * (conditional - unconditional)


@dataclass(frozen=True)
class ModelFamily:
    """Every per-family fact, for one diffusers transformer class.

    Units: ``block_lists`` are the transformer's attributes holding its blocks, in execution order;
    ``branches`` maps a block class name to its cacheable branches in execution order (a branch that is None in
    a block, e.g. SD3's last ``ff_context``, is not a unit). Step inputs: ``step_inputs(config, batch,
    text_tokens, generator, size)`` builds one random step (tests, FLOP counts, benchmarks); ``timestep(t,
    config)`` maps a scheduler timestep in [0, 1000] to what the pipeline passes the transformer. Router
    training: ``encode(pipe, prompts, max_sequence_length)`` -> named tensors, ``conditioning(rows,
    transformer)`` -> forward kwargs of one call, ``extra_inputs(transformer, latents, guidance_scale)`` ->
    the inputs that depend on the latents' shape. Pipelines: ``pipelines`` are the diffusers classes that front
    the transformer; ``second_calls`` their options the cache refuses; ``concepts_refusal`` why ``concepts=``
    cannot apply (empty: it can). ``timestep_argument``: the forward's name for the timestep (Z-Image: ``t``).
    ``unnamed_cfg_calls(argument)``: for a pipeline that runs CFG as two transformer calls per step without naming
    them in ``cache_context`` (Chroma), whether a call does, from its arguments (``argument(name)`` -> the value
    given or the default); the cache then names the calls itself, "cond" then "uncond", as the pipeline orders them.
    ``replays`` maps a block class name to its replay (:mod:`dit_cache.families.replays`): the block's output from
    its input and its units' outputs, taken on steps where none of its units computes; a block without one runs
    its forward then (its norms and modulation included), which is exact too, only slower.
    """

    name: str
    transformer: str
    block_lists: tuple[str, ...]
    branches: Mapping[str, tuple[Branch, ...]]
    step_inputs: Callable
    cfg: CFGLayout
    timestep: Callable = _identity_timestep
    timestep_dtype: torch.dtype = torch.long
    text_tokens: int = 120  # the real model's usual caption length (FLOP counts)
    sample_size: int | None = None  # default latent side when the config has none
    latent_layout: str = "image"  # "image" [B, C, H, W]; "packed" [B, H*W, C] tokens; "video" [B, C, F, H, W]
    pipelines: tuple[str, ...] = ()
    second_calls: tuple[SecondCall, ...] = ()
    concepts_refusal: str = ""
    check_pipeline: Callable | None = None  # pipe -> why it cannot run cached ("" or None: it can)
    encode: Callable | None = None
    conditioning: Callable | None = None
    extra_inputs: Callable | None = None
    guide: Callable = classifier_free_guidance  # (conditional, unconditional, scale) -> the guided prediction
    bench_inputs: str = "prompts"  # "prompts", "captions" (PixArt: clean_caption) or "class_labels"
    concept_scored: bool = False  # the exact shape detector can score its images (the embedded model's world)
    notes: str = ""
    timestep_argument: str = "timestep"
    unnamed_cfg_calls: Callable | None = None
    aliases: tuple[str, ...] = field(default=())  # model names users know it by (README's table)
    replays: Mapping[str, Callable] = field(default_factory=dict)
    fold: object | None = None  # the step fold of its blocks (dit_cache.fold), where their gates allow one
    # Modules (fnmatch patterns of their names under the transformer) whose one input is the same tensor at every
    # step of a generation, computed once per generation (dit_cache.step_invariant; a wrong name costs nothing).
    step_invariant: tuple[str, ...] = ()
    # Modules (fnmatch patterns) whose outputs follow from the values of their inputs alone (the timestep, fixed
    # micro-conditions): kept by those values across generations (dit_cache.timestep_memo; a wrong name costs
    # a comparison).
    timestep_embedder: tuple[str, ...] = ()

    def branches_of(self, block: torch.nn.Module) -> tuple[Branch, ...] | None:
        for cls in type(block).__mro__:
            if cls.__name__ in self.branches:
                return self.branches[cls.__name__]
        return None

    def replay_of(self, block: torch.nn.Module) -> Callable | None:
        for cls in type(block).__mro__:
            if cls.__name__ in self.replays:
                return self.replays[cls.__name__]
        return None

    def timesteps(self, t: float, batch: int, config) -> torch.Tensor:
        """What the pipeline passes the transformer at scheduler timestep ``t`` for a model batch of ``batch``."""
        return self.timestep(torch.full((batch,), t, dtype=self.timestep_dtype), config)

    @property
    def supports_training(self) -> bool:
        """Router training can reproduce the pipeline's step (its conditioning is described)."""
        return self.conditioning is not None


class FamilyRegistry:
    """The records by transformer class name, and their lookups from a model or a pipeline."""

    def __init__(self, families: list[ModelFamily]):
        self._by_transformer: dict[str, ModelFamily] = {}
        self._by_name: dict[str, ModelFamily] = {}
        self._by_pipeline: dict[str, ModelFamily] = {}
        for family in families:
            for table, key in ((self._by_transformer, family.transformer), (self._by_name, family.name),
                               *((self._by_pipeline, p) for p in family.pipelines)):
                if key in table:
                    raise ValueError(f"Two model families claim {key!r}: {table[key].name} and {family.name}.")
                table[key] = family

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def named(self, name: str) -> ModelFamily:
        if name not in self._by_name:
            raise KeyError(f"No model family {name!r}; known: {', '.join(self._by_name)}.")
        return self._by_name[name]

    def of_transformer(self, transformer) -> ModelFamily:
        """The family of a transformer (a model, a ``torch.compile`` wrapper of one, or a class name)."""
        if isinstance(transformer, str):
            names = [transformer]
        else:
            model = getattr(transformer, "_orig_mod", transformer)
            names = [cls.__name__ for cls in type(model).__mro__]
        for name in names:
            if name in self._by_transformer:
                return self._by_transformer[name]
        raise TypeError(f"dit-cache does not support {names[0]}. Supported transformers: "
                        f"{', '.join(sorted(self._by_transformer))}. Adding one is one ModelFamily record in "
                        "dit_cache/families/registry.py (docs/adding_a_family.md).")

    def of_pipeline(self, pipe) -> ModelFamily:
        """The family of a pipeline: its class (or a diffusers base class) when registered, else its
        transformer's."""
        for cls in type(pipe).__mro__:
            if cls.__name__ in self._by_pipeline:
                return self._by_pipeline[cls.__name__]
        if not hasattr(pipe, "transformer"):
            raise TypeError(f"{type(pipe).__name__} has no transformer: dit-cache accelerates DiT-style pipelines.")
        return self.of_transformer(pipe.transformer)

    def pipeline_classes(self) -> dict[str, ModelFamily]:
        return dict(self._by_pipeline)
