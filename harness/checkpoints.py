"""Reading checkpoints that geobench did not write: a .safetensors file, a Hugging Face checkpoint
directory (model.safetensors, or shards listed in model.safetensors.index.json), or a directory of
per-parameter .npz files (repro_pkg's θ₀ and φ̂). Tensors are read one parameter at a time; every
failure is a one-line UsageError naming the file and the parameter."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from geobench.api import UsageError

__all__ = ["CheckpointReader", "NpzDirectory", "Source", "load_weights", "open_source"]

INDEX = "model.safetensors.index.json"


class Source(Protocol):
    """Per-parameter tensors: a checkpoint, or θ₀ / φ̂ as shipped by repro_pkg."""

    @property
    def path(self) -> Path: ...

    def names(self) -> list[str]: ...

    def where(self, name: str) -> Path: ...

    def get(self, name: str) -> torch.Tensor: ...


def _checked(tensor: torch.Tensor, where: Path, name: str) -> torch.Tensor:
    values = tensor.to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise UsageError(f"{str(where)!r}: parameter {name!r} holds non-finite values")
    return values


class _ParameterFiles:
    """Which file holds each parameter."""

    path: Path
    files: dict[str, Path]

    def missing(self, name: str) -> str:
        return f"checkpoint {str(self.path)!r} has no parameter {name!r}"

    def names(self) -> list[str]:
        return list(self.files)

    def where(self, name: str) -> Path:
        if name not in self.files:
            raise UsageError(self.missing(name))
        return self.files[name]


class CheckpointReader(_ParameterFiles):
    """Tensors of one checkpoint: a .safetensors file, or a Hugging Face style directory holding
    either model.safetensors or shards listed in model.safetensors.index.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file():
            self.files = {name: self.path for name in self._keys(self.path)}
        elif (self.path / INDEX).exists():
            try:
                weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{str(self.path / INDEX)!r} is not a safetensors index (no weight_map)") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).exists():
                    raise UsageError(f"checkpoint {str(self.path)!r}: shard {shard!r} listed in {INDEX} is missing")
            self.files = {name: self.path / shard for name, shard in weight_map.items()}
        elif (self.path / "model.safetensors").exists():
            single = self.path / "model.safetensors"
            self.files = {name: single for name in self._keys(single)}
        elif not self.path.exists():
            raise UsageError(f"checkpoint {str(self.path)!r} does not exist")
        else:
            raise UsageError(f"checkpoint {str(self.path)!r} is neither a .safetensors file nor a directory "
                             f"with model.safetensors or {INDEX}")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"cannot read {str(path)!r} as safetensors: {exc}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self.where(name)), framework="pt") as fh:
            return tuple(fh.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        where = self.where(name)
        try:
            with safe_open(str(where), framework="pt") as fh:
                tensor = fh.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"cannot read parameter {name!r} from {str(where)!r}: {exc}") from None
        return _checked(tensor, where, name)

    def tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint (or only `names`) as stored: its own dtype, unchecked,
        memory-mapped (the weights of a geobench run, its state included, go back into a model)."""
        wanted = self.names() if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        for path in dict.fromkeys(self.where(name) for name in wanted):
            with safe_open(str(path), framework="pt") as fh:
                out.update({name: fh.get_tensor(name) for name in wanted if self.files[name] == path})
        return {name: out[name] for name in wanted}


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Copy `weights` (name → tensor, every parameter of the model) into the model in place."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    return model


class NpzDirectory(_ParameterFiles):
    """One .npz file per parameter, named after it (`model.layers.7.mlp.down_proj.weight.npz`); the
    array is the file's only array, or the one stored under the parameter's name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = {p.name.removesuffix(".npz"): p for p in sorted(self.path.glob("*.npz"))}
        if not self.files:
            raise UsageError(f"{str(self.path)!r} holds no .npz files")

    def missing(self, name: str) -> str:
        return f"{str(self.path)!r} has no file {name + '.npz'!r} for parameter {name!r}"

    def get(self, name: str) -> torch.Tensor:
        where = self.where(name)
        try:
            with np.load(where) as data:
                keys = list(data.keys())
                if name in keys:
                    array = data[name]
                elif len(keys) == 1:
                    array = data[keys[0]]
                else:
                    raise UsageError(f"{str(where)!r} holds {len(keys)} arrays ({', '.join(keys)}) and none is "
                                     f"named {name!r}")
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {str(where)!r} as .npz: {exc}") from None
        return _checked(torch.from_numpy(np.asarray(array, dtype=np.float64)), where, name)


def open_source(path: str | Path) -> CheckpointReader | NpzDirectory:
    """θ₀ or φ̂ from a directory of .npz files, a .safetensors file or a Hugging Face checkpoint directory."""
    path = Path(path)
    if path.is_dir() and any(path.glob("*.npz")) and not any(path.glob("*.safetensors")):
        return NpzDirectory(path)
    return CheckpointReader(path)
