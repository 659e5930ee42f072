"""Leaf values of a training config: checking them against annotations, dotted keys, overrides.

:mod:`lmslim.train.config` declares the sections; these helpers move values between plain mappings
(YAML, JSON, ``key=value`` overrides) and those sections.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

from lmslim.core.configs import MAX_INT, show
from lmslim.core.errors import UserError, clip
from lmslim.core.safeyaml import parse_value


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def copy_mapping(obj: Any) -> Any:
    return {k: copy_mapping(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override {key}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_scalar(raw: str, key: str = "value") -> Any:
    raw = raw.strip()
    value = parse_value(raw, f"override {clip(key, 80)}") if raw else ""
    # YAML 1.1 reads "1e-4" as a string; numbers written that way are common for learning rates.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def coerce(value: Any, t: Any, key: str) -> Any:
    """Check (and gently convert) a leaf value against its annotation."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:  # the first member type that takes the value
            try:
                return coerce(value, a, key)
            except UserError as e:
                errors.append(e)
        raise errors[-1]
    if origin is Literal:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list like [0.9, 0.999], got {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, typing.get_args(t)))
    if t is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise UserError(f"{key} must be an integer, got {show(value)}")
        if abs(int(value)) > MAX_INT:  # beyond any step count, seed or timeout torch accepts
            raise UserError(f"{key} must be at most {MAX_INT:,} in magnitude, got {show(value)}")
        return int(value)
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {show(value)}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise UserError(f"{key} is too large, got {show(value)}")
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {show(value)}")
        return value
    return value
