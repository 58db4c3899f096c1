"""Interference (docs/science.md#interference): cos(g_LM, g_probe) on the trunk — the gradients of the two terms of the
composite loss — averaged over batches, at chosen checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geobench.api import SCOPE, MetricPlugin, MetricResult, Param, UsageError, hookimpl
from geobench.objective import flat_gradient, lm_and_probe_losses

if TYPE_CHECKING:
    from geobench.api import MetricContext


OPTIONS = {
    "scope": SCOPE,
    "steps": Param([], "checkpoints (empty: up to `count` spread over the run; the source used 1600, 3000)", items=int),
    "count": Param(5, "checkpoints when `steps` is empty", low=1),
    "batches": Param(8, "batches with probe targets to average over", low=1),
}


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    names = ctx.trajectory.scope(options["scope"])
    rows = []
    for step in ctx.trajectory.spread(options["steps"], options["count"]):
        model = ctx.setup.model_at(step)
        params = dict(model.named_parameters())
        chosen = [params[n] for n in names]
        cosines = []
        for inputs, targets, mask in ctx.setup.batches(20 * options["batches"]):
            if not bool((mask & (targets >= 0)).any()):
                continue  # no probe in this batch
            with ctx.setup.autocast:
                logits = model(inputs)
            lm, probe = lm_and_probe_losses(logits, targets, mask)
            g_lm = flat_gradient(lm, chosen, retain_graph=True)
            g_probe = flat_gradient(probe, chosen)
            cosines.append(float(torch.dot(g_lm, g_probe) / (g_lm.norm() * g_probe.norm()).clamp_min(1e-30)))
            if len(cosines) == options["batches"]:
                break
        if not cosines:
            raise UsageError("no batch with probe targets: interference needs probe.p_probe > 0")
        rows.append({"step": step, "cos_lm_probe": float(np.mean(cosines)), "std": float(np.std(cosines)),
                     "batches": len(cosines)})
    scalars = {"mean_cos": float(np.mean([r["cos_lm_probe"] for r in rows])), "last_cos": rows[-1]["cos_lm_probe"]}
    variant = (f"cos(g_LM, g_probe) over the {options['scope']} parameters, mean over {options['batches']} batches with "
               "probe targets at each checkpoint, the two terms of the composite loss differentiated apart")
    return MetricResult(scalars=scalars, tables={"interference": rows}, variant=variant)


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("interference", "cos(g_LM, g_probe) on the trunk at chosen checkpoints",
                          OPTIONS, compute, default=True, needs=("checkpoints", "model", "data", "gradients", "probe"),
                          columns={"interference": ("mean_cos", "interference")},
                          terms={"interference": "cos(g_LM, g_probe), the cosine between the gradients of the language-model "
                                                 "and the probe terms of the objective, averaged over batches and over the "
                                                 "chosen checkpoints (mean_cos); negative: the two pull apart"}))
