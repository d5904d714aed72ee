"""``antibackdoor defend``: a practitioner's own, untrusted data in; a clean model and a ranked list out.

No attack is applied: the defense runs exactly as in ``run`` (same registry, presets, model factory,
checkpoints and resume) on the data as given. The run directory follows ``run``'s protocol (named by a hash
of the resolved config and of the data itself, status.json while running, metrics.json written last) and
holds model.safetensors, suspicious.csv, clean_indices.txt, report.md and report.html.

Which images measure the returned model: ``--test`` when given; else DATA's own test split (a registered
dataset's, a folder's test/, an npz's x_test); else ``--trusted`` data when the defense does not use it;
else a held-out slice of the given data (``holdout``, stratified), which the defense never sees and which
is labelled as such everywhere: it is as untrusted as the rest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..caching import atomic_write
from ..config import deep_update, from_dict
from ..data.imageset import ImageSet
from ..data.userdata import UserData, conform, load_user_data
from ..defenses.base import DefenseContext, DefenseResult, get_defense
from ..errors import ConfigError, DataError
from ..experiment import (
    RunOptions,
    RunResult,
    _slug,
    pick_device,
    resolve_model,
    run_in_dir,
    write_json,
)
from ..metrics import accuracy, predict, robust_accuracy
from ..models.io import save_model
from ..models.registry import build_model
from ..precision import Precision, resolve_precision, use_precision
from ..seeding import derive_seed
from .analysis import class_surplus, mask_metrics, suspicion_order

log = logging.getLogger("antibackdoor")

EXPORT_KINDS = ("folder", "npz")
DEFAULT_HOLDOUT = 0.1


@dataclass(frozen=True)
class DefendConfig(RunOptions):
    """``antibackdoor defend``: the user's data and what to do with it; the shared options (preset, seed, eval,
    out, data_root, device, precision) come from RunOptions, as in ``run``."""

    data: str
    defense: str = "a-abl"
    detector: str | None = None
    defense_params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    trusted: str | None = None
    test: str | None = None
    holdout: float = DEFAULT_HOLDOUT  # used only when no other evaluation set exists (0: no evaluation)
    skip_bad_files: bool = False
    poison_mask: str | None = None  # evaluation only: never shown to the defense
    export_kept: str | None = None  # "folder" or "npz"

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"--holdout {self.holdout}: must lie in [0, 1)")
        if self.export_kept is not None and self.export_kept not in EXPORT_KINDS:
            raise ConfigError(f"--export-kept: {self.export_kept!r} is not one of {', '.join(EXPORT_KINDS)}")


#: options that do not change what the defense computes (excluded from the run id)
_NOT_IN_ID = ("out", "device", "data_root", "export_kept", "precision_reason")


def with_detector(config: DefendConfig) -> DefendConfig:
    """``--detector NAME``: the detector composed with a treatment, i.e. ``--defense isolate-then-train`` with
    ``detector=NAME`` (its own ``--defense-param`` settings, e.g. ``treatment``, still apply)."""
    if config.detector is None:
        return config
    from ..detectors import DETECTORS

    if config.detector not in DETECTORS:
        raise ConfigError(f"--detector {config.detector}: unknown detector; known: {', '.join(sorted(DETECTORS))}")
    if config.defense not in (DefendConfig.defense, ISOLATE):
        raise ConfigError(f"--detector {config.detector}: give either --detector or --defense {config.defense}, "
                          f"not both (--detector runs --defense {ISOLATE})")
    params = deep_update({"detector": config.detector}, config.defense_params)
    return replace(config, defense=ISOLATE, defense_params=params, detector=None)


ISOLATE = "isolate-then-train"


def _sha(*arrays: np.ndarray | torch.Tensor) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


@dataclass
class EvalSet:
    data: ImageSet | None
    label: str
    kind: str  # "test", "own-test", "trusted", "holdout" or "none"


class Defender:
    """Loads the user's data, runs the defense in a run directory, writes what a practitioner needs."""

    def __init__(self, config: DefendConfig):
        config.validate()
        self.config = with_detector(config)
        self.data: UserData | None = None

    # -- preparation (everything that can fail on input happens before the run directory exists) ----------
    def prepare(self) -> None:
        c = self.config
        data = load_user_data(c.data, skip_bad=c.skip_bad_files, data_root=c.data_root)
        self.data = data
        like = data.train
        size, channels = like.image_size, like.channels
        self.trusted = None
        if c.trusted:
            t = load_user_data(c.trusted, skip_bad=c.skip_bad_files, data_root=c.data_root, role="--trusted",
                               size=size, channels=channels)
            self.trusted = conform(t, like, "--trusted", use_test=False)
        paper = data.paper if c.preset == "paper" else None
        self.defense = get_defense(c.defense, c.preset, c.defense_params, paper)
        self.model_name = resolve_model(c.model, self.defense.paper_source, paper)
        self.device = pick_device(c.device)
        self.precision: Precision = resolve_precision(c.precision, self.device)
        uses_trusted = self.defense.uses_trusted or self.defense.needs_trusted
        if self.defense.needs_trusted and self.trusted is None:
            raise ConfigError(f"--defense {c.defense}: needs trusted clean data; pass --trusted DATA")
        self.uses_trusted = uses_trusted
        n = len(like)
        heldout = np.zeros(n, bool)
        if c.test:
            t = load_user_data(c.test, skip_bad=c.skip_bad_files, data_root=c.data_root, role="--test",
                               size=size, channels=channels)
            test = conform(t, like, "--test", use_test=True)
            self.eval = EvalSet(test, f"the test data given with --test ({c.test}, {len(test)} images)", "test")
        elif data.test is not None and len(data.test):
            self.eval = EvalSet(data.test, f"DATA's own test split ({len(data.test)} images; from the same source "
                                "as the training data, not verified clean)", "own-test")
        elif self.trusted is not None and not uses_trusted:
            self.eval = EvalSet(self.trusted, f"the trusted data given with --trusted ({len(self.trusted)} images; "
                                "the defense did not use it)", "trusted")
        elif c.holdout > 0:
            heldout = stratified_holdout(like.y.numpy(), c.holdout, c.seed)
            self.eval = EvalSet(like.subset(torch.from_numpy(heldout)),
                                f"a held-out slice of the given data ({int(heldout.sum())} images, "
                                f"{100 * c.holdout:.0f} % of each class; the defense never saw them, but they are as "
                                "untrusted as the rest: poisoned ones among them count against the accuracy)",
                                "holdout")
        else:
            self.eval = EvalSet(None, "no evaluation set (--holdout 0 and no --test)", "none")
        self.heldout = heldout
        self.poison = load_poison_mask(c.poison_mask, data) if c.poison_mask else None

    def resolved(self) -> dict[str, Any]:
        c = self.config
        d = c.as_dict()
        d["model"] = self.model_name
        d["precision"] = self.precision.name  # what auto resolved to: results differ by precision
        d["precision_reason"] = self.precision.reason
        d["defense_resolved"] = self.defense.describe()
        d["data_sha"] = _sha(self.data.train.x, self.data.train.y)
        d["eval_sha"] = _sha(self.eval.data.x, self.eval.data.y) if self.eval.data is not None else None
        d["trusted_sha"] = _sha(self.trusted.x, self.trusted.y) if self.trusted is not None else None
        d["poison_mask_sha"] = _sha(self.poison) if self.poison is not None else None
        d["eval_kind"] = self.eval.kind
        return d

    def run_dir(self, resolved: dict[str, Any]) -> Path:
        blob = json.dumps({k: v for k, v in resolved.items() if k not in _NOT_IN_ID}, sort_keys=True, default=str)
        run_id = hashlib.sha256(blob.encode()).hexdigest()[:10]
        return Path(self.config.out).expanduser() / f"{_slug(self.config.data)}-defend-{self.config.defense}-{run_id}"

    def run(self, resume: bool = False, force: bool = False) -> RunResult:
        if self.data is None:
            self.prepare()
        resolved = self.resolved()
        out = run_in_dir(self.run_dir(resolved), resolved, resume, force,
                         lambda run_dir: self._execute(run_dir, resume))
        if self.config.export_kept:
            path = export_kept(out.run_dir, self.data, self.config.export_kept)
            out.metrics["exported"] = str(path)
        return out

    # -- the job ------------------------------------------------------------------------------------------------
    def _execute(self, run_dir: Path, resume: bool) -> RunResult:
        log.info("precision: %s", self.precision.describe())
        with use_precision(self.precision):
            return self._execute_in(run_dir, resume)

    def _execute_in(self, run_dir: Path, resume: bool) -> RunResult:
        c, data = self.config, self.data
        t0 = time.time()
        device, prec = self.device, self.precision
        rows = np.flatnonzero(~self.heldout)
        # no copy of the images when nothing is held out (the array is the largest thing in memory)
        train = data.train.subset(torch.from_numpy(rows)) if self.heldout.any() else data.train
        train = train.to(device)
        log.info("defend: %s, %d training samples (%d classes, %dx%d, %d channel(s)); evaluation on %s", c.data,
                 len(train), train.num_classes, train.image_size, train.image_size, train.channels, self.eval.label)
        for b in data.bad:
            log.info("skipped %s: %s", b.path, b.reason)

        def factory():
            return build_model(self.model_name, train.num_classes, train.channels, train.image_size, train.mean,
                               train.std)

        trusted = self.trusted.to(device) if self.trusted is not None else None
        ctx = DefenseContext(factory, device=device, seed=c.seed, workdir=run_dir / "checkpoints", resume=resume,
                             precision=prec, trusted=trusted)
        log.info("defense: %s (%s preset, model %s, device %s)", c.defense, c.preset, self.model_name, device)
        result = self.defense.run(train, ctx)
        t_defense = time.time() - t0

        log.info("evaluating")
        model = result.model.eval()
        metrics: dict[str, Any] = {"eval_set": self.eval.label, "eval_kind": self.eval.kind}
        if self.eval.data is not None and len(self.eval.data):
            ev = self.eval.data
            metrics["acc"] = accuracy(model, ev, device, prec)
            ra_set = ev.subset(torch.arange(min(c.eval.ra_samples, len(ev)))) if c.eval.ra_samples else ev
            metrics["ra"] = robust_accuracy(model, ra_set, c.eval.pgd(), device, seed=c.seed, precision=prec)
            metrics["eval_size"] = len(ev)
            metrics["ra_attack"] = c.eval.label()
        else:
            metrics["acc"] = metrics["ra"] = None
        findings = analyse(result, train.y.cpu().numpy(), train.classes)
        poison_rows = self.poison[data.index[rows]] if self.poison is not None else None
        if poison_rows is not None:
            metrics["mask"] = mask_metrics(findings["order"], findings["isolated"], poison_rows,
                                           findings["scores"], result.higher_is_suspicious)
            if self.eval.kind == "holdout":
                metrics["mask"].update(holdout_backdoor(model, data, self.heldout, self.poison, device, prec))
        metrics.update({
            "train_size": len(train), "data_size": len(data.train), "heldout": int(self.heldout.sum()),
            "isolated": int(findings["isolated"].sum()), "kept": int((~findings["isolated"]).sum()),
            "bad_files": len(data.bad), "bad": [b.__dict__ for b in data.bad],
            "surplus": findings["surplus"].as_dict(),
            "defense_info": result.info, "model": self.model_name, "precision": prec.name,
            "time_defense_s": round(t_defense, 1),
        })
        self._write(run_dir, result, findings, rows, metrics)
        metrics["time_total_s"] = round(time.time() - t0, 1)
        write_json(run_dir / "history.json", result.history)
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "status.json", {"state": "done", "finished": time.time()})
        return RunResult(run_dir, metrics, result=result)

    def _write(self, run_dir: Path, result: DefenseResult, findings: dict, rows: np.ndarray,
               metrics: dict[str, Any]) -> None:
        from .report import write_report

        data, train = self.data, self.data.train
        save_model(result.model, run_dir / "model.safetensors", self.model_name, train, dataset=self.config.data,
                   defense=self.config.defense, preset=self.config.preset)
        index = data.index[rows]
        sources = [data.sources[r] for r in rows] if data.sources else None
        write_suspicious_csv(run_dir / "suspicious.csv", findings, index, sources, train.y.numpy()[rows],
                             train.classes, result.score_name or "score")
        purged = findings.get("flags", {}).get("purged")  # a-abl+: dropped after the split, not trained on
        out = findings["isolated"] | purged if purged is not None else findings["isolated"]
        kept_idx = np.sort(index[~out])
        note = "" if purged is None else (f"# without the {int(purged.sum())} samples the purge dropped after the "
                                          "split (column 'purged' of suspicious.csv)\n")
        _atomic_text(run_dir / "clean_indices.txt",
                     f"# DATA indices kept by {self.config.defense} ({len(kept_idx)} of {len(index)} inspected; "
                     f"see suspicious.csv)\n" + note + "".join(f"{i}\n" for i in kept_idx))
        if sources is not None:
            kept_files = sorted(s for s, iso in zip(sources, out, strict=True) if not iso)
            _atomic_text(run_dir / "clean_files.txt", "".join(f"{s}\n" for s in kept_files))
        if self.heldout.any():
            held = data.index[self.heldout]
            _atomic_text(run_dir / "heldout_indices.txt",
                         "# DATA indices held out for evaluation (not seen by the defense, not inspected)\n"
                         + "".join(f"{i}\n" for i in held))
        if self.poison is not None:
            self.defense.write_plots(result, torch.from_numpy(self.poison[index]), run_dir)
        write_report(run_dir, self, result, findings, rows, metrics)


# -- pieces -------------------------------------------------------------------------------------------------
def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded ``fraction`` of each class (rounded; a class keeps at least one training sample)."""
    rng = np.random.default_rng(derive_seed(seed, "holdout"))
    mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = min(int(round(len(idx) * fraction)), len(idx) - 1)
        if take > 0:
            mask[rng.permutation(idx)[:take]] = True
    return mask


def analyse(result: DefenseResult, y: np.ndarray, classes: list[str]) -> dict:
    """The ranking, the isolated mask and the class-surplus test of one defense result."""
    n = len(y)
    isolated = (~result.kept.cpu().numpy()) if result.kept is not None else np.zeros(n, bool)
    scores = result.scores.double().cpu().numpy() if result.scores is not None else None
    order = suspicion_order(scores, result.higher_is_suspicious, isolated)
    # the surplus test reads the ranking by score alone: a defense may restrict its isolation itself (AIBD's
    # target filter isolates within one class), which would make any class test meaningless
    score_order = suspicion_order(scores, result.higher_is_suspicious, np.zeros(n, bool)) if scores is not None \
        else order
    surplus = class_surplus(y, score_order, isolated, classes)
    new = result.new_labels.cpu().numpy() if result.new_labels is not None else None
    suggested = np.where(isolated & (new != y), new, -1) if new is not None else np.full(n, -1)
    # the defense's own per-sample flags (A-ABL's taken_back, purged): one column each in suspicious.csv
    flags = {name: v.numpy() for name, v in result.flags(n).items()}
    return {"order": order, "score_order": score_order, "isolated": isolated, "scores": scores,
            "surplus": surplus, "suggested": suggested, "flags": flags}


def write_suspicious_csv(path: Path, findings: dict, index: np.ndarray, sources: list[str] | None,
                         y: np.ndarray, classes: list[str], score_name: str) -> None:
    """Every inspected sample, most suspicious first."""
    scores, isolated, suggested = findings["scores"], findings["isolated"], findings["suggested"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            flags = findings.get("flags", {})
            w.writerow(["rank", "index", "file", "label", "class", score_name, "isolated", "suggested_label",
                        "suggested_class", *flags])
            for rank, r in enumerate(findings["order"], start=1):
                s = int(suggested[r])
                w.writerow([rank, int(index[r]), sources[r] if sources else "", int(y[r]), classes[int(y[r])],
                            f"{scores[r]:.10g}" if scores is not None else "", "yes" if isolated[r] else "no",
                            s if s >= 0 else "", classes[s] if s >= 0 else "",
                            *("yes" if v[r] else "no" for v in flags.values())])

    atomic_write(path, write)


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_poison_mask(path_text: str, data: UserData) -> np.ndarray:
    """The ground truth over DATA's indices, from ``.npy`` (a boolean or 0/1 mask over all indices, or an
    integer array of poisoned indices) or a text file (one index or, for folders, one file path per line)."""
    path = Path(path_text).expanduser()
    n = data.num_indexed
    if not path.is_file():
        raise DataError(f"{path}: no such poison-mask file")
    mask = np.zeros(n, bool)
    if path.suffix == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from None
        a = np.asarray(a).ravel()
        if a.dtype == bool or (np.issubdtype(a.dtype, np.integer) and len(a) == n and set(np.unique(a)) <= {0, 1}):
            if len(a) != n:
                raise DataError(f"{path}: a mask of {len(a)} entries, but DATA has {n} indices")
            return a.astype(bool)
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: expected a boolean mask or integer indices, got {a.dtype}")
        idx = a
    else:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if all(ln.isdigit() for ln in lines):
            idx = np.array([int(ln) for ln in lines], np.int64)
        else:
            if not data.sources:
                raise DataError(f"{path}: file names need folder data; give indices for {data.spec}")
            where = {s: int(i) for s, i in zip(data.sources, data.index, strict=True)}
            missing = [ln for ln in lines if ln not in where]
            if missing:
                raise DataError(f"{path}: {missing[0]} is not a sample of {data.spec} ({len(missing)} unknown)")
            idx = np.array([where[ln] for ln in lines], np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"{path}: indices must lie in [0, {n})")
    mask[idx] = True
    return mask


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
    for r, i in zip(rows, kept, strict=True):
        cls = _safe(train.classes[int(train.y[r])])
        if data.sources and data.root is not None:
            src = data.root / data.sources[r]
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


def make_defend_config(data: dict[str, Any], where: str = "options") -> DefendConfig:
    cfg = from_dict(DefendConfig, data, where)
    cfg.validate()
    return cfg


def run_defend(config: DefendConfig | dict[str, Any], resume: bool = False, force: bool = False) -> RunResult:
    """Run (or reuse) ``defend`` on a user's data; ``config`` is a DefendConfig or a dict of its fields."""
    if isinstance(config, dict):
        config = make_defend_config(config)
    return Defender(config).run(resume=resume, force=force)


__all__ = ["DefendConfig", "Defender", "export_kept", "load_poison_mask", "make_defend_config", "run_defend"]
