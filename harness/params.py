"""Declared parameters: one declaration drives validation, listings and docs.

Config fields and plugin hyperparameters are both declared with `Param`, in the spirit of
scikit-learn's declared estimator parameters: a default, a type, an allowed range and a one-line
help. `Param.check` turns a raw value (from YAML or the command line) into a typed one, or raises
a `UsageError` that names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import yaml

from geobench.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Param:
    default: Any
    help: str = ""
    kind: type | None = None  # inferred from the default when None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the bound itself is not allowed
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False  # None is allowed (written `null` or `none`): "not set", with the meaning `help` gives
    pattern: str | None = None  # a string value must match this regular expression entirely

    @property
    def value_type(self) -> type:
        return self.kind if self.kind is not None else type(self.default)

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        either = " or none" if self.nullable else ""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices) + either
        if self.pattern is not None:
            return f"a string matching {self.pattern}" + either
        parts = [self.value_type.__name__]
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " ".join(parts) + either

    def check(self, key: str, raw: Any) -> Any:
        if self.nullable and (raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "~"))):
            return None
        value = coerce(key, raw, self.value_type)
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{key}={raw!r} is not allowed: expected {self.allowed()}")
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value)):
            raise UsageError(f"{key}={raw!r} is not allowed: expected {self.allowed()}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{key}={raw!r} is not a finite number")
            too_low = self.low is not None and (
                value < self.low or (self.low_open and value == self.low)
            )
            too_high = self.high is not None and (
                value > self.high or (self.high_open and value == self.high)
            )
            if too_low or too_high:
                raise UsageError(f"{key}={raw!r} is out of range: expected {self.allowed()}")
        return value


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without its base-60 numbers: `10:30` stays the string "10:30" instead of becoming
    the integer 630, which a time limit would silently read as 630 minutes."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse user YAML (configs, suites, command-line values) the way geobench reads it everywhere."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it, plus 1e-3 style floats (YAML 1.1 reads a string)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _items(values: Sequence) -> list:
    """List items as numbers where they read as numbers (YAML 1.1 reads 1e-3 as a string)."""
    return [_items(v) if isinstance(v, list) else parse_scalar(v) if isinstance(v, str) else v for v in values]


def coerce(key: str, raw: Any, kind: type) -> Any:
    """Convert `raw` to `kind` or raise a UsageError naming the key and the value."""
    value = parse_scalar(raw) if isinstance(raw, str) and kind is not str else raw
    bad = UsageError(f"{key}={raw!r} is not a valid {kind.__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise bad
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if isinstance(value, float) and not value.is_integer():
            raise bad
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    if kind in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise bad
        return kind(_items(value))
    return value
