"""``apply_cache`` / ``remove_cache``: install the cache engine's hooks on a diffusers transformer.

Where a generation's cache lives: each ``with handle.generation(plan):`` block (every accelerated pipeline call
opens one) has a ``CacheState`` of its own, found by the hooks through a context variable, so concurrent calls
through one transformer (threads, ``from_pipe`` siblings) never see each other's cache and a stock pipeline
sharing the transformer sees none. Outside such blocks an engine-level ``apply_cache`` runs on one default state,
which starts a new generation when the timestep goes up again or the plan's last step has run.

Pipelines that run classifier-free guidance as two transformer calls per step (Qwen-Image, Wan, FLUX's true CFG)
name each call with diffusers' ``transformer.cache_context("cond")`` / ``("uncond")``; a generation then keeps
one state per context, so each call follows the plan as the same step with its own history.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import StateManager

from .deprecation import warn_renamed
from .hooks import BLOCK_HOOK, UNIT_HOOK, BlockReplayHook, DenoisingStepHook, UnitCacheHook
from .state import CacheState, PreparedPlan
from .plan import as_plan
from .actions import ACTIONS, BYPASSED, GATED, Action
from .compile import compile_hooks, compile_options
from .families import family_of
from .fold import step_fold
from .step_invariant import install_step_invariant
from .timestep_memo import install_timestep_memo
from .units import CacheUnit, _unwrap, cache_units, replayable_blocks

_HANDLE_ATTRIBUTE = "_dit_cache_handle"

# (handle, states) pairs of the generations open in this thread / task, innermost last.
_ACTIVE_GENERATIONS: ContextVar[tuple] = ContextVar("dit_cache_active_generations", default=())
# The name of the diffusers cache context ("cond", "uncond") the pipeline's current transformer call runs in.
_CALL_CONTEXT: ContextVar[str | None] = ContextVar("dit_cache_call_context", default=None)


class _CallContextListener(StateManager):
    """Hears ``transformer.cache_context(name)``: diffusers hands the context to every stateful hook's
    ``StateManager``; this one only records the name, for this thread, so the hooks pick the call's state."""

    def __init__(self):  # holds no per-context state of its own
        self._context = None

    def set_context(self, context) -> None:
        _CALL_CONTEXT.set(None if context is None else context.name)


class ContextStates:
    """The cache states of one generation, one per cache context of the pipeline's calls (None: no context).

    ``call_names``: for a pipeline that makes several transformer calls per step without naming them (Chroma's
    CFG), the names its calls take in turn, each call naming itself when it starts (:meth:`name_next_call`).
    """

    def __init__(self, make_state, first: CacheState | None = None, call_names: tuple[str, ...] = ()):
        self._make_state = make_state
        self.by_context: dict[str | None, CacheState] = {None: first or make_state()}
        self.call_names = tuple(call_names)
        self._calls = 0

    def name_next_call(self) -> None:
        if self.call_names:
            _CALL_CONTEXT.set(self.call_names[self._calls % len(self.call_names)])
            self._calls += 1

    def current(self) -> CacheState:
        name = _CALL_CONTEXT.get()
        state = self.by_context.get(name)  # the per-unit hot path: a dict lookup, a call only for a new context
        return state if state is not None else self.of_context(name)

    def of_context(self, name: str | None) -> CacheState:
        state = self.by_context.get(name)
        if state is None:
            state = self.by_context[name] = self._make_state()
        return state

    def __iter__(self):
        return iter(self.by_context.values())

    def reset(self) -> None:
        for state in self:
            state.reset()


@dataclass(frozen=True)
class CacheStats:
    """Unit evaluations of one generation by action (the fields of ``dit_cache.actions.ACTIONS``), and the
    memory its cache held."""

    steps: int
    computed: int
    reused: int
    cache_bytes: int
    forecast: int = 0
    linear: int = 0
    cfg_shared: int = 0

    @property
    def cache_ratio(self) -> float:
        """Share of unit evaluations skipped; a unit run on half of the CFG batch counts half."""
        total = sum(getattr(self, name) for name in _FIELD_COST)
        skipped = sum((1.0 - cost) * getattr(self, name) for name, cost in _FIELD_COST.items())
        return skipped / total if total else 0.0

    @classmethod
    def of(cls, states) -> "CacheStats":
        """Statistics of a ``CacheState``, or summed over a generation's ``ContextStates`` (its steps: the most
        any of its calls completed; two calls per step count their units twice)."""
        states = [states] if isinstance(states, CacheState) else list(states)
        counts, steps, cache_bytes = dict.fromkeys(_FIELD_COST, 0), 0, 0
        for state in states:
            for action, count in state.compiled.plan.counts(state.completed_steps).items():
                counts[ACTIONS[Action[action]].stats_field] += count
            steps, cache_bytes = max(steps, state.completed_steps), cache_bytes + state.cache_bytes
        return cls(steps=steps, cache_bytes=cache_bytes, **counts)


# CacheStats field -> the FLOP share its actions spend (actions sharing a field share a cost).
_FIELD_COST = {facts.stats_field: facts.cost for facts in ACTIONS.values()}
assert all(_FIELD_COST[f.stats_field] == f.cost for f in ACTIONS.values()), "actions sharing a stats field differ"


class CacheHandle:
    """What ``apply_cache`` returns: the plan, statistics and controls of one cached transformer."""

    def __init__(self, transformer: torch.nn.Module, plan, units: list[CacheUnit], history: int):
        self.transformer = transformer
        # CFG_SHARE computes the conditional half of the batch: the family record says which one it is.
        conditional_half = family_of(transformer).cfg.conditional_half
        self.conditional_half = 1 if conditional_half is None else conditional_half
        self.units = units
        self.min_history = history
        self.plan = as_plan(plan)
        self.compiled = PreparedPlan(self.plan, history)
        # (block path, its units, its replay) of every block the family can replay (dit_cache.families.replays)
        self.replayable = replayable_blocks(transformer, units)
        self.replay_blocks = tuple(block_units for _, block_units, _ in self.replayable)
        self.state = self._new_state(self.compiled, detect_new_generation=True)  # engine-level default
        self._engine_states = ContextStates(self._engine_state, self.state)
        self.engine_level = True  # False once a pipeline owns the handle: outside its calls the model is stock
        self.pipelines = weakref.WeakSet()  # accelerated pipelines using this handle
        self._hooked: list[tuple[torch.nn.Module, str, bool]] = []
        self._block_registries: list = []  # the hook registries of the replayable blocks
        self._step_hooks: list = []
        self.compile_options: dict | None = None  # torch.compile options of the units (dit_cache.compile_units)

    def _new_state(self, compiled: PreparedPlan, computed_half: int | None = None, **options) -> CacheState:
        half = self.conditional_half if computed_half is None else computed_half
        return CacheState(compiled, computed_half=half, replay_blocks=self.replay_blocks, **options)

    def _engine_state(self) -> CacheState:
        state = self._new_state(self.compiled, mode=self.state.mode, detect_new_generation=True)
        state.gate_scores, state.gate_writes = self.state.gate_scores, self.state.gate_writes
        return state

    def set_plan(self, plan) -> None:
        """Swap the engine-level plan (a ``CachePlan``, ``CacheSchedule`` or ``PreparedPlan``, same unit count) in
        every cache context's state; starts a new generation."""
        prepared = self.prepare(plan)
        self.plan, self.compiled = prepared.plan, prepared
        for state in self._engine_states:
            state.set_plan(prepared)

    def set_schedule(self, plan) -> None:
        warn_renamed("CacheHandle.set_schedule", "CacheHandle.set_plan")
        self.set_plan(plan)

    def prepare(self, plan) -> PreparedPlan:
        """``plan`` checked against this transformer and prepared for the hooks (reused across calls); a
        ``PreparedPlan`` (e.g. with a deeper history, as the router search keeps) is only checked."""
        if isinstance(plan, PreparedPlan):
            plan.plan.check_compatible(num_units=len(self.units))
            return plan
        plan = as_plan(plan)
        plan.check_compatible(num_units=len(self.units))
        return self.compiled if plan is self.plan else PreparedPlan(plan, self.min_history)

    def compile(self, plan) -> PreparedPlan:
        warn_renamed("CacheHandle.compile (it prepares a plan; torch.compile is dit_cache.compile_units)",
                     "CacheHandle.prepare")
        return self.prepare(plan)

    @contextmanager
    def generation(self, plan=None, *, computed_half: int | None = None, call_names: tuple[str, ...] = ()):
        """A generation with a cache of its own, for the duration of the block (e.g. one pipeline call).

        ``plan`` defaults to the handle's; ``computed_half`` is the half of the CFG batch that CFG_SHARE runs,
        by default the conditional one, which the family record knows (``dit_cache.families``: 1 for PixArt,
        SD3 and Sana, whose pipelines batch [unconditional, conditional]; 0 for DiT). Yields the generation's
        ``ContextStates`` (one ``CacheState`` per cache context); ``CacheStats.of(states)`` gives its statistics.
        ``call_names``: the contexts the pipeline's unnamed calls of one step take in turn (``("cond", "uncond")``
        for Chroma's CFG); empty: the pipeline names its calls itself, or makes one.
        """
        compiled = self.prepare(self.plan if plan is None else plan)
        states = ContextStates(lambda: self._new_state(compiled, computed_half), call_names=call_names)
        token = _ACTIVE_GENERATIONS.set(_ACTIVE_GENERATIONS.get() + ((self, states),))
        outer_context = _CALL_CONTEXT.get()
        try:
            yield states
        finally:
            _ACTIVE_GENERATIONS.reset(token)
            _CALL_CONTEXT.set(outer_context)  # the names this generation gave its calls end with it
            states.reset()  # free the cached tensors now, not when the last reference goes

    def name_call(self) -> None:
        """A transformer call starts: in a generation whose pipeline does not name its calls, name this one."""
        for handle, states in reversed(_ACTIVE_GENERATIONS.get()):
            if handle is self:
                states.name_next_call()
                return

    def active_state(self) -> CacheState | None:
        """The state the hooks use now: the innermost open generation of this handle, else the engine-level one
        (None once a pipeline owns the handle: the stock computation)."""
        for handle, states in reversed(_ACTIVE_GENERATIONS.get()):
            if handle is self:
                return states.current()
        return self._engine_states.current() if self.engine_level else None

    def blocks_replayable(self) -> bool:
        """Whether replayed blocks (and folds) see what their units saw: not where something else hooks a block.
        Context parallelism that splits the sequence at the transformer's input hands every block and unit the
        rank's shard, and a replay is element-wise along the sequence; one that splits or gathers at a block
        (Qwen-Image's first block) leaves its hook there, where a replay would add a whole sequence to a shard."""
        return bool(self._block_registries) and all(len(registry.hooks) == 1 for registry in self._block_registries)

    def reset(self) -> None:
        """Start a new engine-level generation at the next forward call and free the cached tensors."""
        self._engine_states.reset()

    def snapshot(self) -> dict:
        """The engine-level generation so far, one ``CacheSnapshot`` per cache context, for :meth:`restore`."""
        return {name: state.snapshot() for name, state in self._engine_states.by_context.items()}

    def restore(self, snapshots: dict) -> None:
        """Go on from :meth:`snapshot`'s result under the current plan (every context it names)."""
        for name, snapshot in snapshots.items():
            self._engine_states.of_context(name).restore(snapshot)

    @property
    def stats(self) -> CacheStats:
        """Unit counts of the current engine-level generation (the last one, once it has finished)."""
        return CacheStats.of(self._engine_states)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the units' kept outputs (and step-fold sums) of the engine-level generation."""
        return sum(state.cache_bytes for state in self._engine_states)

    @property
    def invariant_bytes(self) -> int:
        """Bytes of the step-invariant outputs it keeps besides (caption projection, cross-attention K / V)."""
        return sum(state.invariant_bytes for state in self._engine_states)

    @contextmanager
    def _mode(self, mode: str):
        previous = self.state.mode
        for state in self._engine_states:
            state.mode = mode
        try:
            yield self
        finally:
            for state in self._engine_states:
                state.mode = previous

    def bypassed(self):
        """Run the stock computation: no cache reads or writes, the step counter does not move."""
        return self._mode(BYPASSED)

    def gated(self):
        """Training mode: every unit after the first step blends fresh and cached outputs (see ``set_gate``)."""
        return self._mode(GATED)

    def idle_bypassed(self) -> None:
        """Hand the handle to pipelines: outside their calls (``generation`` blocks) the model is stock."""
        self.engine_level = False

    def set_gate(self, scores: torch.Tensor, threshold: float) -> None:
        """Soft scores ``[num_units]`` for the next step; units scoring above ``threshold`` refresh their cache."""
        writes = (scores.detach() > threshold).tolist()
        for state in self._engine_states:
            state.gate_scores, state.gate_writes = scores, writes

    def _register(self, module: torch.nn.Module, hook, name: str) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._hooked.append((module, name, had_registry))

    def _unregister_all(self) -> None:
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks.clear()
        self._unregister()
        self._block_registries.clear()

    def _unregister(self, only: str | None = None) -> None:
        """Remove the hooks this handle registered (``only``: those registered under that name)."""
        kept = []
        for module, name, had_registry in reversed(self._hooked):
            if only is not None and name != only:
                kept.append((module, name, had_registry))
                continue
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not had_registry and not registry.hooks:
                # Leave the module exactly as we found it: no empty registry, no instance-level forward.
                del module._diffusers_hook
                instance_forward = module.__dict__.get("forward")
                if getattr(instance_forward, "__func__", None) is type(module).forward:
                    del module.forward
        self._hooked = kept[::-1]
        _invalidate_hook_lookup(self.transformer)

    def __repr__(self) -> str:
        return f"CacheHandle({type(self.transformer).__name__}, {self.plan})"


def _invalidate_hook_lookup(transformer) -> None:
    # diffusers caches which submodules carry hooks (for cache_context); adding or removing ours stales it.
    root_registry = getattr(_unwrap(transformer), "_diffusers_hook", None)
    if root_registry is not None and hasattr(root_registry, "invalidate_child_registries_cache"):
        root_registry.invalidate_child_registries_cache()


def apply_cache(transformer: torch.nn.Module, plan, *, history: int = 1, compile=False) -> CacheHandle:
    """Install caching on ``transformer`` following ``plan`` (a ``CachePlan`` or ``CacheSchedule``).

    At the engine level one forward call is one denoising step; a new generation starts after the plan's last
    step or when the timestep goes up again (so a generation stopped early does not leak into the next).
    ``history`` is the least number of computed outputs each unit keeps (the plan may need more).
    ``compile=True`` (or a dict of ``torch.compile`` options) compiles each unit's computation, the cache
    decisions staying eager, so a plan change never recompiles (see ``dit_cache.compile``).

    Example::

        units = dit_cache.cache_units(pipe.transformer)
        handle = dit_cache.apply_cache(pipe.transformer, CachePlan.taylor(20, len(units), interval=3))
        image = pipe("a red circle", num_inference_steps=20).images[0]
        print(handle.stats)
    """
    if get_cache_handle(transformer) is not None:
        raise RuntimeError(
            f"{type(transformer).__name__} already has a cache applied. "
            "Call dit_cache.remove_cache(transformer) first, or handle.set_plan(...) to change it."
        )
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}.")
    units = cache_units(transformer)
    as_plan(plan).check_compatible(num_units=len(units))  # a TypeError for anything but a plan or schedule
    options = compile_options(compile)  # checked before anything is installed
    handle = CacheHandle(transformer, plan, units, history)
    root = _unwrap(transformer)
    try:
        for unit in units:
            hook = UnitCacheHook(handle, unit.index)
            if unit.index == 0:  # one listener is enough: it sets a context variable
                hook._is_stateful, hook.call_context = True, _CallContextListener()
            handle._register(root.get_submodule(unit.path), hook, UNIT_HOOK)
        fold = step_fold(transformer, handle.replayable, len(units))
        for index, (path, block_units, replay) in enumerate(handle.replayable):
            hook = BlockReplayHook(handle, index, block_units, replay, fold)
            handle._register(root.get_submodule(path), hook, BLOCK_HOOK)
            handle._block_registries.append(root.get_submodule(path)._diffusers_hook)
        handle._step_hooks = DenoisingStepHook(handle, family_of(transformer)).attach(transformer)
        if options is None:  # compiled units call these modules inside their graphs (dit_cache.step_invariant)
            install_step_invariant(handle)
        install_timestep_memo(handle)  # outside the blocks: no compiled unit calls it
        _invalidate_hook_lookup(transformer)
        if options is not None:
            compile_hooks(handle, options)
    except Exception:
        handle._unregister_all()
        raise
    setattr(transformer, _HANDLE_ATTRIBUTE, handle)
    return handle


def remove_cache(transformer: torch.nn.Module) -> bool:
    """Remove caching and restore the stock model; returns False if no cache was applied."""
    handle = get_cache_handle(transformer)
    if handle is None:
        return False
    handle._unregister_all()
    handle.reset()
    delattr(transformer, _HANDLE_ATTRIBUTE)
    return True


def get_cache_handle(transformer: torch.nn.Module) -> CacheHandle | None:
    return getattr(transformer, _HANDLE_ATTRIBUTE, None)


def compile_units(handle_or_transformer, **torch_compile_options) -> CacheHandle:
    """Compile the computation of every cached unit with ``torch.compile`` (default ``dynamic=False``).

    Takes the ``CacheHandle`` from ``apply_cache`` or the cached transformer; returns the handle. Compiling is
    lazy: the first generation pays for it. ``mode="reduce-overhead"`` (CUDA graphs) clones each unit's output,
    since the cache keeps outputs across steps and a CUDA graph rewrites its output buffers at every replay.
    How this composes with torch.compile: :mod:`dit_cache.compile`.

    Example::

        handle = dit_cache.apply_cache(transformer, CachePlan.uniform(20, units, 2))
        dit_cache.compile_units(handle, mode="max-autotune-no-cudagraphs")
    """
    handle = handle_or_transformer
    if not isinstance(handle, CacheHandle):
        handle = get_cache_handle(handle_or_transformer)
        if handle is None:
            raise ValueError(f"{type(handle_or_transformer).__name__} has no cache to compile: call "
                             "dit_cache.apply_cache(transformer, plan) first (or apply_cache(..., compile=True)).")
    compile_hooks(handle, compile_options(torch_compile_options or True))
    return handle
