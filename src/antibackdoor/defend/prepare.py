"""What ``defend`` resolves before its run directory exists: its config, and the typed ``DefendSetup`` the
job and the report both read (the data, the trusted and evaluation sets, the held-out slice, the truth given
with ``--poison-mask``, the defense, the model, the device and the precision).

Everything that can fail on input fails here. Which images measure the returned model: ``--test`` when given;
else DATA's own test split (a registered dataset's, a folder's test/, an npz's x_test); else ``--trusted`` data
when the defense does not use it; else a held-out slice of the given data (``holdout``, stratified), which the
defense never sees and which is labelled as such everywhere: it is as untrusted as the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import deep_update, from_dict
from ..data.imageset import ImageSet
from ..data.safe_npz import read_npy as safe_read_npy
from ..data.userdata import UserData, conform, load_user_data
from ..defenses.base import Defense, get_defense
from ..detectors import DETECTORS
from ..errors import ConfigError, DataError
from ..experiment import RunOptions, pick_device, resolve_model
from ..precision import Precision, resolve_precision
from ..runpath import resolved_record
from ..seeding import derive_seed

EXPORT_KINDS = ("folder", "npz")
DEFAULT_HOLDOUT = 0.1
ISOLATE = "isolate-then-train"
#: defend's options that do not change what the defense computes (besides runpath.NOT_IN_ID): not in the run id
NOT_IN_ID = ("export_kept",)


#: why ``defend`` runs its default defense when the user names none (the report says so beside the name)
DEFAULT_DEFENSE_WHY = ("defend's default: the paper's A-ABL, no clean data needed; a-abl+ keeps more accuracy, "
                       "a-abl-pdb lowers the ASR of whole-image triggers at an accuracy cost (docs/every-trigger.md)")


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


def make_defend_config(data: dict[str, Any], where: str = "options") -> DefendConfig:
    cfg = from_dict(DefendConfig, data, where)
    cfg.validate()
    return cfg


def with_detector(config: DefendConfig) -> DefendConfig:
    """``--detector NAME``: the detector composed with a treatment, i.e. ``--defense isolate-then-train`` with
    ``detector=NAME`` (its own ``--defense-param`` settings, e.g. ``treatment``, still apply)."""
    if config.detector is None:
        return config

    if config.detector not in DETECTORS:
        raise ConfigError(f"--detector {config.detector}: unknown detector; known: {', '.join(sorted(DETECTORS))}")
    if config.defense not in (DefendConfig.defense, ISOLATE):
        raise ConfigError(f"--detector {config.detector}: give either --detector or --defense {config.defense}, "
                          f"not both (--detector runs --defense {ISOLATE})")
    params = deep_update({"detector": config.detector}, config.defense_params)
    return replace(config, defense=ISOLATE, defense_params=params, detector=None)


@dataclass
class EvalSet:
    data: ImageSet | None
    label: str
    kind: str  # "test", "own-test", "trusted", "holdout" or "none"


@dataclass
class DefendSetup:
    """What ``prepare`` resolved: everything the run, its records and the report read."""

    config: DefendConfig  # --detector already folded into the defense
    data: UserData
    trusted: ImageSet | None
    eval: EvalSet
    heldout: np.ndarray  # bool over data.train: held out for evaluation, never shown to the defense
    poison: np.ndarray | None  # bool over DATA's indices (--poison-mask): evaluation only
    defense: Defense
    model: str
    device: torch.device
    precision: Precision

    @property
    def uses_trusted(self) -> bool:
        return _uses_trusted(self.defense)

    @property
    def rows(self) -> np.ndarray:
        """Positions in ``data.train`` the defense inspects: all but the held-out ones."""
        return np.flatnonzero(~self.heldout)

    @property
    def index(self) -> np.ndarray:
        """DATA's indices of the inspected samples."""
        return self.data.index[self.rows]

    @property
    def poison_rows(self) -> np.ndarray | None:
        """The truth over the inspected samples (None: no --poison-mask)."""
        return self.poison[self.index] if self.poison is not None else None

    def record(self) -> dict[str, Any]:
        """config.yaml: the config, what its defaults resolved to, and hashes of the data themselves (the same
        options on changed data are another run)."""
        d = resolved_record(self.config, self.model, self.precision)
        d["defense_resolved"] = self.defense.describe()
        d["data_sha"] = _sha(self.data.train.x, self.data.train.y)
        d["eval_sha"] = _sha(self.eval.data.x, self.eval.data.y) if self.eval.data is not None else None
        d["trusted_sha"] = _sha(self.trusted.x, self.trusted.y) if self.trusted is not None else None
        d["poison_mask_sha"] = _sha(self.poison) if self.poison is not None else None
        d["eval_kind"] = self.eval.kind
        return d


def prepare(c: DefendConfig) -> DefendSetup:
    """Load and check the data, build the defense, decide the evaluation set (see the module's docstring)."""
    data = load_user_data(c.data, skip_bad=c.skip_bad_files, data_root=c.data_root)
    like = data.train
    size, channels = like.image_size, like.channels
    trusted = None
    if c.trusted:
        t = load_user_data(c.trusted, skip_bad=c.skip_bad_files, data_root=c.data_root, role="--trusted",
                           size=size, channels=channels)
        trusted = conform(t, like, "--trusted", use_test=False)
    paper = data.paper if c.preset == "paper" else None
    defense = get_defense(c.defense, c.preset, c.defense_params, paper)
    defense.check_data(like)
    model = resolve_model(c.model, defense.paper_source, paper)
    device = pick_device(c.device)
    precision = resolve_precision(c.precision, device)
    if defense.needs_trusted and trusted is None:
        raise ConfigError(f"--defense {c.defense}: needs trusted clean data; pass --trusted DATA")
    heldout = np.zeros(len(like), bool)
    if c.test:
        t = load_user_data(c.test, skip_bad=c.skip_bad_files, data_root=c.data_root, role="--test",
                           size=size, channels=channels)
        test = conform(t, like, "--test", use_test=True)
        ev = EvalSet(test, f"the test data given with --test ({c.test}, {len(test)} images)", "test")
    elif data.test is not None and len(data.test):
        ev = EvalSet(data.test, f"DATA's own test split ({len(data.test)} images; from the same source as the "
                     "training data, not verified clean)", "own-test")
    elif trusted is not None and not _uses_trusted(defense):
        ev = EvalSet(trusted, f"the trusted data given with --trusted ({len(trusted)} images; the defense did not "
                     "use it)", "trusted")
    elif c.holdout > 0:
        heldout = stratified_holdout(like.y.numpy(), c.holdout, c.seed)
        ev = EvalSet(like.subset(torch.from_numpy(heldout)),
                     f"a held-out slice of the given data ({int(heldout.sum())} images, {100 * c.holdout:.0f} % of "
                     "each class; the defense never saw them, but they are as untrusted as the rest: poisoned ones "
                     "among them count against the accuracy)", "holdout")
    else:
        ev = EvalSet(None, "no evaluation set (--holdout 0 and no --test)", "none")
    poison = load_poison_mask(c.poison_mask, data) if c.poison_mask else None
    return DefendSetup(c, data, trusted, ev, heldout, poison, defense, model, device, precision)


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


def load_poison_mask(path_text: str, data: UserData) -> np.ndarray:
    """The ground truth over DATA's indices, from ``.npy`` (a boolean or 0/1 mask over all indices, or an
    integer array of poisoned indices) or a text file (one index or, for folders, one file path per line)."""
    path = Path(path_text).expanduser()
    n = data.num_indexed
    if not path.is_file():
        raise DataError(f"{path}: no such poison-mask file")
    mask = np.zeros(n, bool)
    if path.suffix == ".npy":
        a = read_npy(path).ravel()
        if a.dtype == bool or (np.issubdtype(a.dtype, np.integer) and len(a) == n and set(np.unique(a)) <= {0, 1}):
            if len(a) != n:
                raise DataError(f"{path}: a mask of {len(a)} entries, but DATA has {n} indices")
            return a.astype(bool)
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: expected a boolean mask or integer indices, got {a.dtype}")
        idx = a
    else:
        # errors name the line, never its text: the file may be any file (--poison-mask /etc/passwd)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a .npy array nor a UTF-8 text file of indices or file paths") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror or exc.__class__.__name__})") from None
        lines = [(no, ln.strip()) for no, ln in enumerate(text.splitlines(), start=1)
                 if ln.strip() and not ln.lstrip().startswith("#")]
        if all(ln.isdigit() for _, ln in lines):
            idx = np.array([int(ln) for _, ln in lines], np.int64)
        else:
            if not data.sources:
                first = next(no for no, ln in lines if not ln.isdigit())
                raise DataError(f"{path}: line {first} is not a sample index (file paths need folder data; give "
                                f"indices for {data.spec})")
            where = {s: int(i) for s, i in zip(data.sources, data.index, strict=True)}
            missing = [no for no, ln in lines if ln not in where]
            if missing:
                raise DataError(f"{path}: line {missing[0]} names no sample of {data.spec} ({len(missing)} of "
                                f"{len(lines)} lines name none; expected indices or folder-relative file paths)")
            idx = np.array([where[ln] for _, ln in lines], np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"{path}: indices must lie in [0, {n})")
    mask[idx] = True
    return mask


def read_npy(path: Path) -> np.ndarray:
    """The one place ``--poison-mask`` reads a ``.npy`` file: ``data.safe_npz``'s checked reader (no pickles, no
    header bomb), whose errors say what is wrong without quoting the file."""
    try:
        return np.asarray(safe_read_npy(path))
    except DataError as exc:
        raise DataError(f"{exc} (--poison-mask expects a boolean mask or integer indices saved with numpy.save)"
                        ) from None


def _uses_trusted(defense: Defense) -> bool:
    return defense.uses_trusted or defense.needs_trusted


def _sha(*arrays: np.ndarray | torch.Tensor) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


__all__ = ["DEFAULT_HOLDOUT", "EXPORT_KINDS", "ISOLATE", "NOT_IN_ID", "DefendConfig", "DefendSetup", "EvalSet",
           "load_poison_mask", "make_defend_config", "prepare", "read_npy", "stratified_holdout", "with_detector"]
