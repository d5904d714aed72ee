"""One experiment = dataset -> attack -> defense -> metrics, in a run directory named by its config.

A run's id is a hash of its resolved config, so re-running finds and reuses finished work. ``metrics.json``
is written last and atomically: its presence is what marks a run finished; ``status.json`` says whether an
unfinished directory is running or failed. Checkpoints live in ``checkpoints/`` and ``--resume`` continues.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .attacks.base import ATTACKS, Attack, PoisonedSet, get_attack
from .caching import atomic_write
from .config import from_dict, to_dict
from .data.imageset import DatasetSplits, GroundTruth, ImageSet, PaperSettings
from .data.registry import load_dataset
from .data.trusted import reserve_trusted
from .defenses.base import Defense, DefenseContext, DefenseResult, get_defense, sample_flags
from .errors import ConfigError, RunStateError
from .metrics import EvalConfig, accuracy, attack_success_rate, robust_accuracy, split_metrics
from .models.io import save_model
from .models.registry import MODELS, build_model
from .precision import PRECISIONS, Precision, resolve_precision, use_precision
from .seeding import generator

log = logging.getLogger("antibackdoor")

PRESETS = ("quick", "paper")
QUICK_MODEL = "cnn"
PAPER_MODEL = "resnet18"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options every command that trains shares (``run``'s ExperimentConfig, ``defend``'s DefendConfig):
    their fields, defaults and checks, once. Keyword-only, so that a config's own fields may have no default
    (``defend``'s DATA)."""

    preset: str = "quick"
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "runs"
    data_root: str | None = None
    device: str = "auto"
    #: auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16 or fp16; config.yaml and the
    #: run id record what auto resolved to
    precision: str = "auto"

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset: {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain data, the config's own first and these shared ones last: the order config.yaml
        has always had (dataclass inheritance puts a base's fields first; run ids hash sorted keys)."""
        d = to_dict(self)
        shared = [f.name for f in fields(RunOptions)]
        return {**{k: v for k, v in d.items() if k not in shared}, **{k: d[k] for k in shared}}


@dataclass(frozen=True)
class ExperimentConfig(RunOptions):
    """``antibackdoor run``: what to poison and how to defend; the shared options (preset, seed, eval, out,
    data_root, device, precision) come from RunOptions."""

    dataset: str = "cifar10-mini"
    attack: str = "badnets"  # or "none": train on clean data
    attack_params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = 0.1
    target: int = 0
    defense: str = "a-abl"
    defense_params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # None: "cnn" in quick, the dataset's paper model (PaperSettings) in paper

    def validate(self) -> None:
        super().validate()
        if self.attack != "none" and self.attack not in ATTACKS:
            raise ConfigError(f"--attack: unknown attack {self.attack!r}; known: none, {', '.join(sorted(ATTACKS))}")
        if self.attack != "none" and not 0.0 < self.poison_rate < 1.0:
            raise ConfigError(f"--poison-rate {self.poison_rate}: must lie in (0, 1)")
        if self.target < 0:
            raise ConfigError(f"--target {self.target}: must be a class index >= 0")


#: fields that do not change a run's results (excluded from its id)
_NOT_IN_ID = ("out", "device", "data_root", "precision_reason")


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ConfigError(f"{p}: not a readable YAML file ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value at the top level")
    return data


def make_config(data: dict[str, Any], where: str = "config") -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, data, where)
    cfg.validate()
    return cfg


@dataclass
class Resolved:
    """The config with everything a default decided: the model name and the attack and defense, built and
    validated (what config.yaml records, and what the run uses)."""

    config: ExperimentConfig
    model: str
    attack: Attack | None  # None: --attack none
    defense: Defense
    device: torch.device
    precision: Precision

    def as_dict(self) -> dict[str, Any]:
        d = self.config.as_dict()
        d["model"] = self.model
        d["precision"] = self.precision.name  # what auto resolved to: results differ by precision
        d["precision_reason"] = self.precision.reason
        d["attack_resolved"] = self.attack.describe() if self.attack is not None else {"name": "none"}
        d["defense_resolved"] = self.defense.describe()
        return d

    def run_id(self) -> str:
        d = {k: v for k, v in self.as_dict().items() if k not in _NOT_IN_ID}
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(s).name if ":" in s else s).strip("_")[:40] or "data"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    reused: bool = False
    result: DefenseResult | None = None
    poisoned: PoisonedSet | None = None


def write_json(path: Path, data: Any) -> None:
    """Strict JSON, written atomically: undefined metrics (NaN) are ``null`` (see jsonutil)."""
    from .jsonutil import write_json as _write

    _write(path, data)


def no_poison(train: ImageSet, target: int) -> PoisonedSet:
    return PoisonedSet(train, torch.zeros(len(train), dtype=torch.bool), train.y.clone(), target, "none")


def resolve_model(model: str | None, defense: str, paper: PaperSettings | None) -> str:
    """The model name a run uses: the one asked for, else the dataset's paper model under ``--preset paper``
    (``paper`` given) for ``defense`` (the resolved defense's ``paper_source``), else the CPU model."""
    name = model or (paper.model_for(defense) if paper is not None else QUICK_MODEL)
    if name not in MODELS:
        raise ConfigError(f"--model: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return name


def run_in_dir(run_dir: Path, config: dict[str, Any], resume: bool, force: bool,
               execute: Callable[[Path], RunResult]) -> RunResult:
    """The run-directory protocol shared by ``run`` and ``defend``.

    A finished directory (metrics.json present) is reused unless ``force``; an unfinished one needs
    ``resume`` (or ``force``, which deletes it). While ``execute(run_dir)`` works, status.json says running
    and log.txt records the log; a failure leaves status.json saying failed or interrupted, with the error.
    """
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and not force:
        log.info("found finished run %s; reusing it (use --force to run again)", run_dir)
        return RunResult(run_dir, json.loads(metrics_path.read_text()), reused=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            shutil.rmtree(run_dir)
        elif not resume:
            state = _read_status(run_dir)
            raise RunStateError(
                f"{run_dir}: holds an unfinished run ({state}); pass --resume to continue it or --force "
                "to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _attach_log(run_dir / "log.txt")
    try:
        write_json(run_dir / "status.json", {"state": "running", "pid": os.getpid(), "started": time.time()})
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return execute(run_dir)
    except BaseException as exc:
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        write_json(run_dir / "status.json", {"state": state, "error": str(exc) or exc.__class__.__name__})
        log.debug("run %s: %s", state, exc)
        raise
    finally:
        logging.getLogger("antibackdoor").removeHandler(handler)
        handler.close()


class Experiment:
    """Prepares, runs and records one experiment. ``run()`` is the whole job."""

    def __init__(self, config: ExperimentConfig, stage_cache: Any = None):
        config.validate()
        self.config = config
        self.splits: DatasetSplits | None = None
        #: a bench.stage_cache.StageCache shared with other runs (None: every stage is trained here)
        self.stage_cache = stage_cache

    # -- resolution ---------------------------------------------------------------------------
    def load_data(self) -> DatasetSplits:
        if self.splits is None:
            self.splits = load_dataset(self.config.dataset, self.config.data_root)
            n = self.splits.train.num_classes
            if self.config.target >= n:
                raise ConfigError(f"--target {self.config.target}: must be a class index in [0, {n})")
        return self.splits

    def resolve(self) -> Resolved:
        """Decide every default and build (so validate) the attack and defense; changes nothing, writes nothing.

        The dataset's paper settings (model, data-dependent defense parameters) apply under ``paper`` only;
        ``quick`` uses the CPU model and the presets as they are on every dataset. The user's values win.
        """
        c = self.config
        splits = self.load_data()
        paper = splits.paper if c.preset == "paper" else None
        defense = get_defense(c.defense, c.preset, c.defense_params, paper)
        model = resolve_model(c.model, defense.paper_source, paper)
        train = splits.train
        if defense.trusted_fraction() is not None:  # a fraction that leaves a class empty fails here
            train = train.subset(~self.trusted_mask(defense, train))
        attack = get_attack(c.attack, c.preset, c.attack_params) if c.attack != "none" else None
        if attack is not None:
            attack.check(train, c.poison_rate, c.target)  # on the data the attack will poison
        device = pick_device(c.device)
        return Resolved(c, model, attack, defense, device, resolve_precision(c.precision, device))

    def trusted_mask(self, defense: Defense, train: ImageSet) -> torch.Tensor:
        """The trusted slice a defense that declares ``needs_trusted`` gets: class-stratified, drawn from the
        stream ``(seed, "trusted")`` (so ``resolve`` and the run draw the same slice)."""
        return reserve_trusted(train, defense.trusted_fraction(), generator(self.config.seed, "trusted"),
                               f"--defense-param trusted_fraction ({self.config.defense})")

    def run_dir(self, resolved: Resolved) -> Path:
        c = self.config
        name = f"{_slug(c.dataset)}-{c.attack}-{c.defense}-{resolved.run_id()}"
        return Path(c.out).expanduser() / name

    # -- the job ------------------------------------------------------------------------------
    def run(self, resume: bool = False, force: bool = False) -> RunResult:
        resolved = self.resolve()
        return run_in_dir(self.run_dir(resolved), resolved.as_dict(), resume, force,
                          lambda run_dir: self._execute(resolved, run_dir, resume))

    def _execute(self, resolved: Resolved, run_dir: Path, resume: bool) -> RunResult:
        t0 = time.time()
        device = resolved.device
        prec = resolved.precision
        log.info("precision: %s", prec.describe())
        with use_precision(prec):  # attacks that train networks in prepare() compute in it too
            return self._execute_in(resolved, run_dir, resume, t0, device, prec)

    def _execute_in(self, resolved: Resolved, run_dir: Path, resume: bool, t0: float, device: torch.device,
                    prec: Precision) -> RunResult:
        c = self.config
        attack, defense = resolved.attack, resolved.defense
        splits = self.load_data()
        # on the compute device before poisoning, so attacks that train networks in prepare() use it too
        train_set, test_set = splits.train.to(device), splits.test.to(device)
        gen = torch.Generator().manual_seed(c.seed)
        log.info("data: %s (%d train, %d test, %d classes)", c.dataset, len(train_set), len(test_set),
                 train_set.num_classes)
        trusted, trusted_mask = None, None
        fraction = defense.trusted_fraction()
        if fraction is not None:
            # drawn from the clean data before poisoning and removed from it: the defense's known-clean slice
            trusted_mask = self.trusted_mask(defense, train_set)
            trusted, train_set = train_set.subset(trusted_mask), train_set.subset(~trusted_mask)
            log.info("trusted slice: %d clean samples (%.3g of the training data) reserved before poisoning",
                     len(trusted), fraction)
        outside = outside_truth(splits.truth, train_set, trusted_mask) if attack is None else None
        if outside is not None:  # data that came poisoned: the evaluation reads its ground truth
            poisoned = outside.poisoned
        elif attack is None:
            poisoned = no_poison(train_set, c.target)
        else:
            log.info("attack: %s at rate %g towards class %d", c.attack, c.poison_rate, c.target)
            poisoned = attack.poison(train_set, c.poison_rate, c.target, gen)
        log.info("poisoned samples: %d of %d (and %d cover samples)", poisoned.num_poison, len(train_set),
                 poisoned.num_cover)

        def factory():
            return build_model(resolved.model, train_set.num_classes, train_set.channels, train_set.image_size,
                               train_set.mean, train_set.std)

        ctx = DefenseContext(factory, device=device, seed=c.seed, workdir=run_dir / "checkpoints", resume=resume,
                             precision=prec, trusted=trusted, stage_cache=self.stage_cache)
        log.info("defense: %s (%s preset, model %s, device %s)", c.defense, c.preset, resolved.model, device)
        result = defense.run(poisoned.data, ctx)
        t_defense = time.time() - t0

        trained = ctx.is_trained(result.model)
        metrics: dict[str, Any] = {"model_trained": trained}
        if trained:
            metrics.update(self._evaluate(result.model.eval(), test_set, attack, device, prec,
                                          outside.triggered if outside is not None else None))
        else:  # a split-only run: no stage trained the returned model, so it has no ACC/ASR/RA to report
            log.info("no stage trained the final model (split only): ACC, ASR and RA are not applicable")
            metrics.update({"acc": None, "asr": None, "ra": None})
        metrics["ra_attack"] = c.eval.label()
        kept = result.kept if result.kept is not None else torch.ones(len(train_set), dtype=torch.bool)
        metrics.update(split_metrics(kept, poisoned.poison_mask))
        flags = sample_flag_counts(result.sample_stats, poisoned.poison_mask)
        if flags:
            metrics["sample_flags"] = flags
        if result.scores is not None and poisoned.num_poison:
            from .detectors.evaluate import roc_auc

            suspicion = result.scores.double() * (1 if result.higher_is_suspicious else -1)
            metrics["auc"] = roc_auc(suspicion, poisoned.poison_mask)  # how well the scores rank the poison
        metrics["poisoned"] = poisoned.num_poison
        if outside is not None:
            metrics["truth"] = outside.summary
        metrics["train_size"] = len(train_set)
        if trusted_mask is not None:
            metrics["trusted_size"] = int(trusted_mask.sum())
            write_json(run_dir / "trusted.json", {"fraction": fraction, "size": int(trusted_mask.sum()),
                                                  "index": trusted_mask.nonzero().flatten().tolist()})
        metrics["precision"] = prec.name
        metrics["defense_info"] = result.info
        metrics["time_defense_s"] = round(t_defense, 1)
        metrics["time_total_s"] = round(time.time() - t0, 1)
        if self.stage_cache is not None:  # which stages were loaded instead of trained, and the seconds saved
            metrics["stage_cache"] = self.stage_cache.take_events()
        self._write_artifacts(run_dir, resolved, result, poisoned, kept, train_set, trained)
        write_json(run_dir / "history.json", result.history)
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "status.json", {"state": "done", "finished": time.time()})
        return RunResult(run_dir, metrics, result=result, poisoned=poisoned)

    def _evaluate(self, model: nn.Module, test_set: ImageSet, attack: Attack | None, device: torch.device,
                  prec: Precision, triggered: ImageSet | None = None) -> dict[str, Any]:
        """ACC, ASR (None without an attack or ``triggered``, the outside trigger's test set) and RA."""
        c = self.config
        out: dict[str, Any] = {"acc": accuracy(model, test_set, device, prec), "asr": None}
        if attack is not None:
            triggered = attack.triggered_test(test_set, c.target)
        if triggered is not None:
            out["asr"] = attack_success_rate(model, triggered.to(device), device, prec)
        ra_set = test_set
        if c.eval.ra_samples:
            ra_set = test_set.subset(torch.arange(min(c.eval.ra_samples, len(test_set))))
        out["ra"] = robust_accuracy(model, ra_set, c.eval.pgd(), device, seed=c.seed, precision=prec)
        return out

    def _write_artifacts(self, run_dir: Path, resolved: Resolved, result: DefenseResult, poisoned: PoisonedSet,
                         kept: torch.Tensor, like: ImageSet, trained: bool = True) -> None:
        if trained:  # an untrained model (split only) is not the run's model: no weights file claims it is
            save_model(result.model, run_dir / "model.safetensors", resolved.model, like,
                       dataset=self.config.dataset)
        write_isolation_csv(run_dir / "isolation.csv", result, poisoned, kept)
        if result.scores is not None:
            from .plots import score_histogram

            score_histogram(result.scores.cpu(), poisoned.poison_mask, run_dir / "scores_hist.png",
                            xlabel=result.score_name or "score", threshold=result.info.get("threshold"),
                            title=f"{self.config.attack} / {self.config.defense}")
        resolved.defense.write_plots(result, poisoned.poison_mask, run_dir, true_labels=poisoned.true_labels.cpu())


@dataclass
class OutsideTruth:
    """The ground truth of data that came poisoned (``outside:``), as a run with ``--attack none`` uses it."""

    poisoned: PoisonedSet  # the training data as given, with the truth of its samples
    triggered: ImageSet  # the trigger's test set (ASR)
    summary: dict[str, Any]  # metrics.json ``truth``: trigger, target, poison in the trusted slice


def outside_truth(truth: GroundTruth | None, train: ImageSet, trusted_mask: torch.Tensor | None) -> OutsideTruth | None:
    """What a run with ``--attack none`` on data that came poisoned reports like a run with an attack: the
    dataset's ground truth (None: an ordinary data set) for the samples the defense got, i.e. without the
    trusted slice a defense reserved first (which may hold poison here: ``trusted_poison`` counts it)."""
    if truth is None:
        return None
    mask, labels = truth.poison_mask.cpu(), truth.true_labels.cpu()
    summary: dict[str, Any] = {"trigger": truth.trigger, "target": truth.target}
    if trusted_mask is not None:
        keep = ~trusted_mask.cpu()
        summary["trusted_poison"] = int((mask & ~keep).sum())
        mask, labels = mask[keep], labels[keep]
    poisoned = PoisonedSet(train, mask, labels, truth.target, f"outside:{truth.trigger}")
    return OutsideTruth(poisoned, truth.triggered_test, summary)


def sample_flag_counts(stats: dict[str, torch.Tensor], poison_mask: torch.Tensor) -> dict[str, dict[str, int]]:
    """For each boolean per-sample statistic of a defense (e.g. A-ABL's ``taken_back``): how many samples it
    flags and how many of those are poisoned (ground truth the defense never saw)."""
    poison = poison_mask.cpu()
    return {name: {"samples": int(flagged.sum()), "poison": int((flagged & poison).sum())}
            for name, flagged in sample_flags(stats, len(poison)).items()}


def write_isolation_csv(path: Path, result: DefenseResult, poisoned: PoisonedSet, kept: torch.Tensor) -> None:
    """One row per training sample: its score, whether the defense kept it, the ground truth (poisoned, cover
    sample), its new label where the defense relabelled, and one 0/1 column per flag the defense set on samples
    (A-ABL's ``taken_back``, ``purged``)."""
    scores = result.scores.cpu() if result.scores is not None else None
    new_labels = result.new_labels.cpu() if result.new_labels is not None else None
    flags = result.flags(len(kept))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            header = ["index", result.score_name or "score", "kept", "is_poison", "is_cover"]
            if new_labels is not None:
                header.append("new_label")
            w.writerow(header + list(flags))
            for i in range(len(kept)):
                row = [i, f"{float(scores[i]):.6g}" if scores is not None else "", int(kept[i]),
                       int(poisoned.poison_mask[i]), int(poisoned.cover_mask[i])]
                if new_labels is not None:
                    row.append(int(new_labels[i]))
                w.writerow(row + [int(v[i]) for v in flags.values()])

    atomic_write(path, write)


def _read_status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state", "unknown")
    except (OSError, ValueError):
        return "unknown state"


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    lg = logging.getLogger("antibackdoor")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(handler)
    return handler


def run_experiment(config: ExperimentConfig | dict[str, Any], resume: bool = False,
                   force: bool = False, stage_cache: Any = None) -> RunResult:
    """Run (or reuse) one experiment; ``config`` is an ExperimentConfig or a dict of its fields.

    ``stage_cache`` (a bench.stage_cache.StageCache) lets stages trained by other runs be reused."""
    if isinstance(config, dict):
        config = make_config(config)
    return Experiment(config, stage_cache=stage_cache).run(resume=resume, force=force)


__all__ = ["EvalConfig", "Experiment", "ExperimentConfig", "RunOptions", "RunResult", "load_config_file", "make_config",
           "run_experiment", "replace"]
