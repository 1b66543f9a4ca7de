"""Method registries: each name maps to a function and its options record (a keyword-only,
frozen dataclass that checks its own values). The records are the schema: params.yaml's
per-method subsections (`detect.ot`, `coreset.goracs`, `finetune.ncu`, ...) are built from
them, so every option is written once, here in the library. The registries themselves live
in `otcurate.options`, free of torch."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """A method without options."""


@dataclass(frozen=True)
class Method:
    """A method's function, named ``module:function`` and imported when first asked for
    (a registry that names its methods costs no import of what they use), and its options
    record."""

    target: str
    options: type = NoOptions

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or self.target.count(":") != 1:
            raise TypeError(f"Method takes 'module:function'; got {self.target!r}.")

    @property
    def fn(self) -> Callable[..., Any]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


def lookup(kind: str, registry: Mapping[str, Method], name: str) -> Method:
    if name not in registry:
        raise ValueError(f"unknown {kind} method {name!r}; known: {', '.join(sorted(registry))}.")
    return registry[name]


def options(kind: str, registry: Mapping[str, Method], name: str, **values: Any) -> Any:
    """`name`'s options record with `values` set; an unknown key is an error naming the known."""
    cls = lookup(kind, registry, name).options
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"{kind} method {name!r} has no option {unknown[0]!r}; its options: "
            f"{', '.join(known) or 'none'}."
        )
    return cls(**values)


def checked(kind: str, registry: Mapping[str, Method], name: str, opts: Any) -> Any:
    """`opts` if it is `name`'s options record, its defaults if None; TypeError otherwise."""
    cls = lookup(kind, registry, name).options
    if opts is None:
        return cls()
    if not isinstance(opts, cls):
        raise TypeError(f"{name} takes {cls.__name__}, got {type(opts).__name__}.")
    return opts
