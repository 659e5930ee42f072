"""Name → (config class, handler) registry, so every technique is reachable by the same name from
Python, the CLI and (later) YAML recipes.

A technique module defines a frozen config dataclass and registers its handler::

    @register("rtn", RTNConfig)
    def _apply(model, config, context): ...

The registry is an explicit object passed around; each technique family owns one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Registry:
    kind: str
    entries: dict[str, tuple[type, Callable[..., Any]]] = field(default_factory=dict)

    def register(self, name: str, config_cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self.entries[name] = (config_cls, fn)
            return fn

        return deco

    def handler_for(self, config: Any) -> tuple[str, Callable[..., Any]]:
        for name, (cls, fn) in self.entries.items():
            if type(config) is cls:
                return name, fn
        raise TypeError(f"no {self.kind} handler for {type(config).__name__}")

    def config_class(self, name: str) -> type:
        if not isinstance(name, str) or name not in self.entries:
            from lmslim.core.configs import show
            from lmslim.core.errors import UserError

            raise UserError(f"unknown {self.kind} method {show(name)}; choose one of: {', '.join(self.entries)}")
        return self.entries[name][0]

    def names(self) -> list[str]:
        return list(self.entries)
