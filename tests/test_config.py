import pytest
from hypothesis import given
from hypothesis import strategies as st

from geobench import config
from geobench.api import Param, UsageError
from geobench.registry import installed


def resolve(optimizer="adamw", pairs=(), file=None, auto="tiny"):
    return config.resolve(optimizer, config.parse_pairs(list(pairs)), file,
                          installed(), auto)


def test_defaults_are_the_paper_protocol():
    cfg = resolve(auto="paper")
    assert cfg.preset == "paper"
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.d_ff, cfg.model.context) == (8, 512, 16, 2048, 256)
    assert (cfg.train.steps, cfg.train.batch_size * cfg.train.grad_accum, cfg.train.warmup) == (10_000, 128, 1500)
    assert cfg.train.lambda_schedule == [[0, 2.0], [4000, 4.0]]
    assert cfg.optimizer.params == {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "wd": 0.5}
    assert cfg.data.source == "roneneldan/TinyStories" and cfg.probe.p_probe == 0.10


def test_layering_preset_then_file_then_command_line(tmp_path):
    file = tmp_path / "my.yaml"
    file.write_text("train:\n  steps: 50\n  seed: 7\nmodel.n_layer: 3\noptimizer:\n  params:\n    beta2: 0.8\n")
    cfg = resolve(pairs=["seed=271", "beta2=0.9"], file=str(file))
    assert cfg.model.d_model == 64            # preset tiny
    assert cfg.model.n_layer == 3             # file over preset
    assert cfg.train.steps == 50              # file over preset
    assert cfg.train.seed == 271              # command line over file
    assert cfg.optimizer.params["beta2"] == 0.9


def test_short_dotted_and_alias_keys():
    cfg = resolve(pairs=["model.n_layer=4", "steps=4000", "data=embedded", "lr=1e-2", "optimizer.eps=1e-6"])
    assert cfg.model.n_layer == 4 and cfg.train.steps == 4000 and cfg.data.source == "embedded"
    assert cfg.optimizer.params["lr"] == 1e-2 and cfg.optimizer.params["eps"] == 1e-6


def test_preset_can_be_chosen_and_is_checked():
    assert resolve(pairs=["preset=paper"]).model.d_model == 512
    with pytest.raises(UsageError, match="preset='huge'.*one of auto, paper, small, tiny"):
        resolve(pairs=["preset=huge"])


def test_every_preset_resolves_and_the_report_schema_admits_it():
    from geobench import report

    presets = [c for c in config.declared_fields()["preset"].choices if c != "auto"]
    assert sorted(presets) == sorted(config.PRESETS)
    assert report.load_schema("report")["properties"]["run"]["properties"]["preset"]["enum"] == sorted(presets)
    for name in presets:
        cfg = resolve(pairs=[f"preset={name}"])
        lam_switch = cfg.train.lambda_schedule[1][0]
        assert 0 < lam_switch <= cfg.train.steps and cfg.train.warmup < lam_switch  # two probe phases
        assert cfg.probe.ood_gap[0] > cfg.probe.train_gap[1]  # the OOD set lies beyond the training gaps


@pytest.mark.parametrize("pair, message", [
    ("beta2=1.5", r"beta2='1.5' is out of range: expected float >= 0 and < 1"),
    ("lr=-1", r"lr='-1' is out of range: expected float > 0"),
    ("steps=ten", r"train.steps='ten' is not a valid int"),
    ("steps=2.5", r"train.steps='2.5' is not a valid int"),
    ("stpes=10", r"unknown key 'stpes' \(did you mean 'steps'\?\)"),
    ("seed", r"expected key=value, got 'seed'"),
    ("optimizer.momentum=0.9", r"unknown optimizer hyperparameter 'momentum'"),
    ("n_head=3", r"model.n_head=3 must divide model.d_model=64"),
    ("lambda=[[5,2.0]]", r"train.lambda_schedule"),
    ("ood_gap=[9,3]", r"probe.ood_gap"),
    ("device=tpu", r"train.device='tpu' is not allowed"),
    ("checkpoint_window=[600,200,50]", r"train.checkpoint_window=\[600, 200, 50\] must be \[start, end, every\]"),
    ("checkpoint_window=[[600,2000,50],[2000,0]]", r"train.checkpoint_window=.* or a list of such triples"),
    ("lm_ood=padded", r"probe.lm_ood='padded' is not allowed: expected one of clean, source"),
    ("diverge_factor=-1", r"train.diverge_factor='-1' is out of range"),
])
def test_bad_values_name_the_key_and_what_is_allowed(pair, message):
    with pytest.raises(UsageError, match=message):
        resolve(pairs=[pair])


def test_ambiguous_short_key_lists_the_candidates(monkeypatch):
    with pytest.raises(UsageError, match="ambiguous: use one of"):
        config.resolve_key("seed", {"seed": Param(0)}, {})


def test_malformed_and_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [steps: 1\n")
    with pytest.raises(UsageError, match=r"malformed YAML in .*bad.yaml.* at line"):
        resolve(file=str(bad))
    with pytest.raises(UsageError, match="cannot read config file"):
        resolve(file=str(tmp_path / "missing.yaml"))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        resolve(file=str(listy))


def test_unknown_key_in_file_names_the_file(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  stepz: 3\n")
    with pytest.raises(UsageError, match=r"unknown key 'train.stepz'.*\(in .*c.yaml\)"):
        resolve(file=str(file))


def test_saved_config_round_trips():
    import yaml

    cfg = resolve(pairs=["beta2=0.9", "steps=77"])
    tree = yaml.safe_load(config.save(cfg))
    assert config.build(tree, installed()) == cfg
    tree["model"]["relax_steps"] = 15  # where an older geobench kept the eqformer's parameter
    with pytest.raises(UsageError, match=r"unknown config key 'model.relax_steps' \(a run directory written by"):
        config.build(tree, installed())


def test_model_parameters_belong_to_their_family():
    cfg = resolve(optimizer="ep", pairs=["relax_steps=12", "model.damping=0.5"])
    assert cfg.model.family == "eqformer" and cfg.model.params == {"relax_steps": 12, "damping": 0.5, "relax_tol": 1e-4}
    assert resolve().model.params == {}  # the GPT declares none
    with pytest.raises(UsageError, match=r"unknown key 'relax_steps'"):
        resolve(pairs=["relax_steps=12"])
    with pytest.raises(UsageError, match=r"model.relax_steps='0' is out of range"):
        resolve(optimizer="ep", pairs=["model.relax_steps=0"])


@given(st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False))
def test_param_accepts_every_value_in_range(x):
    spec = Param(0.5, low=0, high=1, high_open=True)
    assert spec.check("beta2", repr(x)) == x


@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x < 0 or x >= 1))
def test_param_rejects_every_value_out_of_range(x):
    with pytest.raises(UsageError, match="beta2"):
        Param(0.5, low=0, high=1, high_open=True).check("beta2", x)


@pytest.mark.parametrize("raw, kind, expected", [
    ("true", bool, True), ("off", bool, False), ("3", int, 3), ("1e-3", float, 1e-3),
    ("backbone,switching", list, ["backbone", "switching"]), ("[1, 2]", list, [1, 2]), ("1e-3", str, "1e-3"),
])
def test_coercion(raw, kind, expected):
    assert Param(kind() if kind is not str else "", kind=kind).check("k", raw) == expected


def test_checkpoint_windows_one_triple_or_several():
    from geobench.config import checkpoint_windows
    from geobench.schedule import is_checkpoint_step

    assert checkpoint_windows([600, 2000, 50]) == [[600, 2000, 50]]
    assert checkpoint_windows([]) == []
    cfg = resolve(pairs=["steps=4000", "checkpoint_every=200", "checkpoint_window=[[600,2000,50],[2000,4000,100]]"])
    steps = [s for s in range(1, 4001) if is_checkpoint_step(s, cfg)]
    assert steps[:6] == [1, 200, 400, 600, 650, 700] and steps[-3:] == [3800, 3900, 4000]
    assert len(steps) == 1 + 2 + 29 + 20  # step 1, 200 and 400, [600, 2000] by 50, (2000, 4000] by 100


def test_the_paper_preset_compiles_unless_told_not_to():
    assert resolve(pairs=["preset=paper"]).model.compile is True
    assert resolve(pairs=["preset=paper", "compile=false"]).model.compile is False
    assert resolve(pairs=["preset=tiny"]).model.compile is False


def test_param_admits_none_where_declared_and_checks_patterns():
    step = Param(None, "checkpoint (none: the last)", kind=int, nullable=True, low=1)
    assert step.check("basin.depth_from", "none") is None and step.check("basin.depth_from", "null") is None
    assert step.check("basin.depth_from", "400") == 400
    with pytest.raises(UsageError, match=r"basin.depth_from='0' is out of range: expected int >= 1 or none"):
        step.check("basin.depth_from", "0")
    with pytest.raises(UsageError, match=r"steps='none' is not a valid int"):
        Param(10, low=1).check("steps", "none")
    scope = Param("trunk", pattern=r"trunk|all|block:\d+")
    assert scope.check("backbone.scope", "block:3") == "block:3"
    with pytest.raises(UsageError, match=r"backbone.scope='block:x' is not allowed: expected a string matching"):
        scope.check("backbone.scope", "block:x")
