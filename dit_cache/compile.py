"""``torch.compile`` with the cache: each unit's own computation is compiled, the cache decisions stay eager.

The unit hook decides per step whether a unit computes, reuses, forecasts or runs half of the CFG batch: Python
that reads the plan. Compiled into one graph with the computation it would be guarded on, and every plan change
would recompile. So ``compile_units`` compiles only what the unit does when it computes (the branch module's own
``forward``), and the hook calls that compiled function. Consequences:

* every action path is compiled once; changing the plan (``handle.set_plan``, another ``accelerate``) never
  recompiles. Identical branches of repeated blocks share one graph (3 graphs for a PixArt transformer).
* shapes are static (``dynamic=False``): a new resolution, batch or caption length compiles once more. CFG_SHARE
  runs units on half of the CFG batch, a second static shape compiled the first time a plan uses it.
* an outer compile of the transformer (``torch.compile(pipe.transformer)``, ``pipe.transformer.compile()``,
  ``compile_repeated_blocks``), before or after the cache, also works: the hooks are ``torch.compiler.disable``-d,
  so it compiles the code between the units (norms, adaLN modulation, residual adds) and breaks its graph at
  each unit. It cannot use ``fullgraph=True``.

Example::

    pipe = dit_cache.accelerate(pipe, plan=CachePlan.taylor(20, units, interval=3), compile=True)
    pipe("a red circle", num_inference_steps=20)   # the first call compiles (seconds to minutes)
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from .hooks import UNIT_HOOK, UnitCacheHook
from .step_invariant import STEP_INVARIANT_HOOK, install_step_invariant
from .units import _unwrap

if TYPE_CHECKING:  # the handle imports this module (apply_cache(..., compile=True))
    from .cache import CacheHandle

DEFAULT_OPTIONS = {"dynamic": False}
_COMPILE_PARAMETERS = [name for name in inspect.signature(torch.compile).parameters if name != "model"]


def compile_options(compile) -> dict | None:
    """``compile=`` as the keyword arguments of ``torch.compile``: False/None -> None, True -> the defaults, a
    dict -> the defaults updated with it (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return dict(DEFAULT_OPTIONS)
    if not isinstance(compile, dict):
        raise TypeError(f"compile must be True, False or a dict of torch.compile options, got "
                        f"{type(compile).__name__}.")
    unknown = sorted(set(compile) - set(_COMPILE_PARAMETERS))
    if unknown:
        raise TypeError(f"Unknown torch.compile option(s) {unknown} in compile=; torch.compile takes "
                        f"{', '.join(_COMPILE_PARAMETERS)}.")
    return {**DEFAULT_OPTIONS, **compile}


def unit_hooks(handle: "CacheHandle") -> list[UnitCacheHook]:
    root = _unwrap(handle.transformer)
    return [root.get_submodule(unit.path)._diffusers_hook.get_hook(UNIT_HOOK) for unit in handle.units]


def compile_hooks(handle: "CacheHandle", options: dict) -> None:
    """Compile every unit of ``handle`` with ``torch.compile(**options)`` (see :func:`dit_cache.compile_units`)."""
    hooks = unit_hooks(handle)
    # torch.compile checks its options when called: build every unit's function before installing any.
    compiled = [_compiled(hook.fn_ref.original_forward, options) for hook in hooks]
    for hook, forward in zip(hooks, compiled):
        hook.compiled_forward = forward
    # The compiled units call the step-invariant modules inside their graphs, where an eager hook breaks them.
    handle._unregister(STEP_INVARIANT_HOOK)
    handle.compile_options = options


def uncompile_units(handle: "CacheHandle") -> None:
    """Back to the eager computation (the compiled code is dropped with the functions)."""
    for hook in unit_hooks(handle):
        hook.compiled_forward = None
    if handle.compile_options is not None:
        install_step_invariant(handle)
    handle.compile_options = None


def is_compiled(handle: "CacheHandle") -> bool:
    return handle.compile_options is not None


def _compiled(forward, options: dict):
    function = torch.compile(forward, **options)
    if "reduce-overhead" not in str(options.get("mode")):
        return function

    def cloned(*args, **kwargs):
        output = function(*args, **kwargs)
        if torch.is_tensor(output):
            return output.clone()
        return type(output)(None if o is None else o.clone() for o in output)

    return cloned
