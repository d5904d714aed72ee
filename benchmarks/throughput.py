"""Throughput of this machine: ``antibackdoor doctor``'s report plus the sweeps behind the precision choices.

    python benchmarks/throughput.py [--threads 2] [--out benchmarks/results] [--quick]

Writes ``OUT/throughput-<cpu kind>.json`` and ``.md`` (cpu kind: ``avx512-bf16``, ``avx512``, ``avx2``, with
``-emulated`` when ``ATEN_CPU_CAPABILITY``/``ONEDNN_MAX_CPU_ISA`` restrict the kernels, e.g. to measure an
AVX2-only CPU on a newer one). Besides the doctor's figures it measures, for fp32 and (where native) bf16:

- the quick ``cnn``'s training img/s in NCHW vs channels_last at batch sizes 64, 128 and 256;
- one training step of the attacks' own networks (IAB's generator, SSBA's encoder + decoder) and a
  shortened PreAct-ResNet18 training in both layouts: whether channels_last helps them too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from antibackdoor.doctor import DEFAULT, QUICK, Budget, _timed, diagnose, format_report, training_speed
from antibackdoor.precision import Precision


def cpu_kind(report: dict) -> str:
    cpu = report["cpu"]
    cap = str(cpu["torch_capability"]).lower()
    kind = "avx512" if cap.startswith("avx512") else cap
    if cpu["bf16_native"]:
        kind += "-bf16"
    if cpu["isa_env"].keys() & {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}:
        kind += "-emulated"
    return kind


def attack_net_step(name: str, prec: Precision, budget: Budget, batch: int = 64) -> float:
    """img/s of one training step (forward, loss, backward, Adam) of an attack's own network."""
    from antibackdoor.attacks.iab import TriggerNet
    from antibackdoor.attacks.ssba import StegaDecoder, StegaEncoder

    torch.manual_seed(0)
    x = prec.batch(torch.rand(batch, 3, 32, 32))
    if name == "iab-generator":
        net = prec.prepare(TriggerNet(3, 3, 8, 3))
        opt = torch.optim.Adam(net.parameters(), 1e-3)

        def step() -> None:
            with prec.autocast():
                loss = net.pattern(x).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        enc, dec = prec.prepare(StegaEncoder(3, 100, 8, 3)), prec.prepare(StegaDecoder(3, 100, 8))
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], 1e-3)
        bits = torch.randint(0, 2, (batch, 100)).float()

        def step() -> None:
            with prec.autocast():
                encoded = (x + enc(x, bits).float()).clamp(0, 1)
                logits = dec(prec.batch(encoded)).float()
            loss = F.binary_cross_entropy_with_logits(logits, bits) + F.mse_loss(encoded, x)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return batch / _timed(step, max(budget.min_time, 0.05) * 3)


def sweeps(report: dict, budget: Budget) -> dict:
    from antibackdoor.doctor import resnet_speed

    kinds = ["fp32"] + (["bf16"] if report["cpu"]["bf16_native"] else [])
    out: dict = {"cnn_train": [], "attack_nets": [], "preact_resnet18": []}
    for kind in kinds:
        for cl in (False, True):
            prec = Precision(kind, "cpu", "throughput sweep", channels_last=cl)
            layout = "nhwc" if cl else "nchw"
            for bs in (64, 128, 256):
                r = training_speed("cnn", prec, budget.cnn_images, batch_size=bs)
                out["cnn_train"].append({"precision": kind, "layout": layout, "batch_size": bs, **r})
                print(f"cnn train {kind} {layout} bs {bs}: {r['img_s']:.0f} img/s", flush=True)
            for net in ("iab-generator", "ssba-encoder-decoder"):
                ips = attack_net_step(net, prec, budget)
                out["attack_nets"].append({"net": net, "precision": kind, "layout": layout, "img_s": round(ips, 1)})
                print(f"{net} {kind} {layout}: {ips:.0f} img/s", flush=True)
            r = resnet_speed(prec, budget)
            out["preact_resnet18"].append({"precision": kind, "layout": layout, **r})
            print(f"preact-resnet18 {kind} {layout}: {r['img_s']:.1f} img/s", flush=True)
    return out


def markdown(report: dict, sw: dict, kind: str, command: str) -> str:
    lines = [f"# Throughput: {kind}", "", f"`{command}`", "", "```", format_report(report), "```", "",
             "| quick cnn training | layout | batch | img/s | GFLOP/s |", "|---|---|---|---|---|"]
    for r in sw["cnn_train"]:
        lines.append(f"| {r['precision']} | {r['layout']} | {r['batch_size']} | {r['img_s']:.0f} | {r['gflops']:.0f} |")
    lines += ["", "| network (one training step, batch 64) | precision | layout | img/s |", "|---|---|---|---|"]
    for r in sw["attack_nets"]:
        lines.append(f"| {r['net']} | {r['precision']} | {r['layout']} | {r['img_s']:.0f} |")
    for r in sw["preact_resnet18"]:
        lines.append(f"| preact-resnet18 (batch {r['batch_size']}, {r['images']} images) | {r['precision']} | "
                     f"{r['layout']} | {r['img_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="tiny measurements (a smoke test)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    budget = QUICK if a.quick else Budget(min_time=0.5, cnn_images=2048, resnet_batches=4, resnet_batch_size=32)
    t0, load0 = time.time(), os.getloadavg()[0]
    report = diagnose(budget if a.quick else DEFAULT)
    print(format_report(report), flush=True)
    sw = sweeps(report, budget)
    kind = cpu_kind(report)
    env = " ".join(f"{k}={v}" for k, v in report["cpu"]["isa_env"].items())
    command = (env + " " if env else "") + "python benchmarks/throughput.py --threads " + str(a.threads)
    result = {"kind": kind, "command": command, "load_at_start": load0, "doctor": report,
              "sweeps": sw, "seconds": round(time.time() - t0, 1)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"throughput-{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"throughput-{kind}.md").write_text(markdown(report, sw, kind, command))
    print(f"wrote {out / f'throughput-{kind}.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
