"""``antibackdoor defend``: a practitioner's own, untrusted data in; a clean model and a ranked list out.

No attack is applied: the defense runs on the data as given, along the path ``run`` takes (runpath.py: the
same registry, presets, model factory, checkpoints, resume, evaluation and records). The run directory follows
``run``'s protocol (named by a hash of the resolved config and of the data itself, status.json while running,
metrics.json written last) and holds model.safetensors, suspicious.csv, clean_indices.txt, report.md and
report.html. What is resolved before the run (the data, the evaluation set) is in prepare.py.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import runpath
from ..caching import atomic_write
from ..data.images import inside, real_folder
from ..data.userdata import UserData
from ..errors import DataError
from ..metrics import predict
from ..precision import Precision
from ..runpath import Inputs, Job, RunResult, Trained, run_dir_for, run_id, run_in_dir
from .analysis import Findings, analyse, mask_metrics
from .prepare import (
    NOT_IN_ID,
    DefendConfig,
    DefendSetup,
    load_poison_mask,
    make_defend_config,
    prepare,
    with_detector,
)
from .report import verdict, write_report

log = logging.getLogger("antibackdoor")


class Defender:
    """Loads the user's data, runs the defense in a run directory, writes what a practitioner needs."""

    def __init__(self, config: DefendConfig):
        config.validate()
        self.config = with_detector(config)
        self.setup: DefendSetup | None = None

    def prepare(self) -> DefendSetup:
        """Everything that can fail on input, before the run directory exists."""
        self.setup = prepare(self.config)
        return self.setup

    def resolved(self) -> dict[str, Any]:
        return (self.setup or self.prepare()).record()

    def run_dir(self, resolved: dict[str, Any]) -> Path:
        c = self.config
        return run_dir_for(c.out, c.data, "defend", c.defense, run_id(resolved, NOT_IN_ID))

    def run(self, resume: bool = False, force: bool = False) -> RunResult:
        setup = self.setup or self.prepare()
        resolved = setup.record()
        job = DefendJob(setup)
        out = run_in_dir(self.run_dir(resolved), resolved, resume, force,
                         lambda run_dir: runpath.train_and_record(job, run_dir, resume, setup.device, setup.precision))
        if self.config.export_kept:
            path = export_kept(out.run_dir, setup.data, self.config.export_kept)
            out.metrics["exported"] = str(path)
        return out


class DefendJob(Job):
    """``defend``'s part of the shared path (runpath): the user's data as given (less a held-out slice), then
    what a practitioner reads: the ranking, the class-surplus test, the kept indices and the report."""

    def __init__(self, setup: DefendSetup):
        self.setup = setup

    def inputs(self) -> Inputs:
        s = self.setup
        c, data = s.config, s.data
        # no copy of the images when nothing is held out (the array is the largest thing in memory)
        train = data.train.subset(torch.from_numpy(s.rows)) if s.heldout.any() else data.train
        train = train.to(s.device)
        log.info("defend: %s, %d training samples (%d classes, %dx%d, %d channel(s)); evaluation on %s", c.data,
                 len(train), train.num_classes, train.image_size, train.image_size, train.channels, s.eval.label)
        for b in data.bad:
            log.info("skipped %s: %s", b.path, b.reason)
        poison = s.poison_rows
        return Inputs(model=s.model, defense=s.defense, defense_name=c.defense, preset=c.preset, seed=c.seed,
                      train=train, trusted=s.trusted.to(s.device) if s.trusted is not None else None, eval=c.eval,
                      test=s.eval.data, poison_mask=torch.from_numpy(poison) if poison is not None else None,
                      model_meta={"dataset": c.data, "defense": c.defense, "preset": c.preset},
                      title=f"{c.defense} on {c.data}"[:70])

    def record(self, run_dir: Path, out: Trained) -> dict[str, Any]:
        s, result = self.setup, out.result
        c, data = s.config, s.data
        metrics: dict[str, Any] = {"eval_set": s.eval.label, "eval_kind": s.eval.kind}
        ev = out.evaluation
        if ev is not None:
            metrics.update({"acc": ev.acc, "ra": ev.ra, "eval_size": ev.size, "ra_attack": c.eval.label()})
        else:
            metrics["acc"] = metrics["ra"] = None
        findings = analyse(result, data.train.y.numpy()[s.rows], data.train.classes, c.defense)
        poison_rows = s.poison_rows
        if poison_rows is not None:
            metrics["mask"] = mask_metrics(findings.order, findings.isolated, poison_rows, findings.scores,
                                           result.higher_is_suspicious)
            if s.eval.kind == "holdout" and out.trained:
                metrics["mask"].update(holdout_backdoor(result.model.eval(), data, s.heldout, s.poison, s.device,
                                                        s.precision))
        metrics.update({
            "train_size": len(s.rows), "data_size": len(data.train), "heldout": int(s.heldout.sum()),
            "isolated": int(findings.isolated.sum()), "kept": int((~findings.isolated).sum()),
            "bad_files": len(data.bad), "bad": [b.__dict__ for b in data.bad],
            # no ranking, no test: null (the verdict says why)
            "surplus": findings.surplus.as_dict() if findings.surplus is not None else None,
            "verdict": {**{k: v for k, v in verdict(findings.surplus, c.defense, int(findings.isolated.sum()),
                                                    len(s.rows), findings.unranked).items() if k != "text"},
                        **({"unranked": findings.unranked} if findings.unranked else {})},
            "warnings": findings.warnings,
            "defense_info": result.info, "model": s.model, "precision": s.precision.name,
            "time_defense_s": out.time_defense_s,
        })
        self.write(run_dir, out, findings, metrics)
        return metrics

    def write(self, run_dir: Path, out: Trained, findings: Findings, metrics: dict[str, Any]) -> None:
        """suspicious.csv, clean_indices.txt (and clean_files.txt, heldout_indices.txt), the report."""
        s, result = self.setup, out.result
        data, rows, index = s.data, s.rows, s.index
        sources = [data.sources[r] for r in rows] if data.sources else None
        write_suspicious_csv(run_dir / "suspicious.csv", findings, index, sources, data.train.y.numpy()[rows],
                             data.train.classes, result.score_name or "score")
        purged = findings.flags.get("purged")  # a-abl+: dropped after the split, not trained on
        left_out = findings.left_out
        kept_idx = np.sort(index[~left_out])
        note = "" if purged is None else (f"# without the {int(purged.sum())} samples the purge dropped after the "
                                          "split (column 'purged' of suspicious.csv)\n")
        _atomic_text(run_dir / "clean_indices.txt",
                     f"# DATA indices kept by {s.config.defense} ({len(kept_idx)} of {len(index)} inspected; "
                     f"see suspicious.csv)\n" + note + "".join(f"{i}\n" for i in kept_idx))
        if sources is not None:
            kept_files = sorted(f for f, out_ in zip(sources, left_out, strict=True) if not out_)
            _atomic_text(run_dir / "clean_files.txt", "".join(f"{f}\n" for f in kept_files))
        if s.heldout.any():
            held = data.index[s.heldout]
            _atomic_text(run_dir / "heldout_indices.txt",
                         "# DATA indices held out for evaluation (not seen by the defense, not inspected)\n"
                         + "".join(f"{i}\n" for i in held))
        write_report(run_dir, s, result, findings, metrics, trained=out.trained)


# -- pieces -------------------------------------------------------------------------------------------------
def write_suspicious_csv(path: Path, findings: Findings, index: np.ndarray, sources: list[str] | None,
                         y: np.ndarray, classes: list[str], score_name: str) -> None:
    """Every inspected sample, most suspicious first."""
    scores, isolated, suggested, flags = findings.scores, findings.isolated, findings.suggested, findings.flags

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "index", "file", "label", "class", score_name, "isolated", "suggested_label",
                        "suggested_class", *flags])
            for rank, r in enumerate(findings.order, start=1):
                s = int(suggested[r])
                w.writerow([rank, int(index[r]), sources[r] if sources else "", int(y[r]), classes[int(y[r])],
                            f"{scores[r]:.10g}" if scores is not None else "", "yes" if isolated[r] else "no",
                            s if s >= 0 else "", classes[s] if s >= 0 else "",
                            *("yes" if v[r] else "no" for v in flags.values())])

    atomic_write(path, write)


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@torch.no_grad()
def holdout_backdoor(model, data: UserData, heldout: np.ndarray, poison: np.ndarray, device,
                     precision: Precision | None = None) -> dict:
    """With the truth: accuracy on the clean held-out samples, and how many poisoned held-out samples the
    model still gives their (poisoned) label, a trigger-success estimate that needs no knowledge of the
    trigger for dirty-label poison."""
    rows = np.flatnonzero(heldout)
    p = poison[data.index[rows]]
    held = data.train.subset(torch.from_numpy(rows))
    pred = predict(model, held, device, precision=precision).numpy()
    y = held.y.numpy()
    out = {"heldout_poisoned": int(p.sum())}
    out["heldout_clean_acc"] = float((pred[~p] == y[~p]).mean()) if (~p).any() else float("nan")
    out["heldout_poisoned_given_label"] = float((pred[p] == y[p]).mean()) if p.any() else float("nan")
    return out


def export_kept(run_dir: Path, data: UserData, kind: str) -> Path:
    """The kept subset (clean_indices.txt) as a folder of class sub-folders or as an .npz."""
    import shutil

    idx_path = run_dir / "clean_indices.txt"
    if not idx_path.is_file():
        raise DataError(f"{idx_path}: missing; the run did not finish")
    kept = np.loadtxt(idx_path, dtype=np.int64, comments="#", ndmin=1)
    pos = {int(i): r for r, i in enumerate(data.index)}
    rows = np.array([pos[int(i)] for i in kept], np.int64)
    train = data.train
    if kind == "npz":
        out = run_dir / "kept.npz"
        x = train.x[torch.from_numpy(rows)].permute(0, 2, 3, 1).numpy()
        empty = np.zeros((0, *x.shape[1:]), np.uint8)
        y = train.y[torch.from_numpy(rows)].numpy()

        def write(tmp: Path) -> None:
            with open(tmp, "xb") as f:
                np.savez(f, x_train=x, y_train=y, x_test=empty, y_test=np.zeros(0, np.int64), index=kept,
                         classes=np.array(train.classes, dtype=str))

        atomic_write(out, write)
        return out
    from PIL import Image

    out = run_dir / "kept"
    tmp = run_dir / "kept.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for c in train.classes:
        (tmp / _safe(c)).mkdir(parents=True, exist_ok=True)
    root_real = real_folder(data.root) if data.root is not None else None
    for r, i in zip(rows, kept, strict=True):
        cls = _safe(train.classes[int(train.y[r])])
        if data.sources and data.root is not None:
            src = data.root / data.sources[r]
            if not inside(src, root_real):  # the loader refuses these; a copy must never reach outside DATA either
                raise DataError(f"{src}: lies outside {data.root}; not exported")
            dst = tmp / cls / src.name
            if dst.exists():  # same name in two sub-folders of a class
                dst = dst.with_name(f"{int(i):07d}_{src.name}")
            shutil.copy2(src, dst)
        else:
            arr = train.x[r].permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp / cls / f"{int(i):07d}.png")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in name).strip() or "class"


def run_defend(config: DefendConfig | dict[str, Any], resume: bool = False, force: bool = False) -> RunResult:
    """Run (or reuse) ``defend`` on a user's data; ``config`` is a DefendConfig or a dict of its fields."""
    if isinstance(config, dict):
        config = make_defend_config(config)
    return Defender(config).run(resume=resume, force=force)


__all__ = ["DefendConfig", "DefendJob", "DefendSetup", "Defender", "export_kept", "load_poison_mask",
           "make_defend_config", "run_defend"]
