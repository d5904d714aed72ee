"""Command line: ``antibackdoor run | bench | report | suites | datasets | models | attacks | defenses``.

Errors caused by input (files, options, data) end with one line ``antibackdoor: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import deep_update
from .errors import AntibackdoorError, ConfigError

log = logging.getLogger("antibackdoor")

# flag -> config key, for flags that override a config-file value only when given
RUN_FLAGS = {
    "dataset": "dataset", "attack": "attack", "defense": "defense", "model": "model",
    "poison_rate": "poison_rate", "target": "target", "seed": "seed", "preset": "preset", "out": "out",
    "data_root": "data_root", "device": "device",
}


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="antibackdoor", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", help="poison a dataset, train with a defense, report ACC/ASR/RA and split metrics")
    r.add_argument("--config", help="YAML file with any ExperimentConfig field; flags given here override it")
    r.add_argument("--dataset", help="cifar10-mini (default), cifar10, fashion-mnist, npz:PATH, ...")
    r.add_argument("--data-root",
                   help="where datasets are looked for (default $ANTIBACKDOOR_DATA or ~/.cache/antibackdoor)")
    r.add_argument("--attack", help="badnets (default), blend, ... or none for clean data")
    r.add_argument("--defense", help="a-abl (default), none, adv-train, aibd")
    r.add_argument("--model", help="model name (default: cnn in quick, resnet18 in paper)")
    r.add_argument("--poison-rate", type=float, help="fraction of poisoned training samples (default 0.1)")
    r.add_argument("--target", type=int, help="target class (default 0)")
    r.add_argument("--seed", type=int, help="random seed (default 0)")
    r.add_argument("--preset", choices=["quick", "paper"], help="quick: small CPU setting; paper: the papers' setting")
    r.add_argument("--out", help="parent folder of run directories (default runs)")
    r.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    r.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, e.g. alpha=0.2 (repeatable)")
    r.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE",
                   help="defense parameter, dotted for nested ones, e.g. naive.epochs=40 (repeatable)")
    r.add_argument("--aibd-target-filter", action=argparse.BooleanOptionalAction, default=None,
                   help="AIBD: isolate only samples of the guessed target class (on in quick, off in paper)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    r.add_argument("--force", action="store_true", help="delete the run directory of this config and start over")
    r.add_argument("--json", action="store_true", help="print metrics.json instead of the table")

    for name, text in [("datasets", "list datasets, where each is looked for and whether it is present"),
                       ("models", "list models with parameter counts"), ("attacks", "list attacks"),
                       ("defenses", "list defenses")]:
        s = sub.add_parser(name, help=text)
        if name == "datasets":
            s.add_argument("--data-root", help="data root to check")
    from .bench.cli import add_parsers as add_bench_parsers
    from .report.cli import add_parser as add_report_parser

    add_bench_parsers(sub)
    add_report_parser(sub)
    return p


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from .experiment import load_config_file

    data = load_config_file(args.config) if args.config else {}
    for flag, key in RUN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    for option, key in (("attack_param", "attack_params"), ("defense_param", "defense_params")):
        extra = _nest(getattr(args, option), "--" + option.replace("_", "-"))
        if option == "defense_param" and args.aibd_target_filter is not None:
            if data.get("defense", "a-abl") != "aibd":
                raise ConfigError("--aibd-target-filter: only for --defense aibd")
            extra["target_filter"] = args.aibd_target_filter
        if extra:  # a flag's dotted key overrides one value of the config file, not its whole section
            data[key] = deep_update(data.get(key) or {}, extra)
    return data


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{100 * v:.2f}%" if pct else f"{v:.4g}"
    return str(v)


def print_table(metrics: dict[str, Any], run_dir: Path) -> None:
    rows = [
        ("clean accuracy (ACC)", _fmt(metrics.get("acc"))),
        ("attack success rate (ASR)", _fmt(metrics.get("asr"))),
        ("robust accuracy (RA, PGD-10 8/255)", _fmt(metrics.get("ra"))),
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
    from .experiment import make_config, run_experiment

    cfg = make_config(config_from_args(args), where=args.config or "options")
    result = run_experiment(cfg, resume=args.resume, force=args.force)
    if result.reused:
        print(f"reusing finished run (same config): {result.run_dir}  (--force runs it again)", file=sys.stderr)
    if args.json:
        import json

        print(json.dumps(result.metrics, indent=2))
    else:
        print_table(result.metrics, result.run_dir)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.command == "datasets":
        from .data import DATASETS
        from .data.registry import default_data_root

        root = Path(args.data_root).expanduser() if args.data_root else default_data_root()
        print(f"data root: {root}")
        for e in sorted(DATASETS.values(), key=lambda e: e.name):
            present = e.present(root) if e.present else None
            mark = {True: "present", False: "missing", None: "?"}[present]
            where = e.where(root) if e.where else ""
            print(f"  {e.name:<16} {mark:<8} {e.description}\n  {'':<16} {'':<8} looks in: {where}")
    elif args.command == "models":
        from .models import MODELS, build_model, count_parameters

        for e in sorted(MODELS.values(), key=lambda e: e.name):
            n = count_parameters(build_model(e.name, 10))
            print(f"  {e.name:<18} {n / 1e6:>7.2f} M params (10 classes)  {e.description}")
    elif args.command == "attacks":
        from .attacks import ATTACKS

        for name, cls in sorted(ATTACKS.items()):
            print(f"  {name:<10} {cls.label_mode:<6} {cls.description}  params: {cls.params}")
    elif args.command == "defenses":
        from .defenses import DEFENSES

        for name, cls in sorted(DEFENSES.items()):
            print(f"  {name:<10} {cls.description}")
    return 0


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
    if not argv:
        argv = ["run"]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_console_logging()
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command in ("bench", "suites", "report"):
            from .bench.cli import cmd_bench, cmd_suites
            from .report.cli import cmd_report

            return {"bench": cmd_bench, "suites": cmd_suites, "report": cmd_report}[args.command](args)
        return cmd_list(args)
    except AntibackdoorError as exc:
        print(f"antibackdoor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("antibackdoor: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
