"""fusion/cache.py: the on-disk store (misses never raise, LRU under a size cap, nothing written unless
stored), the digests keys are made of, and the code version that changes with the recording/solving code."""
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from fusion.merge import cache as fc

REPO = Path(__file__).resolve().parents[2]


def write_bytes(n):
    return lambda path: Path(path).write_bytes(b"x" * n)


def test_nothing_is_created_until_something_is_stored(tmp_path):
    store = fc.FusionCache(str(tmp_path / "cache"))
    assert store.load("k", lambda p: 1) is None
    assert not (tmp_path / "cache").exists()
    assert fc.FusionCache(str(tmp_path / "off"), 0).store("k", write_bytes(10)) is None
    assert not (tmp_path / "off").exists()
    path = store.store("k", write_bytes(10))
    assert path == str(tmp_path / "cache" / "k.fused") and os.path.getsize(path) == 10
    assert store.load("k", lambda p: Path(p).read_bytes()) == b"x" * 10
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.fused"]  # no temporary file left


def test_an_unusable_entry_is_a_miss_with_a_warning_and_is_overwritten(tmp_path, caplog):
    store = fc.FusionCache(str(tmp_path))
    store.store("k", write_bytes(5))

    def refuse(path):
        raise ValueError("truncated file")

    with caplog.at_level(logging.WARNING, logger="mixofshow"):
        assert store.load("k", refuse) is None
    assert "k.fused is unusable (truncated file)" in caplog.text
    store.store("k", write_bytes(7))
    assert os.path.getsize(store.path("k")) == 7


def test_least_recently_used_entries_are_evicted_beyond_the_cap(tmp_path, caplog):
    store = fc.FusionCache(str(tmp_path), max_bytes=250)
    for i, key in enumerate("abc"):
        store.store(key, write_bytes(100))
        os.utime(store.path(key), (time.time() - 100 + i, time.time() - 100 + i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.fused", "c.fused"]  # a went when c came
    store.load("b", lambda p: None)  # b used: c is now the oldest
    store.store("d", write_bytes(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.fused", "d.fused"]
    with caplog.at_level(logging.WARNING, logger="mixofshow"):
        assert store.store("huge", write_bytes(300)) is None
    assert "larger than the cache cap" in caplog.text and not os.path.exists(store.path("huge"))


def test_old_release_files_and_stale_parts_count_and_go_first(tmp_path):
    old = tmp_path / "0123.rows"  # 0.1.0's per-concept text rows
    old.write_bytes(b"x" * 100)
    stale = tmp_path / "k.fused.99.part"
    stale.write_bytes(b"x" * 100)
    fresh = tmp_path / "j.fused.98.part"  # maybe still being written by another process: left alone
    fresh.write_bytes(b"x" * 100)
    for p in (old, stale):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    fc.FusionCache(str(tmp_path), max_bytes=150).store("new", write_bytes(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.fused.98.part", "new.fused", "notes.txt"]


@pytest.mark.parametrize("value, expected", [(None, 2 << 30), ("", 2 << 30), ("512", 512 << 20), ("0", 0),
                                             ("0.5", 1 << 19), ("lots", 2 << 30)])
def test_cap_from_the_environment(value, expected):
    assert fc.max_bytes_from_env(value) == expected


def test_tensor_digests_see_every_byte():
    t = torch.randn(1_000_003)
    d = fc.tensor_digest(t)
    assert fc.tensor_digest(t.clone()) == d
    for i in (0, 500_000, 1_000_002):  # any single value, not a sample of positions
        u = t.clone()
        u[i] = torch.nextafter(u[i], torch.tensor(10.0))
        assert fc.tensor_digest(u) != d
    assert fc.tensor_digest(t.reshape(1000003, 1)) != d and fc.tensor_digest(t.double()) != d
    assert fc.tensor_digest(t[::2]) == fc.tensor_digest(t[::2].contiguous())
    named = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.float16)}
    assert fc.tensors_digest(named) == fc.tensors_digest(dict(reversed(named.items())), threads=1)
    assert fc.tensor_digest(torch.ones(2, dtype=torch.bfloat16)) != fc.tensor_digest(torch.ones(2, dtype=torch.float16))


class VPrediction:
    pass


class Sampling(torch.nn.Module):
    def __init__(self, sigma_max=14.6):
        super().__init__()
        self.register_buffer("sigmas", torch.linspace(0.03, sigma_max, 10))


class SamplingV(Sampling, VPrediction):
    pass


class Patch:
    def __init__(self, strength):
        self.strength = strength
        self.me = self  # a cycle

    def __call__(self, q, k, v, extra):
        return q * self.strength

    def method(self, x):
        return x


def make_options(strength=1.0, sigma_max=14.6, closure=2.0, v=False):
    scale = closure
    return {"transformer_options": {"patches": {"attn2_patch": [Patch(strength)]}},
            "sampler_cfg_function": lambda args: args["cond"] * scale,
            "object_patches": {"model_sampling": (SamplingV if v else Sampling)(sigma_max)},
            "bound": Patch(strength).method, "builtin": len, "dtype": torch.float16}


def test_describe_is_stable_and_sees_what_changes_the_forward():
    a, b = fc.describe(make_options()), fc.describe(make_options())
    assert a == b  # fresh objects, equal content: equal descriptions
    text = json.dumps(a)
    assert "0x" not in text and "<seen>" in text  # no addresses; the cycle was cut
    for changed in (make_options(strength=0.5), make_options(sigma_max=10.0), make_options(closure=3.0),
                    make_options(v=True)):
        assert fc.describe(changed) != a
    assert "test_fusion_cache.VPrediction" in json.dumps(fc.describe(make_options(v=True)))


