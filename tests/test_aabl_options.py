"""A-ABL's options that are not the paper's (log-score Otsu, take back, purge) and the a-abl+ variant: constructed
inputs and a model with known predictions; nothing here depends on a training run converging."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

import antibackdoor as ab
from antibackdoor.data.imageset import ImageSet
from antibackdoor.data.tiny_imagenet import TINY_PAPER
from antibackdoor.defenses import a_abl
from antibackdoor.defenses.a_abl import AABL, AABLParams
from antibackdoor.defenses.base import get_defense
from antibackdoor.errors import ConfigError
from antibackdoor.experiment import sample_flag_counts
from antibackdoor.stages import agrees_with_label, otsu_threshold, take_back


class PixelClassifier(nn.Module):
    """Predicts class (first pixel value in 0..255) mod ``classes``: known predictions, no training."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.anchor = nn.Parameter(torch.zeros(()))  # so that the model has a parameter and a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(value % self.classes, self.classes).float() + self.anchor


def pixel_set(values: list[int], labels: list[int], classes: int = 3) -> ImageSet:
    x = torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    return ImageSet(x, torch.tensor(labels), [str(c) for c in range(classes)], (0.5,) * 3, (0.25,) * 3, "pixels")


def test_take_back_selects_isolated_samples_whose_label_the_model_predicts():
    # predictions: value mod 3 = 0 1 2 0 1 2 0 1
    data = pixel_set([0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 2, 1, 1, 0, 0, 0])
    agrees = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    kept = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    model = PixelClassifier(3)
    ctx = ab.DefenseContext(lambda: model)
    assert torch.equal(agrees_with_label(model, data, ctx), agrees)
    back = take_back(model, data, kept, ctx)
    assert torch.equal(back, ~kept & agrees)  # samples 2 and 4; never a kept one
    assert torch.equal(take_back(model, data, torch.ones(8, dtype=torch.bool), ctx), torch.zeros(8, dtype=torch.bool))


def test_otsu_on_log_scores_splits_where_the_raw_histogram_cannot():
    g = torch.Generator().manual_seed(0)
    jitter = lambda n: 1 + 0.1 * torch.rand(n, generator=g)  # noqa: E731
    scores = torch.cat([1e-3 * jitter(300), 1.0 * jitter(300), 10.0 * jitter(300)])
    raw = otsu_threshold(scores)
    logged = otsu_threshold(scores, log_scale=True)
    assert 1.1 < raw < 10  # raw: 1e-3 and 1 look alike next to 10
    assert 1.1e-3 < logged < 1.0  # log: the three decades apart, the widest gap is 1e-3 .. 1
    assert (scores > logged).sum() == 600
    assert otsu_threshold(torch.full((5,), 2.0), log_scale=True) == pytest.approx(2.0)


def test_paper_defaults_are_unchanged():
    for preset in ("quick", "paper"):
        p = ab.get_defense("a-abl", preset).params
        assert p.split_log is False and p.takeback_epochs == 0 and p.takeback_lr is None and p.purge is False
    # the split's floor is the one paper value that is not the dataclass default (docs/a-abl.md)
    assert ab.get_defense("a-abl", "paper").params == AABLParams(min_isolated=0.1)


def test_take_back_stage_trains_the_stage3_model_on_kept_plus_taken_back(small_train, monkeypatch, train_calls):
    data = small_train
    scores = 9 + torch.linspace(0, 1, len(data))
    scores[:60] = 0.01  # a robust cluster: isolated
    monkeypatch.setattr(AABL, "split_scores", lambda self, model, d, ctx: scores.clone())
    back = torch.zeros(len(data), dtype=torch.bool)
    back[:60:3] = True  # 20 of the isolated samples are "taken back"
    calls = []

    def fake_take_back(model, d, kept, ctx):
        calls.append((model, kept.clone()))
        return back.clone()

    monkeypatch.setattr(a_abl, "take_back", fake_take_back)
    d = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 1}, "final": {"epochs": 1, "adversary": {"steps": 1}},
                                          "takeback_epochs": 2})
    r = d.run(data, ab.DefenseContext(ab.model_factory("cnn-small", data)))
    kept = scores > r.info["threshold"]
    assert torch.equal(r.kept, kept) and int((~kept).sum()) == 60  # kept still describes the split
    assert [(c.stage, len(c.data)) for c in train_calls] == [("naive", 300), ("adv_train", 240), ("takeback", 260)]
    stage3_model = train_calls[1].model
    assert calls[0][0] is stage3_model and torch.equal(calls[0][1], kept)
    assert train_calls[2].model is stage3_model and r.model is stage3_model  # continued, not a fresh model
    cfg = train_calls[2].cfg
    final = d.params.final
    assert cfg.epochs == 2 and cfg.schedule == "cosine" and math.isclose(cfg.lr, final.lr / 10)
    assert cfg.adversary == final.adversary and cfg.optimizer == final.optimizer
    assert r.info["taken_back"] == 20 and torch.equal(r.sample_stats["taken_back"], back)
    assert len(r.history["takeback"]) == 2


def test_bad_option_values_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^--defense-param takeback_epochs: -1 must be >= 0$"):
        ab.get_defense("a-abl", "quick", {"takeback_epochs": -1})
    with pytest.raises(ConfigError, match=r"^--defense-param takeback_lr: 0.0 must be > 0$"):
        ab.get_defense("a-abl", "quick", {"takeback_lr": 0.0})
    with pytest.raises(ConfigError, match="split_log: expected true or false"):
        ab.get_defense("a-abl", "quick", {"split_log": "yes"})


def test_a_abl_plus_is_a_abl_with_the_options_on():
    for preset in ("quick", "paper"):
        plain, plus = ab.get_defense("a-abl", preset).params, ab.get_defense("a-abl+", preset).params
        assert plus.split_log and plus.purge and plus.takeback_epochs == 0
        assert not plain.purge
        assert plus.naive == plain.naive and plus.final == plain.final and plus.split_eps == plain.split_eps
    # the dataset's paper settings for a-abl (split eps 1/255 on 64x64 Tiny-ImageNet) reach the variant too
    assert get_defense("a-abl+", "paper", {}, TINY_PAPER).params.split_eps == pytest.approx(1 / 255)
    assert get_defense("a-abl", "paper", {}, TINY_PAPER).params.split_eps == pytest.approx(1 / 255)


def test_sample_flag_counts_count_flagged_poison():
    poison = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    stats = {"taken_back": torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool), "k": torch.arange(5)}
    counts = sample_flag_counts(stats, poison)
    assert counts == {"taken_back": {"samples": 3, "poison": 1}}
    json.dumps(counts, allow_nan=False)


def test_cli_runs_pixels_with_a_abl_plus_and_records_the_take_back(tmp_path, tiny_npz, capsys, monkeypatch):
    import numpy as np

    from antibackdoor.attacks import get_attack
    from antibackdoor.cli import main

    stamp = get_attack("pixels", pixels=4).mask(16, 16)  # tiny_npz holds 16 x 16 images

    def split_scores(self, model, d, ctx):
        """The split isolates exactly the samples that carry the four white pixels (all labelled 1)."""
        triggered = (d.x[:, :, stamp] == 255).flatten(1).all(1).cpu()
        return torch.where(triggered, 0.01, 9.0) + torch.linspace(0, 1, len(d)) * ~triggered

    monkeypatch.setattr(AABL, "split_scores", split_scores)
    # the stage-3 model disagrees with the label of every third sample
    monkeypatch.setattr(a_abl, "agrees_with_label", lambda model, d, ctx: torch.arange(len(d)) % 3 != 0)
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "runs"), "--target", "1",
            "--attack", "pixels", "--attack-param", "pixels=4", "--defense", "a-abl+", "--model", "cnn-small",
            "--defense-param", "naive.epochs=1", "--defense-param", "final.epochs=1",
            "--defense-param", "final.adversary.steps=1", "--defense-param", "takeback_epochs=1"]
    assert main(args) == 0, capsys.readouterr().err
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("tiny.npz-pixels-a-abl+-")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    back = metrics["sample_flags"]["taken_back"]
    assert back["samples"] == metrics["defense_info"]["taken_back"] <= metrics["isolated"]
    assert back["poison"] <= min(back["samples"], metrics["isolated_poison"])
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["takeback"]) == 1
    with open(run_dir / "isolation.csv") as f:  # the flags are per-sample columns of isolation.csv too
        table = list(csv.DictReader(f))
    assert sum(int(r["taken_back"]) for r in table) == back["samples"]
    assert sum(int(r["taken_back"]) for r in table if r["is_poison"] == "1") == back["poison"]
    # a-abl+ purges: the isolated samples are all of class 1, so the kept class-1 samples the stage-3 model
    # disagrees with are dropped and stage 3 is trained again
    assert [r["kept"] for r in table] == ["0" if r["is_poison"] == "1" else "1" for r in table]
    assert metrics["defense_info"]["purge_target"] == 1 and "purged_adv_train" in history
    with np.load(tiny_npz) as f:
        y = f["y_train"]
    purged = {int(r["index"]) for r in table if r["purged"] == "1"}
    assert purged == {i for i, r in enumerate(table) if r["is_poison"] == "0" and y[i] == 1 and i % 3 == 0}
    assert metrics["sample_flags"]["purged"] == {"samples": len(purged), "poison": 0} and purged
    # a bad attack parameter is one line and exit code 2, before any run directory
    bad = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "bad"), "--attack", "pixels",
           "--attack-param", "layout=x", "--attack-param", "pixels=4"]
    assert main(bad) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "antibackdoor: error: --attack-param pixels: layout x has 5 pixels, not 4; leave pixels unset"
    assert not (tmp_path / "bad").exists()


def _purge_run(data: ImageSet, scores: torch.Tensor, agrees: torch.Tensor | list[torch.Tensor], monkeypatch,
               seen, **params) -> tuple:
    """A quick A-ABL run with ``purge`` on, the split scores and the stage-3 models' agreement given (one mask
    per round, or the same for every round); ``seen`` is the ``train_calls`` spy."""
    monkeypatch.setattr(AABL, "split_scores", lambda self, model, d, ctx: scores.clone())
    asked = []

    def fake_agrees(model, d, ctx):
        asked.append(model)
        return (agrees[len(asked) - 1] if isinstance(agrees, list) else agrees).clone()

    monkeypatch.setattr(a_abl, "agrees_with_label", fake_agrees)
    d = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 1}, "final": {"epochs": 1, "adversary": {"steps": 1}},
                                          "purge": True, **params})
    return d.run(data, ab.DefenseContext(ab.model_factory("cnn-small", data))), asked


def _surplus_scores(data: ImageSet) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(labels, target, split scores) where half of the first sample's class scores as robust: a class surplus
    among the isolated samples, the rest of the data vulnerable."""
    y = data.y.cpu()
    target = int(y[0])
    scores = 9 + torch.linspace(0, 1, len(data))
    in_target = (y == target).nonzero().squeeze(1)
    scores[in_target[: len(in_target) // 2]] = 0.01
    return y, target, scores


def test_purge_drops_the_surplus_class_samples_the_robust_model_disagrees_with(small_train, monkeypatch,
                                                                                 train_calls):
    data = small_train
    y, target, scores = _surplus_scores(data)
    agrees = torch.arange(len(data)) % 2 == 0
    r, asked = _purge_run(data, scores, agrees, monkeypatch, train_calls)
    seen = train_calls
    kept = scores > r.info["threshold"]
    assert torch.equal(r.kept, kept)  # kept still describes the split
    purged = kept & (y == target) & ~agrees
    assert r.info["purge_target"] == target and r.info["purge_p"] < 0.01
    assert int(purged.sum()) > 0 and torch.equal(r.sample_stats["purged"], purged) and r.info["purged"] == purged.sum()
    assert seen.stages == ["naive", "adv_train", "purged_adv_train"]
    assert asked == [seen[1].model]  # the robust stage-3 model judges
    assert len(seen[2].data) == int((kept & ~purged).sum())
    assert torch.equal(seen[2].data.y.cpu(), y[kept & ~purged])
    assert seen[2].model is not seen[1].model and r.model is seen[2].model  # retrained from scratch, and returned
    counts = sample_flag_counts(r.sample_stats, torch.zeros(len(data), dtype=torch.bool))
    assert counts["purged"] == {"samples": int(purged.sum()), "poison": 0}


def test_purge_rounds_are_each_judged_by_the_previous_rounds_model(small_train, monkeypatch, train_calls):
    data = small_train
    y, target, scores = _surplus_scores(data)
    first, second = torch.arange(len(data)) % 3 != 0, torch.arange(len(data)) % 2 == 0
    r, asked = _purge_run(data, scores, [first, second], monkeypatch, train_calls, purge_rounds=2)
    seen = train_calls
    kept = scores > r.info["threshold"]
    one = kept & (y == target) & ~first
    two = kept & (y == target) & ~second & ~one
    assert r.info["purged_per_round"] == [int(one.sum()), int(two.sum())] and int(two.sum()) > 0
    assert torch.equal(r.sample_stats["purged"], one | two)
    assert seen.stages == ["naive", "adv_train", "purged_adv_train", "purged_adv_train_2"]
    assert asked == [seen[1].model, seen[2].model]  # round 2 is judged by round 1's model
    assert len(seen[3].data) == int((kept & ~(one | two)).sum()) and r.model is seen[3].model
    with pytest.raises(ConfigError, match=r"^--defense-param purge_rounds: 0 must be >= 1$"):
        ab.get_defense("a-abl", "quick", {"purge_rounds": 0})


def test_purge_without_a_surplus_changes_nothing(small_train, monkeypatch, train_calls):
    data = small_train
    scores = 9 + torch.linspace(0, 1, len(data))
    scores[::10] = 0.01  # every tenth sample isolated: no class stands out
    r, asked = _purge_run(data, scores, torch.ones(len(data), dtype=torch.bool), monkeypatch, train_calls)
    assert r.info["purge_target"] is None and "purged" not in r.sample_stats
    assert train_calls.stages == ["naive", "adv_train"] and asked == [] and r.model is train_calls[1].model


def test_defend_with_a_abl_plus_leaves_the_purged_samples_out_of_the_clean_indices(tmp_path, monkeypatch, capsys):
    import numpy as np
    from conftest import write_npz

    from antibackdoor.cli import main

    path = write_npz(tmp_path / "d.npz", n_train=240, classes=4)
    y = np.arange(240) % 4
    scores = 9 + torch.linspace(0, 1, 240)
    scores[torch.from_numpy(np.flatnonzero(y == 2)[:30])] = 0.01  # half of class 2 robust: a surplus
    agrees = torch.arange(240) % 3 != 0
    monkeypatch.setattr(AABL, "split_scores", lambda self, model, d, ctx: scores[: len(d)].clone())
    monkeypatch.setattr(a_abl, "agrees_with_label", lambda model, d, ctx: agrees[: len(d)].clone())
    out = tmp_path / "r"
    code = main(["defend", f"npz:{path}", "--defense", "a-abl+", "--model", "cnn-small", "--out", str(out),
                 "--holdout", "0", "--ra-samples", "20", "--defense-param", "naive.epochs=1",
                 "--defense-param", "final.epochs=1", "--defense-param", "final.adversary.steps=1"])
    assert code == 0, capsys.readouterr().err
    run_dir = next(out.iterdir())
    rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
    purged = {int(r["index"]) for r in rows if r["purged"] == "yes"}
    expected = {i for i in range(240) if y[i] == 2 and scores[i] > 1 and not agrees[i]}
    assert purged == expected and len(purged) == 10  # class 2's kept half, every third sample
    clean = np.loadtxt(run_dir / "clean_indices.txt", dtype=np.int64, comments="#").tolist()
    assert clean == sorted(int(r["index"]) for r in rows if r["isolated"] == "no" and r["purged"] == "no")
    assert "without the 10 samples the purge dropped" in (run_dir / "clean_indices.txt").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["defense_info"]["purge_target"] == 2 and metrics["defense_info"]["purged"] == 10


def test_asr_floor_measures_every_trigger_on_a_model_trained_on_clean_data(tmp_path, tiny_npz, monkeypatch):
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    import asr_floor

    out = tmp_path / "floor.md"
    argv = ["--dataset", f"npz:{tiny_npz}", "--defenses", "none", "--attacks", "badnets,pixels:pixels=4",
            "--targets", "0,1", "--runs", str(tmp_path / "runs"), "--out", str(out), "--threads", "1"]
    assert asr_floor.main(argv) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| none ")]
    assert [(r[2], r[3]) for r in rows] == [("badnets", "0"), ("badnets", "1"), ("pixels pixels=4", "0"),
                                            ("pixels pixels=4", "1")]
    assert all(0.0 <= float(r[4].rstrip(" |")) <= 100.0 for r in rows)
    (run_dir,) = (tmp_path / "runs").iterdir()  # one clean run, shared by every trigger
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["poisoned"] == 0 and metrics["asr"] is None


def test_take_back_after_a_purge_keeps_the_purged_samples_out(small_train, monkeypatch, train_calls):
    data = small_train
    y, target, scores = _surplus_scores(data)
    monkeypatch.setattr(a_abl, "take_back", lambda model, d, kept, ctx: ~kept.cpu())  # everything isolated
    r, _ = _purge_run(data, scores, torch.arange(len(data)) % 2 == 0, monkeypatch, train_calls, takeback_epochs=1)
    purged = r.sample_stats["purged"]
    assert int(purged.sum()) > 0 and train_calls.stages[-1] == "takeback"
    assert len(train_calls[-1].data) == len(data) - int(purged.sum())  # kept minus purged, plus every isolated
