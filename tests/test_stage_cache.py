"""The stage cache: a trained stage is stored once, loaded bit-identically, keyed by what decides it, and safe
under concurrent workers; runs that share a stage give the same results as runs that train it."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest
import torch
from conftest import write_npz

from antibackdoor.bench.stage_cache import StageCache
from antibackdoor.data.imageset import ImageSet
from antibackdoor.defenses import DefenseContext
from antibackdoor.models import build_model
from antibackdoor.precision import PLAIN, resolve_precision
from antibackdoor.stages import fit as stages_mod
from antibackdoor.training import TrainConfig

CFG = TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=1e-3, crop=2, flip=False)
FP32 = resolve_precision("fp32", "cpu")


def _ctx(train: ImageSet, cache: StageCache | None, seed: int = 0) -> DefenseContext:
    def factory():
        return build_model("cnn-small", train.num_classes, train.channels, train.image_size, train.mean, train.std)

    return DefenseContext(factory, seed=seed, stage_cache=cache)


def test_second_stage_is_loaded_identical(tmp_path, small_train, train_calls):
    cache = StageCache(tmp_path / "stages")
    m1, h1 = stages_mod.train_stage(_ctx(small_train, cache), small_train, CFG, "naive")
    m2, h2 = stages_mod.train_stage(_ctx(small_train, cache), small_train, CFG, "train")  # another stage name
    assert train_calls.stages == ["naive"]  # trained once, then loaded
    assert [e["hit"] for e in cache.events] == [False, True]
    assert h1 == h2 and len(h1) == 2
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    x = small_train.x[:64].float() / 255
    assert torch.equal(m1.eval()(x), m2.eval()(x))
    # without the cache the same stage is trained and gives the same weights (the cache changes nothing)
    m3, _ = stages_mod.train_stage(_ctx(small_train, None), small_train, CFG, "naive")
    assert all(torch.equal(s1[k], m3.state_dict()[k]) for k in s1)
    assert len(list((tmp_path / "stages").glob("*.safetensors"))) == 1


def test_key_covers_what_decides_the_model(tmp_path, small_train):
    cache = StageCache(tmp_path)
    ctx = _ctx(small_train, cache)
    base = cache.key(ctx.fresh_model(), small_train, CFG, 0, FP32)
    assert cache.key(ctx.fresh_model(), small_train, CFG, 0, FP32) == base  # deterministic
    flipped = small_train.with_labels((small_train.y + 1) % small_train.num_classes)
    changed_pixel = small_train.x.clone()
    changed_pixel[0, 0, 0, 0] ^= 1
    variants = [
        cache.key(ctx.fresh_model(), small_train, CFG, 1, FP32),  # training seed
        cache.key(ctx.fresh_model(), small_train, TrainConfig(**{**CFG.__dict__, "epochs": 3}), 0, FP32),
        cache.key(ctx.fresh_model(), small_train, CFG, 0, resolve_precision("bf16", "cpu")),  # precision
        cache.key(ctx.fresh_model(), small_train, CFG, 0, resolve_precision("fp16", "cpu")),
        cache.key(ctx.fresh_model(), small_train, CFG, 0, PLAIN),  # fp32 without channels_last
        cache.key(ctx.fresh_model(), flipped, CFG, 0, FP32),  # labels (attack, target)
        cache.key(ctx.fresh_model(), small_train.with_images(changed_pixel), CFG, 0, FP32),  # one pixel
        cache.key(ctx.fresh_model(offset=1), small_train, CFG, 0, FP32),  # initial weights
        cache.key(build_model("cnn", 10), small_train, CFG, 0, FP32),  # architecture
        cache.key(ctx.fresh_model(), small_train, CFG, 0, FP32, sample_weight=torch.ones(len(small_train))),
    ]
    assert len(set(variants)) == len(variants) and base not in variants


def test_epoch_callback_stages_are_not_cached(tmp_path, small_train, train_calls):
    cache = StageCache(tmp_path)
    for _ in range(2):
        stages_mod.train_stage(_ctx(small_train, cache), small_train, CFG, "q", on_epoch_end=lambda e, m: {})
    assert train_calls.stages == ["q", "q"] and cache.events == []


def test_unreadable_entry_is_retrained(tmp_path, small_train, train_calls):
    cache = StageCache(tmp_path)
    stages_mod.train_stage(_ctx(small_train, cache), small_train, CFG, "naive")
    entry = next(tmp_path.glob("*.safetensors"))
    entry.write_bytes(b"not a safetensors file")
    stages_mod.train_stage(_ctx(small_train, cache), small_train, CFG, "naive")
    assert train_calls.stages == ["naive", "naive"]
    assert entry.stat().st_size > 1000  # rewritten


def _worker(root: str, out: str, tag: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = ImageSet(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.arange(8) % 2, ["a", "b"], (0.5,), (0.25,))

    def fit():
        with open(out, "a") as f:
            f.write(tag + "\n")
        time.sleep(1.5)  # long enough for the other worker to ask for the same stage meanwhile
        with torch.no_grad():
            model.weight.fill_(3.0)
        return [{"epoch": 1}]

    cache = StageCache(root)
    cache.train_or_load(model, data, CFG, seed=0, stage="s", fit=fit, precision=PLAIN)
    with open(out + "." + tag, "w") as f:
        json.dump({"w": float(model.weight.mean()), "hit": cache.events[0]["hit"]}, f)


@pytest.mark.slow
def test_concurrent_workers_train_a_stage_once(tmp_path):
    ctx = mp.get_context("spawn")
    out = str(tmp_path / "fits.txt")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "c"), out, t)) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(open(out).read().split()) == 1  # one fit in all
    results = [json.load(open(out + "." + t)) for t in ("a", "b")]
    assert all(r["w"] == 3.0 for r in results)
    assert sorted(r["hit"] for r in results) == [False, True]


def test_runs_sharing_a_stage_equal_runs_that_train_it(tmp_path):
    """`none` and A-ABL's stage 1 share their recipe in quick: A-ABL after `none` loads stage 1, and its whole
    result (split, metrics) equals A-ABL run without the cache."""
    from antibackdoor.experiment import run_experiment

    npz = write_npz(tmp_path / "d.npz")
    naive = {"epochs": 2}
    base = {"dataset": f"npz:{npz}", "model": "cnn-small", "attack": "badnets", "target": 1,
            "eval": {"ra_steps": 1}}
    aabl = {**base, "defense": "a-abl",
            "defense_params": {"naive": naive, "final": {"epochs": 1, "adversary": {"steps": 1}}}}
    cache = StageCache(tmp_path / "stages")
    run_experiment({**base, "defense": "none", "defense_params": {"train": naive}, "out": str(tmp_path / "a")},
                   stage_cache=cache)
    cached = run_experiment({**aabl, "out": str(tmp_path / "a")}, stage_cache=cache)
    plain = run_experiment({**aabl, "out": str(tmp_path / "b")})
    assert [e["hit"] for e in cached.metrics["stage_cache"]] == [True, False]  # naive loaded, final trained
    assert "stage_cache" not in plain.metrics
    for k in ("acc", "asr", "ra", "gamma", "rho_vul", "tpr", "fpr"):
        assert cached.metrics[k] == plain.metrics[k], k
    assert (cached.run_dir / "isolation.csv").read_text() == (plain.run_dir / "isolation.csv").read_text()


def test_stage_precision_is_part_of_the_key(tmp_path, small_train, train_calls):
    """train_stage keys the entry by the context's resolved precision: the same stage under another precision
    (here fp32 without channels_last) is trained, not loaded; under the same one it is loaded."""
    cache = StageCache(tmp_path)
    for prec in (FP32, PLAIN, FP32):
        ctx = _ctx(small_train, cache)
        ctx.precision = prec
        stages_mod.train_stage(ctx, small_train, CFG, "naive")
    assert train_calls.stages == ["naive", "naive"]
    assert [e["hit"] for e in cache.events] == [False, False, True]
