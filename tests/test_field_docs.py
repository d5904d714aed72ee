"""Every setting a user can change is documented and every choice is a ``Literal``: the listings
(``antibackdoor attacks`` / ``defenses`` / ``detectors``) print each field's doc (every attack, defense and
detector in both presets, nested settings included), and the config loader rejects a value outside
a Literal with one line naming the key."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from antibackdoor.adversarial.pgd import PGDConfig
from antibackdoor.attacks.base import ATTACKS, get_attack
from antibackdoor.config import describe_fields, from_dict
from antibackdoor.defenses import DEFENSES
from antibackdoor.detectors import DETECTORS
from antibackdoor.errors import ConfigError
from antibackdoor.metrics import EvalConfig
from antibackdoor.training import TrainConfig

#: (label, settings instance): the adversary is set so that PGDConfig's fields are listed under TrainConfig's
CONFIGS = [
    ("TrainConfig", TrainConfig(adversary=PGDConfig())),
    ("PGDConfig", PGDConfig()),
    ("EvalConfig", EvalConfig()),
    *((f"{registry.kind} {name} ({preset})", params) for registry in (ATTACKS, DEFENSES, DETECTORS)
      for name, cls in sorted(registry.items()) for preset, params in cls.presets.items()),
]


def literal_fields(cls: type, prefix: str = "") -> dict[str, tuple]:
    """Dotted name -> choices of every Literal field of dataclass ``cls``, nested dataclasses included (also
    behind ``| None``)."""
    out: dict[str, tuple] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if typing.get_origin(tp) is typing.Literal:
            out[prefix + name] = typing.get_args(tp)
        for inner in (tp, *typing.get_args(tp)):
            if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                out.update(literal_fields(inner, f"{prefix}{name}."))
    return out


def nested(dotted: str, value: object) -> dict:
    """``a.b`` -> {"a": {"b": value}}."""
    head, _, rest = dotted.partition(".")
    return {head: nested(rest, value) if rest else value}


@pytest.mark.parametrize("label, params", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_every_field_has_a_doc(label, params):
    rows = describe_fields(params)
    assert rows
    assert [r.name for r in rows if not r.doc.strip()] == []
    assert all("\n" not in r.doc for r in rows)


def test_nested_settings_are_listed_with_their_docs():
    rows = {r.name: r for r in describe_fields(TrainConfig(adversary=PGDConfig()))}
    assert rows["adversary.loss"].type == "ce|sce" and rows["adversary.loss"].doc
    assert rows["optimizer"].type == "sgd|adam" and rows["schedule"].type == "none|step|cosine"
    # without an adversary the field itself is listed, with its doc
    plain = {r.name: r for r in describe_fields(TrainConfig())}
    assert plain["adversary"].value is None and plain["adversary"].doc


def test_the_choices_are_literals():
    assert literal_fields(TrainConfig) == {"optimizer": ("sgd", "adam"), "schedule": ("none", "step", "cosine"),
                                           "adversary.loss": ("ce", "sce")}
    assert literal_fields(PGDConfig) == {"loss": ("ce", "sce")}


@pytest.mark.parametrize("cls, where, data, key", [
    (TrainConfig, "train", {"optimizer": "rmsprop"}, "train.optimizer"),
    (TrainConfig, "train", {"schedule": "linear"}, "train.schedule"),
    (TrainConfig, "train", {"adversary": {"loss": "xx"}}, "train.adversary.loss"),
    (PGDConfig, "adversary", {"loss": "xx"}, "adversary.loss"),
])
def test_a_bad_choice_is_one_line_naming_the_key(cls, where, data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(cls, data, where)
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "\n" not in message


@pytest.mark.parametrize("cls", [TrainConfig, PGDConfig, EvalConfig])
def test_every_choice_is_checked_and_accepted(cls):
    for key, choices in literal_fields(cls).items():
        with pytest.raises(ConfigError) as err:
            from_dict(cls, nested(key, "not-a-choice"), "cfg")
        assert str(err.value).startswith(f"cfg.{key}: ") and "\n" not in str(err.value)
        for choice in choices:
            built = from_dict(cls, nested(key, choice), "cfg")
            for part in key.split("."):
                built = getattr(built, part)
            assert built == choice


def test_every_attack_choice_is_checked_under_its_option():
    checked = set()
    for name, cls in sorted(ATTACKS.items()):
        for key in literal_fields(cls.Params):
            with pytest.raises(ConfigError) as err:
                get_attack(name, "quick", nested(key, "not-a-choice"))
            assert str(err.value).startswith(f"--attack-param {key}: ") and "\n" not in str(err.value)
            checked.add(f"{name}.{key}")
    assert {"pixels.layout", "pixels.corner", "trojan.shape", "clb.corners", "clb.robust_optimizer",
            "iab.proxy_optimizer"} <= checked


def undocumented(params: object, prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``params`` (nested settings themselves included) without a doc."""
    out = []
    for f in dataclasses.fields(params):
        if not f.metadata.get("doc", "").strip():
            out.append(prefix + f.name)
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            out += undocumented(value, f"{prefix}{f.name}.")
    return out


@pytest.mark.parametrize("label, params", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_every_nested_setting_has_a_doc_of_its_own(label, params):
    """A stage's settings (``naive``, ``final``, ``separation``) say what the stage is, not only its fields."""
    assert undocumented(params) == []


def test_the_listing_shows_every_accepted_key_with_its_doc(capsys):
    """``antibackdoor defenses`` lists a stage's own doc and every key under it, also the ones at their default."""
    from antibackdoor.cli import main

    assert main(["defenses"]) == 0
    out = "\n" + capsys.readouterr().out
    assert "    naive: TrainConfig  stage 1: naive training on all the data" in out
    assert "    naive.batch_size: int = 128  samples per optimizer step" in out  # at its default in both presets
    assert "    final.adversary.steps: int = 2 (paper: 10)  ascent steps" in out
    for name, cls in DEFENSES.items():
        listed = {line.split(":")[0].strip() for line in out.split(f"\n{name}: ", 1)[1].split("\n\n", 1)[0].splitlines()
                  if line.startswith("    ")}
        assert {r.name for r in describe_fields(cls.presets["quick"])} <= listed, name
