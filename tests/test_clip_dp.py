"""clip_dp.py: per-micro-batch gradients, the micro-batch split, clipping, noise sigma*2C, --init and its own
flags; what every script shares end to end is in test_scripts.py."""
import json

import pytest
import torch

import clip_dp as M
import data
from conftest import TINY, assert_one_error_line, run_script

T = 12  # text length of the tiny model


V = data.WordTokenizer().vocab_size  # 259 word ids


def tiny_model(dtype=torch.float64, size="tiny"):
    torch.manual_seed(0)
    return M.CLIP(16, 4, 3, T, V, **M.SIZES[size]).to(dtype)


def functional(model):
    return ({k: v.detach() for k, v in model.named_parameters()}, {k: v.detach() for k, v in model.named_buffers()})


def pairs(G, Mx, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G, Mx, 3, 16, 16, generator=g, dtype=dtype), torch.randint(3, 259, (G, Mx, T), generator=g)


def flat(g):
    return torch.cat([v.reshape(-1) for v in g.values()])


@pytest.mark.parametrize("size", ["tiny", "cnn-tiny"])  # the ViT and the conv net (the default's kind)
def test_micro_batch_grads_equal_naive_loop_and_ignore_padding(size):
    """vmap over micro-batches == one backward pass per micro-batch on its real pairs only (padding removed)."""
    model = tiny_model(size=size)
    params, buffers = functional(model)
    imgs, toks = pairs(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    grads, losses = M.make_per_example_grads(model, M.clip_loss)(params, buffers, (imgs, toks, mask))
    for i in range(4):
        n = int(mask[i].sum())
        if n < 2:  # no pair to contrast: loss 0, gradient exactly 0
            assert losses[i] == 0 and all((g[i] == 0).all() for g in grads.values())
            continue
        model.zero_grad()
        loss = M.clip_loss(model, imgs[i:i + 1, :n], toks[i:i + 1, :n], mask[i:i + 1, :n])[0]
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach())
        for k, p in model.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-8, atol=1e-12, msg=k)


def test_loss_is_symmetric_infonce():
    """A hand-written InfoNCE on the embeddings: mean over pairs of (CE(image -> captions) + CE(caption -> images))
    / 2."""
    model = tiny_model()
    imgs, toks = pairs(1, 4)
    img, txt, scale = model(imgs[0], toks[0])
    logits = scale * img @ txt.T
    target = torch.arange(4)
    ce = torch.nn.functional.cross_entropy
    ref = 0.5 * (ce(logits, target) + ce(logits.T, target))
    torch.testing.assert_close(M.clip_loss(model, imgs, toks, torch.ones(1, 4, dtype=torch.bool))[0], ref)


def test_a_pair_with_the_same_caption_is_no_negative():
    """Pairs 0 and 2 share a caption: each leaves the other's candidates (in both directions), as a hand-written
    InfoNCE without those two logits says; pairs 1 and 3 keep all four candidates."""
    model = tiny_model()
    imgs, toks = pairs(1, 4)
    toks[0, 2] = toks[0, 0]
    img, txt, scale = model(imgs[0], toks[0])
    logits = scale * img @ txt.T
    ce = lambda row, keep, target: -(row[target] - row[keep].logsumexp(0))
    per_pair = []
    for i in range(4):
        keep = [j for j in range(4) if not (i in (0, 2) and j == 2 - i)]
        per_pair.append(0.5 * (ce(logits[i], keep, i) + ce(logits[:, i], keep, i)))
    torch.testing.assert_close(M.clip_loss(model, imgs, toks, torch.ones(1, 4, dtype=torch.bool))[0],
                               torch.stack(per_pair).mean())


class FixedEmbeddings:
    """encode_image / encode_text from tables: image i -> row i of `img` (i is painted into its pixels);
    a caption -> the row of its first word's bucket."""

    def __init__(self, img, txt):
        self.img, self.txt = img, txt

    def eval(self):
        pass

    def encode_image(self, x):
        return self.img[((x[:, 0, 0, 0] + 1) * 127.5).round().long()]

    def encode_text(self, tokens):
        return self.txt[tokens[:, 1] - data.WordTokenizer.OFFSET]


def test_retrieval_ranks_distinct_captions():
    """4 images captioned "a", "b", "a", "c": 3 distinct captions. image -> text: image 0's "a" is beaten by "b" and
    "c", image 1's "b" by "a"; images 2 and 3 find their own. text -> image: "a" finds image 2 (one of its own),
    "b" finds image 0 (not its own), "c" finds image 3. The two copies of "a" are never ranked against each other."""
    tok = data.WordTokenizer(buckets=8)
    ids = {w: tok.word_id(w) - tok.OFFSET for w in "abc"}
    assert len(set(ids.values())) == 3
    img = torch.tensor([[0.0, 1.0], [0.9, 0.1], [1.0, 0.0], [-1.0, 0.0]])
    txt = torch.zeros(8, 2)
    for w, e in zip("abc", ([1.0, 0.0], [0.0, 1.0], [-1.0, 0.1])):
        txt[ids[w]] = torch.tensor(e)
    pixels = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    ds = data.ImageDataset("toy", size=2, channels=3, pixels=pixels, captions=["a", "b", "a", "c"])
    r = M.retrieval(FixedEmbeddings(img, txt), ds, tok, 4, "cpu")
    assert r == {"image_to_text_r@1": 0.5, "image_to_text_r@5": 1.0, "text_to_image_r@1": pytest.approx(2 / 3),
                 "text_to_image_r@5": 1.0, "distinct_captions": 3}


def test_micro_batches_are_a_per_pair_random_assignment():
    """Each row holds exactly the sampled pairs whose own draw chose it: a pair's micro-batch depends on nothing
    else, so removing a sampled pair empties its slot in its own row and leaves every other row as it was."""
    n, q, K = 500, 0.3, 7
    members, mask, canaries = M.sample_micro_batches(n, q, K, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, replayed
    picked = data.poisson_sample(n, q, generator=g)
    slot = torch.randint(K, (n,), generator=g)
    assert members.shape[0] == K and int(mask.sum()) == len(picked) and len(canaries) == 0
    for j in range(K):
        assert members[j][mask[j]].tolist() == [i for i in picked.tolist() if slot[i] == j]
        assert (members[j][~mask[j]] == 0).all()
    # --audit: 40 joined canaries are indices n .. n + 39 of the same draw, apart from the micro-batches
    members, mask, canaries = M.sample_micro_batches(n, q, K, generator=torch.Generator().manual_seed(5), canaries=40)
    g = torch.Generator().manual_seed(5)
    picked = data.poisson_sample(n + 40, q, generator=g)
    slot = torch.randint(K, (n + 40,), generator=g)
    assert canaries.tolist() == (picked[picked >= n] - n).tolist() and (members[mask] < n).all()
    for j in range(K):
        assert members[j][mask[j]].tolist() == [i for i in picked.tolist() if i < n and slot[i] == j]


def dp_on(model, members, mask, imgs, toks, *, clip, sigma, per_call=2, seed=0):
    """clip_dp.micro_batch_step on pairs stored in imgs (N, 3, 16, 16), toks (N, T)."""
    params, buffers = functional(model)
    peg = M.make_per_example_grads(model, M.clip_loss)
    load_pairs = lambda idx, m: (imgs[idx], toks[idx], m)
    return M.micro_batch_step(peg, params, buffers, members, mask, load_pairs, clip=clip, noise_std=2 * sigma * clip,
                              per_call=per_call, noise_gen=torch.Generator().manual_seed(seed))[0]


def test_each_clipped_micro_batch_gradient_has_norm_at_most_C():
    model = tiny_model()
    imgs, toks = pairs(1, 12, seed=1)
    imgs, toks = imgs[0] * 3, toks[0]
    rows = torch.arange(12).view(4, 3)  # 4 micro-batches of 3 pairs
    params, buffers = functional(model)
    full = torch.ones(4, 3, dtype=torch.bool)
    raw, _ = M.make_per_example_grads(model, M.clip_loss)(params, buffers, (imgs[rows], toks[rows], full))
    raw_norms = torch.stack([flat({k: v[i] for k, v in raw.items()}).norm() for i in range(4)])
    clip = float(raw_norms.median())  # some micro-batches above C, some below
    total = 0
    for j in range(4):
        one = flat(dp_on(model, rows[j:j + 1], torch.ones(1, 3, dtype=torch.bool), imgs, toks, clip=clip, sigma=0.0))
        assert one.norm() <= clip * (1 + 1e-6)  # dp_step measures norms in float32
        torch.testing.assert_close(one.norm(), torch.minimum(raw_norms[j], torch.tensor(clip, dtype=torch.float64)),
                                   rtol=1e-5, atol=0)
        total = total + one
    # the step sums the clipped micro-batch gradients and divides by K, the number of micro-batches
    together = flat(dp_on(model, rows, torch.ones(4, 3, dtype=torch.bool), imgs, toks, clip=clip, sigma=0.0))
    torch.testing.assert_close(together, total / 4)


def test_one_pair_changes_one_micro_batch_only():
    """Remove a pair, or change its caption: only its own micro-batch's gradient moves (the others bit for bit),
    and the clipped sum moves by at most 2C: the sensitivity the noise is calibrated to."""
    model = tiny_model()
    imgs, toks = pairs(1, 12, seed=2)
    imgs, toks = imgs[0], toks[0]
    members = torch.arange(12).view(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    params, buffers = functional(model)
    peg = M.make_per_example_grads(model, M.clip_loss)
    # the image encoder draws a (pooling-invariant) token shuffle from the global generator: same draws both times
    torch.manual_seed(0)
    base, _ = peg(params, buffers, (imgs[members], toks[members], mask))
    removed = mask.clone()
    removed[2, 1] = False  # pair 7 leaves micro-batch 2
    toks2 = toks.clone()
    toks2[7] = torch.randint(3, 259, (T,), generator=torch.Generator().manual_seed(9))  # pair 7 gets another caption
    for m, tk in ((removed, toks), (mask, toks2)):
        torch.manual_seed(0)
        after, _ = peg(params, buffers, (imgs[members], tk[members], m))
        for k in base:
            for j in (0, 1, 3):
                assert torch.equal(after[k][j], base[k][j]), (k, j)
            assert not torch.equal(after[k][2], base[k][2]) or base[k][2].abs().max() == 0
        clip = 1e-3  # every micro-batch gradient is clipped: each moves by up to 2C
        a = flat(dp_on(model, members, mask, imgs, toks, clip=clip, sigma=0.0)) * 4  # the clipped sums
        b = flat(dp_on(model, members, m, imgs, tk, clip=clip, sigma=0.0)) * 4
        assert 0 < (a - b).norm() <= 2 * clip * (1 + 1e-6)


def test_noise_has_std_sigma_2C_over_K():
    """No micro-batch with two pairs leaves only the noise: per coordinate its std must be sigma * 2C / K."""
    model = tiny_model(torch.float32)
    imgs, toks = pairs(1, 4, torch.float32)
    K, sigma, clip = 8, 1.7, 0.5
    members = torch.zeros(K, 2, dtype=torch.long)
    mask = torch.zeros(K, 2, dtype=torch.bool)
    mask[0, 0] = True  # one lone pair: no contrastive loss, no gradient
    z = flat(dp_on(model, members, mask, imgs[0], toks[0], clip=clip, sigma=sigma, seed=3))
    n = z.numel()
    assert n > 5000
    expected = sigma * 2 * clip / K
    # the sample std of n normals has relative standard error ~ 1/sqrt(2n); allow 5 of them
    assert abs(z.std().item() / expected - 1) < 5 / (2 * n) ** 0.5
    assert abs(z.mean().item()) < 5 * expected / n ** 0.5


def test_init_loads_a_mae_dp_encoder(tmp_path):
    import mae_dp
    torch.manual_seed(1)
    mae = mae_dp.MAE(16, 4, 3, **mae_dp.SIZES["tiny"])
    torch.save({"model": mae.state_dict(), "step": 3}, tmp_path / "checkpoint.pt")  # a mae_dp.py checkpoint
    torch.save(mae.state_dict(), tmp_path / "vip_syn.pt")  # the bare ViP-Syn cache
    for f in ("checkpoint.pt", "vip_syn.pt"):
        model = M.CLIP(16, 4, 3, T, V, **M.SIZES["tiny"])
        M.load_encoder(model.encoder, tmp_path / f, "cpu")
        for k, v in mae.encoder.state_dict().items():
            assert torch.equal(model.encoder.state_dict()[k], v), k
    small = M.CLIP(16, 4, 3, T, V, **M.SIZES["small"])
    with pytest.raises(ValueError, match="not this image encoder"):
        M.load_encoder(small.encoder, tmp_path / "vip_syn.pt", "cpu")


FLAGS = TINY["clip_dp.py"]


def test_smoke_run_reports_micro_batches_zero_shot_and_retrieval(smoke_run):
    """The run's own outputs beyond the shared claim (test_scripts.py)."""
    cwd, _ = smoke_run("clip_dp.py")
    s = json.loads((cwd / "run" / "summary.json").read_text())
    assert s["micro_batches_per_step"] == 10  # B / --micro-batch: 40 / 4
    assert s["noise_std_on_sum"] == pytest.approx(2 * s["sigma"] * s["clip"])
    # zero-shot on the 2000 shapes test images, recall on --retrieval-n 100 held-out pairs: counts over those
    zs = s["zero_shot_accuracy_not_private"]
    assert zs * 2000 == pytest.approx(round(zs * 2000)) and s["chance"] == pytest.approx(1 / 10)
    recall = s["retrieval_not_private"]
    U = recall.pop("distinct_captions")
    assert set(recall) == {f"{d}_r@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5)}
    assert 1 <= U <= 20  # shape captions: 10 shapes, large or not
    assert all(v * 100 == pytest.approx(round(v * 100)) or v * U == pytest.approx(round(v * U))
               for v in recall.values())
    assert all(recall[f"{d}_r@1"] <= recall[f"{d}_r@5"] for d in ("image_to_text", "text_to_image"))
    assert set(s["probe_accuracy_not_private"]) == {"random_init", "clip"}


@pytest.mark.parametrize("flags, words", [  # in process: main() raises the one-line error the handler prints
    (["--micro-batch", "0"], "--micro-batch"),
    (["--text-len", "1"], "--text-len"),
])
def test_bad_flags_raise_one_line_errors(tmp_path, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, data.DataError), match=words) as e:
        M.main([*FLAGS, "--steps", "2", *flags, "--out", "bad"])
    assert "\n" not in str(e.value)


def test_a_missing_init_file_exits_with_one_line(tmp_path):
    r = run_script("clip_dp.py", *FLAGS, "--steps", "2", "--init", "/no/such/ckpt.pt", "--out", "bad", cwd=tmp_path)
    assert_one_error_line(r, "/no/such/ckpt.pt")


def test_plain_step_is_dp_step_without_clipping_or_noise():
    """--eps inf's step: the same micro-batches and divisor K as DP-CLIP's, gradients neither clipped nor noised."""
    model = tiny_model()
    params, buffers = functional(model)
    imgs, toks = pairs(6, 3)
    members, pair_mask, _ = M.sample_micro_batches(18, 0.7, 4, generator=torch.Generator().manual_seed(1))
    load_pairs = lambda idx, mask: (imgs.flatten(0, 1)[idx], toks.flatten(0, 1)[idx], mask)
    kw = dict(per_call=3, noise_gen=torch.Generator().manual_seed(0))
    dp, dp_loss = M.micro_batch_step(M.make_per_example_grads(model, M.clip_loss), params, buffers, members, pair_mask,
                                     load_pairs, clip=1e9, noise_std=0.0, **kw)
    plain, plain_loss = M.micro_batch_step(None, params, buffers, members, pair_mask, load_pairs, clip=1.0,
                                           noise_std=2.0, batch_grad=M.make_batch_grad(model, M.clip_loss), **kw)
    assert plain_loss == pytest.approx(dp_loss)
    for k in dp:
        torch.testing.assert_close(plain[k], dp[k], rtol=1e-8, atol=1e-12, msg=k)


def easy_pairs(n, seed, size=16):
    """n images of one circle or one cross (random colour, place and size) on a plain grey background, captioned
    "a circle" / "a cross": a set on which any CLIP with working gradients learns zero-shot in seconds."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    c = (torch.arange(size) + 0.5) / size
    cx, cy, r = (torch.rand(n, 1, 1, generator=g) * w + lo for lo, w in ((0.35, 0.3), (0.35, 0.3), (0.3, 0.15)))
    u, v = (c[None, None, :] - cx) / r, (c[None, :, None] - cy) / r  # (n, 1, S), (n, S, 1)
    inside = torch.where(labels[:, None, None] == 0, data._shape_mask("circle", u, v), data._shape_mask("cross", u, v))
    colour = torch.rand(n, 3, 1, 1, generator=g) * 100 + 155  # bright on a dark background: never invisible
    x = torch.where(inside[:, None], colour, torch.full((n, 3, size, size), 40.0))
    classes = ["circle", "cross"]
    return data.ImageDataset("easy", size=size, channels=3, pixels=x.round().to(torch.uint8), labels=labels,
                             classes=classes, captions=[f"a {classes[k]}" for k in labels.tolist()])


def test_non_private_training_learns_zero_shot_on_an_easy_set():
    """The model, loss and --eps inf step together learn: a broken gradient or a collapsed embedding fails here
    instead of hiding behind DP noise. 150 steps of 64 pairs, the default model: a few seconds on one thread."""
    torch.manual_seed(0)
    train, test = easy_pairs(2000, seed=0), easy_pairs(400, seed=1)
    model = M.CLIP(16, 4, 3, T, V, **M.SIZES["cnn"])
    params, buffers = functional(model)
    opt = torch.optim.AdamW(params.values(), lr=5e-3)
    tok = data.WordTokenizer()
    tokens = tok.encode(train.captions, T)
    load_pairs = lambda idx, mask: (data.normalize(train.images(idx.reshape(-1))).view(*idx.shape, 3, 16, 16),
                                    tokens[idx], mask)
    batch_grad, gen = M.make_batch_grad(model, M.clip_loss), torch.Generator().manual_seed(0)
    for step in range(150):
        members, pair_mask, _ = M.sample_micro_batches(len(train), 64 / len(train), 8, generator=gen)
        for group in opt.param_groups:
            group["lr"] = M.lr_at(step, 150, 5e-3, 10)
        g, loss = M.micro_batch_step(None, params, buffers, members, pair_mask, load_pairs, clip=1.0, noise_std=0.0,
                                     per_call=8, noise_gen=None, batch_grad=batch_grad)
        for k, p in params.items():
            p.grad = g[k]
        opt.step()
    acc, _ = M.zero_shot(model, test, tok, T, "cpu")
    assert acc >= 0.9, (acc, loss)
