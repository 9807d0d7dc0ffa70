"""Tests for data.py: embedded data, priors, sampling, augmentations, tokenizer, every format and bad input."""
import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import SHARED_DATA
from data import DataError, load_dataset

# -----------------------------------------------------------------------------
# embedded shapes


def test_shapes_deterministic_and_prefix_stable():
    data._shapes_cached.cache_clear()
    a = load_dataset("shapes", n=700, seed=3)  # two chunks of 500
    data._shapes_cached.cache_clear()
    b = load_dataset("shapes", n=700, seed=3)
    small = load_dataset("shapes", n=300, seed=3)
    idx = torch.arange(300)
    assert torch.equal(a.images(torch.arange(700)), b.images(torch.arange(700))) and a.captions == b.captions
    assert torch.equal(a.images(idx), small.images(idx)) and a.captions[:300] == small.captions
    other = load_dataset("shapes", n=300, seed=4)
    assert not torch.equal(other.images(idx), small.images(idx))


def test_shapes_fields_and_captions():
    ds = load_dataset("shapes", split="test", n=500)
    x = ds.images(torch.arange(len(ds)))
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.uint8 and ds.channels == 3 and ds.size == 32
    assert ds.labels.shape == (500,) and ds.labels.dtype == torch.long
    assert len(ds.classes) == 10 and set(ds.labels.tolist()) == set(range(10))
    for label, cap in zip(ds.labels.tolist(), ds.captions):
        # the first phrase describes the largest object, whose class is the label, and names a colour
        first = cap.split(",")[0].split(" and ")[0]
        assert ds.classes[label] in first.split() and any(c in first.split() for c in data.COLOURS), cap
    assert load_dataset("shapes", size=48, n=4).images([0, 1]).shape == (2, 3, 48, 48)
    assert data.SHAPES_N == {"train": 10_000, "test": 2_000} and len(load_dataset("shapes", split="test")) == 2_000


def test_shapes_has_one_object_and_shapes3_up_to_three_with_the_same_main_object():
    one, three = load_dataset("shapes", split="test", n=500, seed=2), load_dataset("shapes3", split="test", n=500, seed=2)
    assert one.name == "shapes-test" and three.name == "shapes3-test"
    assert not any(" and " in c for c in one.captions)  # one phrase: one object
    counts = [1 + c.count(",") + c.count(" and ") for c in three.captions]
    assert set(counts) == {1, 2, 3}
    # the same draws: the one-object scene is its twin's main object and background, without the distractors
    assert torch.equal(one.labels, three.labels)
    assert all(c3.startswith(c1) for c1, c3 in zip(one.captions, three.captions))
    alone = torch.tensor([n == 1 for n in counts])
    assert torch.equal(one.images(torch.arange(500))[alone], three.images(torch.arange(500))[alone])
    assert not torch.equal(one.images(torch.arange(500))[~alone], three.images(torch.arange(500))[~alone])


def test_shapes_splits_disjoint():
    def hashes(ds):
        x = ds.images(torch.arange(len(ds))).numpy()
        return {hashlib.sha1(im.tobytes()).hexdigest() for im in x}

    train, test = hashes(load_dataset("shapes", n=1000)), hashes(load_dataset("shapes", split="test"))
    assert len(train) == 1000 and len(test) == 2000 and not train & test


def test_shapes_bad_arguments():
    for kw in ({"split": "dev"}, {"n": 0}, {"size": 4}):
        with pytest.raises(DataError):
            load_dataset("shapes", **kw)


def test_normalize_and_to_rgb():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    y = data.normalize(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert data.to_rgb(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4, 4)


def test_shapes_grey_is_the_luma_of_shapes():
    colour, grey = load_dataset("shapes", split="test", n=50, seed=1), load_dataset("shapes-grey", split="test", n=50,
                                                                                      seed=1)
    assert grey.channels == 1 and grey.name == "shapes-grey-test" and grey.captions is None
    assert torch.equal(grey.images(range(50)), data.to_grey(colour.images(range(50))))
    assert torch.equal(grey.labels, colour.labels)


def test_to_grey_matches_pil_luma():
    """An independent reference: PIL's RGB -> L conversion (ITU-R 601-2 luma), pixel by pixel."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = data.to_grey(x)
    assert y.shape == (3, 1, 8, 8) and y.dtype == torch.uint8
    for i in range(3):
        ref = np.asarray(Image.fromarray(x[i].permute(1, 2, 0).numpy()).convert("L"))
        assert np.abs(y[i, 0].numpy().astype(int) - ref.astype(int)).max() <= 1  # PIL rounds in fixed point
    assert torch.equal(data.to_grey(y), y) and torch.equal(data.to_channels(y, 3), data.to_rgb(y))
    assert torch.equal(data.to_channels(x, 1), y)


# -----------------------------------------------------------------------------
# random-process priors and the grid picture


@pytest.mark.parametrize("fn", [data.dead_leaves, data.spectral_noise, data.shaders])
def test_generators(fn):
    x = fn(24, 32, torch.Generator().manual_seed(1))
    assert x.shape == (24, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, fn(24, 32, torch.Generator().manual_seed(1)))
    assert not torch.equal(x, fn(24, 32, torch.Generator().manual_seed(2)))
    assert x.float().flatten(1).std(1).min() > 5  # no flat images
    assert fn(3, 20, torch.Generator().manual_seed(0)).shape == (3, 3, 20, 20)


def test_random_process_images_mixes_kinds():
    g = torch.Generator().manual_seed(0)
    x = data.random_process_images(31, 16, generator=g)
    assert x.shape == (31, 3, 16, 16) and x.dtype == torch.uint8
    assert data.random_process_images(5, 16, kinds=("shaders",), generator=g).shape == (5, 3, 16, 16)
    assert data.PRIOR_KINDS == ("dead_leaves", "spectral", "shaders")
    with pytest.raises(ValueError):
        data.random_process_images(4, 16, kinds=("clouds",), generator=g)


def test_save_grid(tmp_path):
    x = load_dataset("shapes", n=10).images(torch.arange(10))
    data.save_grid(x, tmp_path / "a.png", nrow=5, captions=["a red star", "x " * 40] + ["c"] * 8, scale=2)
    data.save_grid(data.normalize(x[:, :1]), tmp_path / "b.png")  # grey float in [-1, 1]
    with Image.open(tmp_path / "a.png") as im:
        assert im.width == 5 * (64 + 2) + 2 and im.height > 2 * (64 + 2) + 2  # taller than without captions
    with Image.open(tmp_path / "b.png") as im:
        assert im.width == 8 * (32 + 2) + 2 and im.height == 2 * (32 + 2) + 2
        tile = torch.from_numpy(np.asarray(im)[2:34, 2:34].copy()).permute(2, 0, 1)
    assert torch.equal(tile, x[0, :1].expand(3, -1, -1))  # [-1, 1] mapped back to the same grey uint8


# -----------------------------------------------------------------------------
# Poisson sampling and physical batches


def test_poisson_batch_size_mean_and_variance():
    n, q, steps = 2000, 0.05, 2000
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([len(data.poisson_sample(n, q, generator=g)) for _ in range(steps)], dtype=torch.float64)
    # the sample mean has sd sqrt(q(1-q)n / steps) = 0.22; the sample variance has sd ~ var * sqrt(2 / steps) = 3
    assert abs(sizes.mean() - q * n) < 1.0
    assert abs(sizes.var() - q * (1 - q) * n) < 0.15 * q * (1 - q) * n


def test_poisson_inclusion_independent_across_steps():
    n, q, steps = 1000, 0.1, 1000
    g = torch.Generator().manual_seed(1)
    inc = torch.zeros(steps, n)
    for t in range(steps):
        inc[t, data.poisson_sample(n, q, generator=g)] = 1
    assert abs(inc.mean() - q) < 0.003
    joint = (inc[1:] * inc[:-1]).mean()  # both steps include the example: q^2 if independent
    assert abs(joint - q * q) < 0.001
    a, b = inc[1:].flatten() - inc[1:].mean(), inc[:-1].flatten() - inc[:-1].mean()
    assert abs((a * b).mean() / (a.std() * b.std())) < 0.01
    per_example = inc.mean(0)  # every example has the same inclusion rate
    assert (per_example - q).abs().max() < 5 * (q * (1 - q) / steps) ** 0.5


def test_poisson_edges_and_indices():
    g = torch.Generator().manual_seed(0)
    assert len(data.poisson_sample(50, 0.0, generator=g)) == 0
    assert torch.equal(data.poisson_sample(50, 1.0, generator=g), torch.arange(50))
    shard = torch.arange(100, 200)
    got = data.poisson_sample(100, 0.5, generator=torch.Generator().manual_seed(5), indices=shard)
    plain = data.poisson_sample(100, 0.5, generator=torch.Generator().manual_seed(5))
    assert len(got) > 0 and torch.equal(got, shard[plain])  # the same coins, mapped through indices
    with pytest.raises(ValueError):
        data.poisson_sample(10, 1.5, generator=g)
    with pytest.raises(ValueError):
        data.poisson_sample(10, 0.5, generator=g, indices=shard)


def test_physical_batches():
    idx = torch.tensor([7, 3, 9, 11, 4])
    batches = data.physical_batches(idx, 2)
    assert len(batches) == 3
    for b, m in batches:
        assert b.shape == (2,) and m.shape == (2,) and b.dtype == torch.long and m.dtype == torch.bool
    assert torch.equal(torch.cat([b[m] for b, m in batches]), idx)
    assert batches[-1][0][1] == 0 and not batches[-1][1][1]  # pad idx 0, masked out
    assert len(data.physical_batches(torch.arange(4), 2)) == 2
    (b, m), = data.physical_batches(torch.tensor([], dtype=torch.long), 3)
    assert b.shape == (3,) and not m.any()
    with pytest.raises(ValueError):
        data.physical_batches(idx, 0)


def test_poisson_batches_reproducible():
    run = lambda s: [pb for pb, _ in data.poisson_batches(300, 0.1, 5, 8, generator=torch.Generator().manual_seed(s))]
    a, b = run(0), run(0)
    assert len(a) == 5
    for sa, sb in zip(a, b):
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(sa, sb))
        assert all(i.shape == (8,) for i, _ in sa)


def test_poisson_batches_shards_partition_the_one_process_sample():
    """torchrun: world ranks with the same generator seed hold disjoint shards whose union is the whole sample."""
    def run(shard):
        return [pb for pb, _ in data.poisson_batches(300, 0.1, 4, 8, generator=torch.Generator().manual_seed(3),
                                                     shard=shard)]
    whole = [torch.cat([i[m] for i, m in step]) for step in run((0, 1))]
    for world in (2, 3):
        shards = [run((r, world)) for r in range(world)]
        for t, full in enumerate(whole):
            parts = [torch.cat([i[m] for i, m in s[t]]) for s in shards]
            assert sorted(torch.cat(parts).tolist()) == full.tolist()
            assert all(len(p) in (len(full) // world, len(full) // world + 1) for p in parts)  # balanced
    with pytest.raises(ValueError, match="shard"):
        next(data.poisson_batches(300, 0.1, 1, 8, shard=(2, 2)))


def test_poisson_batches_sample_the_canaries_with_the_examples():
    """--audit: the c joined canaries are indices n .. n + c - 1 of the one Poisson draw (coins from the same call
    and generator as the examples'), returned apart as canary numbers; every torchrun shard gets all of them."""
    n, c, q = 300, 200, 0.2
    g, replay = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    rates = []
    for physical, canaries in data.poisson_batches(n, q, 50, 8, generator=g, canaries=c):
        picked = data.poisson_sample(n + c, q, generator=replay)  # the same draw, replayed
        assert torch.cat([i[m] for i, m in physical]).tolist() == picked[picked < n].tolist()
        assert canaries.tolist() == (picked[picked >= n] - n).tolist()
        rates.append(len(canaries) / c)
    assert abs(sum(rates) / len(rates) - q) < 4 * (q * (1 - q) / (50 * c)) ** 0.5  # each canary's coin: rate q
    shards = [list(data.poisson_batches(n, q, 3, 8, generator=torch.Generator().manual_seed(4), canaries=c,
                                        shard=(r, 2))) for r in range(2)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(*shards))


# -----------------------------------------------------------------------------
# augmentations


def test_augmentations():
    x = data.normalize(load_dataset("shapes", n=16).images(torch.arange(16)))
    for fn in (data.random_crop, data.hflip, data.random_resized_crop, data.color_jitter):
        y = fn(x, generator=torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= -1.001 and y.max() <= 1.001
        assert torch.equal(y, fn(x, generator=torch.Generator().manual_seed(0)))
        assert fn(x[:, :1], generator=torch.Generator().manual_seed(0)).shape == (16, 1, 32, 32)
    y = data.hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(y, x)]
    assert all(f or torch.equal(a, b) for f, a, b in zip(flipped, y, x)) and 0 < sum(flipped) < 16
    assert torch.equal(data.random_crop(x, pad=0, generator=torch.Generator()), x)
    same = data.random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    assert (same - x).abs().max() < 1e-4
    assert (data.color_jitter(x, 0.0, generator=torch.Generator()) - x).abs().max() < 1e-5
    # each crop is one 32x32 window of its reflect-padded original
    y = data.random_crop(x, pad=4, generator=torch.Generator().manual_seed(3))
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for a, p in zip(y, xp):
        assert any(torch.equal(a, p[:, i:i + 32, j:j + 32]) for i in range(9) for j in range(9))


# per-example random streams (the augmentations of private data) and the secret generators

MASK64 = 2**64 - 1


def mix64_reference(z):
    """splitmix64's finaliser on Python ints, unsigned 64-bit: the independent reference for data._mix64."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def example_uniform_reference(seed, step, i, j):
    """Draw j of example i at (seed, step): h = mix(mix(mix(seed + g) + step + g) + i + g), u = the top 53 bits of
    mix(h + (j + 1) g), in [0, 1)."""
    golden, h = 0x9E3779B97F4A7C15, 0
    for word in (seed, step, i):
        h = mix64_reference((h + word + golden) & MASK64)
    return (mix64_reference((h + (j + 1) * golden) & MASK64) >> 11) / 2.0 ** 53


def test_mix64_is_splitmix64():
    assert mix64_reference(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # splitmix64's first output from state 0
    z = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF, 0xFEDCBA9876543210]
    t = torch.tensor([v - 2**64 if v >= 2**63 else v for v in z], dtype=torch.long)
    assert [v & MASK64 for v in data._mix64(t).tolist()] == [mix64_reference(v) for v in z]


def test_example_random_is_bit_exact_to_the_reference():
    idx = torch.tensor([0, 5, 19999, 7, 5, 2**40])
    for seed, step in ((0, 0), (1, 3), (2**32 - 1, 10**6)):
        r = data.ExampleRandom(seed, step, idx)
        first, second = r.uniform(3), r.uniform(2)  # each call takes the next draws
        got = torch.cat([first, second], 1)
        ref = [[example_uniform_reference(seed, step, i, j) for j in range(5)] for i in idx.tolist()]
        assert got.dtype == torch.float64 and got.tolist() == ref
    u = data.ExampleRandom(0, 0, torch.arange(20000)).uniform(2)
    assert 0 <= u.min() and u.max() < 1 and np.unique(u.numpy() * 2.0**53 % 1).tolist() == [0.0]  # 53 bits
    assert abs(u.mean().item() - 0.5) < 0.01


def test_example_random_differs_across_seed_step_and_index():
    draw = lambda seed, step, i: data.ExampleRandom(seed, step, torch.tensor([i])).uniform(8)
    base = draw(0, 0, 0)
    for other in (draw(1, 0, 0), draw(0, 1, 0), draw(0, 0, 1), draw(2**32, 0, 0)):
        assert not torch.equal(other, base)
    assert torch.equal(draw(0, 0, 0), base)  # a pure function: the same call, the same numbers
    # the same example twice in one batch (a padding slot repeats index 0) gets the same numbers
    twice = data.ExampleRandom(0, 0, torch.tensor([0, 3, 0])).uniform(8)
    assert torch.equal(twice[0], twice[2]) and torch.equal(twice[0], base[0])


def test_example_random_views_take_their_own_draws():
    r = data.ExampleRandom(4, 2, torch.tensor([7, 9])).views(3)  # rows: 7 7 7 9 9 9
    u = r.uniform(2)
    assert len(r) == 6 and u.shape == (6, 2)
    ref = [[example_uniform_reference(4, 2, i, 2 * v + j) for j in range(2)] for i in (7, 9) for v in range(3)]
    assert u.tolist() == ref


@pytest.mark.parametrize("fn", [data.random_crop, data.hflip, data.random_resized_crop, data.color_jitter],
                         ids=lambda f: f.__name__)
def test_each_example_is_augmented_by_its_own_stream(fn):
    """An example's augmentation is the same alone, in any batch, at any position: a batch-order generator would
    give each example the draws of its slot instead."""
    x = data.normalize(load_dataset("shapes", n=24).images(torch.arange(24)))
    idx = torch.arange(24) * 11 + 3
    whole = fn(x, generator=data.ExampleRandom(0, 7, idx))
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    shuffled = fn(x[order], generator=data.ExampleRandom(0, 7, idx[order]))
    assert torch.equal(shuffled, whole[order])
    for i in (0, 13, 23):
        assert torch.equal(fn(x[i:i + 1], generator=data.ExampleRandom(0, 7, idx[i:i + 1]))[0], whole[i])
    other_step = fn(x, generator=data.ExampleRandom(0, 8, idx))
    assert not torch.equal(other_step, whole)
    with pytest.raises(ValueError, match="ExampleRandom"):
        fn(x[:5], generator=data.ExampleRandom(0, 7, idx))


def test_uniforms_from_a_stream_or_a_generator():
    r = data.ExampleRandom(0, 0, torch.arange(3))
    u = data.uniforms(3, 4, generator=r)
    assert u.shape == (3, 4) and u.dtype == torch.float32
    assert torch.equal(u, data.ExampleRandom(0, 0, torch.arange(3)).uniform(4).float())
    g = torch.Generator().manual_seed(0)
    assert torch.equal(data.uniforms(3, 4, generator=g), torch.rand(3, 4, generator=torch.Generator().manual_seed(0)))


def test_torch_cpu_manual_seed_keeps_only_32_bits():
    """Why data.secret_generator does not use manual_seed: seeds equal in their low 32 bits draw the same numbers."""
    a, b = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345 + 2**32)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_secret_generator_keeps_the_whole_seed():
    draw = lambda seed: torch.rand(16, generator=data.secret_generator(seed), dtype=torch.float64)
    base = draw(12345)
    for other in (12345 + 2**32, 12345 + 2**63, 12345 + 2**255, 12346):
        assert not torch.equal(draw(other), base)  # a seed differing anywhere draws other numbers
    assert torch.equal(draw(12345), base)  # and the same seed the same ones (--insecure-seed replays)
    g = data.secret_generator(2**200 + 9)
    torch.randn(5, generator=g)  # a normal draw: the generator caches one more
    state = g.get_state()
    after = torch.randn(7, generator=g), torch.rand(3, generator=g)
    h = torch.Generator()
    h.set_state(state)  # a checkpoint's state resumes the stream exactly
    again = torch.randn(7, generator=h), torch.rand(3, generator=h)
    assert all(torch.equal(x, y) for x, y in zip(after, again))
    z = torch.randn(200_000, generator=data.secret_generator(3))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    u = torch.rand(200_000, generator=data.secret_generator(4), dtype=torch.float64)
    assert abs(u.mean().item() - 0.5) < 0.005


def test_secret_seeds_are_256_bit_and_fresh():
    seeds = [data.secret_seeds() for _ in range(4)]
    flat = [s for pair in seeds for s in pair]
    assert len(set(flat)) == 8 and max(flat) > 2**128 and all(0 <= s < 2**256 for s in flat)
    assert data.secret_seeds(pinned=5) == (5, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: its Philox generator takes a 64-bit seed")
def test_secret_generator_on_cuda_uses_64_bits():
    a, b = torch.Generator("cuda").manual_seed(5), torch.Generator("cuda").manual_seed(5 + 2**32)
    assert not torch.equal(torch.rand(8, generator=a, device="cuda"), torch.rand(8, generator=b, device="cuda"))
    assert max(data.secret_generator(s, "cuda").initial_seed() for s in range(8)) >= 2**32  # more than 32 bits
    draw = lambda seed: torch.rand(8, generator=data.secret_generator(seed, "cuda"), device="cuda")
    assert torch.equal(draw(1), draw(1))


# -----------------------------------------------------------------------------
# tokenizer


def test_word_tokenizer_reads_any_script_and_cuts_long_captions():
    tok = data.WordTokenizer()
    texts = ["a red star", "数据隐私 学习", "Café naïve, résumé!", "emoji 😀 ok", ""]
    ids = tok.encode(texts, 6)
    assert ids.shape == (5, 6) and ids.dtype == torch.long and ids.max() < tok.vocab_size == 259
    assert (ids[:, 0] == tok.BOS).all() and ((ids == tok.EOS).sum(1) == 1).all()
    assert tok.words(texts[2]) == ["café", "naïve", "résumé"] and tok.words(texts[3]) == ["emoji", "ok"]
    words = [w for t in texts for w in tok.words(t)]
    assert tok.decode(ids, words) == [" ".join(tok.words(t)) for t in texts]
    cut = tok.encode(["one two three four five six"], 5)  # 3 words of room, EOS kept
    assert tok.decode(cut, ["one", "two", "three"]) == ["one two three"] and cut[0, -1] == tok.EOS


# -----------------------------------------------------------------------------
# real formats on tiny files the tests write


def _rgb(n, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _write_cifar10(d, k=4):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, k))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"]}, f, protocol=2)


def test_cifar10_folder_and_tar_gz(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(str(tmp_path))  # the folder holding cifar-10-batches-py
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    assert len(ds) == 20 and ds.channels == 3 and ds.classes == list("abcdefghij")
    assert torch.equal(ds.images([0])[0], torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)))
    assert ds.labels[:4].tolist() == [int(v) for v in first[b"labels"]]
    assert len(load_dataset(str(tmp_path / "cifar-10-batches-py"), split="test")) == 4
    assert load_dataset(str(tmp_path), size=16).images([0, 1]).shape == (2, 3, 16, 16)
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    t = load_dataset(str(tmp_path / "c.tar.gz"), n=7)
    full = load_dataset(str(tmp_path / "c.tar.gz"))
    assert len(t) == 7 and torch.equal(full.images(torch.arange(20)), ds.images(torch.arange(20)))
    # n= keeps 7 of the 20 (a seeded random subset), each one an image of the full set
    assert all(any(torch.equal(t.images([j])[0], ds.images([i])[0]) for i in range(20)) for j in range(7))


def test_cifar100(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, k in (("train", 6), ("test", 3)):
        with open(d / split, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8), b"fine_labels": [5] * k,
                         b"coarse_labels": [1] * k}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    ds = load_dataset(str(d), split="test")
    assert len(ds) == 3 and ds.labels.tolist() == [5] * 3 and len(ds.classes) == 100 and ds.name == "cifar100-test"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar_malicious_pickle_refused(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "c")
    with open(tmp_path / "c" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="refused.*system") as e:
        load_dataset(str(tmp_path / "c"))
    assert "data_batch_1" in str(e.value) and not (tmp_path / "pwned.txt").exists()


def _idx(a, path):
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    raw = header + a.tobytes()
    (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")).write(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    ext = ".gz" if gz else ""
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for pre in ("train", "t10k"):
        _idx(x, d / f"{pre}-images-idx3-ubyte{ext}")
        _idx(np.arange(5, dtype=np.uint8), d / f"{pre}-labels-idx1-ubyte{ext}")
    ds = load_dataset(str(d), split="test", size=28)
    assert ds.channels == 1 and ds.images([0, 1]).shape == (2, 1, 28, 28) and ds.classes[9] == "Ankle boot"
    assert torch.equal(ds.images([2])[0, 0], torch.from_numpy(x[2])) and ds.labels.tolist() == list(range(5))
    assert load_dataset(str(d)).images([0]).shape == (1, 1, 32, 32)


def test_mnist_corrupt(tmp_path):
    _idx(np.zeros((3, 28, 28), np.uint8), tmp_path / "train-images-idx3-ubyte")
    _idx(np.zeros(3, np.uint8), tmp_path / "train-labels-idx1-ubyte")
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*corrupt"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="t10k-images"):
        load_dataset(str(tmp_path), split="test")


def _folder(root, classes=("cat", "dog"), k=3, ext="png"):
    pics = {}
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i, a in enumerate(_rgb(k, 40, 48, seed=ci)):
            p = root / c / f"{i}.{ext}"
            Image.fromarray(a).save(p)
            pics[p] = a
    return pics


def test_image_folder_with_splits(tmp_path):
    _folder(tmp_path / "train")
    _folder(tmp_path / "test", classes=("dog",), k=2, ext="webp")
    tr, te = load_dataset(str(tmp_path)), load_dataset(str(tmp_path), split="test")
    assert len(tr) == 6 and tr.classes == ["cat", "dog"] and tr.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(te) == 2 and te.classes == ["cat", "dog"] and te.labels.tolist() == [1, 1]  # same class ids
    x = tr.images(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8 and tr.captions is None
    assert load_dataset(str(tmp_path), size=20).images([0]).shape == (1, 3, 20, 20)


def test_lazy_sets_decode_once_when_small(tmp_path, monkeypatch):
    """A small file-backed set is decoded once, as it is loaded (each file is checked before any training), and then
    read from memory; a set too big to keep has its files' headers checked at load and is decoded at each use."""
    pics = _folder(tmp_path)
    ds = load_dataset(str(tmp_path))
    first = ds.images([0, 4, 0])
    for p in pics:
        os.remove(p)
    assert torch.equal(ds.images([0, 4, 0]), first)  # kept in memory: the files are not read again
    assert ds.images(torch.arange(len(ds))).shape == (6, 3, 32, 32)  # all of them, decoded at load
    monkeypatch.setattr(data, "MEMO_BYTES", 0)
    big_pics = list(_folder(tmp_path / "big"))
    big = load_dataset(str(tmp_path / "big"))
    assert torch.equal(big.images([0, 4]), first[:2]) and big._memo is None  # decoded each time, same pixels
    os.remove(big_pics[1])
    with pytest.raises(DataError, match="1.png"):  # read again at each use: a file gone since is named
        big.images([1])


def test_image_folder_resize_is_centre_crop(tmp_path):
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, 16:48] = 255  # a white square in the middle of a wide image
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = load_dataset(str(tmp_path), size=32).images([0])[0]  # unlabelled folder of images
    assert x.float().mean() > 250


def test_corrupt_image_names_the_file(tmp_path, monkeypatch):
    """Found as the set is loaded, before any training (not when, and whether, a sample draws it): in a small set by
    decoding every image, in a large one by each file's header and end."""
    _folder(tmp_path)
    (tmp_path / "dog" / "9.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"9\.jpg"):
        load_dataset(str(tmp_path))
    monkeypatch.setattr(data, "FULL_CHECK_N", 0)  # a large set: headers and ends only
    with pytest.raises(DataError, match=r"9\.jpg"):
        load_dataset(str(tmp_path))
    buf = io.BytesIO()
    Image.fromarray(_rgb(1, 40, 48, seed=5)[0]).save(buf, "JPEG")
    (tmp_path / "dog" / "9.jpg").write_bytes(buf.getvalue()[:-200])  # a JPEG cut short: no end marker
    with pytest.raises(DataError, match=r"9\.jpg"):
        load_dataset(str(tmp_path))
    (tmp_path / "dog" / "9.jpg").write_bytes(buf.getvalue())
    assert len(load_dataset(str(tmp_path))) == 7


def test_coco(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    images, anns = [], []
    for i, a in enumerate(_rgb(3, 48, 64)):
        Image.fromarray(a).save(tmp_path / "val2017" / f"{i:012d}.jpg")
        images.append({"id": 100 + i, "file_name": f"{i:012d}.jpg"})
        anns += [{"id": 10 * i + j, "image_id": 100 + i, "caption": f"picture {i} caption {j} "} for j in range(2)]
    images.append({"id": 999, "file_name": "uncaptioned.jpg"})
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    ds = load_dataset(str(tmp_path), split="test")  # test finds val
    assert len(ds) == 3 and ds.captions[1] == "picture 1 caption 0" and ds.all_captions[1][1] == "picture 1 caption 1"
    assert ds.images([0, 2]).shape == (2, 3, 32, 32) and ds.labels is None
    with pytest.raises(DataError, match="captions_train"):
        load_dataset(str(tmp_path), split="train")
    os.remove(tmp_path / "val2017" / f"{2:012d}.jpg")
    with pytest.raises(DataError, match="000000000002.jpg"):
        load_dataset(str(tmp_path / "annotations" / "captions_val2017.json"))


def _shard(path, pics, start=0, cls=True):
    with tarfile.open(path, "w") as tar:
        for i, a in enumerate(pics):
            key = f"{start + i:09d}"
            members = [(f"{key}.png", _png(a)), (f"{key}.txt", f"caption {start + i} ünïcode".encode())]
            if cls:
                members.append((f"{key}.cls", str(i % 3).encode()))
            members.append((f"{key}.json", b"{}"))
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def test_webdataset_shards_and_index_cache(tmp_path, monkeypatch):
    pics = _rgb(7)
    _shard(tmp_path / "00000.tar", pics[:4])
    _shard(tmp_path / "00001.tar", pics[4:], start=4)
    ds = load_dataset(str(tmp_path))
    assert len(ds) == 7 and ds.captions[5] == "caption 5 ünïcode" and ds.labels.tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert torch.equal(ds.images(torch.tensor([6, 1])), torch.from_numpy(pics[[6, 1]]).permute(0, 3, 1, 2))
    assert (tmp_path / "00000.tar.idx.json").exists()
    # a second load reads the cached index: no tar parsing at all
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-indexed")))
    assert set(load_dataset(str(tmp_path), n=3).captions) <= set(ds.captions)  # a subset, from the cached index
    monkeypatch.undo()
    _shard(tmp_path / "00001.tar", pics[4:6], start=4, cls=False)  # a changed shard is re-indexed
    ds2 = load_dataset(str(tmp_path / "00001.tar"))
    assert len(ds2) == 2 and ds2.labels is None and ds2.captions[0] == "caption 4 ünïcode"


def test_webdataset_corrupt_member_names_shard_and_key(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, blob in (("k1.jpg", b"garbage"), ("k1.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match=r"00000\.tar:k1"):  # found as the set is loaded, before any training
        load_dataset(str(tmp_path))
    assert json.loads((tmp_path / "00000.tar.idx.json").read_text())["entries"][0][3] == "a caption"  # indexed


def test_webdataset_splits(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    _shard(tmp_path / "train" / "00000.tar", _rgb(3))
    _shard(tmp_path / "test" / "00000.tar", _rgb(2))
    assert len(load_dataset(str(tmp_path))) == 3 and len(load_dataset(str(tmp_path), split="test")) == 2


def test_tsv_and_csv(tmp_path):
    (tmp_path / "img").mkdir()
    for i, a in enumerate(_rgb(3, 24, 24)):
        Image.fromarray(a).save(tmp_path / "img" / f"{i}.png")
    rows = "".join(f"img/{i}.png\tpicture número {i}\n" for i in range(3))
    (tmp_path / "train.tsv").write_text("image\tcaption\n" + rows)
    (tmp_path / "x.csv").write_text('path,caption\nimg/0.png,"a cat, sitting"\n' + f"{tmp_path}/img/1.png,a dog\n")
    ds = load_dataset(str(tmp_path))  # train.tsv is picked for split train
    assert len(ds) == 3 and ds.captions[2] == "picture número 2" and ds.images([1]).shape == (1, 3, 32, 32)
    c = load_dataset(str(tmp_path / "x.csv"))
    assert c.captions == ["a cat, sitting", "a dog"]
    (tmp_path / "bad.tsv").write_text("img/0.png\tok\nimg/missing.png\tgone\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2.*missing\.png"):
        load_dataset(str(tmp_path / "bad.tsv"))


def test_bad_inputs_are_one_line_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "noimg").mkdir()
    (tmp_path / "noimg" / "a.txt.bak").write_text("x")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "notes.md", arcname="notes.md")
    (tmp_path / "broken.tar").write_bytes(b"\0garbage" * 100)
    cases = {
        tmp_path / "missing": "no such file",
        tmp_path / "empty": "empty",
        tmp_path / "notes.md": "unknown dataset format",
        tmp_path / "empty.tsv": "no rows",
        tmp_path / "noimg": "no images",
        tmp_path / "other.tar.gz": "extract it first",
        tmp_path / "broken.tar": "not a readable tar shard",
    }
    for path, msg in cases.items():
        with pytest.raises(DataError) as e:
            load_dataset(str(path))
        text = str(e.value)
        assert str(path) in text and msg in text and "\n" not in text, text
    _folder(tmp_path / "flat")
    with pytest.raises(DataError, match="no test split"):
        load_dataset(str(tmp_path / "flat"), split="test")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset(str(tmp_path / "flat"), split="dev")


# -----------------------------------------------------------------------------
# the shared real data (skipped when ../shared/data is absent)

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} absent")


@needs_shared
def test_shared_mnist():
    tr = load_dataset(str(SHARED_DATA / "mnist"), size=28)
    te = load_dataset(str(SHARED_DATA / "mnist"), split="test")
    assert len(tr) == 60_000 and len(te) == 10_000 and tr.channels == 1
    assert tr.labels[:5].tolist() == [5, 0, 4, 1, 9] and te.labels[:3].tolist() == [7, 2, 1]
    assert torch.bincount(tr.labels).min() > 5000 and te.images([0]).shape == (1, 1, 32, 32)


@needs_shared
def test_shared_coco_mini():
    tr = load_dataset(str(SHARED_DATA / "coco-mini"))
    va = load_dataset(str(SHARED_DATA / "coco-mini"), split="test")
    assert len(tr) + len(va) == 159 and sum(len(c) for c in tr.all_captions + va.all_captions) == 795
    x = va.images(torch.arange(len(va)))
    assert x.shape == (len(va), 3, 32, 32) and x.float().std() > 20 and all(c for c in va.captions)


@needs_shared
def test_shared_cifar10_jpeg(tmp_path_factory):
    # extract two classes of the test split only: the suite stays fast
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz") as tar:
        tar.extractall(root, members=[m for m in tar if m.name.lstrip("./").startswith(("test/cat/", "test/dog/"))],
                       filter="data")
    ds = load_dataset(str(root), split="test")
    assert ds.classes == ["cat", "dog"] and len(ds) == 2000 and torch.bincount(ds.labels).tolist() == [1000, 1000]
    x = ds.images(torch.arange(0, 2000, 50))
    assert x.shape == (40, 3, 32, 32) and 60 < x.float().mean() < 200


def test_n_is_a_seeded_random_subset_not_the_first_n(tmp_path):
    """Image folders are sorted by class: n must draw across the whole set, and labels must follow their images."""
    _folder(tmp_path / "f", classes=("a", "b", "c", "d"), k=10)
    full = load_dataset(str(tmp_path / "f"), size=16)
    sub = load_dataset(str(tmp_path / "f"), size=16, n=12, seed=1)
    assert len(sub) == 12 and len(set(sub.labels.tolist())) >= 3  # the first 12 would hold 2 classes
    # each kept image is the full set's image with the same label
    pos = {tuple(full.images([i])[0].flatten()[:64].tolist()): i for i in range(len(full))}
    for j in range(12):
        i = pos[tuple(sub.images([j])[0].flatten()[:64].tolist())]
        assert full.labels[i] == sub.labels[j]
    again = load_dataset(str(tmp_path / "f"), size=16, n=12, seed=1)
    other = load_dataset(str(tmp_path / "f"), size=16, n=12, seed=2)
    assert torch.equal(again.images(torch.arange(12)), sub.images(torch.arange(12)))
    assert not torch.equal(other.images(torch.arange(12)), sub.images(torch.arange(12)))


def test_linear_probe_separable_and_chance():
    """Features that carry the label linearly give ~100%; features independent of the label give ~chance."""
    torch.manual_seed(0)
    n_cls, n = 5, 600

    class Set:  # the minimal ImageDataset surface linear_probe reads; pixel (0, 0) stores the label
        def __init__(self, labels):
            self.labels, self.name = labels, "probe"
            self.pix = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
            self.pix[:, 0, 0, 0] = labels.to(torch.uint8) * 50

        def __len__(self):
            return len(self.labels)

        def images(self, idx):
            return self.pix[idx]

    train, test = Set(torch.randint(0, n_cls, (n,))), Set(torch.randint(0, n_cls, (n,)))
    centres = torch.randn(n_cls, 8) * 3
    label_of = lambda x: ((x[:, 0, 0, 0] + 1) / 2 * 255 / 50).round().long()  # normalize() undone
    informative = lambda x: centres[label_of(x)] + torch.randn(len(x), 8)
    noise_only = lambda x: torch.randn(len(x), 8)
    assert data.linear_probe(informative, train, test, device="cpu", batch=128) > 0.95
    assert data.linear_probe(noise_only, train, test, device="cpu", batch=128) < 0.35  # chance is 0.2


def test_shapes_captions_keep_shapes_and_sizes_only():
    ds = load_dataset("shapes", split="test", n=300)
    short = data.shapes_captions(ds.captions, "shapes")
    assert data.shapes_captions(ds.captions, "full") == ds.captions
    for label, cap, full in zip(ds.labels.tolist(), short, ds.captions):
        words = cap.replace(",", "").split()
        assert not set(words) & (set(data.COLOURS) | {"top", "bottom", "left", "right", "centre", "an"}), (cap, full)
        assert words[0] == "a" and ds.classes[label] == next(w for w in words if w in ds.classes), (cap, full)
    pinned = ["a large red circle at the top left and a small blue star on the right", "an orange heart in the centre"]
    assert data.shapes_captions(pinned, "shapes") == ["a large circle and a small star", "a heart"]
    with pytest.raises(data.DataError, match="caption style"):
        data.shapes_captions(ds.captions, "colours")


def test_word_tokenizer_hashes_words_with_no_collision_among_the_embedded_ones():
    tok = data.WordTokenizer()
    words = data.embedded_words()
    assert tok.vocab_size == 259 and len({tok.word_id(w) for w in words}) == len(words)
    # an independent reference for one word: 3 + blake2b-64 (little-endian) mod 256
    ref = 3 + int.from_bytes(hashlib.blake2b(b"circle", digest_size=8).digest(), "little") % 256
    assert tok.word_id("circle") == ref
    ids = tok.encode(["A large Circle.", "an orange star at the top left and a small ring"], 6)
    assert ids.shape == (2, 6) and ids[0].tolist() == [1, tok.word_id("a"), tok.word_id("large"), ref, 2, 0]
    assert ids[1, -1] == tok.EOS  # cut to max_len, EOS kept
    assert tok.decode(ids, words) == ["a large circle", "an orange star at"]
    assert tok.decode(ids[0], ["a"]) == [f"a <{tok.word_id('large')}> <{ref}>"]  # unlisted ids stay ids
    with pytest.raises(ValueError):
        tok.encode(["a"], 1)
