"""Validated, frozen config dataclasses.

Every config in the project (model, data, training, constraints, the run that holds them) derives
from :class:`Config`. Validation happens on construction and reports *every* bad field at once,
each message naming the field and what is allowed, e.g.::

    ConfigError: invalid config:
      - model.d_model=50 is not divisible by model.n_heads=4
      - train.lr=-1.0 must be > 0

``from_dict`` rejects unknown keys (typos in a YAML profile must not be silently ignored) and
converts lists to tuples so that configs are hashable and immutable.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Self


class ConfigError(ValueError):
    """A config with one or more invalid fields; ``problems`` lists one message per field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


def _prefixed(prefix: str, problems: list[str]) -> list[str]:
    return [f"{prefix}{p}" for p in problems] if prefix else list(problems)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> tuple[Any, str | None]:
    """Check ``value`` against annotation ``tp``; return (possibly converted value, problem or None).

    Only the shapes of annotation this project uses are supported: int, float, str, bool,
    ``X | None``, ``tuple[X, ...]`` and nested Config classes.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None, None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(name, value, non_none[0]) if len(non_none) == 1 else (value, None)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return value, f"{name}={value!r} must be a list of {_type_name(item_tp)}"
        items = []
        for i, v in enumerate(value):
            v2, prob = _coerce(f"{name}[{i}]", v, item_tp)
            if prob:
                return value, prob
            items.append(v2)
        return tuple(items), None
    if tp is bool:
        return value, None if isinstance(value, bool) else f"{name}={value!r} must be true or false"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else f"{name}={value!r} must be an integer"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return value, f"{name}={value!r} must be a number"
    if tp is str:
        return value, None if isinstance(value, str) else f"{name}={value!r} must be a string"
    return value, None


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: type checks and ``problems()`` run in ``__post_init__``."""

    # Sections that are themselves Config classes, by field name (filled in by subclasses).
    _nested: ClassVar[dict[str, type[Config]]] = {}

    def problems(self) -> list[str]:
        """One message per invalid field (subclasses override); empty when valid."""
        return []

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        type_problems = []
        for f in dataclasses.fields(self):
            if f.name in self._nested:
                continue
            value, prob = _coerce(f.name, getattr(self, f.name), hints[f.name])
            if prob:
                type_problems.append(prob)
            else:
                object.__setattr__(self, f.name, value)
        # Value checks assume the types are right, so only run them when they are.
        problems = type_problems or self.problems()
        if problems:
            raise ConfigError(problems)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str = "") -> Self:
        """Build from a plain dict (e.g. parsed YAML), rejecting unknown keys.

        Problems in nested sections are collected with their dotted path, so one call reports
        every bad field of a whole run config.
        """
        if data is not None and not isinstance(data, dict):
            raise ConfigError([f"{prefix or 'config'} must be a mapping, got {type(data).__name__}"])
        data = dict(data or {})
        problems: list[str] = []
        allowed = cls.field_names()
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"{prefix}{key}: unknown key (allowed: {', '.join(allowed)}){hint}")
        kwargs: dict[str, Any] = {}
        nested_failed = False  # then cross-section checks would run against defaults: skip them
        for name in allowed:
            if name not in data:
                continue
            value = data[name]
            if name in cls._nested:
                sub_cls = cls._nested[name]
                if isinstance(value, sub_cls):
                    kwargs[name] = value
                    continue
                try:
                    kwargs[name] = sub_cls.from_dict(value, prefix=f"{prefix}{name}.")
                except ConfigError as err:
                    problems.extend(err.problems)
                    nested_failed = True
            else:
                kwargs[name] = value
        # Construct even after an unknown key, so value problems are reported in the same error.
        if not nested_failed:
            try:
                built = cls(**kwargs)
            except ConfigError as err:
                problems.extend(_prefixed(prefix, err.problems))
            except TypeError as err:  # a required field is missing
                problems.append(f"{prefix}{err}")
        if problems:
            raise ConfigError(problems)
        return built

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that ``from_dict`` turns back into an equal config."""

        def plain(v: Any) -> Any:
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def hash_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields added after runs were first cached that still hold their
        default (``field(metadata={"added": True})``): such a field at its default computes what the code
        did before it existed, so it must not change the hash of any existing run."""
        plain = self.to_dict()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                out[f.name] = v.hash_dict()
            elif not (f.metadata.get("added") and v == f.default):
                out[f.name] = plain[f.name]
        return out

    def replace(self, **changes: Any) -> Self:
        """Copy with some fields changed; dotted keys reach into sections: ``replace(**{"model.d_ff": 256})``."""
        d = self.to_dict()
        for key, value in changes.items():
            *path, last = key.split(".")
            node = d
            for part in path:
                if part not in node or not isinstance(node[part], dict):
                    raise ConfigError([f"{key}: no section {part!r} in {type(self).__name__}"])
                node = node[part]
            if last not in node:
                raise ConfigError([f"{key}: unknown key (allowed: {', '.join(node)})"])
            node[last] = value.to_dict() if isinstance(value, Config) else value
        return type(self).from_dict(d)


def one_of(name: str, value: Any, allowed: typing.Iterable[Any]) -> list[str]:
    """Problem list for a field restricted to a set of values."""
    allowed = list(allowed)
    return [] if value in allowed else [f"{name}={value!r} is not one of {allowed}"]


def at_least(name: str, value: float, low: float) -> list[str]:
    return [] if value >= low else [f"{name}={value!r} must be >= {low}"]


def positive(name: str, value: float) -> list[str]:
    return [] if value > 0 else [f"{name}={value!r} must be > 0"]
