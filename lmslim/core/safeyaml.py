"""Bounded YAML reading for user files (recipes, training configs, ``key=value`` overrides).

PyYAML's ``safe_load`` never runs code, but an alias refers to the same object, so a few hundred
bytes of nested aliases (a "billion laughs") describe a document with billions of nodes: anything
that walks it afterwards (validation, ``deepcopy``, ``json.dumps``, an error message that prints a
value) runs out of memory. Here the composed node graph is measured *before* any Python object is
built: its fully expanded size (every alias counted as often as it is reached), its depth and the
file's size are bounded, and a self-referencing alias is refused.

Example:
    >>> from lmslim.core.safeyaml import load_yaml_text
    >>> load_yaml_text("a: [1, 2]", "example")
    {'a': [1, 2]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmslim.core.errors import UserError, clip

MAX_BYTES = 1 << 20  # 1 MiB: recipes and configs are a few hundred bytes
MAX_NODES = 100_000  # scalars + collections after alias expansion
MAX_DEPTH = 64


class YamlSyntaxError(UserError):
    """The text is not YAML at all (as opposed to YAML over the bounds)."""


def _check(node: yaml.Node, what: str) -> None:
    """Expanded size and depth of the node graph, without expanding it (memoised per node)."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    active: set[int] = set()

    def visit(n: yaml.Node, level: int) -> tuple[int, int]:
        key = id(n)
        if level > MAX_DEPTH:
            raise UserError(f"{what} nests deeper than {MAX_DEPTH} levels; flatten it")
        if key in sizes:
            return sizes[key], depths[key]
        if key in active:
            raise UserError(f"{what} has an alias that refers to itself; remove the recursive alias")
        active.add(key)
        size, depth = 1, 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for child in children:
            s, d = visit(child, level + 1)
            size += s
            depth = max(depth, d + 1)
            if size > MAX_NODES:
                raise UserError(f"{what} expands to more than {MAX_NODES:,} values (nested aliases?); "
                                "write the values out or use fewer aliases")
            if level + depth > MAX_DEPTH:
                raise UserError(f"{what} nests deeper than {MAX_DEPTH} levels; flatten it")
        active.discard(key)
        sizes[key], depths[key] = size, depth
        return size, depth

    visit(node, 0)


def load_yaml_text(text: str, what: str) -> Any:
    """Parse one YAML document with the safe loader, refusing oversized or alias-bomb documents.

    Raises:
        UserError: too large, too deep, a recursive alias, or not valid YAML (with line and column).
    """
    if len(text) > MAX_BYTES:
        raise UserError(f"{what} is {len(text):,} characters; at most {MAX_BYTES:,} are read")
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlSyntaxError(f"{what} is not valid YAML{where}: {problem}") from e
    except RecursionError as e:
        raise UserError(f"{what} nests too deeply to read; flatten it") from e
    except (ValueError, OverflowError, IndexError, KeyError, AttributeError, TypeError) as e:
        # PyYAML's constructors fail this way on values such as a 5000-digit integer or `!!int` alone
        raise UserError(f"{what} holds a value that cannot be read ({type(e).__name__}: {clip(e, 100)})") from e
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str | Path, what: str | None = None) -> Any:
    """Read and parse a YAML file with the bounds of :func:`load_yaml_text`."""
    p = Path(path)
    what = what or str(p)
    if not p.is_file():
        raise UserError(f"{what} does not exist")
    size = p.stat().st_size
    if size > MAX_BYTES:
        raise UserError(f"{what} is {size:,} bytes; at most {MAX_BYTES:,} are read")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not a UTF-8 text file") from e
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or e}") from e
    return load_yaml_text(text, what)


def parse_value(text: str, what: str) -> Any:
    """A ``key=value`` override's value: YAML when it parses (bounded as above), else the raw string."""
    if len(text) > MAX_BYTES:
        raise UserError(f"{what} is {len(text):,} characters; at most {MAX_BYTES:,} are read")
    try:
        return load_yaml_text(text, what)
    except YamlSyntaxError:
        return text
