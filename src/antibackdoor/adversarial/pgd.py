"""One batched L-inf PGD engine for adversarial training, A-ABL's iFGSM scoring and AIBD's flip counting.

Per-sample statistics (final loss, first step at which the prediction leaves the label, the label it goes
to, the input-gradient norm) are recorded for a whole batch at once. Statistics are computed in eval mode,
so BatchNorm uses running statistics and a sample's numbers do not depend on its batch-mates: the batched
result equals a batch-of-one loop (tested).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import key_path, param
from ..errors import ConfigError
from ..precision import PLAIN, Precision
from ..progress import bar
from .losses import per_sample_loss


@dataclass(frozen=True)
class PGDConfig:
    """L-inf PGD. ``eps=math.inf`` leaves only the [0, 1] box (AIBD's unbounded flip counting).

    Single-step adversaries for fast adversarial training are PGD with one step: FGSM with a random start
    (``fgsm_rs``; Wong et al., ICLR 2020) and N-FGSM (``n_fgsm``; de Jorge et al., NeurIPS 2022: a larger
    noise, no projection back onto the eps-ball).
    """

    eps: float = param(8 / 255, doc="L-inf radius around the clean image, pixel units (inf: only the [0, 1] box)")
    step: float = param(2 / 255, doc="size of each sign-gradient ascent step, pixel units")
    steps: int = param(10, doc="ascent steps")
    random_start: bool = param(True, doc="start from a uniform random point of the start ball instead of the image")
    loss: Literal["ce", "sce"] = param("ce", doc="loss the attack ascends and reports: ce (cross-entropy) or sce "
                                                 "(symmetric: sce_alpha * CE + sce_beta * reverse CE)")
    early_stop: bool = param(False, doc="freeze a sample at the step its prediction first leaves its label")
    sce_alpha: float = param(0.1, doc="sce: weight of the cross-entropy")
    sce_beta: float = param(1.0, doc="sce: weight of the reverse cross-entropy")
    grad_norm_p: float = param(1.0, doc="p of the norm of the clean-input gradient reported as grad_norm (1 = L1, "
                                        "2 = L2)")
    start_eps: float | None = param(None, doc="radius of the uniform random start, pixel units (None: eps)")
    project: bool = param(True, doc="project each step back onto the eps-ball (always onto the [0, 1] box)")

    def validate(self, where: str) -> None:
        """Ranges, before anything runs: eps and step are pixel units, so a value above 1 is almost always
        8 meant as 8/255 (eps may be inf: only the [0, 1] box bounds the attack)."""
        pixels = "pixel units: 8/255 = 0.0314"
        checks = [
            ("eps", self.eps == math.inf or 0 <= self.eps <= 1, f"in [0, 1] or inf ({pixels})"),
            ("step", 0 < self.step <= 1 if self.steps else 0 <= self.step <= 1, f"in (0, 1] ({pixels})"),
            ("steps", self.steps >= 0, ">= 0"),
            ("start_eps", self.start_eps is None or 0 <= self.start_eps <= 1, f"in [0, 1] or null ({pixels})"),
            ("sce_alpha", 0 <= self.sce_alpha < math.inf, "a finite number >= 0"),
            ("sce_beta", 0 <= self.sce_beta < math.inf, "a finite number >= 0"),
            ("grad_norm_p", 0 < self.grad_norm_p, "> 0 (1 = L1, 2 = L2, inf = max)"),
        ]
        for key, ok, rule in checks:  # NaN fails every comparison, so it fails here too
            if not ok:
                raise ConfigError(f"{key_path(where, key)}: {getattr(self, key)} must be {rule}")

    @classmethod
    def ifgsm(cls, eps: float, steps: int, step: float | None = None, loss: str = "ce") -> PGDConfig:
        """Iterative FGSM: PGD without random start; step defaults to eps / steps."""
        return cls(eps=eps, step=eps / steps if step is None else step, steps=steps, random_start=False,
                   loss=loss)

    @classmethod
    def fgsm_rs(cls, eps: float, step: float | None = None) -> PGDConfig:
        """FGSM from a uniform random start in the eps-ball, step 1.25 eps, projected (Wong et al.)."""
        return cls(eps=eps, step=1.25 * eps if step is None else step, steps=1, random_start=True)

    @classmethod
    def n_fgsm(cls, eps: float, noise: float = 2.0, step: float | None = None) -> PGDConfig:
        """N-FGSM: start noise of radius ``noise * eps``, one step of ``eps``, not projected (de Jorge et al.)."""
        return cls(eps=eps, step=eps if step is None else step, steps=1, random_start=True,
                   start_eps=noise * eps, project=False)


@dataclass
class PGDResult:
    x_adv: torch.Tensor  # adversarial batch in [0, 1]
    loss: torch.Tensor  # per-sample loss (config.loss) at x_adv, float32
    flip_step: torch.Tensor  # int64: first step t in [0, steps] with prediction != label; -1 = never
    flip_label: torch.Tensor  # int64: the prediction at that step; -1 = never
    grad_norm: torch.Tensor  # float32: ||d loss / d x|| at the starting point, per sample
    pred: torch.Tensor  # int64: prediction at x_adv


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily switch to eval mode (BatchNorm running stats) and restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _forward(model: nn.Module, x: torch.Tensor, prec: Precision) -> torch.Tensor:
    """Logits of ``x`` in the given precision (the per-sample losses are computed in fp32 from them)."""
    with prec.autocast():
        return model(prec.batch(x))


def _start(x0: torch.Tensor, cfg: PGDConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The attack's starting point: ``x0``, or a uniform random point of the start ball with random start."""
    radius = cfg.eps if cfg.start_eps is None else cfg.start_eps
    if cfg.random_start and math.isfinite(radius) and radius > 0:
        noise = torch.rand(x0.shape, generator=generator).to(x0.device, x0.dtype) * 2 - 1
        return (x0 + radius * noise).clamp_(0, 1)
    return x0.clone()


def _step(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, cfg: PGDConfig) -> torch.Tensor:
    """One sign-gradient ascent step, projected onto the eps-ball around ``x0`` and the [0, 1] box."""
    stepped = x + cfg.step * grad.sign()
    if cfg.project and math.isfinite(cfg.eps):
        stepped = torch.max(torch.min(stepped, x0 + cfg.eps), x0 - cfg.eps)
    return stepped.clamp_(0, 1)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig,
        generator: torch.Generator | None = None, precision: Precision | None = None) -> PGDResult:
    """Attack a batch ``x`` (float, [0, 1]) with labels ``y``; the model is put in eval mode meanwhile.

    Runs ``steps`` sign-gradient ascent steps and one final forward pass. With ``early_stop`` only the
    samples whose prediction still equals their label are updated, and the loop ends when none is left.
    ``precision`` sets autocast and the batch layout (None: plain fp32 as given).
    """
    prec = PLAIN if precision is None else precision
    n = x.shape[0]
    dev = x.device
    x0 = x.detach() if x.is_floating_point() else x.float()
    x_adv = _start(x0, cfg, generator)
    flip_step = torch.full((n,), -1, dtype=torch.long, device=dev)
    flip_label = torch.full((n,), -1, dtype=torch.long, device=dev)
    grad_norm = torch.zeros(n, device=dev)
    loss = torch.zeros(n, device=dev)
    pred_out = torch.zeros(n, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)  # indices still being updated

    with eval_mode(model), torch.enable_grad():
        for t in range(cfg.steps + 1):
            xa = x_adv[active].requires_grad_(t < cfg.steps)
            ya = y[active]
            logits = _forward(model, xa, prec)
            per = per_sample_loss(cfg.loss, logits, ya, cfg.sce_alpha, cfg.sce_beta)
            pred = logits.argmax(1)
            newly = (pred != ya) & (flip_step[active] < 0)
            flip_step[active[newly]] = t
            flip_label[active[newly]] = pred[newly]
            loss[active] = per.detach().float()
            pred_out[active] = pred
            if t == cfg.steps:
                break
            (grad,) = torch.autograd.grad(per.sum(), xa)
            if t == 0:
                grad_norm[active] = grad.flatten(1).norm(p=cfg.grad_norm_p, dim=1).float()
            stepped = _step(xa.detach(), grad, x0[active], cfg)
            if cfg.early_stop:
                keep = ~newly
                x_adv[active[keep]] = stepped[keep]
                active = active[keep]
                if active.numel() == 0:
                    break
            else:
                x_adv[active] = stepped
    return PGDResult(x_adv.detach(), loss, flip_step, flip_label, grad_norm, pred_out)


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig,
                         generator: torch.Generator | None = None,
                         precision: Precision | None = None) -> torch.Tensor:
    """Only the adversarial batch, for adversarial training: the iterates of ``pgd`` without its
    statistics and without its final forward pass (a third of the attack's cost for PGD-2)."""
    if cfg.early_stop:
        return pgd(model, x, y, cfg, generator, precision).x_adv
    prec = PLAIN if precision is None else precision
    x0 = x.detach() if x.is_floating_point() else x.float()
    xa = _start(x0, cfg, generator)
    with eval_mode(model), torch.enable_grad():
        for _ in range(cfg.steps):
            xa.requires_grad_(True)
            per = per_sample_loss(cfg.loss, _forward(model, xa, prec), y, cfg.sce_alpha, cfg.sce_beta)
            (grad,) = torch.autograd.grad(per.sum(), xa)
            xa = _step(xa.detach(), grad, x0, cfg)
    return xa.detach()


@dataclass
class PGDStats:
    """Per-sample statistics over a whole dataset (all on CPU)."""

    loss: torch.Tensor
    flip_step: torch.Tensor
    flip_label: torch.Tensor
    grad_norm: torch.Tensor
    pred: torch.Tensor


def pgd_statistics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: PGDConfig,
                   device: torch.device | str = "cpu", batch_size: int = 512,
                   generator: torch.Generator | None = None, progress: str | None = None,
                   dtype: torch.dtype = torch.float32, precision: Precision | None = None) -> PGDStats:
    """Run the attack over uint8 ``images`` in batches and gather the per-sample statistics.

    With ``cfg.early_stop`` the batch is a pool that is refilled as samples flip (see ``_streaming``), so a
    few slow samples never leave the rest of a batch idle. ``precision`` sets autocast and the memory
    layout (the model is put in that layout; None: plain fp32); the per-sample losses stay fp32.
    """
    prec = PLAIN if precision is None else precision
    prec.prepare(model)
    if cfg.early_stop:
        return _streaming(model, images, labels, cfg, torch.device(device), batch_size, generator, progress,
                          dtype, prec)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("loss", "flip_step", "flip_label", "grad_norm", "pred")}
    starts = range(0, images.shape[0], batch_size)
    for s in bar(starts, desc=progress, total=len(starts), unit="batch"):
        xb = images[s:s + batch_size].to(device).to(dtype).div_(255.0)
        yb = labels[s:s + batch_size].to(device)
        r = pgd(model, xb, yb, cfg, generator=generator, precision=prec)
        for k in parts:
            parts[k].append(getattr(r, k).cpu())
    return PGDStats(**{k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()})


def _streaming(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: PGDConfig,
               device: torch.device, pool_size: int, generator: torch.Generator | None, progress: str | None,
               dtype: torch.dtype, prec: Precision) -> PGDStats:
    """Early-stopped PGD over a whole dataset with a refilled pool ("continuous batching").

    Flip counts are long-tailed (AIBD: most samples flip within a few steps, a few never do within the
    cap), so fixed batches would spend most steps on a handful of stragglers. Here every sample carries its
    own step counter; each iteration attacks the whole pool, retires the samples that flipped (or reached
    ``steps``) and tops the pool up from the queue. Each sample sees exactly the updates of ``pgd``.
    """
    n = images.shape[0]
    flip_step = torch.full((n,), -1, dtype=torch.long)
    flip_label = torch.full((n,), -1, dtype=torch.long)
    grad_norm = torch.zeros(n)
    loss_out = torch.zeros(n)
    pred_out = torch.zeros(n, dtype=torch.long)
    empty = torch.empty(0, dtype=torch.long, device=device)
    idx, t = empty, empty  # global index and steps taken of each pool member
    y = empty
    x0 = x_adv = torch.empty((0, *images.shape[1:]), device=device, dtype=dtype)
    queued = 0
    progress_bar = bar(None, desc=progress, total=n, unit="sample")
    with eval_mode(model), torch.enable_grad():
        while queued < n or idx.numel():
            room = pool_size - idx.numel()
            if room > 0 and queued < n:  # refill
                new = torch.arange(queued, min(n, queued + room))
                queued += new.numel()
                xn = images[new].to(device).to(dtype).div_(255.0)
                start = _start(xn, cfg, generator)
                idx = torch.cat([idx, new.to(device)])
                t = torch.cat([t, torch.zeros(new.numel(), dtype=torch.long, device=device)])
                x0 = torch.cat([x0, xn])
                x_adv = torch.cat([x_adv, start])
                y = torch.cat([y, labels[new].to(device)])
            xa = x_adv.requires_grad_(True)
            logits = _forward(model, xa, prec)
            per = per_sample_loss(cfg.loss, logits, y, cfg.sce_alpha, cfg.sce_beta)
            pred = logits.argmax(1)
            (grad,) = torch.autograd.grad(per.sum(), xa)
            flipped = pred != y
            done = flipped | (t >= cfg.steps)
            first = (t == 0) & (cfg.steps > 0)
            if bool(first.any()):
                gi = idx[first].cpu()
                grad_norm[gi] = grad[first].flatten(1).norm(p=cfg.grad_norm_p, dim=1).float().cpu()
            if bool(done.any()):
                gi = idx[done].cpu()
                loss_out[gi] = per.detach()[done].float().cpu()
                pred_out[gi] = pred[done].cpu()
                fl = flipped[done].cpu()
                flip_step[gi[fl]] = t[done].cpu()[fl]
                flip_label[gi[fl]] = pred[done].cpu()[fl]
                if hasattr(progress_bar, "update"):
                    progress_bar.update(int(done.sum()))
            go = ~done
            x_adv = _step(x_adv.detach()[go], grad[go], x0[go], cfg)
            x0, y, idx, t = x0[go], y[go], idx[go], t[go] + 1
    if hasattr(progress_bar, "close"):
        progress_bar.close()
    return PGDStats(loss_out, flip_step, flip_label, grad_norm, pred_out)
