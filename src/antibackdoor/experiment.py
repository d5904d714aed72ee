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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from .adversarial.pgd import PGDConfig
from .attacks.base import ATTACKS, PoisonedSet, get_attack
from .config import from_dict, to_dict
from .data.imageset import DatasetSplits, ImageSet
from .data.registry import load_dataset
from .defenses.base import DefenseContext, DefenseResult, get_defense
from .errors import ConfigError, RunStateError
from .metrics import accuracy, attack_success_rate, robust_accuracy, split_metrics
from .models.registry import MODELS, build_model

log = logging.getLogger("antibackdoor")

PRESETS = ("quick", "paper")
QUICK_MODEL = "cnn"
PAPER_MODEL = "resnet18"


@dataclass(frozen=True)
class EvalConfig:
    """Robust accuracy: PGD-10, eps 8/255, step 2/255, random start (both papers)."""

    ra_eps: float = 8 / 255
    ra_step: float = 2 / 255
    ra_steps: int = 10
    ra_samples: int = 0  # evaluate RA on the first N test images (0 = all)

    def pgd(self) -> PGDConfig:
        return PGDConfig(eps=self.ra_eps, step=self.ra_step, steps=self.ra_steps, random_start=True)


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: str = "cifar10-mini"
    attack: str = "badnets"  # or "none": train on clean data
    attack_params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = 0.1
    target: int = 0
    defense: str = "a-abl"
    defense_params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # None: "cnn" in quick, the dataset's paper model (ResNet-18) in paper
    preset: str = "quick"
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "runs"
    data_root: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset: {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.attack != "none" and self.attack not in ATTACKS:
            raise ConfigError(f"--attack: unknown attack {self.attack!r}; known: none, {', '.join(sorted(ATTACKS))}")
        if self.attack != "none" and not 0.0 < self.poison_rate < 1.0:
            raise ConfigError(f"--poison-rate {self.poison_rate}: must lie in (0, 1)")
        if self.target < 0:
            raise ConfigError(f"--target {self.target}: must be a class index >= 0")


#: fields that do not change a run's results (excluded from its id)
_NOT_IN_ID = ("out", "device", "data_root")


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
    """The config with everything a default decided written out (what config.yaml records)."""

    config: ExperimentConfig
    model: str
    attack: dict[str, Any]
    defense: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        d = to_dict(self.config)
        d["model"] = self.model
        d["attack_resolved"] = self.attack
        d["defense_resolved"] = self.defense
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
        c = self.config
        splits = self.load_data()
        paper_model = splits.defaults.get(f"{c.defense.replace('-', '_')}_model",
                                          splits.defaults.get("model", PAPER_MODEL))
        model = c.model or (QUICK_MODEL if c.preset == "quick" else paper_model)
        if model not in MODELS:
            raise ConfigError(f"--model: unknown model {model!r}; known: {', '.join(sorted(MODELS))}")
        attack = get_attack(c.attack, **self.attack_params()).describe() if c.attack != "none" else {"name": "none"}
        defense_cls = get_defense(c.defense, c.preset)
        fields_ = set(to_dict(defense_cls.params))
        data_defaults = {k: v for k, v in splits.defaults.items() if k in fields_}
        defense = get_defense(c.defense, c.preset, {**data_defaults, **c.defense_params})
        self.defense = defense
        return Resolved(c, model, attack, defense.describe())

    def attack_params(self) -> dict[str, Any]:
        """The attack's parameters: its paper settings under ``--preset paper``, then the user's overrides."""
        c = self.config
        base = dict(getattr(ATTACKS[c.attack], "paper_params", {}) or {}) if c.preset == "paper" else {}
        return {**base, **c.attack_params}

    def run_dir(self, resolved: Resolved) -> Path:
        c = self.config
        name = f"{_slug(c.dataset)}-{c.attack}-{c.defense}-{resolved.run_id()}"
        return Path(c.out).expanduser() / name

    # -- the job ------------------------------------------------------------------------------
    def run(self, resume: bool = False, force: bool = False) -> RunResult:
        resolved = self.resolve()
        run_dir = self.run_dir(resolved)
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
            (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved.as_dict(), sort_keys=False))
            out = self._execute(resolved, run_dir, resume)
        except BaseException as exc:
            state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            write_json(run_dir / "status.json", {"state": state, "error": str(exc) or exc.__class__.__name__})
            log.debug("run %s: %s", state, exc)
            raise
        finally:
            logging.getLogger("antibackdoor").removeHandler(handler)
            handler.close()
        return out

    def _execute(self, resolved: Resolved, run_dir: Path, resume: bool) -> RunResult:
        c = self.config
        t0 = time.time()
        device = pick_device(c.device)
        splits = self.load_data()
        # on the compute device before poisoning, so attacks that train networks in prepare() use it too
        train_set, test_set = splits.train.to(device), splits.test.to(device)
        gen = torch.Generator().manual_seed(c.seed)
        log.info("data: %s (%d train, %d test, %d classes)", c.dataset, len(train_set), len(test_set),
                 train_set.num_classes)
        if c.attack == "none":
            attack = None
            poisoned = no_poison(train_set, c.target)
        else:
            attack = get_attack(c.attack, **self.attack_params())
            log.info("attack: %s at rate %g towards class %d", c.attack, c.poison_rate, c.target)
            poisoned = attack.poison(train_set, c.poison_rate, c.target, gen)
        log.info("poisoned samples: %d of %d", poisoned.num_poison, len(train_set))

        def factory():
            return build_model(resolved.model, train_set.num_classes, train_set.channels, train_set.image_size,
                               train_set.mean, train_set.std)

        ctx = DefenseContext(factory, device=device, seed=c.seed, workdir=run_dir / "checkpoints", resume=resume,
                             stage_cache=self.stage_cache)
        log.info("defense: %s (%s preset, model %s, device %s)", c.defense, c.preset, resolved.model, device)
        result = self.defense.run(poisoned.data, ctx)
        t_defense = time.time() - t0

        log.info("evaluating")
        model = result.model.eval()
        metrics: dict[str, Any] = {"acc": accuracy(model, test_set, device)}
        if attack is not None:
            metrics["asr"] = attack_success_rate(model, attack.triggered_test(test_set, c.target), device)
        else:
            metrics["asr"] = None
        ra_set = test_set
        if c.eval.ra_samples:
            ra_set = test_set.subset(torch.arange(min(c.eval.ra_samples, len(test_set))))
        metrics["ra"] = robust_accuracy(model, ra_set, c.eval.pgd(), device, seed=c.seed)
        kept = result.kept if result.kept is not None else torch.ones(len(train_set), dtype=torch.bool)
        metrics.update(split_metrics(kept, poisoned.poison_mask))
        metrics["poisoned"] = poisoned.num_poison
        metrics["train_size"] = len(train_set)
        metrics["defense_info"] = result.info
        metrics["time_defense_s"] = round(t_defense, 1)
        metrics["time_total_s"] = round(time.time() - t0, 1)
        if self.stage_cache is not None:  # which stages were loaded instead of trained, and the seconds saved
            metrics["stage_cache"] = self.stage_cache.take_events()
        self._write_artifacts(run_dir, result, poisoned, kept)
        write_json(run_dir / "history.json", result.history)
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "status.json", {"state": "done", "finished": time.time()})
        return RunResult(run_dir, metrics, result=result, poisoned=poisoned)

    def _write_artifacts(self, run_dir: Path, result: DefenseResult, poisoned: PoisonedSet,
                         kept: torch.Tensor) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(run_dir / "model.safetensors"), metadata={"model": str(self.config.model or "")})
        scores = result.scores.cpu() if result.scores is not None else None
        new_labels = result.new_labels.cpu() if result.new_labels is not None else None
        tmp = run_dir / "isolation.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            header = ["index", result.score_name or "score", "kept", "is_poison"]
            if new_labels is not None:
                header.append("new_label")
            w.writerow(header)
            for i in range(len(kept)):
                row = [i, f"{float(scores[i]):.6g}" if scores is not None else "", int(kept[i]),
                       int(poisoned.poison_mask[i])]
                if new_labels is not None:
                    row.append(int(new_labels[i]))
                w.writerow(row)
        os.replace(tmp, run_dir / "isolation.csv")
        if scores is not None:
            from .plots import score_histogram

            score_histogram(scores, poisoned.poison_mask, run_dir / "scores_hist.png",
                            xlabel=result.score_name or "score", threshold=result.info.get("threshold"),
                            title=f"{self.config.attack} / {self.config.defense}")
        self.defense.write_plots(result, poisoned.poison_mask, run_dir, true_labels=poisoned.true_labels.cpu())


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


__all__ = ["EvalConfig", "Experiment", "ExperimentConfig", "RunResult", "load_config_file", "make_config",
           "run_experiment", "replace"]
