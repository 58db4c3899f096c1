"""The run configuration: typed sections, presets, layering and validation.

Layering, lowest first: the defaults (the paper protocol of docs/science.md#training-protocol) < a
preset < a YAML file < key=value pairs from the command line. Keys are dotted (`train.steps`), or short where the
leaf name is unambiguous (`steps`, `seed`), or a hyperparameter the chosen optimizer declares
(`beta2`, `lr`) or the model family declares (`relax_steps` of the eqformer). Every value is
checked against its declaration (`Param`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from geobench.api import Config, ModelConfig, Param, UsageError, did_you_mean
from geobench.api.config import SECTIONS
from geobench.api.errors import shown
from geobench.api.params import read_yaml_file
from geobench.schedule import checkpoint_windows

if TYPE_CHECKING:
    from geobench.registry import Registry

# The CPU presets share a model and data; why each number is what it is: README, "Presets".
CPU_MODEL = {"n_layer": 2, "n_head": 4, "d_model": 64, "d_ff": 256, "context": 128}
CPU_DATA = {"source": "embedded", "train_stories": 6000, "val_stories": 300, "vocab_size": 2048}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"model": {"compile": True}, "data": {"tokenizer": "gpt2"}, "probe": {"codeword_min_chars": 3}},
    "tiny": {
        "model": CPU_MODEL,
        "data": CPU_DATA,
        "probe": {"p_probe": 0.5, "n_codewords": 128, "eval_examples": 200, "ood_gap": [40, 80]},
        "train": {
            "steps": 500, "batch_size": 32, "grad_accum": 1, "warmup": 50,
            "lambda_schedule": [[0, 2.0], [200, 4.0]], "eval_every": 50,
            "checkpoint_every": 25, "state_every": 100, "val_batches": 4, "val_batch_size": 32,
        },
    },
    "small": {
        "model": CPU_MODEL,
        "data": CPU_DATA,
        "probe": {"p_probe": 0.2, "n_codewords": 128, "eval_examples": 500, "ood_gap": [60, 85]},
        "train": {
            "steps": 1200, "batch_size": 32, "grad_accum": 1, "warmup": 120,
            "lambda_schedule": [[0, 2.0], [480, 4.0]], "eval_every": 25,
            "checkpoint_every": 25, "state_every": 200, "val_batches": 4, "val_batch_size": 32,
        },
    },
}

ALIASES = {"data": "data.source", "lambda": "train.lambda_schedule"}


def declared_fields() -> dict[str, Param]:
    """Every declared config key as a dotted path, with its declaration."""
    out = {}
    for f in dataclasses.fields(Config):
        if "param" in f.metadata:
            out[f.name] = f.metadata["param"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "param" in f.metadata:
                out[f"{section}.{f.name}"] = f.metadata["param"]
    return out


def resolve_key(key: str, optimizer_params: Mapping[str, Param], model_params: Mapping[str, Param]) -> str:
    """Map a user key (dotted, short, alias, optimizer hyperparameter or model parameter) to its
    dotted path."""
    fields = declared_fields()
    if key in fields or key == "optimizer.name":
        return key
    for section, declared, what in (("optimizer", optimizer_params, "optimizer hyperparameter"),
                                    ("model", model_params, "model parameter")):
        if key.startswith(f"{section}."):
            name = key.removeprefix(f"{section}.").removeprefix("params.")
            if name in declared:
                return f"{section}.params.{name}"
            if section == "optimizer" or key.startswith("model.params."):
                raise UsageError(f"unknown {what} {name!r}{did_you_mean(name, declared)}; "
                                 f"allowed: {', '.join(declared) or 'none'}")
    if key in ALIASES:
        return ALIASES[key]
    matches = [path for path in fields if path.rsplit(".", 1)[-1] == key]
    matches += [f"{section}.params.{key}" for section, declared in (("optimizer", optimizer_params),
                                                                     ("model", model_params)) if key in declared]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UsageError(f"key {key!r} is ambiguous: use one of {', '.join(matches)}")
    known = list(fields) + list(ALIASES) + list(optimizer_params) + list(model_params)
    known += [path.rsplit(".", 1)[-1] for path in fields]
    raise UsageError(f"unknown key {key!r}{did_you_mean(key, known)}")


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """['a=1', 'b.c=x'] → {'a': '1', 'b.c': 'x'}; a pair without '=' is an error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping → dotted keys. Section-level dicts are descended; values that are lists
    or the optimizer's params dict entries become leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as dotted keys; unreadable or malformed files are a UsageError."""
    data = read_yaml_file(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return flatten(data)


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path (`train.steps`) in a nested config dict."""
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def _plugin_params(section: str, declared: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [name for name in given if name not in declared]
    if unknown:
        raise UsageError(f"unknown {section} parameter {unknown[0]!r}{did_you_mean(unknown[0], declared)}; "
                         f"allowed: {', '.join(declared) or 'none'}")
    return {name: spec.check(f"{section}.{name}", given[name]) if name in given else spec.default
            for name, spec in declared.items()}


def build(tree: Mapping[str, Any], reg: Registry) -> Config:
    """Validate a nested dict of raw values into a Config (all values typed and in range), the
    optimizer's and the model family's own parameters against their plugins' declarations."""
    if not isinstance(tree, Mapping):
        raise UsageError(f"a configuration must be a mapping of sections, not {shown(tree)}")
    declared = declared_fields()
    unknown = [path for path in flatten(tree) if path not in declared and path != "optimizer.name"
               and not path.startswith(("optimizer.params.", "model.params."))]
    if unknown:
        raise UsageError(f"unknown config key {unknown[0]!r} (a run directory written by another geobench version?)")
    cfg = Config()
    for path, spec in declared.items():
        try:
            raw = _get(tree, path)
        except (KeyError, TypeError):
            continue
        value = spec.check(path, raw)
        if "." in path:
            section, leaf = path.split(".")
            setattr(getattr(cfg, section), leaf, value)
        else:
            setattr(cfg, path, value)
    cfg.optimizer.name = str(_get(tree, "optimizer.name"))
    cfg.optimizer.params = _plugin_params("optimizer", reg.optimizer(cfg.optimizer.name).params,
                                          tree.get("optimizer", {}).get("params") or {})
    cfg.model.params = _plugin_params("model", reg.model(cfg.model.family).params,
                                      tree.get("model", {}).get("params") or {})
    check_consistency(cfg)
    return cfg


def _pair(key: str, value: list, low: int = 0) -> None:
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UsageError(f"{key}={value!r} must be two integers [min, max]")
    if not low <= value[0] <= value[1]:
        raise UsageError(f"{key}={value!r} must satisfy {low} <= min <= max")


def check_consistency(cfg: Config) -> None:
    """Checks that involve more than one value."""
    if cfg.model.d_model % cfg.model.n_head:
        raise UsageError(
            f"model.n_head={cfg.model.n_head} must divide model.d_model={cfg.model.d_model}"
        )
    for key in ("train_gap", "ood_gap", "eval_prefix", "filler_ids"):
        _pair(f"probe.{key}", getattr(cfg.probe, key))
    sched = cfg.train.lambda_schedule
    ok = bool(sched) and all(
        isinstance(item, (list, tuple)) and len(item) == 2
        and isinstance(item[0], int) and not isinstance(item[0], bool)
        and isinstance(item[1], (int, float)) and not isinstance(item[1], bool) and 0 <= item[1] < math.inf
        for item in sched
    )
    if not ok or sched[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(sched, sched[1:])):
        raise UsageError(
            f"train.lambda_schedule={sched!r} must be [[0, lambda], [step, lambda], ...] "
            "with increasing steps and finite lambda >= 0"
        )
    for start, _, _ in checkpoint_windows(cfg.train.checkpoint_window):
        if start > cfg.train.steps:
            raise UsageError(f"train.checkpoint_window={shown(cfg.train.checkpoint_window)} has a window starting at "
                             f"step {start}, after the last step train.steps={cfg.train.steps}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resolve(optimizer: str | None, pairs: Mapping[str, Any], config_file: str | None, reg: Registry,
            auto_preset: str) -> Config:
    """Layer defaults < preset < file < command line and validate; `auto_preset` is what
    preset=auto becomes. The optimizer plugin declares its hyperparameters and may name the model
    family it trains; the model family declares its own parameters."""
    file_values: Mapping[str, Any] = read_yaml(config_file) if config_file else {}
    name = optimizer or file_values.get("optimizer.name")
    if not name:
        raise UsageError("name an optimizer: geobench run OPTIMIZER [key=value ...]")
    plugin = reg.optimizer(str(name))

    # the preset and the model family decide which keys exist: find them first (command line over file)
    def first_given(keys: tuple[str, ...], default: Any) -> Any:
        for values in (pairs, file_values):
            for key in keys:
                if key in values:
                    return values[key]
        return default

    preset = declared_fields()["preset"].check("preset", first_given(("preset",), "auto"))
    if preset == "auto":
        preset = auto_preset
    family = declared_fields()["model.family"].check(
        "model.family", first_given(("model.family", "family"), plugin.family or ModelConfig().family))
    model_params = reg.model(family).params

    tree = to_dict(Config())
    tree["preset"] = preset
    tree["optimizer"]["name"] = str(name)
    tree["model"]["family"] = family
    for section, preset_values in PRESETS[preset].items():
        tree[section].update(copy.deepcopy(preset_values))
    for given, source in ((file_values, str(config_file)), (pairs, "")):
        for key, raw in given.items():
            if key in ("preset", "optimizer.name"):
                continue
            try:
                path = resolve_key(key, plugin.params, model_params)
            except UsageError as exc:
                raise UsageError(f"{exc} (in {source})" if source else str(exc)) from None
            set_path(tree, path, raw)
    return build(tree, reg)


def save(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
