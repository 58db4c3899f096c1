"""The optimizers researchers compare today, each from the library its authors (or its reference
implementation's maintainers) publish: `pip install "geobench[zoo]"` brings the libraries; without
them `geobench plugins` lists these plugins as unavailable.

Each plugin states how the harness drives it (docs/writing-an-optimizer-plugin.md): who owns the
schedule, whether its step needs a closure or a per-step hook, which roles go to which optimizer.
The defaults are the libraries' (or their authors' recommended) values unless a comment says why
not; the `optimizer-zoo` suite carries the learning rates its tiny-scale sweep found best
(docs/optimizer-zoo.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from geobench.api import Batch, OptimizerPlugin, Param, Parameters, TrainingSchedule, hookimpl
from geobench.composite import Composite

ZOO = 'pip install "geobench[zoo]"'
Build = Callable[..., torch.optim.Optimizer]


def lr(default: float, what: str = "peak learning rate") -> Param:
    return Param(default, what, low=0, low_open=True)


def beta(default: float, what: str) -> Param:
    return Param(default, what, low=0, high=1, high_open=True)


def wd(default: float) -> Param:
    return Param(default, "decoupled weight decay (matrices and embeddings only)", low=0)


def load(path: str) -> Any:
    """`module.Class`, imported when a run builds the optimizer (the plugin registers without it)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def standard(path: str, kwargs: Callable[[Mapping[str, Any], TrainingSchedule], dict[str, Any]]) -> Build:
    """A builder for one optimizer class over the standard groups (weight decay from `wd` on
    matrices and embeddings, none on norms and biases), its other arguments from `kwargs(hp, schedule)`."""

    def build(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
              schedule: TrainingSchedule) -> torch.optim.Optimizer:
        return load(path)(parameters.groups(weight_decay=hp["wd"]), **kwargs(hp, schedule))

    return build


# --- Muon: orthogonalized momentum for the hidden matrices, AdamW for embeddings, head and norms

ADAMW = {  # the AdamW inside a hybrid (Muon's) or a wrapper (SAM's)
    "beta1": beta(0.9, "AdamW's first-moment decay"),
    "beta2": beta(0.95, "AdamW's second-moment decay"),
    "wd": wd(0.1),
}
MUON = {
    "lr": lr(0.02, "Muon's peak learning rate (hidden matrices)"),
    "momentum": beta(0.95, "Muon's momentum"),
    "nesterov": Param(True, "Nesterov momentum in Muon"),
    "ns_steps": Param(5, "Newton-Schulz iterations of the orthogonalization", low=1),
    "adjust_lr": Param("original", "Muon's per-matrix lr scale: original (sqrt(max(1, rows/cols))) or "
                       "match_rms_adamw (0.2·sqrt(max(rows, cols)))", choices=("original", "match_rms_adamw")),
    "adamw_lr": lr(3e-3, "AdamW's peak learning rate (embeddings, head, norms)"),
    **ADAMW,
}


def build_muon(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
               schedule: TrainingSchedule) -> torch.optim.Optimizer:
    muon = torch.optim.Muon(parameters.tensors("matrix"), lr=hp["lr"], weight_decay=hp["wd"],
                            momentum=hp["momentum"], nesterov=hp["nesterov"], ns_steps=hp["ns_steps"],
                            adjust_lr_fn=hp["adjust_lr"])
    adamw = torch.optim.AdamW(parameters.groups(weight_decay=hp["wd"], roles=("embedding", "head", "norm")),
                              lr=hp["adamw_lr"], betas=(hp["beta1"], hp["beta2"]))
    return Composite({"muon": muon, "adamw": adamw})


# --- Schedule-Free AdamW: its own warmup and no decay schedule; evaluations are of the averaged x

SCHEDULE_FREE = {
    "lr": lr(3e-3),
    "beta1": beta(0.9, "interpolation between the averaged x and the base sequence z"),
    "beta2": beta(0.999, "second-moment decay"),
    "eps": Param(1e-8, "denominator epsilon", low=0, low_open=True),
    "wd": wd(0.1),
    "warmup_steps": Param(None, "warmup steps of its own (none: the run's train.warmup)", kind=int, low=0,
                          nullable=True),
    "weight_lr_power": Param(2.0, "weight of each iterate in the average: lr^power", low=0),
}


def build_schedule_free(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
                        schedule: TrainingSchedule) -> torch.optim.Optimizer:
    warmup = schedule.warmup if hp["warmup_steps"] is None else hp["warmup_steps"]
    return load("schedulefree.AdamWScheduleFree")(
        parameters.groups(weight_decay=hp["wd"]), lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
        warmup_steps=warmup, weight_lr_power=hp["weight_lr_power"])


# --- SAM over AdamW: the step takes the gradient again at the adversarially perturbed weights

SAM = {
    "rho": Param(0.05, "radius of the perturbation", low=0, low_open=True),
    "adaptive": Param(False, "ASAM: the perturbation scaled by |θ|"),
    "lr": lr(1e-3, "AdamW's peak learning rate"),
    **ADAMW,
}


def build_sam(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
              schedule: TrainingSchedule) -> torch.optim.Optimizer:
    return load("pytorch_optimizer.SAM")(parameters.groups(weight_decay=hp["wd"]), base_optimizer=torch.optim.AdamW,
                                         rho=hp["rho"], adaptive=hp["adaptive"], lr=hp["lr"],
                                         betas=(hp["beta1"], hp["beta2"]))


# --- L-BFGS: one group over every parameter (it takes no per-group options), a line search per step

LBFGS = {
    "lr": lr(0.1, "peak step length (the line search's first trial)"),
    "max_iter": Param(2, "iterations (each a loss and gradient of the step's batches) per step", low=1),
    "history_size": Param(10, "curvature pairs kept", low=1),
    "line_search": Param("strong_wolfe", "line search: strong_wolfe or none", choices=("strong_wolfe", "none")),
}


def build_lbfgs(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
                schedule: TrainingSchedule) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(parameters.tensors(), lr=hp["lr"], max_iter=hp["max_iter"],
                             history_size=hp["history_size"],
                             line_search_fn=None if hp["line_search"] == "none" else hp["line_search"])


# --- SophiaG: a clipped Newton-like step on a Gauss-Newton-Bartlett diagonal Hessian estimate

SOPHIA = {
    "lr": lr(3e-4),
    "beta1": beta(0.965, "momentum decay"),
    "beta2": beta(0.99, "Hessian estimate decay"),
    "rho": Param(0.04, "clipping scale of the preconditioned step", low=0, low_open=True),
    "wd": wd(0.1),
    "hessian_every": Param(10, "refresh the Hessian estimate every k steps (at steps 1, k + 1, ...)", low=1),
}


def build_sophia(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
                 schedule: TrainingSchedule) -> torch.optim.Optimizer:
    sophia = load("sophia_opt.SophiaG")

    class SophiaG(sophia):  # type: ignore[misc, valid-type]
        """SophiaG whose step is scaled by the run's tokens per step (its `bs`)."""

        def step(self, closure=None):
            return super().step(closure, bs=schedule.tokens_per_step)

    optimizer = SophiaG(parameters.groups(weight_decay=hp["wd"]), lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                        rho=hp["rho"])
    for group in optimizer.param_groups:
        group["hessian_every"] = hp["hessian_every"]  # saved with the state: a resumed run refreshes alike
    return optimizer


def sophia_hessian(*, step: int, tokens_per_step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   batches: Sequence[Batch]) -> None:
    """Every `hessian_every` steps, the GNB estimate: the gradient of the cross-entropy of labels
    sampled from the model's own predictions, squared, folded into the optimizer's Hessian EMA."""
    every = optimizer.param_groups[0]["hessian_every"]
    if (step - 1) % every:
        return
    optimizer.zero_grad(set_to_none=True)
    for inputs, _, _ in batches:
        logits = model(inputs)
        sampled = torch.distributions.Categorical(logits=logits.detach().float()).sample()
        (F.cross_entropy(logits.flatten(0, 1).float(), sampled.flatten()) / len(batches)).backward()
    optimizer.update_hessian()  # type: ignore[attr-defined]


PLUGINS = [
    OptimizerPlugin(
        name="muon", help="Muon (torch.optim.Muon) for the hidden matrices, AdamW for embeddings, head and norms",
        params=MUON, build=build_muon),
    OptimizerPlugin(
        name="schedulefree", help="Schedule-Free AdamW (schedulefree): its own warmup, no decay schedule; the "
        "trajectory records the averaged (eval-mode) weights", params=SCHEDULE_FREE, build=build_schedule_free,
        schedule="self", requires=("schedulefree",), install=ZOO),
    OptimizerPlugin(
        name="soap", help="SOAP: Adam in Shampoo's eigenbasis (pytorch-optimizer)",
        params={"lr": lr(3e-3), "beta1": beta(0.95, "first-moment decay"), "beta2": beta(0.95, "second-moment decay"),
                "wd": wd(0.1), "precondition_every": Param(10, "eigenbasis refresh interval (steps)", low=1)},
        build=standard("pytorch_optimizer.SOAP", lambda hp, s: {
            "lr": hp["lr"], "betas": (hp["beta1"], hp["beta2"]), "precondition_frequency": hp["precondition_every"]}),
        requires=("pytorch-optimizer",), install=ZOO),
    OptimizerPlugin(
        name="kron", help="PSGD Kron: a Kronecker-factored preconditioner fitted by PSGD (pytorch-optimizer)",
        params={"lr": lr(1e-3), "momentum": beta(0.9, "momentum"), "wd": wd(0.1)},
        build=standard("pytorch_optimizer.Kron", lambda hp, s: {
            "lr": hp["lr"], "momentum": hp["momentum"], "weight_decouple": True}),
        requires=("pytorch-optimizer",), install=ZOO),
    OptimizerPlugin(
        name="ademamix", help="AdEMAMix: Adam plus a slow EMA of the gradient (pytorch-optimizer)",
        params={"lr": lr(1e-3), "beta1": beta(0.9, "fast EMA decay"), "beta2": beta(0.999, "second-moment decay"),
                "beta3": beta(0.9999, "slow EMA decay"), "alpha": Param(5.0, "weight of the slow EMA", low=0),
                "wd": wd(0.1)},
        # the authors warm α and β₃ up over the whole run
        build=standard("pytorch_optimizer.AdEMAMix", lambda hp, s: {
            "lr": hp["lr"], "betas": (hp["beta1"], hp["beta2"], hp["beta3"]), "alpha": hp["alpha"],
            "t_alpha_beta3": s.steps, "weight_decouple": True}),
        requires=("pytorch-optimizer",), install=ZOO),
    OptimizerPlugin(
        name="mars", help="MARS: variance-reduced (STORM-style) gradients in AdamW (pytorch-optimizer)",
        params={"lr": lr(3e-3), "beta1": beta(0.95, "first-moment decay"), "beta2": beta(0.99, "second-moment decay"),
                "gamma": Param(0.025, "variance-reduction scale", low=0), "wd": wd(0.1)},
        # optimize_1d: norms and biases take MARS's update at the scheduled lr too (its separate lr_1d
        # would not follow the harness's schedule)
        build=standard("pytorch_optimizer.MARS", lambda hp, s: {
            "lr": hp["lr"], "betas": (hp["beta1"], hp["beta2"]), "gamma": hp["gamma"], "optimize_1d": True}),
        requires=("pytorch-optimizer",), install=ZOO),
    OptimizerPlugin(
        name="lion", help="Lion: the sign of interpolated momentum (lion-pytorch)",
        params={"lr": lr(3e-4), "beta1": beta(0.9, "interpolation of the update direction"),
                "beta2": beta(0.99, "momentum decay"), "wd": wd(0.1)},
        build=standard("lion_pytorch.Lion", lambda hp, s: {"lr": hp["lr"], "betas": (hp["beta1"], hp["beta2"])}),
        requires=("lion-pytorch",), install=ZOO),
    OptimizerPlugin(
        name="adafactor", help="Adafactor (torch.optim.Adafactor): factored second moments, relative step size",
        params={"lr": lr(1e-2, "peak relative step size"), "beta2_decay": Param(-0.8, "second-moment decay exponent",
                                                                                high=0),
                "wd": wd(0.0)},
        build=standard("torch.optim.Adafactor", lambda hp, s: {"lr": hp["lr"], "beta2_decay": hp["beta2_decay"]})),
    OptimizerPlugin(
        name="prodigy", help="Prodigy: Adam with an estimated step size d (prodigyopt)",
        params={"lr": lr(1.0, "peak multiplier of the estimated step size"), "beta1": beta(0.9, "first-moment decay"),
                "beta2": beta(0.999, "second-moment decay"), "d_coef": Param(1.0, "scale of the estimate", low=0,
                                                                              low_open=True),
                "wd": wd(0.1)},
        # safeguard_warmup: the authors' advice when a warmup schedules lr
        build=standard("prodigyopt.Prodigy", lambda hp, s: {
            "lr": hp["lr"], "betas": (hp["beta1"], hp["beta2"]), "d_coef": hp["d_coef"], "safeguard_warmup": True}),
        lr_meaning="a multiplier of Prodigy's estimated step size d (1: Prodigy's own)",
        requires=("prodigyopt",), install=ZOO),
    OptimizerPlugin(
        name="sam", help="SAM over AdamW (pytorch-optimizer): the gradient at the worst point within radius rho",
        params=SAM, build=build_sam, closure=True, requires=("pytorch-optimizer",), install=ZOO),
    OptimizerPlugin(
        name="lbfgs", help="L-BFGS (torch.optim.LBFGS) with a line search, on each step's micro-batches",
        params=LBFGS, build=build_lbfgs, closure=True),
    OptimizerPlugin(
        name="sophia", help="SophiaG (sophia-opt, the authors' implementation): clipped steps preconditioned "
        "by a sampled-label Hessian estimate refreshed every k steps", params=SOPHIA,
        build=build_sophia, prepare_step=sophia_hessian, requires=("sophia-opt",), install=ZOO),
]


@hookimpl
def geobench_register_optimizers(register):
    for plugin in PLUGINS:
        register(plugin)
