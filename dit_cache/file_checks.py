"""Whole-file checks for the safetensors files dit-cache reads (routers, plans with their LINEAR forecaster
weights, schedules): every tensor's dtype, rank, shape and finiteness and every metadata field's type and range,
checked when the file is loaded, so a damaged or hand-edited file fails there, in one line that names the file,
the field and the fix, instead of giving arbitrary budgets or a traceback later.

Files are read with ``safetensors`` only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open


class FileChecker:
    """Reads one file and checks its parts; every refusal is a ``ValueError`` of the form
    ``<file> is a damaged <kind>: <field> <problem>; <fix>.``"""

    def __init__(self, path: str | Path, kind: str, fix: str):
        self.path, self.kind, self.fix = Path(path), kind, fix

    def fail(self, field: str, problem: str, fix: str | None = None):
        raise ValueError(f"{self.path} is a damaged {self.kind}: {field} {problem}; {fix or self.fix}.")

    # ---- reading -------------------------------------------------------------------------------------------
    def read(self, formats: tuple[str, ...]) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
        """(format, raw metadata, tensors) of a safetensors file whose ``format`` metadata is one of ``formats``."""
        if not self.path.is_file():
            raise FileNotFoundError(f"No {self.kind} file at {self.path}.")
        try:
            with safe_open(str(self.path), framework="pt") as file:
                header = dict(file.metadata() or {})
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # safetensors raises its own error types for other files
            raise ValueError(f"{self.path} is not a dit-cache {self.kind}: it is not a safetensors file "
                             f"({str(error).splitlines()[0] if str(error) else type(error).__name__}).") from None
        kind = header.pop("format", None)
        if kind not in formats:
            raise ValueError(f"{self.path} is not a dit-cache {self.kind} (no '{formats[0]}' metadata).")
        return kind, header, tensors

    def only(self, tensors: dict, required: set[str], optional: set[str] = frozenset()) -> None:
        """Refuse missing tensors and tensors this version would silently ignore."""
        missing = sorted(required - set(tensors))
        if missing:
            raise ValueError(f"{self.path} is not a dit-cache {self.kind}: it has no {', '.join(missing)} "
                             f"tensor{'s' if len(missing) > 1 else ''}.")
        unknown = sorted(set(tensors) - required - set(optional))
        if unknown:
            self.fail(f"tensor{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
                      "is not part of the format (this version would ignore it)",
                      f"re-save the file with this version's {self.kind} .save, or upgrade dit-cache")

    # ---- tensors -------------------------------------------------------------------------------------------
    def tensor(self, tensors: dict, name: str, kind: str, shape: tuple, fix: str | None = None):
        """``tensors[name]`` (None if absent) checked: ``kind`` is "float" (finite), "int" (integer codes) or
        "flag" (bool or 0/1 integers, returned as bool); ``shape`` gives one size or None (any) per dimension."""
        value = tensors.get(name)
        if value is None:
            return None
        field = f"tensor '{name}'"
        is_float = value.is_floating_point()
        is_int = not is_float and not value.is_complex() and value.dtype != torch.bool
        dtype_ok = {"float": is_float, "int": is_int, "flag": is_int or value.dtype == torch.bool}[kind]
        if not dtype_ok:
            wanted = {"float": "a floating-point", "int": "an integer", "flag": "a boolean (or 0/1 integer)"}[kind]
            self.fail(field, f"has dtype {value.dtype}, {wanted} tensor expected", fix)
        sizes = tuple(value.shape)
        if len(sizes) != len(shape) or any(want is not None and got != want for got, want in zip(sizes, shape)):
            wanted = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            self.fail(field, f"has shape {sizes}, shape {wanted} expected", fix)
        if any(size == 0 for size in sizes):
            self.fail(field, f"is empty (shape {sizes})", fix)
        if kind == "float" and not bool(torch.isfinite(value).all()):
            self.fail(field, "holds NaN or infinite values", fix)
        if kind == "flag":
            if not bool(((value == 0) | (value == 1)).all()):
                self.fail(field, "holds values other than 0 and 1", fix)
            value = value.bool()
        return value

    # ---- metadata ------------------------------------------------------------------------------------------
    def json_fields(self, header: dict[str, str]) -> dict:
        fields = {}
        for key, text in header.items():
            try:
                fields[key] = json.loads(text)
            except json.JSONDecodeError as error:
                self.fail(f"metadata '{key}'", f"is not JSON ({error})")
        return fields

    def number(self, fields: dict, key: str, low: float, high: float, *, open_low=False, open_high=False,
               integer=False, fix: str | None = None):
        """``fields[key]`` (None if absent) as a finite number in the given range."""
        if key not in fields:
            return None
        value = fields[key]
        kind = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            self.fail(f"metadata '{key}'", f"is {value!r}, {kind} expected", fix)
        below = value <= low if open_low else value < low
        above = value >= high if open_high else value > high
        if not math.isfinite(value) or below or above:
            span = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
            self.fail(f"metadata '{key}'", f"is {value!r}, {kind} in {span} expected", fix)
        return value

    def text(self, fields: dict, key: str):
        if key in fields and not isinstance(fields[key], str):
            self.fail(f"metadata '{key}'", f"is {fields[key]!r}, a string expected")
        return fields.get(key)

    def mapping(self, fields: dict, key: str):
        if key in fields and fields[key] is not None and not isinstance(fields[key], dict):
            self.fail(f"metadata '{key}'", f"is {fields[key]!r}, a JSON object expected")
        return fields.get(key)

    def numbers(self, fields: dict, key: str, count: int | None, low: float, high: float, fix: str | None = None):
        """``fields[key]`` (None if absent) as a list of ``count`` finite numbers in [low, high]."""
        if key not in fields:
            return None
        values = fields[key]
        good = isinstance(values, list) and (count is None or len(values) == count) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
            for v in values)
        if not good:
            size = "a list of numbers" if count is None else f"a list of {count} numbers"
            self.fail(f"metadata '{key}'", f"is {values!r}, {size} in [{low:g}, {high:g}] expected", fix)
        return [float(v) for v in values]
