"""Probes behind the quick preset's speed/quality trade-off: A-ABL's stages timed and scored separately.

    python benchmarks/probe_quick_speed.py naive crop40,cos30 [--targets 0,3] [--split-at 25,30,35]
        A-ABL's naive stage with each recipe, then its split (iFGSM 2/255 x 5, SCE, Otsu): stage times,
        ACC/ASR of the naive model, gamma, rho_vul, TPR, FPR. ``--split-at`` also splits the model of a
        constant-lr recipe after those epochs (the same run: its epochs do not depend on the total).
    python benchmarks/probe_quick_speed.py final pgd2,fgsm_rs,n_fgsm [--naive crop40] [--targets 0,3]
        the naive recipe and its split, then stage 3 with each adversarial-training recipe on the kept
        samples: time, ACC, ASR, RA under PGD-10 and PGD-2 (eps 8/255).

Seeds and stage order are those of ``antibackdoor run`` (BadNets 10 %, seed 0), so a row equals the run
with that recipe. Precision: the active one (``--precision``; auto by default).
"""

from __future__ import annotations

import argparse
import time

import torch

import antibackdoor as ab
from antibackdoor.adversarial import PGDConfig
from antibackdoor.defenses import DefenseContext, get_defense
from antibackdoor.defenses.stages import otsu_threshold, train_stage
from antibackdoor.metrics import accuracy, attack_success_rate, robust_accuracy, split_metrics
from antibackdoor.precision import resolve_precision
from antibackdoor.training import TrainConfig

EPS = 8 / 255
NAIVE = {
    "crop40": TrainConfig(epochs=40, optimizer="adam", lr=1e-3, crop=4, flip=False),  # the old quick default
    "crop30": TrainConfig(epochs=30, optimizer="adam", lr=1e-3, crop=4, flip=False),
    "cos30": TrainConfig(epochs=30, optimizer="adam", lr=2e-3, crop=4, flip=False, schedule="cosine"),
    "cos25": TrainConfig(epochs=25, optimizer="adam", lr=2e-3, crop=4, flip=False, schedule="cosine"),
    "cos20": TrainConfig(epochs=20, optimizer="adam", lr=2e-3, crop=4, flip=False, schedule="cosine"),
    "cos30_1e3": TrainConfig(epochs=30, optimizer="adam", lr=1e-3, crop=4, flip=False, schedule="cosine"),
    "crop30_bs256": TrainConfig(epochs=30, optimizer="adam", lr=1.5e-3, crop=4, flip=False, batch_size=256),
    "crop30_bs64": TrainConfig(epochs=30, optimizer="adam", lr=1e-3, crop=4, flip=False, batch_size=64),
    "crop30_lr2e3": TrainConfig(epochs=30, optimizer="adam", lr=2e-3, crop=4, flip=False),
    "cos25_bs64": TrainConfig(epochs=25, optimizer="adam", lr=1e-3, crop=4, flip=False, batch_size=64,
                              schedule="cosine"),
}


def _at(adv: PGDConfig, epochs: int = 20) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adam", lr=1e-3, schedule="cosine", crop=4, flip=True, adversary=adv)


FINAL = {
    "pgd2": _at(PGDConfig(eps=EPS, step=4 / 255, steps=2)),  # the old quick default
    "pgd2_15": _at(PGDConfig(eps=EPS, step=4 / 255, steps=2), 15),
    "fgsm_rs": _at(PGDConfig.fgsm_rs(EPS)),
    "fgsm_rs_15": _at(PGDConfig.fgsm_rs(EPS), 15),
    "n_fgsm": _at(PGDConfig.n_fgsm(EPS)),
    "n_fgsm_15": _at(PGDConfig.n_fgsm(EPS), 15),
    "n_fgsm_25": _at(PGDConfig.n_fgsm(EPS), 25),
}


def split(aabl, model, ps, trig, ctx, test, tag: str, t_train: float) -> torch.Tensor:
    """A-ABL's split of ``model``; prints its time and metrics, returns the kept mask."""
    t = time.time()
    scores = aabl.split_scores(model, ps.data, ctx)
    kept = scores > otsu_threshold(scores)
    m = split_metrics(kept, ps.poison_mask)
    prec = ctx.precision
    print(f"target {ps.target} naive {tag}: train {t_train:.0f} s, split {time.time() - t:.0f} s, "
          f"ACC {accuracy(model, test, precision=prec):.3f}, ASR {attack_success_rate(model, trig, precision=prec):.3f}"
          f", gamma {m['gamma']:.3f}, rho_vul {m['rho_vul']:.4f}, TPR {m['tpr']:.3f}, FPR {m['fpr']:.3f}", flush=True)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["naive", "final"])
    p.add_argument("recipes", help="comma-separated recipe names (see NAIVE and FINAL)")
    p.add_argument("--naive", default="crop40", help="the naive recipe before 'final' probes")
    p.add_argument("--targets", default="0")
    p.add_argument("--split-at", default="", help="naive: also split after these epochs (constant-lr recipes)")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    prec = resolve_precision(a.precision, "cpu")
    print(f"precision {prec.describe()}", flush=True)
    splits = ab.load_dataset("cifar10-mini")
    test = splits.test
    attack = ab.get_attack(a.attack)
    aabl = get_defense("a-abl", "quick")
    at = {int(e) for e in a.split_at.split(",") if e}
    for target in [int(t) for t in a.targets.split(",")]:
        ps = attack.poison(splits.train, 0.1, target, ab.seeded(0))
        trig = attack.triggered_test(test, target)
        ctx = DefenseContext(ab.model_factory("cnn", splits.train), seed=0, precision=prec)
        for name in (a.recipes.split(",") if a.probe == "naive" else [a.naive]):
            cfg, t0 = NAIVE[name], time.time()

            def on_epoch_end(epoch, model, name=name, cfg=cfg, t0=t0, ps=ps, trig=trig, ctx=ctx):
                if epoch + 1 in at and epoch + 1 < cfg.epochs:
                    split(aabl, model, ps, trig, ctx, test, f"{name}@{epoch + 1}", time.time() - t0)
                return None

            naive, _ = train_stage(ctx, ps.data, cfg, "naive", on_epoch_end=on_epoch_end if at else None)
            kept = split(aabl, naive, ps, trig, ctx, test, name, time.time() - t0)
        if a.probe == "naive":
            continue
        for name in a.recipes.split(","):
            t = time.time()
            model, _ = train_stage(ctx, ps.data.subset(kept), FINAL[name], "adv_train", seed_offset=1)
            t_train = time.time() - t
            t = time.time()
            ra10 = robust_accuracy(model, test, PGDConfig(eps=EPS, step=2 / 255, steps=10), precision=prec)
            t_ra = time.time() - t
            ra2 = robust_accuracy(model, test, PGDConfig(eps=EPS, step=4 / 255, steps=2), precision=prec)
            print(f"target {target} naive {a.naive} final {name}: train {t_train:.0f} s, "
                  f"ACC {accuracy(model, test, precision=prec):.3f}, "
                  f"ASR {attack_success_rate(model, trig, precision=prec):.3f}, RA PGD-10 {ra10:.3f} "
                  f"({t_ra:.0f} s), RA PGD-2 {ra2:.3f}", flush=True)


if __name__ == "__main__":
    main()
