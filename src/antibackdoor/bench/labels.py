"""How the papers spell the registry's names (tables, figures, published data files)."""

from __future__ import annotations

from typing import Any

ATTACK_LABELS = {"none": "clean", "badnets": "BadNets", "blend": "Blend", "trojan": "Trojan", "clb": "CLB",
                 "iab": "IAB", "sig": "SIG", "ssba": "SSBA", "wanet": "WaNet"}
DEFENSE_LABELS = {"none": "No defense", "adv-train": "Adv. Train", "a-abl": "A-ABL", "aibd": "AIBD", "abl": "ABL",
                  "nad": "NAD", "cbd": "CBD", "dbd": "DBD", "d-st": "D-ST", "d-br": "D-BR"}
DATASET_PAPER = {"cifar10": "CIFAR-10", "cifar10-mini": "CIFAR-10", "gtsrb": "GTSRB", "gtsrb-roi": "GTSRB",
                 "tiny-imagenet": "Tiny-ImageNet"}
MODEL_LABELS = {"vgg16": "VGG16", "mobilenetv2": "MobileNetV2", "densenet121": "DenseNet121",
                "resnet18": "ResNet-18", "resnet34": "ResNet-34", "preact-resnet18": "PreAct-ResNet18",
                "wrn16-1": "WRN-16-1", "wrn16-2": "WRN-16-2"}


def params_text(params: dict[str, Any]) -> str:
    """``{"naive": {"epochs": 20}}`` -> ``(naive.epochs=20)``."""
    flat: list[str] = []

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat.append(f"{prefix[:-1]}={d}")

    walk(params, "")
    return "(" + ", ".join(flat) + ")" if flat else ""


def label(kind: str, name: str, params: dict[str, Any] | None = None) -> str:
    """The display label of an attack or defense with its parameters (when any)."""
    base = (ATTACK_LABELS if kind == "attack" else DEFENSE_LABELS).get(name, name)
    text = params_text(params or {})
    return f"{base} {text}" if text else base
