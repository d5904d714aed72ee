"""``antibackdoor doctor``: what this machine is, which precision ``auto`` picks, and how fast it runs.

One run prints the torch version, the devices, the CPU features that decide speed (AVX2, AVX-512,
AVX512-BF16, AMX), threads and the precision ``auto`` picks and why, then measures in the same process:

- the conv and matmul peak in GFLOP/s (fp32, and bf16 where the hardware runs it natively): the best of a
  few large 3x3 convolutions in both memory layouts, and a square matmul;
- the quick preset's ``cnn``: training img/s through the library's own training loop, and PGD attack
  steps img/s (forward + input gradient), each also as GFLOP/s and as a share of the conv peak;
- a shortened PreAct-ResNet18 training figure (a few batches), the paper preset's kind of model.

FLOPs are counted from the model (2 per multiply-add of every conv and linear layer, for one image):
training = forward + input gradient + weight gradient = 3x forward, minus the input gradient of the first
layer (the image needs none); an attack step = forward + input gradient = 2x forward.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adversarial.pgd import PGDConfig, adversarial_examples
from .data.imageset import ImageSet
from .models import build_model
from .precision import ENV, Precision, auto_choice, cpu_bf16_native, resolve_precision
from .seeding import generator, seeded_rng
from .training import TrainConfig, train

#: /proc/cpuinfo flags that decide the speed of dense float math
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
#: environment variables that change which kernels torch and oneDNN use (to emulate an older CPU)
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
           "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Budget:
    """How long each measurement runs; ``quick`` is for CI (a few seconds, numbers only indicative)."""

    min_time: float = 0.4  # seconds per peak measurement
    cnn_images: int = 2048  # images per timed training / attack measurement
    resnet_batches: int = 3  # timed PreAct-ResNet18 training batches (0 = skip)
    resnet_batch_size: int = 32
    conv_scale: int = 1  # divides the batch of the peak convolutions


DEFAULT = Budget()
QUICK = Budget(min_time=0.02, cnn_images=256, resnet_batches=1, resnet_batch_size=4, conv_scale=8)


# -- the machine -------------------------------------------------------------------------------------------
def cpu_info() -> dict[str, Any]:
    """CPU model and feature flags (Linux /proc/cpuinfo), torch's kernel level and oneDNN's bf16 support."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model,
        "flags": {f: f in flags for f in CPU_FLAGS} if flags else {},
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": cpu_bf16_native(),
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
    }


def devices() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"device": "cpu"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append({"device": f"cuda:{i}", "name": props.name,
                        "memory_gib": round(props.total_memory / 2**30, 1),
                        "bf16": bool(torch.cuda.is_bf16_supported())})
    return out


def threads() -> dict[str, int]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count() or 0, "usable_cpus": affinity}


# -- FLOPs ---------------------------------------------------------------------------------------------------
def forward_flops(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(FLOPs of one forward pass of one image, FLOPs of its first conv/linear layer): 2 per multiply-add."""
    counts: list[int] = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            counts.append(2 * out.numel() * k)
        else:
            counts.append(2 * out.numel() * mod.in_features)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sum(counts), (counts[0] if counts else 0)


def train_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    fwd, first = forward_flops(model, shape)
    return 3 * fwd - first


# -- timing --------------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any], min_time: float, warmup: int = 1) -> float:
    """Seconds per call of ``fn``: warm-up calls, then calls until ``min_time`` has passed (at least two)."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if n >= 2 and dt >= min_time:
            return dt / n


def conv_peak(dtype: torch.dtype, budget: Budget = DEFAULT) -> dict[str, Any]:
    """Best GFLOP/s of 3x3 convolutions (forward) over three CIFAR-sized shapes and both memory layouts."""
    best: dict[str, Any] = {"gflops": 0.0}
    for batch, channels, size in ((64, 64, 32), (128, 128, 16), (256, 256, 8)):
        batch = max(1, batch // budget.conv_scale)
        for layout in ("nchw", "nhwc"):
            x = torch.randn(batch, channels, size, size)
            w = torch.randn(channels, channels, 3, 3) * 0.05
            if layout == "nhwc":
                x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
            x, w = x.to(dtype), w.to(dtype)
            with torch.no_grad():
                sec = _timed(lambda x=x, w=w: F.conv2d(x, w, padding=1), budget.min_time)
            gflops = 2 * batch * size * size * channels * channels * 9 / sec / 1e9
            if gflops > best["gflops"]:
                best = {"gflops": round(gflops, 1), "shape": f"{batch}x{channels}x{size}x{size}", "layout": layout}
    return best


def matmul_peak(dtype: torch.dtype, budget: Budget = DEFAULT, n: int = 1536) -> dict[str, Any]:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    sec = _timed(lambda: a @ b, budget.min_time)
    return {"gflops": round(2 * n**3 / sec / 1e9, 1), "n": n}


def _random_set(n: int, size: int = 32, classes: int = 10, seed: int = 0):
    g = generator(seed, "doctor", "data")
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return ImageSet(x, y, [str(i) for i in range(classes)], (0.5,) * 3, (0.25,) * 3, name="random")


def training_speed(model_name: str, prec: Precision, n: int, batch_size: int = 128,
                   adversary=None) -> dict[str, Any]:
    """img/s of ``n`` images through the library's training loop (after a one-epoch warm-up on a slice)."""
    data = _random_set(n)
    with seeded_rng(0, "doctor", model_name):
        model = build_model(model_name, 10)
    flops = train_flops(model, (3, 32, 32))
    cfg = TrainConfig(epochs=1, batch_size=batch_size, optimizer="adam", lr=1e-3, crop=4, flip=True,
                      adversary=adversary)
    train(model, data.subset(torch.arange(min(n, 2 * batch_size))), cfg, precision=prec)
    t0 = time.perf_counter()
    train(model, data, cfg, precision=prec, seed=1)
    sec = time.perf_counter() - t0
    return {"img_s": round(n / sec, 1), "gflops": round(n * flops / sec / 1e9, 1), "batch_size": batch_size,
            "flops_per_img": flops}


def attack_speed(model_name: str, prec: Precision, n: int, batch_size: int = 256, steps: int = 2) -> dict[str, Any]:
    """PGD attack steps per second x images (eval mode, forward + input gradient per step)."""
    with seeded_rng(0, "doctor", model_name):
        model = prec.prepare(build_model(model_name, 10).eval())
    fwd, _ = forward_flops(model, (3, 32, 32))
    g = generator(0, "doctor", "attack")
    x = torch.rand(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    cfg = PGDConfig(eps=8 / 255, step=4 / 255, steps=steps)
    reps = max(1, n // batch_size)

    def run() -> None:
        for _ in range(reps):
            adversarial_examples(model, x, y, cfg, precision=prec)

    sec = _timed(run, 0.0)
    img_steps = reps * batch_size * steps
    return {"img_s": round(img_steps / sec, 1), "gflops": round(img_steps * 2 * fwd / sec / 1e9, 1),
            "batch_size": batch_size, "flops_per_img": 2 * fwd}


def resnet_speed(prec: Precision, budget: Budget) -> dict[str, Any]:
    """A shortened PreAct-ResNet18 training figure: a few timed batches after one warm-up batch."""
    bs, k = budget.resnet_batch_size, budget.resnet_batches
    with seeded_rng(0, "doctor", "preact-resnet18"):
        model = build_model("preact-resnet18", 10)
    flops = train_flops(model, (3, 32, 32))
    data = _random_set(bs * k)
    cfg = TrainConfig(epochs=1, batch_size=bs, optimizer="sgd", lr=0.01, crop=4, flip=True)
    train(model, data.subset(torch.arange(bs)), cfg, precision=prec)
    t0 = time.perf_counter()
    train(model, data, cfg, precision=prec, seed=1)
    sec = time.perf_counter() - t0
    return {"img_s": round(bs * k / sec, 1), "gflops": round(bs * k * flops / sec / 1e9, 1), "batch_size": bs,
            "images": bs * k, "flops_per_img": flops}


# -- the report ----------------------------------------------------------------------------------------------
def diagnose(budget: Budget = DEFAULT, measure: bool = True) -> dict[str, Any]:
    """Everything ``antibackdoor doctor`` prints, as a JSON-ready dict."""
    quiet = os.environ.get("ANTIBACKDOOR_PROGRESS")
    os.environ["ANTIBACKDOOR_PROGRESS"] = "0"  # no training progress bars between the report's lines
    try:
        return _diagnose(budget, measure)
    finally:
        if quiet is None:
            os.environ.pop("ANTIBACKDOOR_PROGRESS", None)
        else:
            os.environ["ANTIBACKDOOR_PROGRESS"] = quiet


def _diagnose(budget: Budget, measure: bool) -> dict[str, Any]:
    t0 = time.time()
    cpu = cpu_info()
    auto = resolve_precision("auto", "cpu")
    name, why = auto_choice("cpu")
    report: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "devices": devices(), "cpu": cpu,
        "threads": threads(),
        "precision": {"auto": auto.name, "reason": auto.reason, "hardware_choice": name, "hardware_reason": why,
                      "env": os.environ.get(ENV)},
    }
    if torch.cuda.is_available():
        report["precision"]["cuda_auto"] = resolve_precision("auto", "cuda").name
    if not measure:
        return report
    kinds = ["fp32"] + (["bf16"] if cpu["bf16_native"] else [])
    peaks, cnn, attack = {}, {}, {}
    for kind in kinds:
        prec = Precision(kind, "cpu", "doctor")
        peaks[kind] = {"conv": conv_peak(prec.dtype, budget), "matmul": matmul_peak(prec.dtype, budget)}
        cnn[kind] = training_speed("cnn", prec, budget.cnn_images)
        attack[kind] = attack_speed("cnn", prec, budget.cnn_images)
        for entry in (cnn[kind], attack[kind]):
            entry["share_of_conv_peak"] = round(entry["gflops"] / max(peaks[kind]["conv"]["gflops"], 1e-9), 3)
    report["peak_gflops"] = peaks
    report["cnn_train"] = cnn
    report["cnn_attack_step"] = attack
    if budget.resnet_batches > 0:
        r = resnet_speed(auto, budget)
        r["precision"] = auto.name
        r["share_of_conv_peak"] = round(r["gflops"] / max(peaks.get(auto.name, peaks["fp32"])["conv"]["gflops"],
                                                          1e-9), 3)
        report["preact_resnet18_train"] = r
    report["doctor_seconds"] = round(time.time() - t0, 1)
    return report


def format_report(r: dict[str, Any]) -> str:
    cpu, th, p = r["cpu"], r["threads"], r["precision"]
    feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items()) or "unknown"
    lines = [
        f"torch {r['torch']}, Python {r['python']}",
        "devices: " + ", ".join(d["device"] + (f" ({d['name']}, bf16 {'yes' if d['bf16'] else 'no'})"
                                               if "name" in d else "") for d in r["devices"]),
        f"CPU: {cpu['model']}",
        f"  features: {feats}",
        f"  torch kernels: {cpu['torch_capability']}; oneDNN native bf16: {'yes' if cpu['bf16_native'] else 'no'}",
    ]
    if cpu["isa_env"]:
        lines.append("  set in the environment: " + ", ".join(f"{k}={v}" for k, v in cpu["isa_env"].items()))
    lines += [
        f"threads: torch {th['torch_threads']} (inter-op {th['interop_threads']}), usable CPUs {th['usable_cpus']}"
        f" of {th['cpu_count']}",
        f"precision auto -> {p['auto']}: {p['reason']}",
    ]
    if p["env"] and p["hardware_choice"] != p["auto"]:
        lines.append(f"  (without ${ENV}: {p['hardware_choice']}: {p['hardware_reason']})")
    if "cuda_auto" in p:
        lines.append(f"  on cuda: {p['cuda_auto']}")
    if "peak_gflops" not in r:
        return "\n".join(lines)
    lines.append("measured (this process, CPU):")
    for kind, pk in r["peak_gflops"].items():
        c, m = pk["conv"], pk["matmul"]
        lines.append(f"  {kind} peak: conv {c['gflops']:.0f} GFLOP/s ({c['shape']}, {c['layout']}), "
                     f"matmul {m['gflops']:.0f} GFLOP/s ({m['n']}x{m['n']})")
    for kind in r["cnn_train"]:
        t, a = r["cnn_train"][kind], r["cnn_attack_step"][kind]
        lines.append(f"  cnn {kind}: training {t['img_s']:.0f} img/s = {t['gflops']:.0f} GFLOP/s "
                     f"({100 * t['share_of_conv_peak']:.0f} % of the conv peak); attack steps {a['img_s']:.0f} img/s "
                     f"= {a['gflops']:.0f} GFLOP/s ({100 * a['share_of_conv_peak']:.0f} %)")
    if "preact_resnet18_train" in r:
        q = r["preact_resnet18_train"]
        lines.append(f"  preact-resnet18 {q['precision']}: training {q['img_s']:.1f} img/s = {q['gflops']:.0f} "
                     f"GFLOP/s ({100 * q['share_of_conv_peak']:.0f} % of the conv peak; {q['images']} images)")
    lines.append(f"doctor took {r['doctor_seconds']:.0f} s")
    return "\n".join(lines)
