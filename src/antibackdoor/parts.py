"""The one base of every configurable part (attacks, defenses, detectors): a name, a display label, typed
``Params`` with ``quick`` and ``paper`` presets, and one construction path.

Building a part is always: the preset's ``Params`` -> the dataset's paper settings for it (``--preset paper``
only) -> the user's overrides (``--attack-param`` / ``--defense-param``, dotted keys into nested settings) ->
``config.check_tree``, which checks every ``Literal`` choice and calls every ``validate(where)`` down the tree
(a nested ``TrainConfig`` of a detector inside a defense included), so a bad value stops the run before its
directory exists, with one line that names the key the user typed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .config import check_tree, key_path, merge, to_dict
from .data.imageset import PaperSettings, with_paper_settings
from .errors import ConfigError


@dataclass(frozen=True)
class NoParams:
    """The parameters of a part that has none."""


class Part:
    """Subclasses (``Attack``, ``Defense``, ``Detector``) set ``kind`` and ``option``; each concrete part sets
    ``name``, ``description``, ``Params`` (a frozen dataclass whose fields are ``config.param``s with a doc) and
    ``presets`` (``quick`` and ``paper``; left out, the defaults serve as both), and may set ``label``."""

    #: what the part is, in errors and listings
    kind: ClassVar[str] = "part"
    #: how errors name its parameters: ``--attack-param``, ``--defense-param``, ...
    option: ClassVar[str] = ""
    name: ClassVar[str] = ""
    #: how tables and figures name it (the papers' spelling, e.g. ``A-ABL``); empty: the name
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    presets: ClassVar[dict[str, Any]] = {}
    #: the defense whose per-dataset paper settings (``PaperSettings.defense_params``) this part takes under
    #: ``--preset paper`` (a variant of a paper's defense, a detector that is a defense's scorer); empty: its own
    paper_settings_of: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "presets" not in cls.__dict__ and ("Params" in cls.__dict__ or not cls.presets):
            cls.presets = {"quick": cls.Params(), "paper": cls.Params()}  # the defaults are the paper's

    def __init__(self, preset: str = "quick", overrides: dict[str, Any] | None = None, params: Any = None):
        self.params = self.resolve_params(preset, overrides or {}) if params is None else params
        self.check_params()

    @classmethod
    def resolve_params(cls, preset: str, overrides: dict[str, Any]) -> Any:
        """The preset's Params with ``overrides`` applied; unknown keys and wrong types are ConfigErrors."""
        if preset not in cls.presets:
            raise ConfigError(f"--preset: {preset!r} unknown for {cls.kind} {cls.name}; known: "
                              f"{', '.join(cls.presets)}")
        base = cls.presets[preset]
        known = sorted(f.name for f in fields(base))
        for key in overrides:
            if key not in known:
                raise ConfigError(f"{key_path(cls.option, key)}: unknown parameter of {cls.kind} {cls.name}; "
                                  f"known: {', '.join(known) or 'none'}")
        return merge(base, overrides, cls.option)

    def check_params(self) -> None:
        """Every value checked, nested settings included, before anything runs (``config.check_tree``)."""
        check_tree(self.params, self.option)

    @classmethod
    def create(cls, preset: str = "quick", overrides: dict[str, Any] | None = None,
               paper: PaperSettings | None = None) -> Part:
        """The part with its preset, then the dataset's paper settings for it (``paper`` given: ``--preset paper``
        only; they reach the parts it builds too, ``apply_paper_settings``), then ``overrides`` (the user's)."""
        part = cls(preset, with_paper_settings(cls, overrides, paper))
        if paper is not None:
            part.apply_paper_settings(paper)
        return part

    def apply_paper_settings(self, paper: PaperSettings) -> None:
        """Hand the dataset's paper settings to the parts this one builds (isolate-then-train: its detector). Its
        own parameters got theirs before it was built (``create``); nothing here."""

    @classmethod
    def display_label(cls) -> str:
        return cls.label or cls.name

    def describe(self) -> dict[str, Any]:
        """The resolved parameters as plain data (config.yaml's ``*_resolved``; run ids hash them)."""
        return {"name": self.name, **to_dict(self.params)}
