"""The typed documents and the JSON Schemas shipped for other tools describe the same thing: every
field of a document is a property of its schema, every property a field, and what the schema
requires the document always writes; a document read back is the document written."""

import dataclasses
import math

import pytest

from geobench import comparison, documents, report
from geobench.api import EvalRecord, Measures, MetricResult, UsageError
from geobench.api.documents import from_json, to_json


def json_keys(cls) -> set[str]:
    return {f.metadata.get("json", f.name) for f in dataclasses.fields(cls) if f.name != "extra"}


def written_always(cls) -> set[str]:
    """Keys every instance writes: fields without a default, with a default that is not empty
    (a status "ok"), or marked `always`."""
    return {f.metadata.get("json", f.name) for f in dataclasses.fields(cls)
            if f.name != "extra" and (f.metadata.get("always") or f.default_factory is dataclasses.MISSING
                                      and f.default not in (None, False))}


REPORT = report.load_schema("report")
COMPARISON = report.load_schema("comparison")
PAIRS = [
    (documents.RunReport, REPORT["properties"], REPORT["else"]["required"] + REPORT["required"], {"trajectory"}),
    (documents.RunInfo, REPORT["properties"]["run"]["properties"], REPORT["properties"]["run"]["required"], set()),
    (documents.Environment, REPORT["properties"]["environment"]["properties"],
     REPORT["properties"]["environment"]["required"], set()),
    (documents.Throughput, REPORT["properties"]["throughput"]["properties"],
     REPORT["properties"]["throughput"]["required"], set()),
    (documents.TrajectoryInfo, REPORT["properties"]["trajectory"]["properties"],
     REPORT["properties"]["trajectory"]["required"], set()),
    (documents.ModelInfo, REPORT["properties"]["model"]["properties"], REPORT["properties"]["model"]["required"], set()),
    (EvalRecord, REPORT["$defs"]["eval"]["properties"], ["step"], set()),
    (documents.MetricOutcome, REPORT["$defs"]["metric"]["properties"], REPORT["$defs"]["metric"]["required"], set()),
    (comparison.Comparison, COMPARISON["properties"], COMPARISON["required"], set()),
    (comparison.RunRow, COMPARISON["properties"]["runs"]["items"]["properties"],
     COMPARISON["properties"]["runs"]["items"]["required"], set()),
    (comparison.GroupRow, COMPARISON["properties"]["groups"]["items"]["properties"],
     COMPARISON["properties"]["groups"]["items"]["required"], set()),
    (documents.TableSpec, COMPARISON["properties"]["table"]["properties"], COMPARISON["properties"]["table"]["required"],
     set()),
]


@pytest.mark.parametrize("cls, properties, required, elsewhere", PAIRS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_document_and_its_schema_name_the_same_keys(cls, properties, required, elsewhere):
    keys = json_keys(cls)
    listed = set(properties) - elsewhere
    if cls in (documents.RunReport, comparison.Comparison):
        assert keys == listed, (sorted(keys - listed), sorted(listed - keys))
    else:  # a section's schema may list only what tools rely on; what it lists the document has
        assert listed <= keys, sorted(listed - keys)
        assert keys <= listed, f"{cls.__name__} writes {sorted(keys - listed)}, which the schema does not describe"
    assert set(required) - {"extensions"} <= written_always(cls) | {"final", "extensions"}, sorted(
        set(required) - written_always(cls))


def test_an_eval_record_round_trips_with_the_source_key_for_lambda():
    record = EvalRecord.of(5, Measures(2.0, 0.5, 0.25, 3.0, 4.0, 0.75), lam=2.0, lr=1e-3, train_loss=float("nan"),
                           tokens=40, train_seconds=1.5, gradient_rule={"skipped": 1, "free_residual": 0.01})
    data = to_json(record)
    assert data["lambda"] == 2.0 and "lam" not in data and data["train_loss"] is None  # NaN: JSON's null
    assert "diverged" not in data  # an optional field at its default is left out
    back = from_json(EvalRecord, data, "the record")
    assert dataclasses.replace(back, train_loss=0.0) == dataclasses.replace(record, train_loss=0.0)
    assert back.train_loss is None and back.gradient_rule["skipped"] == 1 and isinstance(back.tokens, int)


@pytest.mark.parametrize("data, message", [
    ({"val_loss": 1.0}, "lacks 'step'"),
    ({"step": "1"}, "step is '1', not an integer"),
    ({"step": 1, "p_ood": "high"}, "p_ood is 'high', not a number"),
    ({"step": 1, "bogus": 1}, "unknown key 'bogus'"),
    ([1, 2], "not a mapping"),
])
def test_a_document_that_does_not_fit_is_one_line_naming_the_key(data, message):
    with pytest.raises(UsageError, match=message):
        from_json(EvalRecord, data, "evals.jsonl line 3")


def test_a_metric_outcome_flattens_its_result_and_keeps_keys_it_does_not_know():
    result = MetricResult(scalars={"pc1": 0.7, "k95": 3}, tables={"t": [{"a": 1}]}, variant="raw", notes=["n"])
    outcome = documents.MetricOutcome.ok(result, source="geobench 0.1.0", options={"scope": "trunk"}, seconds=1.23456)
    data = to_json(outcome)
    assert data["status"] == "ok" and data["scalars"] == {"pc1": 0.7, "k95": 3} and data["seconds"] == 1.235
    assert report.metric_problem(outcome) is None
    older = from_json(documents.MetricOutcome, {**data, "reference": "runs/adamw"}, "an older report")
    assert older.extra == {"reference": "runs/adamw"} and to_json(older)["reference"] == "runs/adamw"
    assert isinstance(older.scalars["k95"], int) and math.isclose(older.scalars["pc1"], 0.7)
