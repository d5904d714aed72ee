"""Command line: ``antibackdoor run | defend | bench | report | suites | doctor | datasets | models | attacks |
defenses | detectors``.

Errors caused by input (files, options, data) end with one line ``antibackdoor: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .attacks import ATTACKS
from .bench.cli import add_parsers as add_bench_parsers
from .bench.cli import cmd_bench, cmd_suites
from .config import deep_update, describe_fields
from .data import DATASETS
from .data.registry import default_data_root
from .defend import DefendConfig, make_defend_config, run_defend
from .defenses import DEFENSES
from .detectors import DETECTORS
from .doctor import DEFAULT, QUICK, diagnose, format_report
from .errors import AntibackdoorError, ConfigError
from .experiment import PRESETS, QUICK_MODEL, ExperimentConfig, load_config_file, make_config, run_experiment
from .jsonutil import dumps
from .models import MODELS, build_model, count_parameters
from .precision import PRECISIONS
from .report.cli import add_parser as add_report_parser
from .report.cli import cmd_report
from .runpath import Terminated

log = logging.getLogger("antibackdoor")

#: the options ``run`` and ``defend`` share whose flag sets one config value, only when given (a config file's
#: value or the default stays otherwise); both declare them with ``add_shared_options``
SHARED_FLAGS = ("defense", "model", "preset", "seed", "out", "data_root", "device", "precision")
#: ``run``'s own such flags
RUN_FLAGS = ("dataset", "attack", "poison_rate", "target")
#: ``defend``'s own such flags
DEFEND_FLAGS = ("detector", "trusted", "test", "holdout", "poison_mask", "export_kept")


#: the top-level --help's text (plain words: argparse prints it as it is)
DESCRIPTION = ("Train clean, adversarially robust image classifiers from training data that may carry a backdoor, "
               "and benchmark defenses against the attacks they must stop. Start with 'antibackdoor run' (the "
               "default experiment: a few minutes on a CPU) or 'antibackdoor defend DATA' (your own data).")


def _key_value(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _nest(pairs: list[str], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in pairs:
        try:
            keys, value = _key_value(text)
        except ConfigError as exc:
            raise ConfigError(f"{option}: {exc}") from None
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    return out


def _names(registry: dict, default: str | None = None, extra: tuple[str, ...] = ()) -> str:
    """``a, b (default), c`` from a registry's names: the help lists what is registered, nothing typed here."""
    names = sorted([*registry, *extra])
    return ", ".join(f"{n} (default)" if n == default else n for n in names)


def build_parser() -> argparse.ArgumentParser:

    d = ExperimentConfig()
    datasets = ", ".join(f"{n}:ARG" if e.takes_argument else (f"{n} (default)" if n == d.dataset else n)
                         for n, e in sorted(DATASETS.items()))
    p = argparse.ArgumentParser(prog="antibackdoor", description=DESCRIPTION,
                                epilog="antibackdoor COMMAND --help describes a command's options.")
    p.add_argument("--version", action="version", version=f"antibackdoor {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="poison a dataset, train with a defense, report ACC/ASR/RA and split metrics")
    r.add_argument("--config", help="YAML file with any ExperimentConfig field; flags given here override it")
    r.add_argument("--dataset", help=datasets)
    r.add_argument("--attack", help=_names(ATTACKS, d.attack, ("none",)) + "; none trains on clean data")
    r.add_argument("--poison-rate", type=float, help=f"fraction of poisoned training samples (default {d.poison_rate})")
    r.add_argument("--target", type=int, help=f"target class (default {d.target})")
    r.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, e.g. alpha=0.2 (repeatable; `antibackdoor attacks` lists them)")
    # deprecated: --defense-param target_filter=true|false says the same for every defense that has it
    r.add_argument("--aibd-target-filter", action=argparse.BooleanOptionalAction, default=None,
                   help=argparse.SUPPRESS)
    add_shared_options(r, d, "metrics.json instead of the table")

    _add_defend(sub)

    d = sub.add_parser("doctor", help="torch, devices, CPU features, the precision auto picks, measured speed")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--quick", action="store_true", help="tiny measurements (seconds; numbers only indicative)")
    d.add_argument("--no-measure", action="store_true", help="only describe the machine, measure nothing")

    for name, text in [("datasets", "list datasets, where each is looked for and whether it is present"),
                       ("models", "list models with parameter counts"),
                       ("attacks", "list attacks with their parameters (type, quick default, paper value)"),
                       ("defenses", "list defenses with their parameters (quick preset, paper value)"),
                       ("detectors", "list isolation detectors with their parameters (quick preset, paper value)")]:
        s = sub.add_parser(name, help=text)
        if name == "datasets":
            s.add_argument("--data-root", help="data root to check")

    add_bench_parsers(sub)
    add_report_parser(sub)
    return p


def add_shared_options(p: argparse.ArgumentParser, defaults: Any, json_help: str, model_note: str = "") -> None:
    """The options ``run`` and ``defend`` share, declared once, with defaults and choices drawn from the
    registries and ``defaults`` (the command's config as built with no options)."""
    g = p.add_argument_group("options shared by run and defend")
    g.add_argument("--defense", help=_names(DEFENSES, defaults.defense))
    g.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE",
                   help="defense parameter, dotted for nested ones, e.g. naive.epochs=40 (repeatable; "
                        "`antibackdoor defenses` lists them)")
    g.add_argument("--model", help=f"{_names(MODELS)} (default: {QUICK_MODEL} in quick, the dataset's paper model "
                                   f"in paper{model_note})")
    g.add_argument("--preset", choices=list(PRESETS),
                   help=f"quick: small CPU setting; paper: the papers' setting (default {defaults.preset})")
    g.add_argument("--seed", type=int, metavar="S", help=f"random seed (default {defaults.seed})")
    g.add_argument("--ra-samples", type=int, metavar="N",
                   help="measure robust accuracy on the first N evaluation images (default: all)")
    g.add_argument("--data-root",
                   help="where named datasets are looked for (default $ANTIBACKDOOR_DATA or ~/.cache/antibackdoor)")
    g.add_argument("--out", help=f"parent folder of run directories (default {defaults.out})")
    g.add_argument("--device", help=f"auto, cpu, cuda, cuda:N (default {defaults.device})")
    g.add_argument("--precision", choices=list(PRECISIONS),
                   help=f"default {defaults.precision}: bf16 where the hardware runs it natively, else fp32 "
                        "(see antibackdoor doctor); fp16 only when asked, with a gradient scaler")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    g.add_argument("--force", action="store_true", help="delete the run directory of this config and start over")
    g.add_argument("--json", action="store_true", help=f"print {json_help}")


def shared_config(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a config file's content, or a command's own options) with the shared options given on the
    command line: a flag replaces one value; a dotted --defense-param key or --ra-samples replaces one value of
    its section, not the whole section."""
    for flag in SHARED_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    sections = {"defense_params": _nest(args.defense_param, "--defense-param"),
                "eval": {"ra_samples": args.ra_samples} if args.ra_samples is not None else {}}
    for key, extra in sections.items():
        if extra:
            data[key] = deep_update(data.get(key) or {}, extra)
    return data


def _add_defend(sub) -> None:

    d = sub.add_parser(
        "defend", help="run a defense on your own, untrusted data: a clean model, a ranked list of suspicious "
                       "samples and a report",
        description="Train with a defense on DATA as given (no attack applied) and write model.safetensors, "
                    "suspicious.csv, clean_indices.txt, report.md and report.html into a run directory.")
    d.add_argument("data", metavar="DATA",
                   help="folder:PATH (one sub-folder per class, any images Pillow reads; options after '?': "
                        "labels=FILE for a CSV with columns file,label; size=N; channels=1|3), npz:PATH "
                        "(x_train, y_train[, x_test, y_test, classes]) or a dataset name (cifar10-mini, ...)")
    d.add_argument("--detector", help="an isolation detector composed with a treatment: runs --defense "
                   "isolate-then-train with detector=NAME (antibackdoor detectors lists them)")
    d.add_argument("--trusted", metavar="DATA", help="a small set you know is clean, for defenses that use one "
                                                     "(else it is the evaluation set when --test is absent)")
    d.add_argument("--test", metavar="DATA", help="images to measure the returned model on (default: DATA's own "
                                                  "test split, else a held-out slice of DATA)")
    d.add_argument("--holdout", type=float,
                   help="fraction of each class held out for evaluation when there is no test data (default "
                        f"{DefendConfig.holdout}; 0: no evaluation, every sample inspected)")
    d.add_argument("--poison-mask", metavar="FILE",
                   help="evaluation only, never shown to the defense: .npy boolean mask over DATA's indices (or "
                        "integer indices), or a text file of indices or folder-relative file paths")
    d.add_argument("--skip-bad-files", action="store_true",
                   help="skip unreadable or non-image files, missing CSV files and empty class folders (listed "
                        "in the report) instead of stopping at the first")
    d.add_argument("--export-kept", choices=["folder", "npz"],
                   help="also write the kept samples as kept/<class>/... or kept.npz in the run directory")
    add_shared_options(d, DefendConfig(""), "metrics.json instead of the summary",
                       model_note="; resnet18 for folders and npz files")


def defend_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {"data": args.data}
    for flag in DEFEND_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    if args.skip_bad_files:
        data["skip_bad_files"] = True
    return shared_config(args, data)


def cmd_defend(args: argparse.Namespace) -> int:

    result = run_defend(make_defend_config(defend_config_from_args(args)), resume=args.resume, force=args.force)
    m = result.metrics
    if result.reused:
        print(f"reusing finished run (same data and config): {result.run_dir}  (--force runs it again)",
              file=sys.stderr)
    if args.json:
        print(dumps(m, indent=2))
        return 0
    rows = [("verdict", _defend_verdict(m)),
            ("isolated", f"{m.get('isolated')} of {m.get('train_size')} inspected "
                         f"({_fmt(m.get('isolated', 0) / max(m.get('train_size', 1), 1))})"),
            ("accuracy (ACC)", _fmt(m.get("acc"))), ("robust accuracy (RA)", _fmt(m.get("ra"))),
            ("measured on", m.get("eval_set", "-"))]
    rows += [("warning", w) for w in m.get("warnings", [])]
    if m.get("bad_files"):
        rows.append(("skipped files", f"{m['bad_files']} (listed in the report)"))
    if m.get("mask"):
        k = m["mask"]
        rows += [("isolation TPR / FPR", f"{_fmt(k['tpr'])} / {_fmt(k['fpr'])}"),
                 ("ROC AUC of the ranking", f"{k['auc']:.3f}")]
    if m.get("exported"):
        rows.append(("kept samples written to", m["exported"]))
    rows.append(("time", f"{m.get('time_total_s', 0):.0f} s"))
    width = max(len(r[0]) for r in rows)
    print()
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    print(f"\nreport: {result.run_dir / 'report.html'}\nranked samples: {result.run_dir / 'suspicious.csv'}")
    return 0


def _defend_verdict(m: dict[str, Any]) -> str:
    """The summary's verdict line: the report's headline, with the p-value where a class was called."""
    s = m.get("surplus")
    if not s:  # no ranking: no test and no verdict (metrics.json's verdict says why)
        why = m.get("verdict", {}).get("unranked") or "the defense ranks no sample"
        return f"none: {why}, so there is no ranking to test for a class surplus"
    if s.get("target") is not None:
        name = s["rows"][s["target"]]["name"]
        return (f"class {name!r} is over-represented among the most suspicious samples (p = {s['p']:.2g}): "
                "suspected backdoor target")
    if m.get("isolated") == 0:
        return "nothing isolated, and no class has a surplus among the most suspicious samples"
    return "no class has a surplus among the most suspicious samples"


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:

    data = load_config_file(args.config) if args.config else {}
    for flag in RUN_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    attack = _nest(args.attack_param, "--attack-param")
    if attack:  # a flag's dotted key overrides one value of the config file, not its whole section
        data["attack_params"] = deep_update(data.get("attack_params") or {}, attack)
    data = shared_config(args, data)
    if args.aibd_target_filter is not None:
        data = _aibd_target_filter(args.aibd_target_filter, data, data.get("defense", ExperimentConfig.defense))
    return data


def _aibd_target_filter(on: bool, data: dict[str, Any], defense: str) -> dict[str, Any]:
    """The deprecated ``--[no-]aibd-target-filter``: what ``--defense-param target_filter=true|false`` says;
    one line on stderr names that form."""
    flag = "--aibd-target-filter" if on else "--no-aibd-target-filter"
    if defense != "aibd":
        raise ConfigError(f"{flag}: only for --defense aibd")
    print(f"antibackdoor: {flag} is deprecated; use --defense-param target_filter={'true' if on else 'false'}",
          file=sys.stderr)
    return {**data, "defense_params": deep_update(data.get("defense_params") or {}, {"target_filter": on})}


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{100 * v:.2f}%" if pct else f"{v:.4g}"
    return str(v)


#: what ACC/ASR/RA read where no stage trained the final model (a split-only run)
NOT_TRAINED = "n/a (split only: no final model trained)"


def print_table(metrics: dict[str, Any], run_dir: Path) -> None:
    trained = metrics.get("model_trained", True) is not False

    def model_metric(k: str) -> str:
        return _fmt(metrics.get(k)) if trained else NOT_TRAINED

    rows = [
        ("clean accuracy (ACC)", model_metric("acc")),
        ("attack success rate (ASR)", model_metric("asr")),
        (f"robust accuracy (RA, {metrics.get('ra_attack', 'PGD')})", model_metric("ra")),
        ("kept share gamma = |D_vul|/|D|", _fmt(metrics.get("gamma"))),
        ("poison share of kept rho_vul", _fmt(metrics.get("rho_vul"))),
        ("isolation TPR", _fmt(metrics.get("tpr"))),
        ("isolation FPR", _fmt(metrics.get("fpr"))),
        ("isolated / poisoned", f"{metrics.get('isolated_poison', 0)} of {metrics.get('isolated', 0)} isolated "
                                f"are poisoned; {metrics.get('poisoned', 0)} poisoned in all"),
        ("time", f"{metrics.get('time_total_s', 0):.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    print(f"\nrun directory: {run_dir}")


def cmd_run(args: argparse.Namespace) -> int:

    cfg = make_config(config_from_args(args), where=args.config or "options")
    result = run_experiment(cfg, resume=args.resume, force=args.force)
    if result.reused:
        print(f"reusing finished run (same config): {result.run_dir}  (--force runs it again)", file=sys.stderr)
    if args.json:
        print(dumps(result.metrics, indent=2))
    else:
        print_table(result.metrics, result.run_dir)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:

    report = diagnose(QUICK if args.quick else DEFAULT, measure=not args.no_measure)
    if args.json:
        print(dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.command == "datasets":
        root = Path(args.data_root).expanduser() if args.data_root else default_data_root()
        print(f"data root: {root}")
        for e in sorted(DATASETS.values(), key=lambda e: e.name):
            present = e.present(root) if e.present else None
            mark = {True: "present", False: "missing", None: "?"}[present]
            where = e.where(root) if e.where else ""
            print(f"  {e.name:<16} {mark:<8} {e.description}\n  {'':<16} {'':<8} looks in: {where}")
    elif args.command == "models":
        for e in sorted(MODELS.values(), key=lambda e: e.name):
            n = count_parameters(build_model(e.name, 10))
            print(f"  {e.name:<18} {n / 1e6:>7.2f} M params (10 classes)  {e.description}")
    elif args.command == "attacks":
        for name, cls in sorted(ATTACKS.items()):
            print(f"{name} ({cls.label_mode} label): {cls.description}")
            _print_params(cls.presets, "--attack-param")
    elif args.command == "defenses":
        for name, cls in sorted(DEFENSES.items()):
            print(f"{name}: {cls.description}")
            _print_params(cls.presets, "--defense-param")
    elif args.command == "detectors":
        print("(set with --defense isolate-then-train --defense-param detector=NAME "
              "--defense-param detector_params.KEY=VALUE)\n")
        for name, cls in sorted(DETECTORS.items()):
            needs = "trains a suspect model" if cls.needs_model else "no suspect model"
            print(f"{name} ({needs}): {cls.description}")
            _print_params(cls.presets, "detector_params")
    return 0


def _print_params(presets: dict[str, Any], option: str) -> None:
    """One line per accepted key: name, type, quick value (paper value where it differs) and its doc. A nested
    settings block (a stage's TrainConfig) gets a line with its own doc, then every one of its keys under the
    dotted names ``--defense-param`` takes."""
    if "quick" not in presets:
        return
    quick = {f.name: f for f in describe_fields(presets["quick"], groups=True)}
    paper = {f.name: f for f in describe_fields(presets["paper"], groups=True)} if "paper" in presets else {}
    if not quick and not paper:
        print(f"    (no {option})")
    for name in [*quick, *(n for n in paper if n not in quick)]:
        q, pp = quick.get(name), paper.get(name)
        f = q or pp
        if f.group:
            print(f"    {name}: {f.type}  {f.doc}".rstrip())
            continue
        value = _short(q.value) if q is not None else "-"
        if pp is not None and (q is None or pp.value != q.value):
            value += f" (paper: {_short(pp.value)})"
        doc = f"  {f.doc}" if f.doc else ""
        print(f"    {name}: {f.type} = {value}{doc}")
    print()


def _short(value: Any) -> str:
    """A value as one YAML-like line (nested configs in flow style)."""
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return repr(value) if isinstance(value, str) else str(value)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests swap it), one instance per process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_console_logging() -> None:
    lg = logging.getLogger("antibackdoor")
    lg.setLevel(logging.DEBUG)
    if not any(isinstance(h, _StderrHandler) for h in lg.handlers):
        h = _StderrHandler()
        h.setLevel(logging.INFO)
        h.setFormatter(logging.Formatter("[antibackdoor] %(message)s"))
        lg.addHandler(h)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:  # no command: say what there is rather than start minutes of training unasked
        parser.print_help()
        print("antibackdoor: error: no command given; 'antibackdoor run' runs the default experiment",
              file=sys.stderr)
        return 2
    _setup_console_logging()
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "defend":
            return cmd_defend(args)
        if args.command in ("bench", "suites", "report"):
            return {"bench": cmd_bench, "suites": cmd_suites, "report": cmd_report}[args.command](args)
        if args.command == "doctor":
            return cmd_doctor(args)
        return cmd_list(args)
    except AntibackdoorError as exc:
        print(f"antibackdoor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # SIGTERM (runpath.Terminated) exits 143 = 128 + 15, what a process killed by it exits with, so that
        # a scheduler or a shell still sees a termination; Ctrl-C exits 130 = 128 + SIGINT likewise
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"antibackdoor: {how}; continue with the same command plus --resume", file=sys.stderr)
        return 128 + int(exc.signum) if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # the reader went away (antibackdoor defenses | head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
