"""Shared-direction energy (SPEC §4, after repro_pkg), streamed one parameter at a time.

For checkpoints θ_t, an origin θ₀ and per-parameter unit directions φ̂_p:
τ_p = θ_t,p − θ₀,p; α_p = ⟨τ_p, φ̂_p⟩; E_phi = Σ α_p²; E_tau = Σ ‖τ_p‖²; E_perp = E_tau − E_phi;
p_phi = E_phi / E_tau; p_perp = 1 − p_phi; cos_eff = √p_phi.
Only one parameter of each checkpoint is in memory at a time, so models far larger than memory work.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from geobench.errors import UsageError

COLUMNS = ["opt", "iter", "n_params", "E_tau", "E_phi", "E_perp", "p_phi", "p_perp", "cos_eff"]
INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of one checkpoint: a .safetensors file, or a Hugging Face style directory holding
    either model.safetensors or shards listed in model.safetensors.index.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file():
            self.files = {name: self.path for name in self._keys(self.path)}
        elif (self.path / INDEX).exists():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).exists():
                    raise UsageError(f"checkpoint {str(self.path)!r}: shard {shard!r} listed in {INDEX} is missing")
            self.files = {name: self.path / shard for name, shard in weight_map.items()}
        elif (self.path / "model.safetensors").exists():
            single = self.path / "model.safetensors"
            self.files = {name: single for name in self._keys(single)}
        else:
            raise UsageError(f"checkpoint {str(self.path)!r} is neither a .safetensors file nor a directory "
                             f"with model.safetensors or {INDEX}")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise UsageError(f"checkpoint {str(self.path)!r} has no parameter {name!r}")
        with safe_open(str(self.files[name]), framework="pt") as fh:
            return fh.get_tensor(name).to(torch.float64)


def energy_rows(opt: str, checkpoints: Sequence[tuple[int, CheckpointReader]], origin: CheckpointReader,
                direction: Callable[[str], torch.Tensor], names: Sequence[str]) -> list[dict]:
    """One row per checkpoint, in SPEC's columns; φ̂_p = unit(direction(p)), τ measured from `origin`."""
    if not names:
        raise UsageError("the parameter set is empty")
    e_tau = [0.0] * len(checkpoints)
    e_phi = [0.0] * len(checkpoints)
    for name in names:
        theta0 = origin.get(name)
        phi = direction(name)
        if phi.shape != theta0.shape:
            raise UsageError(f"parameter {name!r}: the direction has shape {tuple(phi.shape)}, "
                             f"the origin {tuple(theta0.shape)}")
        phi_norm = phi.norm()
        phi_hat = phi / phi_norm if phi_norm > 0 else torch.zeros_like(phi)
        for i, (step, reader) in enumerate(checkpoints):
            theta = reader.get(name)
            if theta.shape != theta0.shape:
                raise UsageError(f"parameter {name!r} has shape {tuple(theta.shape)} at iter {step} "
                                 f"but {tuple(theta0.shape)} at the origin")
            tau = theta - theta0
            e_tau[i] += float(tau.pow(2).sum())
            e_phi[i] += float((tau * phi_hat).sum()) ** 2
    rows = []
    for (step, _), tau2, phi2 in zip(checkpoints, e_tau, e_phi):
        p_phi = phi2 / tau2 if tau2 > 0 else float("nan")
        rows.append({"opt": opt, "iter": step, "n_params": len(names), "E_tau": tau2, "E_phi": phi2,
                     "E_perp": tau2 - phi2, "p_phi": p_phi, "p_perp": 1 - p_phi,
                     "cos_eff": math.sqrt(max(p_phi, 0.0)) if tau2 > 0 else float("nan")})
    return rows


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_manifest(path: str | Path) -> dict[str, list[tuple[int, Path]]]:
    """{"optimizers": {NAME: {"checkpoints": [{"iter": N, "hf_path": DIR}, ...]}}} → NAME → [(iter, path)],
    sorted by iter; relative paths are relative to the manifest."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read manifest {str(path)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"manifest {str(path)!r} is not valid JSON (line {exc.lineno})") from None
    try:
        optimizers = data["optimizers"]
        return {name: sorted((int(c["iter"]), (path.parent / c["hf_path"]).resolve()) for c in entry["checkpoints"])
                for name, entry in optimizers.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"manifest {str(path)!r} does not have the form "
                         '{"optimizers": {NAME: {"checkpoints": [{"iter": N, "hf_path": DIR}]}}} '
                         f"({type(exc).__name__}: {exc})") from None


def select(names: Sequence[str], pattern: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--params {pattern!r} is not a valid regular expression: {exc}") from None
    return [n for n in names if regex.search(n)]


def manifest_energy(manifest: str | Path, opt: str, reference: str | None, pattern: str) -> list[dict]:
    """Energy of optimizer `opt`'s checkpoints against the reference optimizer's drift direction
    (θ₀ = the reference's first checkpoint, φ̂ = unit(its last − its first)); `reference` defaults to `opt`."""
    runs = read_manifest(manifest)
    for name in (opt, reference or opt):
        if name not in runs:
            raise UsageError(f"manifest has no optimizer {name!r}; it lists {', '.join(runs)}")
        if not runs[name]:
            raise UsageError(f"manifest lists no checkpoints for optimizer {name!r}")
    ref = runs[reference or opt]
    origin, end = CheckpointReader(ref[0][1]), CheckpointReader(ref[-1][1])
    checkpoints = [(step, CheckpointReader(path)) for step, path in runs[opt]]
    names = select(origin.names(), pattern)
    if not names:
        raise UsageError(f"--params {pattern!r} matches no parameter of {str(ref[0][1])!r}")
    return energy_rows(opt, checkpoints, origin, lambda n: end.get(n) - origin.get(n), names)
