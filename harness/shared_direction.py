"""Shared-direction energy (docs/science.md#shared-direction-energy, after repro_pkg), streamed one parameter at a time.

For checkpoints θ_t, an origin θ₀ and per-parameter unit directions φ̂_p:
τ_p = θ_t,p − θ₀,p; α_p = ⟨τ_p, φ̂_p⟩; E_phi = Σ α_p²; E_tau = Σ ‖τ_p‖²; E_perp = E_tau − E_phi;
p_phi = E_phi / E_tau; p_perp = 1 − p_phi; cos_eff = √p_phi.

Only one parameter is in memory at a time (its origin, its direction, the previous and the current
checkpoint's values, and each optimizer's final drift for the pairwise cosines), so peak memory is
the largest parameter times a small constant, whatever the number of checkpoints: models far larger
than memory work. θ₀ and φ̂ may be given as a directory of per-parameter .npz files (repro_pkg's
layout), a .safetensors file or a Hugging Face checkpoint directory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from geobench.api import UsageError
from geobench.checkpoints import CheckpointReader, Source, open_source

__all__ = [
    "COLUMNS",
    "Measurement",
    "chosen_optimizers",
    "energy_rows",
    "manifest_energy",
    "measure",
    "read_manifest",
    "select",
    "to_csv",
]

COLUMNS = ["opt", "iter", "n_params", "E_tau", "E_phi", "E_perp", "p_phi", "p_perp", "cos_eff"]
UNIT_TOLERANCE = 1e-3  # a given φ̂ whose norm is further than this from 1 is normalized, with a notice


@dataclasses.dataclass
class Measurement:
    """Rows in the reproducer's columns (by optimizer, then iter), the per-checkpoint step energy
    ‖θ_i − θ_(i−1)‖² (from θ₀ for the first), and the inner products of the optimizers' final drifts."""

    rows: list[dict]
    step_energy: dict[str, list[float]]
    final_dots: np.ndarray
    opts: list[str]

    def final_cosines(self) -> np.ndarray:
        """Pairwise cosines of the final drift directions over the whole parameter set (each
        parameter weighted by its drift energy)."""
        norms = np.sqrt(np.clip(np.diag(self.final_dots), 1e-300, None))
        return self.final_dots / np.outer(norms, norms)


def measure(trajectories: Mapping[str, Sequence[tuple[int, Source]]], origin: Source,
            direction: Callable[[str], torch.Tensor], names: Sequence[str],
            notice: Callable[[str], None] | None = None) -> Measurement:
    """Stream every parameter once through every checkpoint of every optimizer. With `notice`, a
    direction that is not unit norm is reported before it is normalized (a given φ̂ should be unit)."""
    if not names:
        raise UsageError("the parameter set is empty")
    opts = list(trajectories)
    e_tau = {o: [0.0] * len(trajectories[o]) for o in opts}
    e_phi = {o: [0.0] * len(trajectories[o]) for o in opts}
    e_step = {o: [0.0] * len(trajectories[o]) for o in opts}
    dots = np.zeros((len(opts), len(opts)))
    zero: list[str] = []  # parameters whose direction is zero
    for name in names:
        theta0 = origin.get(name)
        phi = direction(name)
        if phi.shape != theta0.shape:
            raise UsageError(f"parameter {name!r}: the direction has shape {tuple(phi.shape)}, "
                             f"θ₀ {tuple(theta0.shape)} ({str(origin.where(name))!r})")
        norm = float(phi.norm())
        if norm == 0:
            zero.append(name)
        if notice is not None and abs(norm - 1) > UNIT_TOLERANCE:
            notice(f"φ̂ of {name!r} has norm {norm:.6g}; " + ("normalized to 1" if norm > 0 else
                                                            "no direction: it adds nothing to E_phi"))
        phi_hat = phi / norm if norm > 0 else torch.zeros_like(phi)
        finals = []
        for o in opts:
            previous, tau = theta0, torch.zeros_like(theta0)
            for i, (step, source) in enumerate(trajectories[o]):
                theta = source.get(name)
                if theta.shape != theta0.shape:
                    raise UsageError(f"parameter {name!r} has shape {tuple(theta.shape)} at iter {step} of {o!r} "
                                     f"({str(source.where(name))!r}) but {tuple(theta0.shape)} in θ₀")
                tau = theta - theta0
                e_tau[o][i] += float(tau.pow(2).sum())
                e_phi[o][i] += float((tau * phi_hat).sum()) ** 2
                e_step[o][i] += float((theta - previous).pow(2).sum())
                previous = theta
            finals.append(tau.reshape(-1))
        stacked = torch.stack(finals)
        dots += (stacked @ stacked.T).numpy()
    if len(zero) == len(names):
        raise UsageError(f"φ̂ is zero for every one of the {len(names)} parameters: there is no direction to "
                         "measure the energy along")
    rows = [row(o, step, len(names), tau2, phi2) for o in opts
            for (step, _), tau2, phi2 in zip(trajectories[o], e_tau[o], e_phi[o])]
    return Measurement(rows, e_step, dots, opts)


def row(opt: str, step: int, n_params: int, tau2: float, phi2: float) -> dict:
    p_phi = phi2 / tau2 if tau2 > 0 else float("nan")
    return {"opt": opt, "iter": step, "n_params": n_params, "E_tau": tau2, "E_phi": phi2, "E_perp": tau2 - phi2,
            "p_phi": p_phi, "p_perp": 1 - p_phi, "cos_eff": math.sqrt(max(p_phi, 0.0)) if tau2 > 0 else float("nan")}


def energy_rows(opt: str, checkpoints: Sequence[tuple[int, Source]], origin: Source,
                direction: Callable[[str], torch.Tensor], names: Sequence[str]) -> list[dict]:
    """The rows of one optimizer's checkpoints; φ̂_p = unit(direction(p)), τ measured from `origin`."""
    return measure({opt: checkpoints}, origin, direction, names).rows


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_manifest(path: str | Path) -> dict[str, list[tuple[int, Path]]]:
    """{"optimizers": {NAME: {"checkpoints": [{"iter": N, "hf_path": DIR}, ...]}}} → NAME → [(iter, path)],
    sorted by iter; relative paths are relative to the manifest; an iter may appear once per optimizer."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read manifest {str(path)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"manifest {str(path)!r} is not valid JSON (line {exc.lineno})") from None
    form = '{"optimizers": {NAME: {"checkpoints": [{"iter": N, "hf_path": DIR}]}}}'
    optimizers = data.get("optimizers") if isinstance(data, dict) else None
    if not isinstance(optimizers, dict):
        raise UsageError(f"manifest {str(path)!r} does not have the form {form}: 'optimizers' must map names to entries")
    if not optimizers:
        raise UsageError(f"manifest {str(path)!r} lists no optimizers")
    try:
        runs = {str(name): sorted((_iter(c["iter"]), (path.parent / str(c["hf_path"])).resolve())
                                  for c in entry["checkpoints"])
                for name, entry in optimizers.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"manifest {str(path)!r} does not have the form {form} ({type(exc).__name__}: {exc})") from None
    for name, checkpoints in runs.items():
        iters = [it for it, _ in checkpoints]
        repeated = sorted({it for it in iters if iters.count(it) > 1})
        if repeated:
            raise UsageError(f"manifest {str(path)!r}: optimizer {name!r} lists iter {repeated[0]} more than once")
        if not checkpoints:
            raise UsageError(f"manifest {str(path)!r} lists no checkpoints for optimizer {name!r}")
    return runs


def _iter(value: object) -> int:
    """A manifest's iter: a non-negative integer (10.0 is 10; 10.5, true and -1 are refused)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value < 0):
        raise ValueError(f"iter {value!r} is not a non-negative integer")
    return int(value)


def select(names: Sequence[str], pattern: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--params {pattern!r} is not a valid regular expression: {exc}") from None
    return [n for n in names if regex.search(n)]


def chosen_optimizers(runs: Mapping[str, object], spec: str) -> list[str]:
    """`NAME`, `A,B` or `all` → optimizer names of the manifest, in the order given (manifest order for all)."""
    names = list(runs) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    missing = [n for n in names if n not in runs]
    if missing or not names:
        raise UsageError(f"manifest has no optimizer {(missing or [spec])[0]!r}; it lists {', '.join(runs)}")
    return names


def manifest_energy(manifest: str | Path, opts: str, reference: str | None = None, pattern: str | None = None,
                    theta0: str | Path | None = None, phi_hat: str | Path | None = None,
                    notice: Callable[[str], None] | None = None) -> Measurement:
    """Energy of the manifest's optimizers `opts` (`NAME`, `A,B` or `all`).

    θ₀: `theta0` (npz directory, .safetensors file or HF directory) or else the first checkpoint of
    `reference` (default: the first optimizer named). φ̂: `phi_hat`, normalized with a notice where
    it is not unit, or else the unit drift last − first of `reference`. The parameters: those matching
    `pattern`, else those of `phi_hat`, else all of θ₀."""
    runs = read_manifest(manifest)
    chosen = chosen_optimizers(runs, opts)
    ref = chosen_optimizers(runs, reference)[0] if reference else chosen[0]
    origin: Source = open_source(theta0) if theta0 else CheckpointReader(runs[ref][0][1])
    given_phi = open_source(phi_hat) if phi_hat else None
    if pattern is not None:
        names = select((given_phi or origin).names(), pattern)
        if not names:
            raise UsageError(f"--params {pattern!r} matches no parameter of {str((given_phi or origin).path)!r}")
    else:
        names = (given_phi or origin).names()
    if given_phi is not None:
        direction: Callable[[str], torch.Tensor] = given_phi.get
    else:  # the reference's unit drift, last minus first
        first, last = CheckpointReader(runs[ref][0][1]), CheckpointReader(runs[ref][-1][1])
        direction = lambda n: last.get(n) - first.get(n)  # noqa: E731
    trajectories = {o: [(it, CheckpointReader(p)) for it, p in runs[o]] for o in chosen}
    return measure(trajectories, origin, direction, names, notice=notice if given_phi else None)
