"""antibackdoor: train clean, adversarially robust classifiers from possibly poisoned data.

The Python API in a nutshell::

    import antibackdoor as ab
    splits = ab.load_dataset("cifar10-mini")
    attack = ab.get_attack("badnets")
    poisoned = attack.poison(splits.train, rate=0.1, target=0, generator=ab.seeded(0))
    defense = ab.get_defense("a-abl", preset="quick")
    result = defense.run(poisoned.data, ab.DefenseContext(ab.model_factory("cnn", splits.train)))
    print(ab.evaluate(result.model, splits.test, attack, target=0))

    model = ab.load_model("runs/<run>/model.safetensors")   # any run's or defend's model, one call
"""

from __future__ import annotations

import torch

from .attacks import ATTACKS, Attack, PoisonedSet, get_attack
from .data import DATASETS, DatasetSplits, ImageSet, load_dataset
from .defenses import DEFENSES, Defense, DefenseContext, DefenseResult, get_defense
from .detectors import DETECTORS, DetectionResult, Detector, get_detector
from .errors import AntibackdoorError
from .experiment import ExperimentConfig, run_experiment
from .metrics import accuracy, attack_success_rate, robust_accuracy, split_metrics
from .models import MODELS, build_model
from .models.io import load_model, save_model
from .seeding import fixed_generator

__version__ = "0.1.0"


def seeded(seed: int) -> torch.Generator:
    """A CPU generator for reproducible poisoning."""
    return fixed_generator(seed)


def model_factory(name: str, like: ImageSet):
    """A zero-argument function building model ``name`` for data shaped like ``like``."""
    return lambda: build_model(name, like.num_classes, like.channels, like.image_size, like.mean, like.std)


def evaluate(model: torch.nn.Module, test: ImageSet, attack: Attack | None = None, target: int = 0,
             device: str = "cpu", robust: bool = True) -> dict[str, float]:
    """ACC, ASR (if an attack is given) and RA (PGD-10, 8/255) of ``model`` on ``test``."""
    out = {"acc": accuracy(model, test, device)}
    if attack is not None:
        out["asr"] = attack_success_rate(model, attack.triggered_test(test, target), device)
    if robust:
        out["ra"] = robust_accuracy(model, test, device=device)
    return out


__all__ = [
    "ATTACKS", "Attack", "AntibackdoorError", "DATASETS", "DEFENSES", "DETECTORS", "DatasetSplits", "Defense",
    "DefenseContext", "DefenseResult", "DetectionResult", "Detector", "ExperimentConfig", "ImageSet", "MODELS",
    "PoisonedSet", "accuracy", "attack_success_rate", "build_model", "evaluate", "get_attack", "get_defense",
    "get_detector", "load_dataset", "load_model", "model_factory", "robust_accuracy", "run_experiment",
    "save_model", "seeded", "split_metrics",
]
