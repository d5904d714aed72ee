"""One experiment = dataset -> attack -> defense -> metrics, in a run directory named by its config.

A run's id is a hash of its resolved config, so re-running finds and reuses finished work. ``metrics.json``
is written last and atomically: its presence is what marks a run finished; ``status.json`` says whether an
unfinished directory is running or failed. Checkpoints live in ``checkpoints/`` and ``--resume`` continues.
Training, measuring and recording take the path ``defend`` takes too (runpath.py); what is ``run``'s own is
here: the config, resolving it, poisoning, and the records measured against the attack's truth.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from . import runpath
from .attacks.base import ATTACKS, Attack, PoisonedSet, get_attack
from .caching import atomic_write
from .config import check_tree, from_dict, to_dict
from .data.imageset import DatasetSplits, GroundTruth, ImageSet, PaperSettings
from .data.registry import load_dataset
from .data.trusted import reserve_trusted
from .defenses.base import Defense, DefenseResult, get_defense, sample_flags
from .errors import ConfigError
from .metrics import EvalConfig, roc_auc, split_metrics
from .models.registry import MODELS
from .precision import PRECISIONS, Precision, resolve_precision
from .runpath import (
    Inputs,
    Job,
    RunResult,
    Trained,
    resolved_record,
    run_dir_for,
    run_id,
    run_in_dir,
    write_json,
)
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
        check_tree(self.eval, "eval")  # RA is measured after the whole training: its settings are checked now

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


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:  # the bytes themselves are never quoted: the file may be anything
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {exc.start} is not UTF-8); a config file is YAML "
                          "text saved as UTF-8") from None
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
        d = resolved_record(self.config, self.model, self.precision)
        d["attack_resolved"] = self.attack.describe() if self.attack is not None else {"name": "none"}
        d["defense_resolved"] = self.defense.describe()
        return d

    def run_id(self) -> str:
        return run_id(self.as_dict())


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


def no_poison(train: ImageSet, target: int) -> PoisonedSet:
    return PoisonedSet(train, torch.zeros(len(train), dtype=torch.bool), train.y.clone(), target, "none")


def resolve_model(model: str | None, defense: str, paper: PaperSettings | None) -> str:
    """The model name a run uses: the one asked for, else the dataset's paper model under ``--preset paper``
    (``paper`` given) for ``defense`` (the resolved defense's ``paper_source``), else the CPU model."""
    name = model or (paper.model_for(defense) if paper is not None else QUICK_MODEL)
    if name not in MODELS:
        raise ConfigError(f"--model: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return name


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
        defense.check_data(train)
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
        return run_dir_for(c.out, c.dataset, c.attack, c.defense, resolved.run_id())

    # -- the job ------------------------------------------------------------------------------
    def run(self, resume: bool = False, force: bool = False) -> RunResult:
        resolved = self.resolve()
        job = PoisonedRun(self, resolved)
        out = run_in_dir(self.run_dir(resolved), resolved.as_dict(), resume, force,
                         lambda run_dir: runpath.train_and_record(job, run_dir, resume, resolved.device,
                                                                  resolved.precision))
        out.poisoned = job.poisoned  # None for a reused run
        return out


class PoisonedRun(Job):
    """``run``'s part of the shared path (runpath): reserve the trusted slice and poison the data first; then
    record what only ``run`` knows, measured against the attack's truth: the split metrics, isolation.csv and
    trusted.json."""

    def __init__(self, experiment: Experiment, resolved: Resolved):
        self.experiment, self.resolved = experiment, resolved
        self.poisoned: PoisonedSet | None = None
        self.trusted_mask: torch.Tensor | None = None
        self.outside: OutsideTruth | None = None

    def inputs(self) -> Inputs:
        c, r = self.experiment.config, self.resolved
        defense, device = r.defense, r.device
        splits = self.experiment.load_data()
        # on the compute device before poisoning, so attacks that train networks in prepare() use it too
        train_set, test_set = splits.train.to(device), splits.test.to(device)
        log.info("data: %s (%d train, %d test, %d classes)", c.dataset, len(train_set), len(test_set),
                 train_set.num_classes)
        trusted = None
        fraction = defense.trusted_fraction()
        if fraction is not None:
            # drawn from the clean data before poisoning and removed from it: the defense's known-clean slice
            self.trusted_mask = mask = self.experiment.trusted_mask(defense, train_set)
            trusted, train_set = train_set.subset(mask), train_set.subset(~mask)
            log.info("trusted slice: %d clean samples (%.3g of the training data) reserved before poisoning",
                     len(trusted), fraction)
        self.poisoned, triggered = self.poison(train_set, test_set, splits.truth)
        p = self.poisoned
        return Inputs(model=r.model, defense=defense, defense_name=c.defense, preset=c.preset, seed=c.seed,
                      train=p.data, trusted=trusted, eval=c.eval, test=test_set, triggered=triggered,
                      poison_mask=p.poison_mask, true_labels=p.true_labels.cpu(),
                      stage_cache=self.experiment.stage_cache, model_meta={"dataset": c.dataset},
                      title=f"{c.attack} / {c.defense}")

    def poison(self, train: ImageSet, test: ImageSet,
               truth: GroundTruth | None) -> tuple[PoisonedSet, ImageSet | None]:
        """The training data with the truth about it, and the test images with the trigger (for ASR; None
        when no trigger is known): from the attack; under ``--attack none`` from the ground truth of data that
        came poisoned (``outside:``), else the clean data as it is."""
        c, attack = self.experiment.config, self.resolved.attack
        self.outside = outside_truth(truth, train, self.trusted_mask) if attack is None else None
        if self.outside is not None:  # data that came poisoned: the evaluation reads its ground truth
            poisoned, triggered = self.outside.poisoned, self.outside.triggered.to(test.device)
        elif attack is None:
            poisoned, triggered = no_poison(train, c.target), None
        else:
            log.info("attack: %s at rate %g towards class %d", c.attack, c.poison_rate, c.target)
            poisoned = attack.poison(train, c.poison_rate, c.target, torch.Generator().manual_seed(c.seed))
            triggered = attack.triggered_test(test, c.target)
        log.info("poisoned samples: %d of %d (and %d cover samples)", poisoned.num_poison, len(train),
                 poisoned.num_cover)
        return poisoned, triggered

    def record(self, run_dir: Path, out: Trained) -> dict[str, Any]:
        c, result, poisoned = self.experiment.config, out.result, self.poisoned
        ev = out.evaluation
        metrics: dict[str, Any] = {"model_trained": out.trained}
        metrics.update({"acc": ev.acc, "asr": ev.asr, "ra": ev.ra} if ev is not None
                       else {"acc": None, "asr": None, "ra": None})
        metrics["ra_attack"] = c.eval.label()
        n = len(poisoned.data)
        kept = result.kept if result.kept is not None else torch.ones(n, dtype=torch.bool)
        metrics.update(split_metrics(kept, poisoned.poison_mask))
        flags = sample_flag_counts(result.sample_stats, poisoned.poison_mask)
        if flags:
            metrics["sample_flags"] = flags
        if result.scores is not None and poisoned.num_poison:
            metrics["auc"] = roc_auc(result.suspicion(), poisoned.poison_mask)  # how well the scores rank the poison
        metrics["poisoned"] = poisoned.num_poison
        if self.outside is not None:
            metrics["truth"] = self.outside.summary
        metrics["train_size"] = n
        mask = self.trusted_mask
        if mask is not None:
            metrics["trusted_size"] = int(mask.sum())
            write_json(run_dir / "trusted.json", {"fraction": self.resolved.defense.trusted_fraction(),
                                                  "size": int(mask.sum()), "index": mask.nonzero().flatten().tolist()})
        metrics["precision"] = self.resolved.precision.name
        metrics["defense_info"] = result.info
        metrics["time_defense_s"] = out.time_defense_s
        write_isolation_csv(run_dir / "isolation.csv", result, poisoned, kept)
        return metrics


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


def run_experiment(config: ExperimentConfig | dict[str, Any], resume: bool = False,
                   force: bool = False, stage_cache: Any = None) -> RunResult:
    """Run (or reuse) one experiment; ``config`` is an ExperimentConfig or a dict of its fields.

    ``stage_cache`` (a bench.stage_cache.StageCache) lets stages trained by other runs be reused."""
    if isinstance(config, dict):
        config = make_config(config)
    return Experiment(config, stage_cache=stage_cache).run(resume=resume, force=force)


__all__ = ["EvalConfig", "Experiment", "ExperimentConfig", "RunOptions", "RunResult", "load_config_file", "make_config",
           "run_experiment", "replace"]
