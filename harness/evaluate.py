"""Evaluation of docs/science.md#the-probe-task: val_loss on held-out stories, and the probe's p_in, p_ood (exact match),
nll_ood, lm_ood and r_ood on the fixed eval sets."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from geobench.api.documents import Measures
from geobench.data.probe import EvalSet
from geobench.objective import has_head, head_token_stats, token_losses


@dataclasses.dataclass
class Evaluator:
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    probe_in: EvalSet
    probe_ood: EvalSet
    batch_size: int
    device: torch.device
    autocast: contextlib.AbstractContextManager = dataclasses.field(default_factory=contextlib.nullcontext)
    lm_ood_padding_eos: int | None = None  # an EOS id: count the eval sets' padding in lm_ood (the source's)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> Measures:
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for inputs, targets in self.val_batches:
            ce = self._losses(model, inputs, targets)
            total += float(ce.sum())
            count += int((targets >= 0).sum())
        correct_in, _, _ = self._probe(model, self.probe_in)
        correct_ood, nll_ood, lm_ood = self._probe(model, self.probe_ood)
        model.train(was_training)
        p_in, p_ood = float(correct_in.mean()), float(correct_ood.mean())
        return Measures(val_loss=total / max(count, 1), p_in=p_in, p_ood=p_ood, nll_ood=nll_ood, lm_ood=lm_ood,
                        r_ood=nll_ood / lm_ood if lm_ood else float("nan"))

    def _scorer(self, model, inputs):
        """targets ↦ (per-position CE, argmax) for `inputs`; through the model's head in chunks when
        it has one (no full logits), else from its logits."""
        with self.autocast:
            if has_head(model, inputs.numel()):
                hidden = model.hidden(inputs.to(self.device, non_blocking=True))
                return lambda targets: head_token_stats(hidden, model.output_weight, targets)
            logits = model(inputs.to(self.device, non_blocking=True))
        return lambda targets: (token_losses(logits, targets), logits.argmax(-1))

    def _losses(self, model, inputs, targets):
        return self._scorer(model, inputs)(targets.to(self.device))[0]

    @torch.no_grad()
    def ood_correct(self, model: torch.nn.Module) -> np.ndarray:
        """Per-example exact match on the OOD set (for bootstrap noise estimates)."""
        return self._probe(model, self.probe_ood)[0]

    def _probe(self, model: torch.nn.Module, data: EvalSet) -> tuple[np.ndarray, float, float]:
        """(per-example exact match, mean CE on probe positions, mean CE on the other non-pad positions)."""
        hits, probe_ce, probe_n, lm_ce, lm_n = [], 0.0, 0, 0.0, 0
        lm_targets = data.targets if self.lm_ood_padding_eos is None else data.padded_targets(self.lm_ood_padding_eos)
        for start in range(0, len(data.inputs), self.batch_size):
            rows = slice(start, start + self.batch_size)
            inputs, targets, mask, lm = (torch.from_numpy(a[rows]).to(self.device) for a in
                                         (data.inputs, data.targets, data.mask, lm_targets))
            score = self._scorer(model, inputs)
            ce, predicted = score(targets)
            correct = (predicted == targets) | ~mask
            hits.append(correct.all(dim=1).cpu().numpy())
            probe_ce += float((ce * mask).sum())
            probe_n += int(mask.sum())
            other = (lm >= 0) & ~mask
            lm_ce += float(((score(lm)[0] if lm_targets is not data.targets else ce) * other).sum())
            lm_n += int(other.sum())
        return np.concatenate(hits), probe_ce / max(probe_n, 1), lm_ce / max(lm_n, 1)
