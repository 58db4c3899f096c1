"""Common tests over the registry (after scikit-learn's estimator checks): every installed
optimizer, metric and model plugin — the built-ins and any package installed beside them, like
the example geobench-lion in tox's plugin env — is held to the same contract."""

import dataclasses
import json

import pytest
import torch

from conftest import FAST
from geobench import cli, config, optim
from geobench.analysis import metric_options, plan_metrics, run_metrics
from geobench.api import Param, TrainingSchedule
from geobench.documents import MetricOutcome
from geobench.registry import installed
from geobench.rundir import RunDir
from geobench.runner import open_analysis
from geobench.train import prepare, train

REG = installed()


def refused(argv: list[str], key: str, tmp_path, capsys) -> None:
    """`argv` ends with KEY=VALUE, a value the declaration of KEY refuses: exit 2, one line."""
    code = cli.main([*argv, "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("geobench: error: ") and key in err, err
    assert not (tmp_path / "never").exists()


def declared(params) -> list:
    """The declarations that refuse some value (a free-form string admits every one)."""
    return [(key, spec) for key, spec in params.items() if spec.invalid_example() is not None]


def test_invalid_examples_come_from_the_constraints_and_are_refused():
    from geobench.api import UsageError

    for spec in (Param(1, low=0), Param(0.5, low=0, high=1, high_open=True), Param("a", choices=("a", "b")),
                 Param("trunk", pattern=r"trunk|all"), Param(True), Param([], items=int), Param([1, 2]),
                 Param(2.0), Param({}, kind=dict)):
        with pytest.raises(UsageError):
            spec.check("key", spec.invalid_example())
    assert Param("x", "free-form").invalid_example() is None
    assert Param(None, "a name or none", kind=str, nullable=True).invalid_example() is None


def concrete_optimizers() -> list[str]:
    return [name for name, plugin in REG.optimizers.items() if plugin.variants is None]


def family_of(optimizer: str) -> str:
    return REG.optimizer(optimizer).family or "gpt"


def optimizer_for(family: str) -> str:
    """An optimizer that trains `family` (for the model's and the metrics' parameter checks)."""
    return next(name for name in concrete_optimizers() if family_of(name) == family)


@pytest.mark.parametrize("name", concrete_optimizers())
def test_every_optimizer_hyperparameter_refuses_an_invalid_value(name, tmp_path, capsys):
    for key, spec in declared(REG.optimizer(name).params):
        refused(["run", name, *FAST, f"{key}={spec.invalid_example()}"], key, tmp_path, capsys)


@pytest.mark.parametrize("name", [n for n, p in REG.optimizers.items() if p.variants is not None])
def test_an_optimizer_with_variants_refuses_its_bare_name(name, tmp_path, capsys):
    refused(["run", name, *FAST], name, tmp_path, capsys)


@pytest.mark.parametrize("family", sorted(REG.models))
def test_every_model_parameter_refuses_an_invalid_value(family, tmp_path, capsys):
    for key, spec in declared(REG.model(family).params):
        refused(["run", optimizer_for(family), *FAST, f"model.family={family}", f"model.{key}={spec.invalid_example()}"],
                key, tmp_path, capsys)


def applicable_run(metric: str) -> list[str]:
    """A run command to which `metric` applies."""
    for family in sorted(REG.models, key=lambda f: f != "gpt"):
        optimizer = optimizer_for(family)
        cfg = config.resolve(optimizer, config.parse_pairs(FAST), None, REG, "tiny")
        if REG.unmet_need(metric, cfg) is None:
            return ["run", optimizer, *FAST]
    pytest.fail(f"metric {metric!r} applies to no installed model family")


@pytest.mark.parametrize("name", sorted(REG.metrics))
def test_every_metric_option_refuses_an_invalid_value(name, tmp_path, capsys):
    for key, spec in declared(REG.metric(name).options):
        refused([*applicable_run(name), f"metrics=[{name}]", f"{name}.{key}={spec.invalid_example()}"], f"{name}.{key}",
                tmp_path, capsys)


# Small options for the built-in metrics that would otherwise train or sample for long on a tiny run;
# an installed third-party metric runs with its defaults.
QUICK = {
    "alignment": {"control_batches": 2, "control_checkpoints": 1},
    "fisher": {"batches": 2, "count": 2, "random_directions": 2},
    "interference": {"batches": 2},
    "grad_structure": {"tokens": 100},
    "ep": {"count": 2, "batches": 2, "eig_iterations": 3},
    "reheat": {"lrs": [1e-3], "steps": 2, "warmup": 1, "eval_every": 1},
    "basin": {"recovery_steps": 2, "relax_steps": 2, "relax_batch": 4, "sigmas": [0.0, 0.3], "eval_every": 1,
              "repeats": 1},
    "switching": {"resamples": 5},
}


@pytest.fixture(scope="module", params=sorted(REG.models))
def tiny_run(request, tmp_path_factory):
    """A finished tiny run of each model family, with evaluations and checkpoints every 2 steps."""
    family = request.param
    pairs = config.parse_pairs(FAST + ["steps=12", "eval_every=2", "checkpoint_every=2", "state_every=12",
                                       f"model.family={family}", "model.d_model=32", "model.n_head=2",
                                       "model.d_ff=64"])
    cfg = config.resolve(optimizer_for(family), pairs, None, REG, "tiny")
    out = RunDir(tmp_path_factory.mktemp(family) / "run")
    out.path.mkdir(parents=True)
    out.config.write_text(config.save(cfg))
    train(prepare(cfg, REG), out)
    return open_analysis(out.path, REG)


def test_every_metric_gives_a_result_or_a_declared_skip(tiny_run):
    cfg = tiny_run.config
    skipped = {name: why for name in REG.metrics if (why := REG.unmet_need(name, cfg))}
    names = [name for name in REG.metrics if name not in skipped]
    given = {f"{m}.{k}": str(v) for m, opts in QUICK.items() if m in names for k, v in opts.items()
             if k in REG.metric(m).options}
    results = run_metrics(tiny_run, names, metric_options(names, given, REG), skipped=skipped)
    assert set(results) == set(REG.metrics)
    for name, result in results.items():
        if name in skipped:
            assert result == MetricOutcome(status="skipped", source=REG.metric(name).source, reason=skipped[name])
        else:
            assert result.status == "ok", (name, result.error, result.traceback)
    # a default plan of the same run skips exactly what cannot apply
    planned, plan_skipped = plan_metrics(dataclasses.replace(cfg, metrics=None), REG)
    assert set(plan_skipped) <= set(skipped) and not set(planned) & set(skipped)


def test_every_checkpoint_only_metric_gives_a_result_on_a_manifests_checkpoints(tiny_run, tmp_path):
    """What a manifest's checkpoints can give (no config, no evaluations, no model) is what a
    metric that declares only `checkpoints` (and `evals`) receives; each of them works on one."""
    from geobench.analysis import of_manifest

    run = tiny_run.run
    entries = [{"iter": s, "hf_path": str(run.checkpoint_path(s))} for s in run.checkpoint_steps()]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"optimizers": {"run": {"checkpoints": entries}}}))
    names = [name for name in REG.metrics if REG.unmet_need(name, None) is None]
    assert "backbone" in names and "energy" not in names  # energy needs a geobench run ("run")
    given = {f"{m}.{k}": str(v) for m, opts in {**QUICK, "backbone": {"per_block": False}}.items() if m in names
             for k, v in opts.items() if k in REG.metric(m).options}
    given.update({f"{m}.scope": "all" for m in names if "scope" in REG.metric(m).options})
    results = run_metrics(of_manifest(manifest, "run", ".", tmp_path / "out", REG), names,
                          metric_options(names, given, REG))
    for name, result in results.items():
        assert result.status == "ok", (name, result.error, result.traceback)


def test_a_metric_that_uses_what_it_did_not_declare_fails_here(tiny_run):
    """The context holds what `needs` declares: reaching for more is a defect of the plugin, caught
    by this test rather than by a user's run (whose applicability check trusted the declaration)."""
    from geobench.analysis import compute
    from geobench.api import MetricPlugin, MetricResult, UndeclaredNeed

    def sneaky(*, ctx, options):
        return MetricResult(scalars={"evals": len(ctx.evals)})

    for needs in (("checkpoints",), ("checkpoints", "model")):
        outcome = compute(tiny_run, MetricPlugin("sneaky", "reads the evaluations", {}, sneaky, needs=needs), {},
                          strict=False)
        assert outcome.status == "failed" and UndeclaredNeed.__name__ in outcome.error
        assert "declares needs=" in outcome.error and "add 'evals' to its needs" in outcome.error
    honest = compute(tiny_run, MetricPlugin("honest", "declares it", {}, sneaky, needs=("checkpoints", "evals")), {},
                     strict=False)
    assert honest.status == "ok" and honest.scalars["evals"] == len(tiny_run.evals)


# --- optimizer plugins: resume, the schedule they follow, the state they keep

def available_optimizers() -> list:
    return [pytest.param(name, marks=pytest.mark.skip(reason=plugin.unavailable()) if plugin.unavailable() else ())
            for name, plugin in REG.optimizers.items() if plugin.variants is None]


class Killed(BaseException):
    """What a kill leaves: the run stops where it is, nothing handles it."""


def resumable_config(name: str, **extra: str) -> config.Config:
    pairs = config.parse_pairs(FAST + ["steps=6", "eval_every=3", "checkpoint_every=3", "state_every=3",
                                       "model.d_model=32", "model.n_head=2", "model.d_ff=64",
                                       *(f"{k}={v}" for k, v in extra.items())])
    return config.resolve(name, pairs, None, REG, "tiny")


@pytest.mark.parametrize("name", available_optimizers())
def test_every_optimizer_resumes_exactly_after_a_kill(name, tmp_path, monkeypatch):
    """A run killed right after its first state save (step 3), resumed, writes the checkpoints and
    evaluations of the uninterrupted run, bit for bit, train_loss included."""
    plugin = REG.optimizer(name)
    whole = RunDir(tmp_path / "whole")
    setup = prepare(resumable_config(name), REG)
    outcome = train(setup, whole)
    floats = optim.state_floats_per_parameter(setup.optimizer, sum(p.numel() for p in setup.model.parameters()))
    assert floats > 0 or name == "sgd", name  # plain SGD keeps no state
    assert outcome.last_step == 6

    killed = RunDir(tmp_path / "killed")
    save_state = RunDir.save_state

    def save_then_die(self, *args, **kwargs):
        save_state(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(RunDir, "save_state", save_then_die)
    with pytest.raises(Killed):
        train(prepare(resumable_config(name), REG), killed)
    monkeypatch.setattr(RunDir, "save_state", save_state)
    assert killed.load_state()[0]["step"] == 3
    resumed = train(prepare(resumable_config(name, resume="true"), REG), killed)
    assert resumed.resumed_from == 3 and resumed.last_step == 6
    if not plugin.deterministic:
        pytest.skip(f"{name} declares a resumed run not bit-identical")
    assert killed.checkpoint_steps() == whole.checkpoint_steps()
    for step in whole.checkpoint_steps():
        a, b = whole.load_checkpoint(step), killed.load_checkpoint(step)
        assert all(torch.equal(a[k], b[k]) for k in a), (name, step)
    timing = {"train_seconds": None}
    assert ([dataclasses.replace(e, **timing) for e in killed.read_evals()]
            == [dataclasses.replace(e, **timing) for e in whole.read_evals()])


@pytest.mark.parametrize("name", available_optimizers())
def test_every_harness_scheduled_optimizer_stands_still_at_lr_zero(name):
    plugin = REG.optimizer(name)
    if plugin.schedule != "harness":
        pytest.skip(f"{name} schedules itself")
    cfg = resumable_config(name)
    family = REG.model(cfg.model.family)
    model = family.build(config=cfg.model, vocab_size=50)
    schedule = TrainingSchedule(steps=6, warmup=1, tokens_per_step=64)
    optim.check_lr_zero_moves_nothing(plugin, model, family.layout.parameters, cfg.optimizer.params,
                                      torch.device("cpu"), schedule)
    optimizer = optim.build(plugin, family.layout.parameters(model), cfg.optimizer.params, torch.device("cpu"),
                            schedule)
    assert all(group["peak_lr"] > 0 for group in optimizer.param_groups)
