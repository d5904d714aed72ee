"""Named suites: the tables of the A-ABL and AIBD papers as grids, each in a ``quick`` and a ``paper`` size.

A suite is a grid per preset plus the layout of the tables the report draws from it (the paper's rows,
column groups and metrics, its Average / Worst-case rows, which axis holds the competing methods for the
bold "best" marks) and the published numbers beside which ours are shown (``published/*.csv``).

Quick sizes run on the bundled mini CIFAR-10 with the quick CNN; paper sizes use the papers' datasets and
models. Every suite runs targets 0, 3 and 7 by default (class 0 is special: clean airplanes are hard to
flip, so a result seen only at target 0 can be luck); ``--targets`` and ``--seeds`` change that.

Defenses and detectors are looked up in their registries when the suite runs, so methods that land later
appear without an edit here; cells whose method is missing are skipped, and the bench says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import to_dict
from ..defenses.none import PAPER_PLAIN, QUICK_PLAIN

# -- display names as the papers print them ----------------------------------------------------------------
AABL_ATTACKS = [("none", "clean"), ("badnets", "BadNets"), ("trojan", "Trojan"), ("clb", "CLB"), ("iab", "IAB"),
                ("blend", "Blend"), ("ssba", "SSBA"), ("wanet", "WaNet")]
AIBD_ATTACKS = [("none", "clean"), ("badnets", "BadNets"), ("blend", "Blend"), ("sig", "SIG"), ("wanet", "WaNet"),
                ("trojan", "Trojan"), ("iab", "Dynamic")]
TARGETS = [0, 3, 7]
QUICK_DATA = ["cifar10-mini"]

#: A-ABL's naive training recipe (quick preset of `none` and A-ABL stage 1) and the paper's standard training,
#: taken from the defenses so that a suite never drifts from them
QUICK_NAIVE = to_dict(QUICK_PLAIN)
PAPER_NAIVE = to_dict(PAPER_PLAIN)
#: A-ABL run up to its split only: stage 3 with no epochs (gamma, rho_vul, TPR, FPR are final after stage 2)
SPLIT_ONLY = {"final": {"epochs": 0}}
#: A-ABL: CLB poisons 50 % of the target class (the paper's rho for CLB on CIFAR-10 and GTSRB)
CLB_RATE = {"match": {"attack": "clb"}, "set": {"poison_rate": 0.5}}
#: AIBD trains every model without augmentation and uses WRN-16-1 on GTSRB
AIBD_GTSRB_MODEL = {"match": {"dataset": ["gtsrb", "gtsrb-roi"]}, "set": {"model": "wrn16-1"}}


def _attacks(pairs: list[tuple[str, str]], clean: bool = True, only: tuple[str, ...] | None = None) -> list[dict]:
    return [{"name": n, "label": lab} for n, lab in pairs
            if (clean or n != "none") and (only is None or n in only)]


@dataclass(frozen=True)
class TableSpec:
    """One table of the report: ``rows`` x column groups ``cols`` x ``metrics`` (per block of ``blocks``).

    Values are the mean (± std) over the cells that share the row, column and block (seeds, targets).
    ``competitors`` names the axis ("rows" or "cols") whose entries compete: the best value per metric
    across it is bold (``reference``: names of defenses, e.g. ``none``, whose entries do not compete, whatever
    their label). ``summary`` appends
    "average" / "worst" rows (or columns, for ``summary_axis="cols"``) over the non-clean entries.
    """

    title: str
    rows: str
    cols: str
    metrics: tuple[str, ...]
    blocks: str | None = None
    competitors: str | None = None
    reference: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    summary_axis: str = "rows"
    mark_failures: bool = False
    published: str | None = None
    isolating_only: bool = False  # leave out methods that never isolate a sample (e.g. No defense)


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    source: str
    description: str
    grids: dict[str, dict[str, Any]]
    tables: tuple[TableSpec, ...]
    figures: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def grid_dict(self, preset: str) -> dict[str, Any]:
        return {"name": self.name, "preset": preset, "targets": TARGETS, "seeds": [0], **self.grids[preset]}


def _aabl_t3_defenses() -> list[dict]:
    return [{"name": "none", "label": "No defense"}, {"name": "abl", "label": "ABL"},
            {"name": "dbd", "label": "DBD"}, {"name": "d-st", "label": "D-ST"}, {"name": "cbd", "label": "CBD"},
            {"name": "adv-train", "label": "Adv. Train"}, {"name": "a-abl", "label": "A-ABL"},
            {"name": "aibd", "label": "AIBD"}, {"name": "a-abl-pdb", "label": "A-ABL-PDB"}]


def _detector(name: str, label: str, split_only: bool = True, **detector_params: Any) -> dict:
    """A cell of the ``isolate-then-train`` defense (detector + treatment) with the registered detector
    ``name``: the isolated samples are dropped; ``split_only`` trains nothing afterwards (the split is what the
    table measures), otherwise the defense's own final recipe (adversarial training) runs."""
    params: dict[str, Any] = {"detector": name, "treatment": "drop"}
    if detector_params:
        params["detector_params"] = detector_params
    if split_only:
        params["train"] = {"epochs": 0}
    return {"name": "isolate-then-train", "label": label, "params": params}


SUITES: dict[str, Suite] = {}


def _add(s: Suite) -> None:
    SUITES[s.name] = s


_add(Suite(
    "aabl-t1", "Dataset splitting by iFGSM: gamma and rho_vul per attack", "A-ABL Table 1",
    "A-ABL stages 1-2 (naive training, iFGSM + SCE scores, Otsu split) on every attack; gamma = |D_vul|/|D| "
    "and the poison share rho_vul of D_vul (SIG, not in the paper's table, is added so that every attack of the "
    "project is split). Stage 3 is skipped (final.epochs = 0): the split is final after "
    "stage 2, so ACC/ASR of these cells are those of an untrained model and are not shown.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AABL_ATTACKS + [("sig", "SIG")]),
               "defenses": [{"name": "a-abl", "label": "A-ABL split", "params": SPLIT_ONLY}], "adjust": [CLB_RATE]},
     "paper": {"datasets": ["cifar10", "gtsrb", "tiny-imagenet"], "attacks": _attacks(AABL_ATTACKS + [("sig", "SIG")]),
               "defenses": [{"name": "a-abl", "label": "A-ABL split", "params": SPLIT_ONLY}], "adjust": [CLB_RATE]}},
    (TableSpec("gamma and rho_vul of the iFGSM split (%)", rows="attack", cols="dataset",
               metrics=("gamma", "rho_vul"), published="aabl_t1"),
     TableSpec("isolation TPR / FPR of the split (%)", rows="attack", cols="dataset", metrics=("tpr", "fpr"))),
    figures=("score_hists", "roc"),
))

_add(Suite(
    "aabl-t2", "Naive training on the split D_vul", "A-ABL Table 2",
    "A-ABL's split followed by ordinary (not adversarial) training on the kept subset D_vul: patch triggers "
    "(Category A) are isolated, whole-image triggers (Category B) survive the split and stay effective.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AABL_ATTACKS, clean=False), "adjust": [CLB_RATE],
               "defenses": [{"name": "a-abl", "label": "Naive on D_vul", "params": {"final": QUICK_NAIVE}}]},
     "paper": {"datasets": ["cifar10", "gtsrb", "tiny-imagenet"], "attacks": _attacks(AABL_ATTACKS, clean=False),
               "adjust": [CLB_RATE],
               "defenses": [{"name": "a-abl", "label": "Naive on D_vul", "params": {"final": PAPER_NAIVE}}]}},
    (TableSpec("naive training on D_vul: ACC / ASR (%)", rows="attack", cols="dataset", metrics=("acc", "asr"),
               published="aabl_t2"),),
))

_add(Suite(
    "aabl-t3", "Defenses against attacks: ACC / ASR / RA", "A-ABL Table 3",
    "Every defense on every attack and on clean data (row 'clean'). RA: PGD-10, eps 8/255, step 2/255. "
    "'No defense' is shown for reference and does not compete for the bold marks; AIBD (not in A-ABL's table) "
    "and the project's A-ABL-PDB are added so that the defenses of the project are compared on the same cells.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AABL_ATTACKS), "defenses": _aabl_t3_defenses(),
               "adjust": [CLB_RATE]},
     "paper": {"datasets": ["cifar10", "gtsrb", "tiny-imagenet"], "attacks": _attacks(AABL_ATTACKS),
               "defenses": _aabl_t3_defenses(), "adjust": [CLB_RATE]}},
    (TableSpec("ACC / ASR / RA (%)", rows="attack", cols="defense", metrics=("acc", "asr", "ra"), blocks="dataset",
               competitors="cols", reference=("none",), summary=("average", "worst"), mark_failures=True,
               published="aabl_t3"),
     TableSpec("isolation of the defenses that isolate: TPR / FPR (%)", rows="attack", cols="defense",
               metrics=("tpr", "fpr"), blocks="dataset", competitors="cols", isolating_only=True)),
    figures=("score_hists", "roc"),
))

_add(Suite(
    "aabl-t4", "Adversarial training on D-ST's split", "A-ABL Table 4",
    "D-ST's separation into clean / suspicious / poisoned, then PGD adversarial training on the clean part or "
    "on clean + suspicious: adversarial training completes a split that misses whole-image triggers.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AABL_ATTACKS, only=("blend", "wanet")),
               "defenses": [_detector("dst-fct", "Clean", split_only=False, keep="clean"),
                            _detector("dst-fct", "Clean + Suspicious", split_only=False, keep="clean+suspicious")]},
     "paper": {"datasets": ["cifar10", "gtsrb"], "attacks": _attacks(AABL_ATTACKS, only=("blend", "wanet")),
               "defenses": [_detector("dst-fct", "Clean", split_only=False, keep="clean"),
                            _detector("dst-fct", "Clean + Suspicious", split_only=False, keep="clean+suspicious")]}},
    (TableSpec("gamma / rho_vul / ACC / ASR (%)", rows="attack", cols="defense",
               metrics=("gamma", "rho_vul", "acc", "asr"), blocks="dataset", published="aabl_t4"),),
))

_AUG = [("randaugment-sce", "RandAugment"), ("autoaugment-sce", "AutoAugment"), ("augmix-sce", "AugMix")]
_add(Suite(
    "aabl-t5", "Splitting by strong augmentation vs iFGSM", "A-ABL Table 5",
    "The SCE loss of a strongly augmented view (RandAugment, AutoAugment, AugMix — the paper's 'AutoMix') "
    "instead of the iFGSM example, split by Otsu, next to A-ABL's split.",
    {p: {"datasets": QUICK_DATA if p == "quick" else ["cifar10"], "attacks": _attacks(AABL_ATTACKS, clean=False),
         "adjust": [CLB_RATE],
         "defenses": [*(_detector(n, lab) for n, lab in _AUG),
                      {"name": "a-abl", "label": "A-ABL", "params": SPLIT_ONLY}]} for p in ("quick", "paper")},
    (TableSpec("gamma / rho_vul of each split (%)", rows="attack", cols="defense", metrics=("gamma", "rho_vul"),
               published="aabl_t5"),),
    figures=("roc",),
))

_add(Suite(
    "aabl-t6", "A-ABL across architectures", "A-ABL Table 6",
    "A-ABL on every attack with other architectures. Quick: WRN-16-1, MobileNetV2 and VGG16 on the mini "
    "CIFAR-10 (DenseNet121 is too slow for 2 CPU cores); paper: VGG16, MobileNetV2, DenseNet121 on CIFAR-10.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AABL_ATTACKS), "adjust": [CLB_RATE],
               "defenses": [{"name": "a-abl", "label": "A-ABL"}], "models": ["wrn16-1", "mobilenetv2", "vgg16"]},
     "paper": {"datasets": ["cifar10"], "attacks": _attacks(AABL_ATTACKS), "adjust": [CLB_RATE],
               "defenses": [{"name": "a-abl", "label": "A-ABL"}],
               "models": ["vgg16", "mobilenetv2", "densenet121"]}},
    (TableSpec("ACC / RA / ASR per architecture (%)", rows="attack", cols="model", metrics=("acc", "ra", "asr"),
               summary=("average", "worst"), mark_failures=True, published="aabl_t6"),),
))

_RATE_ATTACKS = ("badnets", "trojan", "iab", "blend", "ssba", "wanet")
_add(Suite(
    "aabl-t7", "A-ABL at poison rates 1 / 5 / 20 %", "A-ABL Table 7",
    "A-ABL against six attacks at several poison rates (CLB is left out: it poisons the target class only). "
    "10 % is included for the curves; the paper shows it in Table 3.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AABL_ATTACKS, only=_RATE_ATTACKS),
               "defenses": [{"name": "a-abl", "label": "A-ABL"}], "poison_rates": [0.01, 0.05, 0.1, 0.2]},
     "paper": {"datasets": ["cifar10"], "attacks": _attacks(AABL_ATTACKS, only=_RATE_ATTACKS),
               "defenses": [{"name": "a-abl", "label": "A-ABL"}], "poison_rates": [0.01, 0.05, 0.1, 0.2]}},
    (TableSpec("ACC / RA / ASR per poison rate (%)", rows="attack", cols="poison_rate", metrics=("acc", "ra", "asr"),
               summary=("average", "worst"), mark_failures=True, published="aabl_t7"),),
    figures=("rate_curves",),
))

_AIBD_NONE = {"name": "none", "label": "No Defense", "params": {"train": {"crop": 0, "flip": False}}}
_add(Suite(
    "aibd-t1", "Defenses against attacks: ACC / ASR", "AIBD Table 1",
    "No defense, ABL, NAD, DBD, CBD and AIBD (and the project's A-ABL-PDB beside them) against six attacks and "
    "clean data (row 'clean'). As in the "
    "paper, the undefended model is trained without augmentation; GTSRB uses WRN-16-1.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AIBD_ATTACKS),
               "defenses": [_AIBD_NONE, {"name": "abl", "label": "ABL"}, {"name": "nad", "label": "NAD"},
                            {"name": "dbd", "label": "DBD"}, {"name": "cbd", "label": "CBD"},
                            {"name": "aibd", "label": "AIBD"}, {"name": "a-abl-pdb", "label": "A-ABL-PDB"}]},
     "paper": {"datasets": ["cifar10", "gtsrb"], "attacks": _attacks(AIBD_ATTACKS), "adjust": [AIBD_GTSRB_MODEL],
               "defenses": [_AIBD_NONE, {"name": "abl", "label": "ABL"}, {"name": "nad", "label": "NAD"},
                            {"name": "dbd", "label": "DBD"}, {"name": "cbd", "label": "CBD"},
                            {"name": "aibd", "label": "AIBD"}, {"name": "a-abl-pdb", "label": "A-ABL-PDB"}]}},
    (TableSpec("ACC / ASR (%)", rows="attack", cols="defense", metrics=("acc", "asr"), blocks="dataset",
               competitors="cols", reference=("none",), summary=("average",), mark_failures=True,
               published="aibd_t1"),),
    figures=("k_dist",),
))

_T2_ATTACKS = ("badnets", "blend", "sig", "iab", "trojan")
_T2_SCHEMES = [_detector("activation-clustering", "Neural activation"), _detector("abl-loss", "ABL"),
               _detector("dbd-sce", "DBD"), _detector("scale-up", "SCALE-UP"), {"name": "aibd", "label": "AIBD"}]
_add(Suite(
    "aibd-t2", "Isolation quality: TPR / FPR", "AIBD Table 2",
    "How well each scheme isolates the poisoned samples: activation clustering ('Neural activation'), ABL's "
    "loss isolation (the abl-loss detector: the ABL defense's isolation stage), DBD's SCE split (the dbd-sce "
    "detector), SCALE-UP and AIBD (its final top-q). Detector cells train nothing after the split.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AIBD_ATTACKS, only=_T2_ATTACKS), "defenses": _T2_SCHEMES},
     "paper": {"datasets": ["cifar10"], "attacks": _attacks(AIBD_ATTACKS, only=_T2_ATTACKS),
               "defenses": _T2_SCHEMES}},
    (TableSpec("TPR / FPR of the isolation (%)", rows="defense", cols="attack", metrics=("tpr", "fpr"),
               competitors="rows", summary=("average",), summary_axis="cols", published="aibd_t2"),),
    figures=("roc", "k_dist"),
))

_TREAT = [("unlearn", "Unlearning"), ("random", "Random Labels"), ("adversarial", "Adv. Labels")]
_add(Suite(
    "aibd-t3", "Treatments of the isolated samples", "AIBD Table 3",
    "AIBD with the isolated samples unlearned (ABL's gradient ascent), relabelled at random, or relabelled "
    "with their adversarial labels (AIBD). The three share one infected model per attack (stage cache).",
    {p: {"datasets": QUICK_DATA if p == "quick" else ["cifar10"], "attacks": _attacks(AIBD_ATTACKS, clean=False),
         "defenses": [{"name": "aibd", "label": lab, "params": {"treatment": t}} for t, lab in _TREAT]}
     for p in ("quick", "paper")},
    (TableSpec("ACC / ASR per treatment (%)", rows="attack", cols="defense", metrics=("acc", "asr"),
               competitors="cols", summary=("average",), published="aibd_t3"),),
))

_add(Suite(
    "aibd-fig4", "AIBD at poison rates 1-20 %", "AIBD Figure 4",
    "AIBD against six attacks at poison rates from 1 % to 20 %. The paper gives this as a figure only, so no "
    "published numbers are shown beside ours.",
    {"quick": {"datasets": QUICK_DATA, "attacks": _attacks(AIBD_ATTACKS, clean=False),
               "defenses": [{"name": "aibd", "label": "AIBD"}], "poison_rates": [0.01, 0.05, 0.1, 0.2]},
     "paper": {"datasets": ["cifar10"], "attacks": _attacks(AIBD_ATTACKS, clean=False),
               "defenses": [{"name": "aibd", "label": "AIBD"}], "poison_rates": [0.01, 0.05, 0.1, 0.15, 0.2]}},
    (TableSpec("ACC / ASR per poison rate (%)", rows="attack", cols="poison_rate", metrics=("acc", "asr"),
               summary=("average",)),),
    figures=("rate_curves",),
))


#: triggers the papers' defenses were not tuned on: Tran et al.'s few-pixel triggers beside BadNets' patch
_SPARSE_ATTACKS = [
    {"name": "badnets", "label": "BadNets 3x3"},
    {"name": "pixels", "label": "1 pixel", "params": {"pixels": 1}},
    {"name": "pixels", "label": "4 pixels", "params": {"pixels": 4, "layout": "grid", "spacing": 2}},
    {"name": "pixels", "label": "3x3 mid-left", "params": {"pixels": 9, "layout": "grid", "spacing": 1,
                                                           "row": 12, "col": 5}},
    {"name": "blend", "label": "Blend"},
]
_add(Suite(
    "sparse-triggers", "A-ABL, its options and AIBD on few-pixel triggers", "this project",
    "Few-pixel triggers (one pixel, four pixels, a 3x3 patch away from the corner) beside BadNets and Blend, "
    "against the paper's A-ABL, A-ABL with its non-paper options (a-abl+), AIBD, A-ABL-PDB and adversarial "
    "training on all the data (the accuracy reference). Not a table of either paper: no published numbers.",
    {p: {"datasets": QUICK_DATA if p == "quick" else ["cifar10"], "attacks": _SPARSE_ATTACKS,
         "defenses": [{"name": "none", "label": "No defense"}, {"name": "adv-train", "label": "Adv. Train"},
                      {"name": "a-abl", "label": "A-ABL"}, {"name": "a-abl+", "label": "A-ABL+"},
                      {"name": "aibd", "label": "AIBD"}, {"name": "a-abl-pdb", "label": "A-ABL-PDB"}]}
     for p in ("quick", "paper")},
    (TableSpec("ACC / ASR / RA per trigger (%)", rows="attack", cols="defense", metrics=("acc", "asr", "ra"),
               competitors="cols", reference=("none",), summary=("average", "worst")),
     TableSpec("isolation: gamma / rho_vul / TPR / FPR (%)", rows="attack", cols="defense",
               metrics=("gamma", "rho_vul", "tpr", "fpr"), isolating_only=True)),
))


def get_suite(name: str) -> Suite | None:
    return SUITES.get(name)
