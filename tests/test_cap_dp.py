"""cap_dp.py: per-example gradients, padding, tokenizer, clipping, noise, zero-shot, --init, TAN, and its own flags
and inputs end to end (COCO and webdataset written here); what every script shares is in test_scripts.py."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

import accountant
import cap_dp as C
import data
from conftest import TINY, assert_one_error_line, run_script

TOK = data.WordTokenizer()
# captions of 1 to 7 words
CAPTIONS = ["a red circle", "a large blue star at the top", "ü", "日本語 の キャプション", "a small green heart"]


def tiny_model(dtype=torch.float64, max_len=24, size="tiny"):
    torch.manual_seed(0)
    return C.Captioner(16, 4, 3, **C.SIZES[size], max_len=max_len, vocab=TOK.vocab_size).to(dtype)


def functional(model):
    return ({k: v.detach() for k, v in model.named_parameters()}, {k: v.detach() for k, v in model.named_buffers()})


def batch(k=5, T=24, dtype=torch.float64):
    return torch.rand(k, 3, 16, 16, dtype=dtype) * 2 - 1, TOK.encode(CAPTIONS[:k], T)


@pytest.mark.parametrize("size", ["tiny", "cnn-tiny"])  # the ViT and the conv net (the default's kind)
def test_per_example_grads_equal_naive_loop(size):
    model = tiny_model(size=size)
    params, buffers = functional(model)
    x, tok = batch()
    grads, losses = C.make_per_example_grads(model, C.caption_loss)(params, buffers, (x, tok))
    for i in range(len(x)):  # the naive reference: one backward pass per example
        model.zero_grad()
        loss = C.caption_loss(model, x[i:i + 1], tok[i:i + 1])[0]
        loss.backward()
        assert torch.allclose(losses[i], loss)
        for k, p in model.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_padding_tokens_carry_no_loss():
    model = tiny_model(max_len=48)
    x, tok = batch(T=12)  # long enough for every caption: none is cut
    # more padding after EOS changes nothing: PAD targets are masked, and causal attention hides PAD inputs
    torch.testing.assert_close(C.caption_loss(model, x, tok), C.caption_loss(model, x, TOK.encode(CAPTIONS, 48)))
    # the loss is the mean over exactly the non-PAD targets (words and EOS): logits at PAD targets never count
    logits = torch.randn(len(x), tok.shape[1] - 1, TOK.vocab_size, dtype=torch.float64)
    pad = tok[:, 1:] == TOK.PAD
    moved = logits + 100 * torch.randn_like(logits) * pad[..., None]
    base = C.caption_loss(lambda *_: logits, x, tok)
    torch.testing.assert_close(C.caption_loss(lambda *_: moved, x, tok), base)
    nll = -logits.log_softmax(-1).gather(-1, tok[:, 1:, None])[..., 0]
    torch.testing.assert_close(base, (nll * ~pad).sum(1) / (~pad).sum(1))
    assert (~pad).sum(1).tolist() == [len(TOK.words(c)) + 1 for c in CAPTIONS]


def test_prompts_are_tokenised_like_the_training_captions():
    """Zero-shot scores a class's prompts with the tokens a training caption of that class gets: same word ids,
    whatever the case and punctuation (a hash of the lowercase word)."""
    shapes = data.load_dataset("shapes", split="test", n=50)
    caps = data.shapes_captions(shapes.captions, "shapes")
    prompts = [p for ps in C.class_prompts(shapes, "shapes") for p in ps]
    for c in caps:
        assert TOK.encode([c], 8).tolist()[0] in TOK.encode(prompts, 8).tolist(), c
    assert torch.equal(TOK.encode(["A Large CIRCLE."], 8), TOK.encode(["a large circle"], 8))


def step(model, xs, tok, *, clip, sigma, expected_batch, seed=0):
    params, buffers = functional(model)
    peg = C.make_per_example_grads(model, C.caption_loss)
    idx = torch.arange(len(xs))
    micro = [(idx, torch.ones(len(xs), dtype=torch.bool))]
    g, _ = C.dp_step(peg, params, buffers, micro, lambda i: (xs[i], tok[i]), clip=clip, noise_std=sigma * clip,
                     expected_batch=expected_batch, noise_gen=torch.Generator().manual_seed(seed))
    return torch.cat([v.reshape(-1) for v in g.values()])


def test_clipping_padding_slots_and_noise():
    model = tiny_model()
    xs, tok = batch()
    params, buffers = functional(model)
    raw, _ = C.make_per_example_grads(model, C.caption_loss)(params, buffers, (xs, tok))
    raw_norms = torch.stack([torch.cat([v[i].reshape(-1) for v in raw.values()]).norm() for i in range(len(xs))])
    clip = float(raw_norms.median())  # some examples above C, some below
    ones = [step(model, xs[i:i + 1], tok[i:i + 1], clip=clip, sigma=0.0, expected_batch=1) for i in range(len(xs))]
    for g, r in zip(ones, raw_norms):
        torch.testing.assert_close(g.norm(), torch.minimum(r, torch.tensor(clip, dtype=r.dtype)), rtol=1e-5, atol=0)
    torch.testing.assert_close(step(model, xs, tok, clip=clip, sigma=0.0, expected_batch=10), sum(ones) / 10)
    # padding slots of a micro-batch (mask False) contribute nothing
    peg = C.make_per_example_grads(model, C.caption_loss)
    mask = torch.tensor([True, False, True, False, False])
    g, _ = C.dp_step(peg, params, buffers, [(torch.arange(5), mask)], lambda i: (xs[i], tok[i]), clip=clip,
                     noise_std=0.0, expected_batch=1, noise_gen=torch.Generator())
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in g.values()]), ones[0] + ones[2])
    # an empty Poisson sample leaves only the noise: std sigma*C/B per coordinate
    model32 = tiny_model(torch.float32)
    p32, b32 = functional(model32)
    empty = [(torch.arange(2), torch.zeros(2, dtype=torch.bool))]
    g, _ = C.dp_step(C.make_per_example_grads(model32, C.caption_loss), p32, b32, empty,
                     lambda i: (xs[i].float(), tok[i]), clip=0.5, noise_std=1.7 * 0.5, expected_batch=8.0,
                     noise_gen=torch.Generator().manual_seed(3))
    z = torch.cat([v.reshape(-1) for v in g.values()])
    assert z.numel() > 5000 and abs(z.std().item() / (1.7 * 0.5 / 8) - 1) < 5 / (2 * z.numel()) ** 0.5


def test_zero_shot_of_a_tiny_trained_model_beats_chance():
    """A tiny captioner trained (non-privately, a few seconds) on 'a photo of a <colour>' for solid-colour images
    classifies held-out images zero-shot by caption loss far above chance (1/4)."""
    names = ["red", "green", "blue", "white"]
    rgb = torch.tensor([[220, 30, 35], [40, 175, 60], [35, 70, 230], [250] * 3])
    g = torch.Generator().manual_seed(0)

    def make(n):
        labels = torch.randint(0, 4, (n,), generator=g)
        px = (rgb[labels][:, :, None, None] + torch.randint(-20, 20, (n, 3, 16, 16), generator=g)).clamp(0, 255)
        return data.ImageDataset("colours", size=16, channels=3, pixels=px.to(torch.uint8), labels=labels,
                                 classes=names, captions=[f"a photo of a {names[i]}" for i in labels.tolist()])

    train, test = make(256), make(100)
    torch.manual_seed(0)
    model = C.Captioner(16, 8, 3, **C.SIZES["tiny"], max_len=24, vocab=TOK.vocab_size)
    x, tok = data.normalize(train.images(torch.arange(256))), TOK.encode(train.captions, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(60):
        b = torch.randint(0, 256, (64,), generator=g)
        loss = C.caption_loss(model, x[b], tok[b]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert C.zero_shot(model, test, TOK, "cpu", 24, 100) > 0.6
    caps = C.greedy_captions(model, data.normalize(test.images(torch.arange(4))), TOK, 24, ["a", "photo", "of", *names])
    assert caps == [f"a photo of a {names[i]}" for i in test.labels[:4].tolist()]  # decoded up to EOS, no padding


def test_class_prompts_follow_the_caption_grammar():
    shapes = data.load_dataset("shapes", split="test", n=10)
    prompts = C.class_prompts(shapes)
    assert len(prompts) == 10 and "an orange circle" in prompts[0] and "a red circle" in prompts[0]
    assert all(shapes.classes[i] in p for i, ps in enumerate(prompts) for p in ps)


def test_init_loads_a_mae_checkpoint_and_the_syn_cache(tmp_path):
    import mae_dp

    torch.manual_seed(1)
    mae = mae_dp.MAE(16, 4, 3, **mae_dp.SIZES["tiny"])
    torch.save({"model": mae.state_dict(), "step": 3}, tmp_path / "checkpoint.pt")  # a mae_dp.py run
    torch.save(mae.state_dict(), tmp_path / "vip_syn.pt")  # its ViP-Syn cache: a bare state_dict
    for f in ("checkpoint.pt", "vip_syn.pt"):
        cap = tiny_model(torch.float32)
        C.load_encoder(cap, tmp_path / f)
        for k, v in mae.encoder.state_dict().items():
            assert torch.equal(cap.encoder.state_dict()[k], v), k
    wrong = C.Captioner(16, 8, 3, **C.SIZES["tiny"], max_len=24, vocab=TOK.vocab_size)  # another patch: an error
    with pytest.raises(ValueError, match="--patch"):
        C.load_encoder(wrong, tmp_path / "vip_syn.pt")


FLAGS = TINY["cap_dp.py"]


def test_smoke_run_reports_zero_shot_captions_and_probes(smoke_run):
    """The run's own outputs beyond the shared claim (test_scripts.py)."""
    cwd, r = smoke_run("cap_dp.py")
    s = json.loads((cwd / "run" / "summary.json").read_text())
    assert set(s["probe_accuracy_not_private"]) == {"random_init", "dp_cap"}
    # zero-shot is scored on exactly --zero-shot-n 20 test images: a count of them, over 20
    zs = s["zero_shot_accuracy_not_private"]
    assert zs * 20 == pytest.approx(round(zs * 20)) and s["zero_shot_chance"] == pytest.approx(1 / 10)
    assert len(s["captions_not_private"]) == 8
    assert f"zero-shot accuracy (not private): {zs:.3f}" in r.stdout


def test_tan_reports_the_eps_it_spent(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    C.main(["--eps", "4", "--steps", "3", "--tan-batch", "10", *FLAGS, "--out", "tan"])
    s = json.loads((tmp_path / "tan" / "summary.json").read_text())
    full = accountant.dp_sgd_plan(target_eps=4, n=300, batch_size=40, steps=3)
    # sigma'/B' = sigma/B: the noise in each update is that of the simulated run ...
    assert s["sigma"] / s["batch_size"] == pytest.approx(full["sigma"] / 40) and s["q"] == pytest.approx(10 / 300)
    # ... but the privacy is that of what ran: a smaller sigma, so a larger eps than the simulated run's
    assert s["eps"] == pytest.approx(accountant.epsilon(q=10 / 300, sigma=s["sigma"], steps=3, delta=1 / 600))
    assert s["eps"] > 4 and s["tan"]["simulated_batch_size"] == 40
    assert "NOT the eps" in capsys.readouterr().out


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_coco_and_webdataset_train_for_a_step(tmp_path, monkeypatch):
    pics = (torch.rand(6, 20, 24, 3) * 255).to(torch.uint8).numpy()
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    for i, a in enumerate(pics):
        Image.fromarray(a).save(coco / "train2017" / f"{i:012d}.jpg")
    (coco / "annotations" / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(6)],
        "annotations": [{"id": i, "image_id": i, "caption": f"a photo number {i}, très jolie"} for i in range(6)]}))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, a in enumerate(pics):
            for name, blob in ((f"{i:06d}.png", _png(a)), (f"{i:06d}.txt", f"ein Bild {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    monkeypatch.chdir(tmp_path)
    for path in (coco, tmp_path / "00000.tar"):
        C.main(["--data", str(path), *FLAGS, "--n", "6", "--batch-size", "4", "--steps", "1", "--out", path.stem])
        s = json.loads((tmp_path / path.stem / "summary.json").read_text())
        assert s["n"] == 6 and s["steps"] == 1 and s["eps"] <= 8


@pytest.mark.parametrize("flags, words", [
    (["--max-len", "1"], "--max-len"),
])
def test_bad_flags_raise_one_line_value_errors(tmp_path, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=words) as e:
        C.main([*FLAGS, "--steps", "2", *flags, "--out", "bad"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, words", [  # as a user sees them: the script's handler, one line, exit code 2
    (["--tan-batch", "80"], "--tan-batch"),
    (["--init", "/no/such/ckpt.pt"], "/no/such/ckpt.pt"),
])
def test_bad_flags_exit_with_one_line(tmp_path, flags, words):
    r = run_script("cap_dp.py", *FLAGS, "--steps", "2", *flags, "--out", "bad", cwd=tmp_path)
    assert_one_error_line(r, words)


def test_non_private_training_learns_zero_shot_on_an_easy_set():
    """The captioner, its loss and the --eps inf step together learn to say "circle" or "cross" (zero-shot by caption
    loss): a broken gradient fails here instead of hiding behind DP noise. The default model, 300 steps of 64: seconds on one thread."""
    from test_clip_dp import easy_pairs

    torch.manual_seed(0)
    train, test = easy_pairs(2000, seed=0), easy_pairs(400, seed=1)
    model = C.Captioner(16, 4, 3, **C.SIZES["cnn"], max_len=12, vocab=TOK.vocab_size)
    params, buffers = functional(model)
    opt = torch.optim.AdamW(params.values(), lr=5e-3)
    tokens = TOK.encode(train.captions, 12)
    load = lambda idx: (data.normalize(train.images(idx)), tokens[idx])
    batch_grad = C.make_batch_grad(model, C.caption_loss)
    for step, (micro_batches, _) in enumerate(data.poisson_batches(len(train), 64 / len(train), 300, 64,
                                                              generator=torch.Generator().manual_seed(0))):
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, 300, 5e-3, 10)
        g, loss = C.plain_step(batch_grad, params, buffers, micro_batches, load, expected_batch=64)
        for k, p in params.items():
            p.grad = g[k]
        opt.step()
    acc = C.zero_shot(model, test, TOK, "cpu", 12, len(test))
    assert acc >= 0.9, (acc, loss)
