"""The typed documents a plugin sees: an evaluation record and a metric's result; and the one
(de)serializer every geobench document uses.

A document is a dataclass. `to_json(doc)` gives its JSON form (field names, except where a field's
metadata names its key, e.g. `lambda`; optional fields left at their default are left out), and
`from_json(cls, data, what)` reads it back, checking every key and type on the way: a file that
does not hold the document is one `UsageError` naming the file's part and the problem.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from geobench.api.errors import UsageError, shown

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def key(name: str) -> dict[str, Any]:
    """Field metadata: the JSON key of a field whose name cannot be it (`lambda`)."""
    return {"json": name}


def always(default_factory: Any) -> Any:
    """An optional field written even when empty (the schema requires its key)."""
    return dataclasses.field(default_factory=default_factory, metadata={"always": True})


def _json_key(field: dataclasses.Field) -> str:
    return field.metadata.get("json", field.name)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def to_json(doc: Any) -> Any:
    """The JSON form of a document (nested documents, lists and mappings converted; NaN and inf
    become null, which JSON lacks)."""
    if dataclasses.is_dataclass(doc) and not isinstance(doc, type):
        out = {}
        for field in dataclasses.fields(doc):
            value = getattr(doc, field.name)
            if field.name == "extra":  # keys a reader keeps without knowing them
                out.update({str(k): to_json(v) for k, v in value.items()})
            elif field.metadata.get("always") or not (
                    _default(field) is not dataclasses.MISSING and _unset(value) and _unset(_default(field))):
                out[_json_key(field)] = to_json(value)
        return out
    if isinstance(doc, Mapping):
        return {str(k): to_json(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [to_json(v) for v in doc]
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    return doc


def _unset(value: Any) -> bool:
    """An optional field left at its default None, False or empty: the JSON form leaves it out."""
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, where)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(errors[0])
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_json(hint, value, where)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise UsageError(f"{where} is {shown(value)}, not a list")
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if (origin or hint) is tuple else converted
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where} is {shown(value)}, not a mapping")
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"{where} is {shown(value)}, not one of {', '.join(map(str, args))}")
        return value
    if hint is float:
        if value is None:  # JSON's stand-in for NaN
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where} is {shown(value)}, not a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where} is {shown(value)}, not an integer")
        return value
    if hint in (str, bool) and not isinstance(value, hint):
        raise UsageError(f"{where} is {shown(value)}, not a {hint.__name__}")
    return value


def from_json(cls: type[T], data: Any, what: str) -> T:
    """The document `cls` from its JSON form; `what` names it in messages ("report.json")."""
    if not isinstance(data, dict):
        raise UsageError(f"{what} is {shown(data)}, not a mapping")
    fields = {_json_key(f): f for f in dataclasses.fields(cls) if f.name != "extra"}
    hints = _hints(cls)
    has_extra = any(f.name == "extra" for f in dataclasses.fields(cls))
    unknown = [k for k in data if k not in fields]
    if unknown and not has_extra:
        raise UsageError(f"{what} has an unknown key {unknown[0]!r} (written by another geobench version?)")
    values: dict[str, Any] = {}
    for json_key, field in fields.items():
        if json_key in data:
            values[field.name] = _convert(data[json_key], hints[field.name], f"{what}: {json_key}")
        elif _default(field) is dataclasses.MISSING:
            raise UsageError(f"{what} lacks {json_key!r}")
    if has_extra:
        values["extra"] = {k: data[k] for k in unknown}
    return cls(**values)


@dataclasses.dataclass
class Measures:
    """One evaluation of a model (docs/science.md#the-probe-task): validation loss and the probe's
    exact match on the in-distribution and OOD sets, its CE on the probe and the other positions."""

    val_loss: float
    p_in: float
    p_ood: float
    nll_ood: float
    lm_ood: float
    r_ood: float


@dataclasses.dataclass
class EvalRecord:
    """One line of evals.jsonl: the measures at `step` and the schedule and training around it.
    `step` 0 is the evaluation before any update (a derived run's first record); a derived run that
    diverged ends with a record holding only its step and `diverged`."""

    step: int
    val_loss: float | None = None
    p_in: float | None = None
    p_ood: float | None = None
    nll_ood: float | None = None
    lm_ood: float | None = None
    r_ood: float | None = None
    lam: float | None = dataclasses.field(default=None, metadata=key("lambda"))
    lr: float | None = None
    train_loss: float | None = None  # the mean composite loss of the steps since the last evaluation
    tokens: int | None = None
    train_seconds: float | None = None
    gradient_rule: dict[str, int | float | None] = dataclasses.field(default_factory=dict)
    diverged: bool = False

    @classmethod
    def of(cls, step: int, measures: Measures, **training: Any) -> EvalRecord:
        return cls(step=step, **dataclasses.asdict(measures), **training)


@dataclasses.dataclass
class MetricResult:
    """What a metric's compute returns; the report renders it without knowing the metric.

    - `scalars`: name → number (NaN and inf are written as null);
    - `series`: name → list; `tables`: name → rows (mappings of column → value);
    - `figures`: paths from `ctx.figure`; `captions`: figure path → what it shows (ctx.figure's
      `caption` lands here); `files`: paths from `ctx.write_file`;
    - `variant`: one sentence on how the numbers were computed (which of the source's choices);
    - `no_signal`: why the numbers mean nothing for this run (the report shows it instead of them);
    - `notes`: what else the reader must know (a part of the metric that was skipped, and why).
    """

    scalars: Mapping[str, int | float | None] = dataclasses.field(default_factory=dict)
    series: dict[str, list] = dataclasses.field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    figures: list[str] = dataclasses.field(default_factory=list)
    captions: dict[str, str] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)
    variant: str | None = None
    no_signal: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
