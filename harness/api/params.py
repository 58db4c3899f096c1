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
from pathlib import Path
from typing import Any

import yaml

from geobench.api.errors import UsageError, shown


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e16 else f"{bound:g}"


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
    items: type | None = None  # a list's values (at any depth of nesting) must be of this type

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
        if self.items is not None:
            return f"a list of {self.items.__name__} values" + either
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        return " ".join([self.value_type.__name__, " and ".join(bounds)]).strip() + either

    def invalid_example(self) -> str | None:
        """A command-line value this declaration refuses, generated from its constraints (for tests
        that hold every declared option to its declaration), or None when it admits every string
        (a free-form string)."""
        if self.choices is not None:
            return "not-one-of-the-choices"
        kind = self.value_type
        if kind in (int, float) and self.low is not None:
            return _number(self.low if self.low_open else self.low - 1)
        if kind in (int, float) and self.high is not None:
            return _number(self.high if self.high_open else self.high + 1)
        if kind is str:
            return None if self.pattern is None else "\n"  # no pattern geobench declares matches a newline
        if self.items is not None:
            return "[[], {a: 1}]"
        return {bool: "maybe", int: "1.5", float: "abc", list: "{a: 1}", tuple: "{a: 1}", dict: "[1, 2]"}.get(kind)

    def check(self, key: str, raw: Any) -> Any:
        if self.nullable and (raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "~"))):
            return None
        value = coerce(key, raw, self.value_type)
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{key}={shown(raw)} is not allowed: expected {self.allowed()}")
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value)):
            raise UsageError(f"{key}={shown(raw)} is not allowed: expected {self.allowed()}")
        if self.items is not None and isinstance(value, (list, tuple)):
            value = type(value)(_typed_items(key, raw, value, self.items))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{key}={shown(raw)} is not a finite number")
            too_low = self.low is not None and (
                value < self.low or (self.low_open and value == self.low)
            )
            too_high = self.high is not None and (
                value > self.high or (self.high_open and value == self.high)
            )
            if too_low or too_high:
                raise UsageError(f"{key}={shown(raw)} is out of range: expected {self.allowed()}")
        return value


SEED_HIGH = 2**32 - 1  # numpy's generators take seeds in [0, 2**32)


def seed_param(default: int, help: str) -> Param:
    """A seed: an integer every generator geobench seeds accepts."""
    return Param(default, help, low=0, high=SEED_HIGH)


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


MAX_YAML_VALUES = 100_000  # a document that expands (through aliases) to more values is refused


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:  # YAML's last-wins would silently drop the first value
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key_node.value!r}",
                                                        key_node.start_mark)
            seen.add(key_node.value)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values in the document once every alias is expanded (a shared node counts at each use)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a recursive alias counts once
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def load_yaml(text: str) -> Any:
    """Parse user YAML (configs, suites, command-line values) the way geobench reads it everywhere:
    no duplicate keys, no document that aliases expand beyond MAX_YAML_VALUES values."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_YAML_VALUES:,} values through its aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, what: str) -> Any:
    """A YAML file (`what`: "config file", "suite", ...) parsed by `load_yaml`; an unreadable or
    malformed one is a UsageError naming the file, the line and the problem."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_yaml_text(text, f"{what} {str(path)!r}")


def parse_yaml_text(text: str, where: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) if isinstance(exc, yaml.MarkedYAMLError) else str(exc)
        raise UsageError(f"malformed YAML in {where}{at}" + (f": {problem}" if problem else "")) from None


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


def _typed_items(key: str, raw: Any, values: Sequence, kind: type) -> list:
    """`values` with every value (nested lists descended) coerced to `kind`."""
    out = []
    for value in values:
        if isinstance(value, (list, tuple)):
            out.append(_typed_items(key, raw, value, kind))
            continue
        try:
            out.append(coerce(key, value, kind))
        except UsageError:
            raise UsageError(f"{key}={shown(raw)} holds {shown(value)}, which is not a valid {kind.__name__}") from None
    return out


def coerce(key: str, raw: Any, kind: type) -> Any:
    """Convert `raw` to `kind` or raise a UsageError naming the key and the value."""
    value = parse_scalar(raw) if isinstance(raw, str) and kind is not str else raw
    bad = UsageError(f"{key}={shown(raw)} is not a valid {kind.__name__}")
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
    if kind is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if kind in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise bad
        return kind(_items(value))
    return value
