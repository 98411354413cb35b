"""Coerce loosely typed values (command-line ``--set``, Tune samples, MLflow params) to the
declared types of a config dataclass's fields, with one-sentence errors."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


class CoercionError(ValueError):
    pass


def _one(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if value in ("", "None", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _one(name, value, a)
            except CoercionError as e:
                errors.append(str(e))
        raise CoercionError(errors[0] if errors else f"{name} has an unsupported type")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise CoercionError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise CoercionError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise CoercionError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise CoercionError(f"{name} must be a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise CoercionError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(number):  # nan and inf parse as floats but train nothing
            raise CoercionError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise CoercionError(f"{name} must be a string, got {value!r}")
    return value


def coerce_fields(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return ``values`` with each entry coerced to ``cls``'s declared field type.

    Unknown keys are left for the dataclass constructor to reject; nested dataclass fields
    are left as they are.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        tp = hints.get(key)
        if key in names and tp is not None and not (dataclasses.is_dataclass(value)):
            base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if not any(dataclasses.is_dataclass(b) for b in base):
                value = _one(prefix + key, value, tp)
        out[key] = value
    return out
