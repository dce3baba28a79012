"""Renamed public names keep working for a release, with one ``FutureWarning`` per old name and process."""

from __future__ import annotations

import warnings

_WARNED: set[str] = set()


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    if old in _WARNED:
        return
    _WARNED.add(old)
    warnings.warn(f"{old} is renamed {new}; the old name will be removed in the next release.", FutureWarning,
                  stacklevel=stacklevel)


def skip_flops_argument(skip_flops: float | None, flops: float | None, where: str) -> float | None:
    """``skip_flops=``, or the deprecated ``flops=`` it replaces (the share of the units' FLOPs to skip)."""
    if flops is None:
        return skip_flops
    if skip_flops is not None:
        raise ValueError(f"Pass skip_flops= only: flops= is its old name ({where}).")
    warn_renamed(f"{where}(flops=...)", f"{where}(skip_flops=...)", stacklevel=4)
    return flops
