"""Input-aware dynamic backdoor (IAB; Nguyen & Tran, NeurIPS 2020), as a data-poisoning attack.

IAB learns, per input x, a pattern G(x) and a near-binary mask M(x); the triggered image is
``x + (G(x) - x) * M(x)``, a sparse, high-contrast, sample-specific stamp (stripe-like on CIFAR-10).
``prepare`` trains the networks as in the paper's release:

1. the mask network M alone, with the diversity loss (different images -> different masks) plus a penalty
   on mask density above ``mask_density``;
2. M frozen, the pattern generator G jointly with a proxy classifier C on batches that mix backdoor samples
   (own trigger, target label; ``p_attack``), cross-trigger samples (another image's trigger, true label;
   ``p_cross``) and clean ones, plus the diversity loss on the patterns.

Like A-ABL, which uses IAB to poison a data set, ``poison`` then keeps only G and M: a fraction ``rate`` is
triggered and relabelled to the target, and ``cross_ratio`` times as many other samples get a trigger made
for another image and keep their label (so a victim learns that only an image's own trigger fires). The
cross samples are not in the poison mask but in the poisoned set's ``cover_mask``. Trained networks are
cached (see ``cache.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import param, to_dict
from ..data.augment import augment
from ..data.imageset import ImageSet
from ..models import build_model
from ..precision import Precision, active_precision
from ..progress import bar
from ..seeding import generator as seeded_generator
from ..seeding import seeded_rng
from . import cache
from .base import Attack, PoisonedSet, check_model, map_uint8, param_error, register_attack

log = logging.getLogger("antibackdoor")

_EPS = 1e-7


def _conv_block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class TriggerNet(nn.Module):
    """The paper's encoder-decoder generator (two convs per level, max-pool down, nearest-neighbour up).

    ``width`` channels at full resolution doubling per level over ``depth`` levels (the paper: 32 and 3 on
    CIFAR-10). Inputs whose side is not a multiple of 2**depth are edge-padded and the output cropped.
    Returns raw pre-activation maps; ``pattern``/``mask`` apply the paper's squashing.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, depth: int = 3):
        super().__init__()
        self.depth = depth
        layers: list[nn.Module] = []
        cin, c = in_channels, width
        for level in range(depth):
            layers += [*_conv_block(cin, c), *_conv_block(c, c), nn.MaxPool2d(2)]
            cin = c
            if level < depth - 1:
                c *= 2
        layers += _conv_block(c, c)
        for level in range(depth):
            last = level == depth - 1
            nxt = out_channels if last else c // 2
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *_conv_block(c, c),
                       *_conv_block(c, nxt, relu=not last)]
            c = nxt
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k = 2 ** self.depth
        ph, pw = (-h) % k, (-w) % k
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.body(x)[..., :h, :w]

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger pattern in [0, 1] pixel units."""
        return torch.tanh(self(x).float()) / (2 + _EPS) + 0.5

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Mask in [0, 1], pushed towards 0/1 by the paper's steep threshold around 0.5."""
        m = torch.tanh(self(x).float()) / (2 + _EPS) + 0.5
        return torch.tanh(m * 20 - 10) / (2 + _EPS) + 0.5


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS distance (the tiny constant keeps sqrt's gradient finite at 0)."""
    return torch.sqrt((a.float() - b.float()).pow(2).mean(dim=(1, 2, 3)) + 1e-12)


def diversity_loss(xa: torch.Tensor, xb: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    """The paper's diversity loss: image distance over trigger distance, so different inputs must get
    different triggers (this is what makes the triggers sample-specific)."""
    return (_distance(xa, xb) / (_distance(ta, tb) + _EPS)).mean()


def blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x + (pattern - x) * mask


@dataclass(frozen=True)
class IABParams:
    """CPU-sized defaults; the ``paper`` preset holds the paper's values (cost on mini CIFAR-10: see
    docs/attacks_dynamic.md)."""

    epochs: int = param(15, doc="joint G + classifier epochs")
    mask_epochs: int = param(3, doc="mask-network epochs")
    width: int = param(8, doc="generator width at full resolution")
    depth: int = param(3, doc="generator levels (paper: 3 on CIFAR-10/GTSRB, 2 on MNIST)")
    proxy_model: str = param("cnn", doc="classifier trained jointly with G")
    batch_size: int = param(128, doc="joint-training batch size (paper: 128)")
    mask_batch_size: int = param(32, doc="mask-training batch size: more, smaller steps converge in few "
                                         "epochs")
    proxy_optimizer: Literal["adam", "sgd"] = param("adam", doc="classifier optimizer (SGD: momentum 0.9, "
                                                                "wd 5e-4)")
    lr_c: float = param(1e-3, doc="classifier learning rate")
    lr_g: float = param(0.01, doc="generator learning rate, Adam betas (0.5, 0.9) (paper)")
    lr_m: float = param(0.01, doc="mask-network learning rate, Adam betas (0.5, 0.9) (paper)")
    lambda_div: float = param(1.0, doc="weight of the diversity loss")
    lambda_norm: float = param(100.0, doc="weight of the mask-density penalty")
    mask_density: float = param(0.032, doc="mask density above which the penalty applies")
    p_attack: float = param(0.1, doc="share of each joint-training batch with its own trigger")
    p_cross: float = param(0.1, doc="share with another image's trigger")
    cross_ratio: float = param(0.25, doc="poisoning: cross-trigger (cover) samples per backdoor sample "
                                         "(1 leaves the quick victim at 63% ASR)")
    crop: int = param(4, doc="random-crop padding while training G/M/C (the paper also rotates by 10)")
    flip: bool = param(True, doc="horizontal flips while training G/M/C")
    model_seed: int = param(0, doc="network initialisation and batch order (independent of the run's seed)")

    def validate(self, where: str) -> None:
        if not self.cross_ratio >= 0:
            raise param_error("cross_ratio", f"{self.cross_ratio} must be >= 0")
        if not (0 < self.p_attack and 0 <= self.p_cross and self.p_attack + self.p_cross < 1):
            raise param_error("p_attack", "need 0 < p_attack, 0 <= p_cross and p_attack + p_cross < 1")
        check_model("proxy_model", self.proxy_model)


@register_attack
class InputAware(Attack):
    name = "iab"
    label = "IAB"
    label_mode = "dirty"
    description = "input-aware dynamic attack: learned per-image pattern + mask, plus cross-trigger samples"
    Params = IABParams
    presets = {
        "quick": IABParams(),
        "paper": replace(IABParams(), epochs=600, mask_epochs=25, width=32, depth=3, proxy_model="preact-resnet18",
                         mask_batch_size=128, proxy_optimizer="sgd", lr_c=0.01, crop=5, cross_ratio=1.0),
    }
    # parameters that only change how the trained networks are used, not the networks themselves
    _USE_ONLY = ("cross_ratio",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen_net: TriggerNet | None = None
        self.mask_net: TriggerNet | None = None
        self.train_info: dict[str, Any] = {}
        self.trained_target: int | None = None

    # -- training ---------------------------------------------------------------------------------
    def prepare(self, train: ImageSet, target: int, generator: torch.Generator) -> None:
        """Train (or load from the cache) the mask and pattern networks for ``target``."""
        key = {k: v for k, v in to_dict(self.params).items() if k not in self._USE_ONLY}
        key["target"] = int(target)
        prec = active_precision(train.device)
        key["precision"] = prec.name  # the networks are trained in it
        tensors, meta = cache.load_or_build(
            self.name, key, train, lambda: self._train(train, target, prec))
        # trained or cached, the networks come from the stored tensors: both paths give the same trigger
        self.gen_net, self.mask_net = self._new_nets(train.channels)
        cache.unpack(tensors, {"G": self.gen_net, "M": self.mask_net})
        self.gen_net.eval().requires_grad_(False)
        self.mask_net.eval().requires_grad_(False)
        self.train_info = meta
        self.trained_target = int(target)
        self.prepared = True

    def _new_nets(self, channels: int) -> tuple[TriggerNet, TriggerNet]:
        return (TriggerNet(channels, channels, self.params.width, self.params.depth),
                TriggerNet(channels, 1, self.params.width, self.params.depth))

    def _train(self, train: ImageSet, target: int,
               prec: Precision) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:

        t0, c0 = time.time(), time.process_time()
        with seeded_rng(self.params.model_seed, self.name, "init"):  # the global RNG stays untouched
            dev = train.device
            G, M = (prec.prepare(net.to(dev)) for net in self._new_nets(train.channels))
            C = build_model(self.params.proxy_model, train.num_classes, train.channels, train.image_size,
                            train.mean, train.std).to(dev)
            gen = seeded_generator(self.params.model_seed, self.name, "batches")
            std = torch.tensor(train.std, device=dev).view(1, -1, 1, 1)
            mask_stats = self._train_mask(M, train, gen, std, prec)
            M.eval().requires_grad_(False)
            joint_stats = self._train_joint(G, M, C, train, target, gen, prec)
        info = {"train_time_s": round(time.time() - t0, 1), "train_cpu_s": round(time.process_time() - c0, 1),
                "mask": mask_stats, "joint": joint_stats}
        log.info("iab: trained in %.0f s: %s", info["train_time_s"], info)
        if mask_stats["density"] > 2 * self.params.mask_density:
            log.warning("iab: the masks cover %.0f%% of the pixels (target %.0f%%); the mask network is "
                        "undertrained (raise mask_epochs)", 100 * mask_stats["density"],
                        100 * self.params.mask_density)
        return cache.pack({"G": G.cpu(), "M": M.cpu()}), info

    def _batches(self, n: int, gen: torch.Generator, bs: int):
        """Pairs of index batches from two independent shuffles (the paper's two data loaders)."""
        p1, p2 = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
        for s in range(0, n, bs):
            if p1[s:s + bs].numel() >= 2:
                yield p1[s:s + bs], p2[s:s + bs]

    def _augmented(self, train: ImageSet, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = train.x[idx.to(train.device)]
        return augment(x, self.params.crop, self.params.flip, gen).float().div_(255.0)

    def _train_mask(self, M: TriggerNet, train: ImageSet, gen: torch.Generator,
                    std: torch.Tensor, prec: Precision) -> dict[str, float]:
        opt = torch.optim.Adam(M.parameters(), lr=self.params.lr_m, betas=(0.5, 0.9))
        scaler = prec.scaler()
        M.train()
        stats = {"density": float("nan"), "div": float("nan")}
        for _ in bar(range(self.params.mask_epochs), desc="iab: mask network", unit="ep"):
            dens, divs, k = 0.0, 0.0, 0
            for i1, i2 in self._batches(len(train), gen, self.params.mask_batch_size):
                x1, x2 = (prec.batch(self._augmented(train, i, gen)) for i in (i1, i2))
                m = min(len(x1), len(x2))
                x1, x2 = x1[:m], x2[:m]
                with prec.autocast():
                    m1, m2 = M.mask(x1), M.mask(x2)
                # images compared after normalisation, as in the paper (which feeds normalised images)
                div = diversity_loss(x1 / std, x2 / std, m1, m2)
                norm = F.relu(m1 - self.params.mask_density).mean()
                loss = self.params.lambda_norm * norm + self.params.lambda_div * div
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                dens += float(m1.detach().mean())
                divs += float(div.detach())
                k += 1
            stats = {"density": round(dens / max(k, 1), 4), "div": round(divs / max(k, 1), 4)}
        return stats

    def _train_joint(self, G: TriggerNet, M: TriggerNet, C: nn.Module, train: ImageSet, target: int,
                     gen: torch.Generator, prec: Precision) -> dict[str, float]:
        if self.params.proxy_optimizer == "sgd":
            opt_c: torch.optim.Optimizer = torch.optim.SGD(C.parameters(), lr=self.params.lr_c, momentum=0.9,
                                                           weight_decay=5e-4)
        else:
            opt_c = torch.optim.Adam(C.parameters(), lr=self.params.lr_c)
        opt_g = torch.optim.Adam(G.parameters(), lr=self.params.lr_g, betas=(0.5, 0.9))
        prec.prepare(C)
        scaler = prec.scaler()
        G.train()
        C.train()
        y_all = train.y.to(train.device)
        stats: dict[str, float] = {}
        for _ in bar(range(self.params.epochs), desc="iab: generator + classifier", unit="ep"):
            tot = {"clean": [0, 0], "bd": [0, 0], "cross": [0, 0]}
            div_sum, steps = 0.0, 0
            for i1, i2 in self._batches(len(train), gen, self.params.batch_size):
                x1, x2 = (prec.batch(self._augmented(train, i, gen)) for i in (i1, i2))
                y1 = y_all[i1.to(train.device)]
                bs = len(x1)
                # at least two images per generator call (BatchNorm); no cross part if it would be empty
                nb = max(2, int(self.params.p_attack * bs))
                nc = int(self.params.p_cross * bs)
                nc = min(max(nc, 2), len(x2) - nb) if nc else 0
                nc = nc if nc >= 2 else 0
                with prec.autocast():
                    with torch.no_grad():
                        m1, m2 = M.mask(x1[:nb]), M.mask(x2[nb:nb + nc])
                    pat1 = G.pattern(x1[:nb])
                    pat2 = G.pattern(x2[nb:nb + nc]) if nc else pat1[:0]
                    x_bd = blend(x1[:nb], pat1, m1)
                    x_cross = blend(x1[nb:nb + nc], pat2, m2)
                    inputs = torch.cat([x_bd, x_cross, x1[nb + nc:]])
                    logits = C(prec.batch(inputs)).float()
                targets = torch.cat([torch.full((nb,), target, dtype=torch.long, device=y1.device), y1[nb:]])
                loss_ce = F.cross_entropy(logits, targets)
                k = min(nb, nc)
                div = diversity_loss(x1[:k], x2[nb:nb + k], pat1[:k], pat2[:k]) if k else logits.new_zeros(())
                loss = loss_ce + self.params.lambda_div * div
                # (the release zeroes only the classifier's gradients, letting G's accumulate; we zero both)
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt_c)
                scaler.step(opt_g)
                scaler.update()
                hit = (logits.argmax(1) == targets).detach()
                parts = (("bd", slice(0, nb)), ("cross", slice(nb, nb + nc)), ("clean", slice(nb + nc, bs)))
                for name, sl in parts:
                    tot[name][0] += int(hit[sl].sum())
                    tot[name][1] += int(hit[sl].numel())
                div_sum += float(div.detach())
                steps += 1
            stats = {f"{k}_acc": round(v[0] / max(v[1], 1), 4) for k, v in tot.items()}
            stats["div"] = round(div_sum / max(steps, 1), 4)
        return stats

    # -- the trigger --------------------------------------------------------------------------------
    def _nets(self, device: torch.device) -> tuple[TriggerNet, TriggerNet]:
        if self.gen_net is None or self.mask_net is None:
            raise RuntimeError("attack iab: no trigger networks yet; call poison() or prepare() first")
        return self.gen_net.to(device).eval(), self.mask_net.to(device).eval()

    @torch.no_grad()
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Each image gets its own trigger: x + (G(x) - x) * M(x)."""
        G, M = self._nets(x.device)
        return blend(x, G.pattern(x), M.mask(x)).clamp_(0, 1)

    @torch.no_grad()
    def apply_cross(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``x`` with the trigger generated for ``other`` (a cross-trigger sample)."""
        G, M = self._nets(x.device)
        return blend(x, G.pattern(other), M.mask(other)).clamp_(0, 1)

    def poison(self, train: ImageSet, rate: float, target: int, generator: torch.Generator) -> PoisonedSet:
        """Backdoor samples as usual, then ``cross_ratio`` x as many cross-trigger (cover) samples."""
        if self.prepared and self.trained_target != target:
            self.prepared = False  # the networks were trained for another target class
        return super().poison(train, rate, target, generator)

    def cover_count(self, num_poison: int) -> int:
        return int(round(self.params.cross_ratio * num_poison))

    def cover_images(self, train: ImageSet, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``train.x[idx]`` with the triggers of partner images: any other training image, never itself."""
        partner = torch.randint(0, len(train) - 1, (len(idx),), generator=generator)
        partner += (partner >= idx).long()
        dev = train.x.device
        return map_uint8(self.apply_cross, train.x[idx.to(dev)], train.x[partner.to(dev)])
