"""Batch-of-one reference implementation of the PGD statistics, written independently of the engine.

It mirrors the per-sample loops of published code (one sample, one forward/backward per step) and serves
as the ground truth in tests and the baseline in benchmarks; it is not meant for real use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .losses import per_sample_loss
from .pgd import PGDConfig, PGDStats, eval_mode


def pgd_statistics_loop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: PGDConfig,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PGDStats:
    """Same outputs as ``pgd_statistics`` (without random start), one sample at a time."""
    if cfg.random_start:
        raise ValueError("the reference loop is deterministic: use random_start=False")
    out = {k: [] for k in ("loss", "flip_step", "flip_label", "grad_norm", "pred")}
    with eval_mode(model), torch.enable_grad():
        for i in range(images.shape[0]):
            x0 = images[i:i + 1].to(device).to(dtype) / 255.0
            y = labels[i:i + 1].to(device)
            x = x0.clone()
            flip_step, flip_label, gnorm = -1, -1, 0.0
            for t in range(cfg.steps + 1):
                x.requires_grad_(True)
                logits = model(x)
                loss = per_sample_loss(cfg.loss, logits, y, cfg.sce_alpha, cfg.sce_beta)
                pred = int(logits.argmax(1))
                if flip_step < 0 and pred != int(y):
                    flip_step, flip_label = t, pred
                if t < cfg.steps:
                    (g,) = torch.autograd.grad(loss.sum(), x)
                    if t == 0:
                        gnorm = float(g.flatten().norm(p=cfg.grad_norm_p))
                if t == cfg.steps or (cfg.early_stop and flip_step >= 0):
                    break
                x = x.detach() + cfg.step * g.sign()
                if math.isfinite(cfg.eps):
                    x = torch.clamp(x, x0 - cfg.eps, x0 + cfg.eps)
                x = x.clamp(0, 1)
            out["loss"].append(float(loss.detach()))
            out["flip_step"].append(flip_step)
            out["flip_label"].append(flip_label)
            out["grad_norm"].append(gnorm)
            out["pred"].append(pred)
    return PGDStats(
        loss=torch.tensor(out["loss"]), flip_step=torch.tensor(out["flip_step"]),
        flip_label=torch.tensor(out["flip_label"]), grad_norm=torch.tensor(out["grad_norm"]),
        pred=torch.tensor(out["pred"]),
    )
