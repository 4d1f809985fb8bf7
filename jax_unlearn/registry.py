"""Name -> factory tables: the one place where a combiner or an objective becomes known by name.

``combiners.COMBINERS`` and ``objectives.OBJECTIVES`` are `Registry` instances; configs, the
CLI help and the benchmark read the names from them, so a new combiner or objective is one
factory function plus one ``register`` call.

>>> from jax_unlearn.registry import Registry
>>> shapes = Registry("shape")
>>> @shapes.register("square")
... def square(side: float = 1.0):
...     return side * side
>>> shapes.names(), shapes.get("square")(side=3.0)
(('square',), 9.0)
>>> shapes.get("circle")
Traceback (most recent call last):
...
ValueError: unknown shape 'circle'; known: square
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


class Registry:
    """An ordered mapping of names to factories of one ``kind`` (``"combiner"``, ``"objective"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any] | None = None):
        """Registers ``factory`` as ``name`` (also usable as a decorator); a name is registered once."""
        def add(f):
            if not name or not isinstance(name, str):
                raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
            if name in self._factories and self._factories[name] is not f:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = f
            return f

        return add if factory is None else add(factory)

    def unregister(self, name: str) -> None:
        """Removes ``name`` (for tests and plugins that register temporarily)."""
        self._factories.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self._factories)}")
        return self._factories[name]

    def arguments(self, name: str, settings: Mapping[str, Any], defaults: Mapping[str, Any], section: str,
                  context: Mapping[str, Any] = {}) -> dict[str, Any]:
        """The keyword arguments the factory of ``name`` takes from ``settings`` (and from
        ``context``, e.g. ``hidden_size``, when it asks for them).

        A setting the factory does not take must keep its value in ``defaults``; otherwise a
        ValueError names ``{section}.{key}`` and the factory it does not apply to.
        """
        params = inspect.signature(self.get(name)).parameters
        kwargs = {k: v for k, v in context.items() if k in params}
        for key, value in settings.items():
            if key in params:
                kwargs[key] = value
            elif value != defaults.get(key):
                takes = ", ".join(f"{section}.{p}" for p in params if p in settings) or "none of the section's keys"
                raise ValueError(f"'{section}.{key}' does not apply to {self.kind} {name!r} "
                                 f"(it takes {takes}); remove it or choose another {self.kind}")
        return kwargs

    def build(self, name: str, settings: Mapping[str, Any], defaults: Mapping[str, Any], section: str,
              context: Mapping[str, Any] = {}) -> Any:
        """``factory(**arguments(...))`` (see `arguments`)."""
        return self.get(name)(**self.arguments(name, settings, defaults, section, context))
