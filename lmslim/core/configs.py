"""Type checks for technique config dataclasses: every field against its annotation, before any rule.

A config reaches ``__post_init__`` from Python, the CLI or a YAML recipe; only the last can put a
string where a number belongs (``sparsity: "half"``), a list where a name belongs, ``true`` where a
count belongs or a 40-digit integer anywhere. Range checks written for the right type then fail with
a ``TypeError`` from deep inside (``"half" < 1``) or let a wrong value through (``tuple("*mlp*")``).
So each config calls :func:`check_fields` first thing in ``__post_init__``: every field's value is
checked (and gently normalised: a list becomes a tuple, ``4.0`` becomes ``4``, ``1`` becomes
``1.0``) against its type annotation, and a mismatch is a :class:`UserError` that names the field
and the type it wants. :func:`build_config` adds the mapping side for recipes: unknown keys with a
"did you mean" hint, and a stray exception from a validation rule turned into a one-line user error.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     steps: int = 4
    ...     def __post_init__(self) -> None:
    ...         check_fields(self)
    >>> Demo(steps=8.0).steps
    8
    >>> Demo(steps="four")
    Traceback (most recent call last):
    ...
    lmslim.core.errors.UserError: steps must be an integer, got 'four'
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from typing import Any, Literal

from lmslim.core.errors import UserError, clip

# No option is a count, size or seed anywhere near this; larger integers are typos or fuzz, and some
# (group sizes, grid points, threads) would try to allocate or loop that many times.
MAX_INT = 2**31 - 1

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, 60, 60, 40


def show(value: Any) -> str:
    """A short, safe rendering of a user value for an error message (never raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return clip(_repr.repr(value), 80)
    except Exception:  # noqa: BLE001 - a value too odd to print (too deep, too many digits) is named by type
        return f"a {type(value).__name__}"


def describe(t: Any) -> str:
    """What an annotation asks for, in recipe words (``int | None`` → ``an integer or null``)."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if t is tuple or origin in (tuple, list):
        args = typing.get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if args:
            return f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        t, getattr(t, "__name__", str(t)))


def _plural(t: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(t, describe(t))


def check_value(value: Any, t: Any, key: str) -> Any:
    """``value`` checked against the annotation ``t`` and normalised; ``UserError`` naming ``key`` if not.

    ``Any`` (and annotations this does not know) pass through for ``__post_init__`` to check.
    """
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(value, a, key)
            except UserError:
                pass
        raise UserError(f"{key} must be {describe(t)}, got {show(value)}")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(t)):
            raise UserError(f"{key} must be {describe(t)}, got {show(value)}")
        return value
    if t is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be {describe(t)}, got {show(value)}")
        args = typing.get_args(t)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise UserError(f"{key} must be {describe(t)}, got {show(value)}")
        return tuple(check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if t is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {show(value)}")
        return value
    if t is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # 4.0 from YAML or arithmetic
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer, got {show(value)}")
        if abs(value) > MAX_INT:
            raise UserError(f"{key} must be an integer of at most {MAX_INT:,}, got {show(value)}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise UserError(f"{key} must be a finite number, got {show(value)}")
        return number
    if t is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {show(value)}")
        return value
    return value


def did_you_mean(key: Any, choices: list[str] | set[str] | frozenset[str]) -> str:
    """``; did you mean 'x'?`` for a near miss, else the list of valid keys (``key`` may be any value)."""
    close = difflib.get_close_matches(str(key)[:200], sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def check_patterns(patterns: tuple[str, ...], key: str) -> None:
    """Module-name patterns (``lmslim.core.targeting``): a ``re:`` pattern must compile."""
    for i, pattern in enumerate(patterns):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except (re.error, RecursionError, OverflowError, ValueError) as e:
                raise UserError(f"{key}[{i}] {show(pattern)} is not a valid regular expression: {clip(e, 100)}") from e


_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (cached; modules use ``from __future__ import annotations``)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a (frozen) dataclass instance against its annotation, normalising in place.

    Call first thing in ``__post_init__``; the range rules that follow may then trust the types.
    """
    for name, t in field_types(type(obj)).items():
        value = getattr(obj, name)
        checked = check_value(value, t, prefix + name)
        if checked is not value:
            object.__setattr__(obj, name, checked)


def build_config(cls: type, options: Any, where: str, extra_keys: set[str] | frozenset[str] = frozenset(),
                 hidden: set[str] | frozenset[str] = frozenset({"needs_calibration"})) -> Any:
    """``cls(**options)`` for user data: unknown keys, wrong types and failed rules all as ``UserError``.

    Args:
        cls: a frozen config dataclass whose ``__post_init__`` calls :func:`check_fields`.
        options: the mapping from the recipe (or YAML file).
        where: prefix of every message (``stage prune (wanda)``).
        extra_keys: keys the caller handles itself (skipped here).
        hidden: fields that are class facts, not settings (refused as unknown keys).
    """
    if not isinstance(options, dict):
        raise UserError(f"{where}: options must be a mapping of {cls.__name__} keys, got {show(options)}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in hidden}
    kwargs = {}
    for key, value in options.items():
        if key in extra_keys:
            continue
        if not isinstance(key, str) or key not in fields:
            raise UserError(f"{where}: unknown key {show(key)}{did_you_mean(key, fields | set(extra_keys))}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{where}: {e}") from e
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as e:
        # A rule in __post_init__ that met a value check_fields let through (an ``Any`` field): still the
        # user's input, so one line that names the stage, not a traceback.
        raise UserError(f"{where}: invalid options ({type(e).__name__}: {clip(e, 200)})") from e
