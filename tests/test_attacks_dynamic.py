"""IAB and SSBA: the poisoning contract (who changes and how, whose label changes, the mask) on the attacks' own
networks set to known outputs, that their triggers depend on the image (untrained networks: a property of the
architecture), and that a real (one-epoch) training is cached and reused. How well a longer training hides and
reads SSBA's code, or diversifies IAB's triggers, is measured in benchmarks/training_outcomes.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from antibackdoor.attacks import get_attack
from antibackdoor.attacks.iab import InputAware
from antibackdoor.attacks.ssba import SSBA, secret_bits
from antibackdoor.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# one epoch each: the cache and the plumbing are tested on a real training, not its quality
IAB_TINY = {"width": 4, "depth": 2, "epochs": 1, "mask_epochs": 1, "batch_size": 16, "mask_batch_size": 16,
            "proxy_model": "cnn-small", "cross_ratio": 1.0}
SSBA_TINY = {"width": 8, "depth": 2, "n_bits": 8, "epochs": 1, "batch_size": 16}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """Every cache file of this module goes to a fresh data root."""
    root = tmp_path_factory.mktemp("data_root")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANTIBACKDOOR_DATA", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(mini):
    """64 real images, downsampled to 16x16 (4x cheaper; the networks take any size)."""
    sub = mini.train.subset(torch.arange(64))
    x = F.interpolate(sub.x.float(), size=(16, 16), mode="area").round().to(torch.uint8)
    return sub.with_images(x)


@pytest.fixture(scope="module")
def iab_run(tiny, cache_root, one_thread):
    att = get_attack("iab", **IAB_TINY)
    return att, att.poison(tiny, 0.25, 3, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ssba_run(tiny, cache_root, one_thread):
    att = get_attack("ssba", **SSBA_TINY)
    return att, att.poison(tiny, 0.25, 3, torch.Generator().manual_seed(0))


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).flatten(1).any(1)


def _set_output(net: nn.Module, value: float | torch.Tensor) -> nn.Module:
    """``net`` (one of the attacks' own architectures) made to output ``value`` whatever its input: its last layer
    zeroed but for the bias, or, where a BatchNorm ends it (at its initial running statistics), the layer before
    zeroed and the BatchNorm's shift set."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    last = layers[-1]
    with torch.no_grad():
        for layer in layers[-2:] if isinstance(last, nn.BatchNorm2d) else layers[-1:]:
            if not isinstance(layer, nn.BatchNorm2d):
                layer.weight.zero_()
                layer.bias.zero_()
        last.bias.copy_(torch.as_tensor(value, dtype=last.bias.dtype).expand_as(last.bias))
    return net.eval().requires_grad_(False)


def _data_statistics(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """``net`` in eval mode with its BatchNorm statistics set to those of ``x`` (one pass, no gradient step): at
    their initial statistics the deep generator's eval output barely varies."""
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: one pass gives the batch's statistics
    with torch.no_grad():
        net.train()(x)
    return net.eval()


def _known_iab(tiny) -> InputAware:
    """IAB with its networks set so that every pattern is grey (0.5) and every mask 0.5: a triggered pixel of
    grey level k becomes (k + 127.5) / 2, rounded (never a tie)."""
    att = get_attack("iab", **IAB_TINY)
    g, m = att._new_nets(tiny.channels)
    att.gen_net, att.mask_net = _set_output(g, 0.0), _set_output(m, 0.0)
    att.prepared, att.trained_target = True, 3
    return att


def test_iab_poison_contract(tiny):
    att = _known_iab(tiny)
    ps = att.poison(tiny, 0.25, 3, torch.Generator().manual_seed(0))
    m, cross = ps.poison_mask, ps.cover_mask
    assert ps.data.x.shape == tiny.x.shape and ps.data.x.dtype == torch.uint8
    assert int(m.sum()) == 16 and int(cross.sum()) == 16  # cross_ratio 1: as many cross samples
    assert not (m & cross).any()
    # triggered, with the known pattern and mask: backdoor and cross samples; untouched: everything else
    triggered = m | cross
    assert torch.equal(ps.data.x[triggered], (2 * tiny.x[triggered].int() + 257).div(4, rounding_mode="floor")
                       .to(torch.uint8))
    assert torch.equal(ps.data.x[~triggered], tiny.x[~triggered])
    # relabelled: exactly the backdoor samples; cross samples keep their true label
    assert torch.all(ps.data.y[m] == 3) and torch.equal(ps.data.y[~m], tiny.y[~m])
    assert torch.equal(ps.true_labels, tiny.y)
    x = tiny.float_images(torch.arange(8))
    out = att.apply(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_iab_trigger_is_sample_specific(tiny):
    """The generator and mask network see the image: untrained (random weights, BatchNorm statistics of the
    data), different images get different patterns and masks, so an image's own trigger differs from one made
    for another image; in eval mode an image's trigger does not depend on the rest of its batch."""
    att = get_attack("iab", **IAB_TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g, m = att._new_nets(tiny.channels)
    x_all = tiny.float_images()
    att.gen_net, att.mask_net = _data_statistics(g, x_all), _data_statistics(m, x_all)
    x = x_all[:8]
    other = x.roll(1, 0)
    pattern, mask = att.gen_net.pattern(x), att.mask_net.mask(x)
    assert (pattern[0] - pattern[1]).abs().mean() > 0.01
    assert (mask[0] - mask[1]).abs().mean() > 0.01
    assert (att.apply(x) - att.apply_cross(x, other)).abs().mean() > 0.01
    assert torch.allclose(att.apply(x[:1]), att.apply(x)[:1], atol=1e-5)


def test_iab_cache_reused(tiny, iab_run, cache_root, monkeypatch):
    att, ps = iab_run
    files = list((cache_root / "cache").glob("antibackdoor-cache-iab-*.safetensors"))
    assert len(files) == 1 and not list((cache_root / "cache").glob("*.tmp"))
    assert att.train_info["cached"] is False

    def no_training(*a, **k):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(InputAware, "_train", no_training)
    again = get_attack("iab", **{**IAB_TINY, "cross_ratio": 0.5})  # cross_ratio only changes the poisoning
    ps2 = again.poison(tiny, 0.25, 3, torch.Generator().manual_seed(0))
    assert again.train_info["cached"] is True
    assert torch.equal(ps2.data.x[ps.poison_mask], ps.data.x[ps.poison_mask])
    assert ps2.num_cover == 8
    # another target trains other networks
    with pytest.raises(AssertionError, match="trained again"):
        get_attack("iab", **IAB_TINY).prepare(tiny, 4, torch.Generator())


def test_iab_too_few_samples_for_cross_triggers_is_an_error(tiny, monkeypatch):
    """As WaNet: 16 poisoned + 64 cross-trigger samples do not fit in 64 images. It used to truncate the cross
    samples silently; now it stops, before any training, with the error WaNet gives."""

    def no_training(*a, **k):
        raise AssertionError("trained before checking the sample budget")

    monkeypatch.setattr(InputAware, "_train", no_training)
    with pytest.raises(ConfigError, match=r"^--attack-param cross_ratio: attack iab at --poison-rate 0.25 needs 16 "
                                          r"poisoned \+ 64 cover samples, more than the 64 there are"):
        get_attack("iab", **{**IAB_TINY, "cross_ratio": 4.0}).poison(tiny, 0.25, 3, torch.Generator())


def test_iab_needs_prepare_and_valid_params():
    with pytest.raises(RuntimeError, match="prepare"):
        get_attack("iab").apply(torch.rand(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="p_attack"):
        get_attack("iab", p_attack=0.6, p_cross=0.6)


def _known_ssba(tiny) -> SSBA:
    """SSBA with its networks set: the encoder adds 3 grey levels everywhere, the decoder reads the secret."""
    att = get_attack("ssba", **SSBA_TINY)
    enc, dec = att._new_nets(tiny.channels)
    att.encoder, att.decoder = _set_output(enc, 3 / 255), _set_output(dec, 2 * att.bits - 1)
    att.prepared = True
    return att


def test_ssba_poison_contract(tiny):
    from antibackdoor.attacks import quantize

    att = _known_ssba(tiny)
    ps = att.poison(tiny, 0.25, 3, torch.Generator().manual_seed(0))
    m = ps.poison_mask
    assert int(m.sum()) == 16 and ps.data.x.shape == tiny.x.shape
    # the residual is added, clipped and quantised on exactly the poisoned samples
    assert torch.equal(ps.data.x[m], (tiny.x[m].int() + 3).clamp(max=255).to(torch.uint8))
    assert torch.equal(ps.data.x[~m], tiny.x[~m])
    assert torch.all(ps.data.y[m] == 3) and torch.equal(ps.data.y[~m], tiny.y[~m])
    x = tiny.float_images(torch.arange(8))
    out = att.apply(x)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # encode hides the secret unless given other bits, decode thresholds the decoder's logits at 0
    codes = torch.randint(0, 2, (8, 8), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(quantize(att.encode(x, codes)), quantize(out))
    assert torch.equal(att.decode(ps.data.float_images(m)), att.bits.expand(16, -1))


def test_ssba_residual_depends_on_the_image_and_the_code():
    """StegaStamp's encoder sees the image and the code: even untrained, two images get different residuals
    for the same code, one image different residuals for different codes."""
    from antibackdoor.attacks.ssba import StegaEncoder

    torch.manual_seed(0)
    enc = StegaEncoder(3, 8, 8, 2).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    bits = secret_bits("ab", 8).expand(2, -1)
    with torch.no_grad():
        res = enc(x, bits)
        assert (res[0] - res[1]).abs().mean() > 1e-4
        assert (enc(x, 1 - bits) - res).abs().mean() > 1e-4


def test_ssba_cache_reused(tiny, ssba_run, cache_root, monkeypatch):
    att, ps = ssba_run
    assert len(list((cache_root / "cache").glob("antibackdoor-cache-ssba-*.safetensors"))) == 1

    def no_training(*a, **k):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(SSBA, "_train", no_training)
    again = get_attack("ssba", **SSBA_TINY)
    ps2 = again.poison(tiny, 0.25, 3, torch.Generator().manual_seed(0))
    assert again.train_info["cached"] is True
    assert torch.equal(ps2.data.x, ps.data.x)
    # the secret is not part of the key: the same networks hide another string
    other = get_attack("ssba", **SSBA_TINY, secret="xyz")
    other.prepare(tiny, 0, torch.Generator())
    assert not torch.equal(other.bits, att.bits)


@pytest.mark.parametrize("size", [28, 32, 20])
def test_networks_take_any_image_size(size):
    from antibackdoor.attacks.iab import TriggerNet
    from antibackdoor.attacks.ssba import StegaDecoder, StegaEncoder

    x = torch.rand(2, 1, size, size)
    assert TriggerNet(1, 1, 4, 3)(x).shape == x.shape
    assert StegaEncoder(1, 8, 4, 3)(x, torch.ones(2, 8)).shape == x.shape
    assert StegaDecoder(1, 8, 4)(x).shape == (2, 8)


def test_secret_bits():
    assert secret_bits("a", 10).tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 0, 1]  # 'a' = 0x61, repeated
    with pytest.raises(ConfigError, match="secret"):
        get_attack("ssba", secret="")
