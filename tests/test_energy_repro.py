"""`geobench energy` as repro_pkg users run it: tiny Hugging Face style sharded checkpoints with Qwen3
parameter names (bf16 and fp32), θ₀ and φ̂ given as .npz directories or safetensors, several
optimizers in one CSV, verdicts per trajectory, and every bad input as one line with exit code 2."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import hf_checkpoint, run_cli
from geobench.energy_report import Thresholds, classify, spike
from geobench.shared_direction import COLUMNS, Measurement

MEASURED = [f"model.layers.{i}.mlp.down_proj.weight" for i in (7, 14, 21, 28)] + [
    "model.layers.21.self_attn.q_proj.weight", "model.layers.21.self_attn.o_proj.weight"]
SHAPES = {n: ((8, 12) if "down_proj" in n else (8, 8)) for n in MEASURED}
OTHER = {"model.embed_tokens.weight": (20, 8), "model.layers.7.input_layernorm.weight": (8,)}
ITERS = (10, 20, 30)


def write_npz_dir(directory, arrays, key_by_name=False):
    directory.mkdir(parents=True)
    for name, array in arrays.items():
        if key_by_name:  # several arrays in the file: the one named after the parameter counts
            np.savez(directory / f"{name}.npz", **{name: array, "step": np.array(3)})
        else:
            np.savez(directory / f"{name}.npz", array)
    return directory


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """Base weights θ₀, a shared direction φ̂ (not unit: the CLI normalizes it), and three optimizers'
    checkpoints, one of them stored in bf16."""
    root = tmp_path_factory.mktemp("repro")
    rng = np.random.default_rng(7)
    base = {n: rng.normal(size=s) for n, s in {**SHAPES, **OTHER}.items()}
    phi = {n: rng.normal(size=SHAPES[n]) for n in MEASURED}
    moves = {"adam": (1.0, 0.05), "muon": (0.9, 0.3), "sgd": (0.2, 1.0)}  # (along φ̂, across) per iter
    manifest = {"optimizers": {}}
    stored = {}
    for opt, (along, across) in moves.items():
        dtype = torch.bfloat16 if opt == "muon" else torch.float32
        entries = []
        for it in ITERS:
            tensors = {}
            for n in base:
                value = base[n] + (along * it / 10 * phi[n] + across * it / 10 * rng.normal(size=base[n].shape)
                                   if n in phi else 0.01 * rng.normal(size=base[n].shape))
                tensors[n] = torch.from_numpy(value).to(dtype)
            hf_checkpoint(root / opt / f"iter_{it}", tensors, shards=3)
            stored[(opt, it)] = {n: t.double().numpy() for n, t in tensors.items()}
            entries.append({"iter": it, "hf_path": f"{opt}/iter_{it}"})
        manifest["optimizers"][opt] = {"checkpoints": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_npz_dir(root / "theta_0", {n: base[n] for n in MEASURED})
    write_npz_dir(root / "phi_hat", {n: 3.0 * phi[n] for n in MEASURED}, key_by_name=True)
    save_file({n: torch.from_numpy(base[n]) for n in MEASURED}, root / "theta0.safetensors")
    save_file({n: torch.from_numpy(phi[n] / np.linalg.norm(phi[n])) for n in MEASURED}, root / "phi.safetensors")
    return root, base, phi, stored


def expected_rows(base, phi, stored, opts):
    rows = []
    for opt in opts:
        for it in ITERS:
            tau = {n: stored[(opt, it)][n] - base[n] for n in MEASURED}
            e_tau = sum((t**2).sum() for t in tau.values())
            e_phi = sum(((tau[n] * phi[n]).sum() / np.linalg.norm(phi[n])) ** 2 for n in MEASURED)
            rows.append((opt, it, e_tau, e_phi))
    return rows


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def energy(root, *extra, out="traj.csv"):
    return run_cli("energy", "--manifest", str(root / "manifest.json"), *extra, "--out", str(root / "out" / out))


def test_several_optimizers_with_given_theta0_and_phi_hat_match_numpy(repro):
    root, base, phi, stored = repro
    result = energy(root, "--opt", "all", "--theta0", str(root / "theta_0"), "--phi-hat", str(root / "phi_hat"))
    assert result.returncode == 0, result.stderr
    table = read_csv(root / "out" / "traj.csv")
    assert list(table[0]) == COLUMNS
    assert [(r["opt"], int(r["iter"])) for r in table] == [(o, it) for o in ("adam", "muon", "sgd") for it in ITERS]
    assert {int(r["n_params"]) for r in table} == {6}  # the measured set: the parameters φ̂ holds
    for row, (_, _, e_tau, e_phi) in zip(table, expected_rows(base, phi, stored, ("adam", "muon", "sgd"))):
        assert float(row["E_tau"]) == pytest.approx(e_tau, rel=1e-9)
        assert float(row["E_phi"]) == pytest.approx(e_phi, rel=1e-9)
        assert float(row["cos_eff"]) == pytest.approx(np.sqrt(e_phi / e_tau), rel=1e-9)
    # φ̂ is not unit: one notice per parameter, naming it and its norm
    notices = [line for line in result.stderr.splitlines() if "notice" in line]
    norm = np.linalg.norm(3.0 * phi["model.layers.7.mlp.down_proj.weight"])
    assert len(notices) == 6
    assert f"φ̂ of 'model.layers.7.mlp.down_proj.weight' has norm {norm:.6g}; normalized to 1" in result.stderr
    # the verdicts, the shared-direction check and the pages beside the CSV
    assert "adam: 3 checkpoints" in result.stdout and "healthy" in result.stdout
    text = (root / "out" / "traj.md").read_text()
    assert "## Verdict per optimizer" in text and "| sgd | diffuse |" not in text
    html = (root / "out" / "traj.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert (root / "out" / "figures" / "traj.png").exists()


def test_theta0_as_safetensors_or_hf_directory_and_a_params_regex(repro):
    root, base, phi, stored = repro
    npz = energy(root, "--opt", "sgd,adam", "--theta0", str(root / "theta_0"), "--phi-hat", str(root / "phi_hat"),
                 out="npz.csv")
    st = energy(root, "--opt", "sgd,adam", "--theta0", str(root / "theta0.safetensors"),
                "--phi-hat", str(root / "phi.safetensors"), out="st.csv")
    assert npz.returncode == st.returncode == 0, npz.stderr + st.stderr
    assert "notice" not in st.stderr  # a unit φ̂ needs no normalizing
    for a, b in zip(read_csv(root / "out" / "npz.csv"), read_csv(root / "out" / "st.csv")):
        assert (a["opt"], a["iter"], a["E_tau"]) == (b["opt"], b["iter"], b["E_tau"])
        assert float(a["E_phi"]) == pytest.approx(float(b["E_phi"]), rel=1e-12)
    assert [r["opt"] for r in read_csv(root / "out" / "st.csv")][::3] == ["sgd", "adam"]
    # θ₀ as an HF checkpoint directory, only the down projections
    hf = energy(root, "--opt", "adam", "--theta0", str(root / "adam" / "iter_10"), "--phi-hat", str(root / "phi_hat"),
                "--params", r"down_proj", out="hf.csv")
    assert hf.returncode == 0, hf.stderr
    rows = read_csv(root / "out" / "hf.csv")
    assert {int(r["n_params"]) for r in rows} == {4} and float(rows[0]["E_tau"]) == 0.0


def test_defaults_take_theta0_and_phi_hat_from_the_reference_optimizer(repro):
    root, _, _, stored = repro
    result = energy(root, "--opt", "sgd", "--ref", "adam", "--params", "layers", out="ref.csv")
    assert result.returncode == 0, result.stderr
    assert "notice" not in result.stderr  # a drift direction is normalized silently
    names = [n for n in stored[("adam", 10)] if "layers" in n]
    origin, end = stored[("adam", 10)], stored[("adam", 30)]
    for row in read_csv(root / "out" / "ref.csv"):
        theta = stored[("sgd", int(row["iter"]))]
        e_phi = sum((((theta[n] - origin[n]) * (end[n] - origin[n])).sum() / np.linalg.norm(end[n] - origin[n])) ** 2
                    for n in names)
        assert float(row["E_phi"]) == pytest.approx(e_phi, rel=1e-9)


def test_pairwise_cosines_of_the_final_drifts(repro):
    root, base, _, stored = repro
    result = energy(root, "--opt", "all", "--theta0", str(root / "theta_0"), "--phi-hat", str(root / "phi_hat"),
                    out="pairs.csv")
    assert result.returncode == 0, result.stderr
    drift = {o: np.concatenate([(stored[(o, 30)][n] - base[n]).ravel() for n in MEASURED]) for o in ("adam", "muon", "sgd")}
    want = drift["adam"] @ drift["sgd"] / np.linalg.norm(drift["adam"]) / np.linalg.norm(drift["sgd"])
    text = (root / "out" / "pairs.md").read_text()
    header = text.splitlines().index("|  | adam | muon | sgd |")
    line = text.splitlines()[header + 2]  # the adam row of the cosine matrix
    assert line.split("|")[2].strip() == "1.000"  # one notation for the whole matrix
    assert float(line.split("|")[4]) == pytest.approx(want, abs=5e-4)  # columns: adam, muon, sgd


@pytest.mark.parametrize("break_it, message", [
    ("missing_in_checkpoint", "has no parameter 'model.layers.14.mlp.down_proj.weight'"),
    ("missing_in_theta0", "has no file 'model.layers.21.self_attn.o_proj.weight.npz'"),
    ("missing_in_phi", "matches no parameter"),
    ("shape", "has shape (8, 8) at iter 20 of 'sgd'"),
    ("non_finite", "parameter 'model.layers.28.mlp.down_proj.weight' holds non-finite values"),
    ("unreadable", "cannot read parameter"),
    ("repeated_iter", "optimizer 'sgd' lists iter 20 more than once"),
])
def test_bad_inputs_are_one_line_exit_2_and_no_csv(repro, tmp_path, break_it, message):
    import shutil

    src, *_ = repro
    root = tmp_path / "copy"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("out"))
    sgd20 = root / "sgd" / "iter_20"
    index = json.loads((sgd20 / "model.safetensors.index.json").read_text())
    params = ["--theta0", str(root / "theta_0"), "--phi-hat", str(root / "phi_hat")]
    if break_it == "missing_in_checkpoint":
        del index["weight_map"]["model.layers.14.mlp.down_proj.weight"]
        (sgd20 / "model.safetensors.index.json").write_text(json.dumps(index))
    elif break_it == "missing_in_theta0":
        (root / "theta_0" / "model.layers.21.self_attn.o_proj.weight.npz").unlink()
    elif break_it == "missing_in_phi":
        params += ["--params", "embed_tokens"]
    elif break_it in ("shape", "non_finite", "unreadable"):
        name = {"shape": "model.layers.7.mlp.down_proj.weight", "non_finite": "model.layers.28.mlp.down_proj.weight",
                "unreadable": "model.layers.21.self_attn.q_proj.weight"}[break_it]
        shard = sgd20 / index["weight_map"][name]
        if break_it == "unreadable":
            shard.write_bytes(shard.read_bytes()[:-40])  # a truncated shard
        else:
            from safetensors.torch import load_file
            tensors = load_file(shard)
            tensors[name] = torch.zeros(8, 8) if break_it == "shape" else torch.full(tensors[name].shape, float("nan"))
            save_file(tensors, shard)
    elif break_it == "repeated_iter":
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["optimizers"]["sgd"]["checkpoints"].append({"iter": 20, "hf_path": "sgd/iter_30"})
        (root / "manifest.json").write_text(json.dumps(manifest))
    result = energy(root, "--opt", "all", *params)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "notice" not in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert not (root / "out").exists()


def planted(opt, along, across, jump_at=None):
    """cos_eff and energies of a trajectory with drift a·t along φ̂ and b·t across it."""
    rows, step = [], []
    previous = 0.0
    for it in range(100, 1100, 100):
        a, b = along * it, across(it)
        if jump_at is not None and it >= jump_at:
            a += 50.0
        e_phi, e_tau = a**2, a**2 + b**2
        rows.append({"opt": opt, "iter": it, "n_params": 6, "E_tau": e_tau, "E_phi": e_phi, "E_perp": b**2,
                     "p_phi": e_phi / e_tau, "p_perp": b**2 / e_tau, "cos_eff": np.sqrt(e_phi / e_tau)})
        step.append((np.sqrt(e_tau) - previous) ** 2)
        previous = np.sqrt(e_tau)
    return rows, step


def test_reading_guide_classes_on_planted_trajectories():
    limits = Thresholds()
    healthy = classify(*planted("adam", 0.1, lambda t: 0.01 * t), limits)
    diffuse = classify(*planted("lion", 0.1, lambda t: 0.0004 * t**2), limits)
    collapse = classify(*planted("bad", 0.1, lambda t: 0.01 * t, jump_at=700), limits)
    assert healthy["verdict"] == "healthy" and healthy["spike_iter"] is None
    assert diffuse["verdict"] == "diffuse" and diffuse["perp_over_phi_final"] > 3
    assert collapse["verdict"] == "step-energy collapse" and collapse["spike_iter"] == 700
    mixed = classify(*planted("x", 0.1, lambda t: 0.06 * t), limits)  # cos_eff 0.86, flat
    assert mixed["verdict"] == "mixed"
    # each verdict names the threshold that decided it; "mixed" says which conditions failed
    assert healthy["why"].startswith("cos_eff >= 0.9 at every checkpoint (min ")
    assert collapse["why"] == "at iter 700 the step energy per iter exceeds 10 × the median before it"
    assert diffuse["why"].count(">=") == 3 and "E_perp/E_phi ended at" in diffuse["why"]
    assert mixed["why"].startswith("not healthy: cos_eff min 0.8") and "< 0.9; not diffuse: cos_eff fell" in mixed["why"]
    assert "(not >= 0.1)" in mixed["why"]
    assert spike([10, 20, 30, 40], [100.0, 1.0, 1.0, 1.0], 10) is None  # the first step from θ₀ is history only
    assert Measurement([], {}, np.eye(2) * 4, ["a", "b"]).final_cosines().tolist() == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("opt", ["sgd", "muon"])  # fp32 and bf16 shards
def test_backbone_of_a_manifest_trajectory_against_numpy(repro, tmp_path, opt):
    import jsonschema

    from geobench import report

    root, _, _, stored = repro
    out = tmp_path / "analysis"
    result = run_cli("analyze", "--manifest", str(root / "manifest.json"), "--opt", opt, "--params", r"layers\.",
                     "--out", str(out), "backbone.rotation_window=3")
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, report.load_schema("report"))
    assert "run" not in doc and "evals" not in doc and doc["trajectory"]["steps"] == list(ITERS)
    names = sorted(n for n in stored[(opt, 10)] if "layers." in n)
    assert doc["trajectory"]["parameters"] == len(names)
    thetas = np.stack([np.concatenate([stored[(opt, it)][n].ravel() for n in names]) for it in ITERS])
    delta = thetas[1:] - thetas[0]
    for key, rows in (("pc1", delta / np.linalg.norm(delta, axis=1, keepdims=True)), ("pc1_raw", delta)):
        s = np.linalg.svd(rows, compute_uv=False)
        assert doc["metrics"]["backbone"]["scalars"][key] == pytest.approx(s[0] ** 2 / (s**2).sum(), abs=1e-9)
    assert doc["metrics"]["backbone"]["scalars"]["drift"] == pytest.approx(np.linalg.norm(delta[-1]), rel=1e-9)
    assert "no training section" in (out / "report.md").read_text()
    assert "no training section" in (out / "report.html").read_text()

    compared = run_cli("report", str(out), "--out", str(tmp_path / "cmp"))  # there is no training to compare
    assert compared.returncode == 2 and len(compared.stderr.strip().splitlines()) == 1, compared.stderr
    assert "is the report of a manifest's checkpoints" in compared.stderr and not (tmp_path / "cmp").exists()


def test_manifest_analysis_refuses_what_checkpoints_cannot_give(repro, tmp_path):
    root, *_ = repro
    base = ["analyze", "--manifest", str(root / "manifest.json"), "--opt", "sgd", "--out", str(tmp_path / "a")]
    for extra, message in ((["--metric", "alignment"], "metric 'alignment' cannot apply to a manifest: it needs the run's model"),
                           (["--metric", "energy"], "metric 'energy' cannot apply to a manifest: it needs a geobench run"),
                           (["backbone.scope=trunk"], "scope='trunk': a manifest's trajectory has only the parameters"),
                           (["--params", "nothing"], "--params 'nothing' matches no parameter")):
        result = run_cli(*base, *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
