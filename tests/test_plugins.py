"""Every hookspec, exercised through a plugin registered the way pluggy registers any plugin."""

import math
import re

import pytest
import torch

from conftest import FAST
from geobench import Param, config, hookimpl, report
from geobench.analysis import of_run, run_metrics
from geobench.api import MetricPlugin, MetricResult, ModelPlugin, OptimizerPlugin, ParameterLayout, UsageError
from geobench.api.documents import to_json
from geobench.documents import CellOutcome, report_from_json
from geobench.registry import make_registry
from geobench.rundir import RunDir
from geobench.runner import open_analysis
from geobench.train import prepare, train


class Watcher:
    """A plugin with one of everything."""

    def __init__(self):
        self.steps, self.evals, self.checkpoints, self.reports = [], [], [], 0

    @hookimpl
    def geobench_register_optimizers(self, register):
        register(OptimizerPlugin("plain-sgd", "SGD without extras", {"lr": Param(0.05, low=0, low_open=True)},
                                 build=build_sgd))

    @hookimpl
    def geobench_register_metrics(self, register):
        register(MetricPlugin("drift", "distance of the last checkpoint from the first", {"scale": Param(1.0)},
                              compute=drift))
        register(MetricPlugin("broken", "always fails", {}, compute=broken))

    @hookimpl
    def geobench_register_models(self, register):
        register(ModelPlugin("linear", "a bigram model", build=bigram, layout=ParameterLayout(trunk="weight", block="$^")))

    @hookimpl
    def geobench_on_step(self, run, step, loss, lr):
        self.steps.append((step, loss, lr))

    @hookimpl
    def geobench_on_eval(self, run, step, record):
        self.evals.append(record)

    @hookimpl
    def geobench_on_checkpoint(self, run, step, path):
        assert path.exists()
        self.checkpoints.append(step)

    @hookimpl
    def geobench_on_report(self, run, report):
        self.reports += 1
        report.extensions["watcher"] = {"steps_seen": len(self.steps)}


def build_sgd(*, parameters, hp, device, schedule):
    return torch.optim.SGD(parameters.tensors(), lr=hp["lr"])


def bigram(*, config, vocab_size):
    return torch.nn.Embedding(vocab_size, vocab_size)


def drift(*, ctx, options):
    steps = ctx.trajectory.checkpoint_steps()
    first, last = ctx.trajectory.load_checkpoint(steps[0]), ctx.trajectory.load_checkpoint(steps[-1])
    total = sum(float(((last[n] - first[n]) ** 2).sum()) for n in first)
    return MetricResult(scalars={"drift": options["scale"] * total ** 0.5}, series={"steps": steps},
                        tables={"checkpoints": [{"step": s} for s in steps]})


def broken(*, ctx, options):
    raise RuntimeError("this metric is broken on purpose")


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    watcher = Watcher()
    reg = make_registry(extra_plugins=(watcher,))
    cfg = config.resolve("plain-sgd", config.parse_pairs(FAST + ["model.family=gpt"]), None, reg, "tiny")
    run = prepare(cfg, reg)
    out = RunDir(tmp_path_factory.mktemp("run") / "watched")
    outcome = train(run, out)
    return watcher, reg, cfg, run, out, outcome


def test_register_hooks_add_optimizers_metrics_and_models(watched_run):
    watcher, reg, *_ = watched_run
    assert reg.optimizers["plain-sgd"].source.startswith("registered at runtime")
    assert reg.optimizers["adamw"].source.startswith("geobench ")
    assert reg.metric("drift").options["scale"].default == 1.0
    assert reg.model("linear").build(config=None, vocab_size=5).weight.shape == (5, 5)
    with pytest.raises(UsageError, match="unknown metric 'drfit'.*did you mean 'drift'"):
        reg.metric("drfit")


def test_lifecycle_hooks_see_every_step_eval_and_checkpoint(watched_run):
    watcher, reg, cfg, run, out, outcome = watched_run
    assert outcome.status == "completed" and outcome.last_step == 12
    assert [s for s, _, _ in watcher.steps] == list(range(1, 13))
    assert [r.step for r in watcher.evals] == [1, 6, 12] == [r.step for r in out.read_evals()]
    assert watcher.checkpoints == [1, 4, 8, 12] == out.checkpoint_steps()


def test_metrics_run_and_one_failure_does_not_stop_the_others(watched_run):
    watcher, reg, cfg, run, out, outcome = watched_run
    results = run_metrics(of_run(out, cfg, reg), ["broken", "drift"])
    assert results["broken"].status == "failed" and "broken on purpose" in results["broken"].error
    first, last = out.load_checkpoint(1), out.load_checkpoint(12)
    expected = torch.sqrt(sum(((last[n] - first[n]) ** 2).sum() for n in first)).item()
    assert results["drift"].status == "ok"
    assert results["drift"].scalars["drift"] == pytest.approx(expected, rel=1e-5)

    doc = report_from_json(to_json(minimal_report(out, results)), "the test's report")
    report.write(out, doc, reg)
    assert watcher.reports == 1
    text = out.report_md.read_text()
    assert "## Metric `drift`" in text and "**failed:** RuntimeError" in text
    import json

    saved = json.loads(out.report_json.read_text())
    assert saved["extensions"]["watcher"]["steps_seen"] == 12
    assert saved["metrics"]["drift"]["tables"]["checkpoints"][0] == {"step": 1}


def minimal_report(out, metrics):
    evals = out.read_evals()
    final = report.final_summary(evals)
    return {
        "schema_version": "1.0", "geobench_version": "test",
        "run": {"name": "watched", "status": "completed", "last_step": 12, "steps_planned": 12, "diverged_at": None,
                "resumed_from": None, "started": "", "finished": "", "preset": "tiny", "preset_reason": "test"},
        "environment": report.environment(torch.device("cpu")),
        "corpus": {"kind": "embedded", "source": "embedded", "description": "d", "train_stories": 1, "val_stories": 1,
                   "fingerprint": "x"},
        "tokenizer": {"kind": "bpe", "description": "d", "vocab_size": 10, "eos_id": 0, "fingerprint": "x", "codewords": 2},
        "model": {"family": "gpt", "parameters": {"total": 1, "trunk": 1}},
        "optimizer": {"name": "plain-sgd", "source": "test", "params": {}},
        "config": {}, "throughput": {"train_seconds": 1.0, "tokens": 1, "tokens_per_second": 1.0},
        "evals": to_json(evals), "final": to_json(final), "metrics": metrics, "extensions": {},
    }


def test_report_schema_rejects_what_tools_could_not_parse(watched_run, tmp_path):
    import jsonschema

    *_, out, _ = watched_run
    doc = to_json(minimal_report(out, {}))
    report.validate(doc)
    for broken_doc in ({**doc, "schema_version": "0.9"}, {**doc, "run": {**doc["run"], "status": "exploded"}},
                       {k: v for k, v in doc.items() if k != "evals"}):
        with pytest.raises(jsonschema.ValidationError):
            report.validate(broken_doc)
    assert to_json({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}


def test_a_name_registered_twice_is_an_error():
    class Twin:
        @hookimpl
        def geobench_register_optimizers(self, register):
            register(OptimizerPlugin("adamw", "impostor", {}, build=None))

    with pytest.raises(UsageError, match="'adamw' is registered twice"):
        make_registry(extra_plugins=(Twin(),))


def test_a_metric_result_outside_the_schema_is_recorded_as_failed(watched_run):
    watcher, reg, cfg, run, out, outcome = watched_run

    class Sloppy:
        @hookimpl
        def geobench_register_metrics(self, register):
            register(MetricPlugin("sloppy", "returns a mapping where a list belongs", {},
                                  compute=lambda *, ctx, options: MetricResult(series={"x": {"a": 1}})))

    sloppy_reg = make_registry(extra_plugins=(Sloppy(),))
    result = run_metrics(of_run(out, cfg, sloppy_reg), ["sloppy"])["sloppy"]
    assert result.status == "failed" and "does not fit the report schema: series/x" in result.error


def test_every_hookspec_has_an_implementation_here_and_was_called(watched_run):
    from geobench.api import hookspecs

    watcher, *_ = watched_run
    specs = {name for name in vars(hookspecs) if name.startswith("geobench_")}
    assert specs == {name for name in dir(Watcher) if name.startswith("geobench_")}
    assert watcher.steps and watcher.evals and watcher.checkpoints  # registration: the fixture's run trained with them


def test_a_plugin_registered_at_runtime_works_on_every_path(tmp_path):
    """One registry, passed explicitly: a runtime optimizer trains, its run is measured by metrics
    that rebuild the model, reheated by a derived run that fires the same lifecycle hooks, and run
    as a suite cell with the comparison built from the same plugins."""
    import yaml

    from geobench import suites

    watcher = Watcher()
    reg = make_registry(extra_plugins=(watcher,))
    cfg = config.resolve("plain-sgd", config.parse_pairs(FAST + ["eval_every=4"]), None, reg, "tiny")
    out = RunDir(tmp_path / "run")
    out.path.mkdir()
    out.config.write_text(config.save(cfg))
    train(prepare(cfg, reg), out)
    ctx = open_analysis(out.path, reg)
    trained_steps = len(watcher.steps)
    given = {"alignment.control_batches": "2", "reheat.lrs": "[0.05]", "reheat.steps": "3", "reheat.warmup": "1",
             "reheat.eval_every": "1"}
    from geobench.analysis import metric_options

    results = run_metrics(ctx, ["alignment", "reheat", "drift"], metric_options(["alignment", "reheat", "drift"],
                                                                              given, reg))
    assert {name: r.status for name, r in results.items()} == {"alignment": "ok", "reheat": "ok", "drift": "ok"}
    derived = yaml.safe_load((out.path / "derived" / "reheat-from12-lr0.05" / "config.yaml").read_text())
    assert derived["optimizer"] == {"name": "plain-sgd", "params": {"lr": 0.05}}
    assert len(watcher.steps) == trained_steps + 3  # the derived run's steps reached the run's hooks

    suite_file = tmp_path / "suite.yaml"
    base = dict(pair.split("=", 1) for pair in FAST if not pair.startswith("metrics"))
    suite_file.write_text(yaml.safe_dump({"name": "runtime", "base": base, "grid": {"optimizer": ["plain-sgd"]},
                                          "metrics": ["drift"], "table": {"heading": "optimizer"}}))
    suite = suites.load(str(suite_file), "tiny", {}, str(tmp_path / "suite"), reg)
    assert suites.run(suite) == {"plain-sgd": CellOutcome("completed")}
    comparison = (tmp_path / "suite" / "comparison.json").read_text()
    assert '"optimizer": "plain-sgd"' in comparison


def test_on_step_reports_the_step_whose_loss_is_not_finite(tmp_path):
    """A watcher learns of a divergence at the step that caused it: the non-finite step is reported,
    and the run stops after it."""
    class Exploding:
        @hookimpl
        def geobench_register_optimizers(self, register):
            register(OptimizerPlugin("exploding-sgd", "SGD with an infinite step", {}, schedule="self",
                                     build=lambda *, parameters, hp, device, schedule: torch.optim.SGD(
                                         parameters.tensors(), lr=float("inf"))))

    watcher = Watcher()
    reg = make_registry(extra_plugins=(watcher, Exploding()))
    cfg = config.resolve("exploding-sgd", config.parse_pairs(FAST + ["grad_clip=0"]), None, reg, "tiny")
    outcome = train(prepare(cfg, reg), RunDir(tmp_path / "boom"))
    assert outcome.status == "diverged" and outcome.last_step < cfg.train.steps
    steps = [step for step, _, _ in watcher.steps]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1  # every step read, in order, the bad one last
    assert not math.isfinite(watcher.steps[-1][1]) and all(math.isfinite(loss) for _, loss, _ in watcher.steps[:-1])


@pytest.mark.parametrize("metrics, expected", [
    ("[+reheat]", ["alignment", "backbone", "energy", "fisher", "grad_structure", "interference", "switching", "reheat"]),
    ("[-fisher,-energy]", ["alignment", "backbone", "grad_structure", "interference", "switching"]),
    ("[backbone]", ["backbone"]),
])
def test_metrics_plus_and_minus_change_the_default_set(metrics, expected):
    from geobench.analysis import plan_metrics
    from geobench.registry import installed

    cfg = config.resolve("adamw", config.parse_pairs([f"metrics={metrics}"]), None, installed(), "tiny")
    assert plan_metrics(cfg, installed())[0] == expected


@pytest.mark.parametrize("metrics, message", [
    ("[+fishr]", "unknown metric 'fishr' (did you mean 'fisher'?)"),
    ("[backbone,+reheat]", "mixes names with +NAME/-NAME"),
    ("[+ep]", "metric 'ep' cannot apply to this run: it needs model family eqformer"),
])
def test_a_bad_plus_or_minus_is_one_line(metrics, message):
    from geobench.analysis import plan_metrics
    from geobench.registry import installed

    cfg = config.resolve("adamw", config.parse_pairs([f"metrics={metrics}"]), None, installed(), "tiny")
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_metrics(cfg, installed())
