"""randp.py: per-example gradients with augmentation multiplicity, the phase switch, the composed privacy claim,
the phase I prior and its cache, and the cached-feature probe; what every script shares end to end is in
test_scripts.py."""
import json
import re
import shutil

import pytest
import torch

import accountant
import data
import randp as R
from conftest import TINY, run_script


def tiny_model(dtype=torch.float64, classes=4):
    torch.manual_seed(0)
    model = R.WRN(0.25, classes).to(dtype)
    for p in model.head.parameters():  # the zero head would zero every body gradient: give it values
        torch.nn.init.normal_(p, std=0.3)
    return model


def functional(model):
    return ({k: v.detach() for k, v in model.named_parameters()}, {k: v.detach() for k, v in model.named_buffers()})


def flat(g):
    return torch.cat([v.reshape(-1) for v in g.values()])


def test_per_example_grads_with_aug_mult_equal_naive_loop():
    model = tiny_model()
    params, buffers = functional(model)
    views, labels = torch.randn(4, 3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 3, 1, 3])  # (B, K, C, H, W)
    grads, losses = R.make_per_example_grads(model, R.classify_loss)(params, buffers, (views, labels))
    for i in range(4):
        model.zero_grad()  # the naive reference: one backward pass per example, on its K views
        loss = R.classify_loss(model, views[i:i + 1], labels[i:i + 1])[0]
        loss.backward()
        assert torch.allclose(losses[i], loss)
        for k, p in model.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-9, atol=1e-12, msg=k)
        # ... which is the mean of the K single-view gradients: averaged BEFORE clipping, one example's gradient
        mean = None
        for j in range(3):
            model.zero_grad()
            R.classify_loss(model, views[i:i + 1, j:j + 1], labels[i:i + 1])[0].backward()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) / 3
            mean = g if mean is None else mean + g
        torch.testing.assert_close(flat({k: v[i] for k, v in grads.items()}), mean, rtol=1e-9, atol=1e-12)


def test_group_norm_keeps_examples_apart():
    """An example's output does not depend on the rest of the batch (BatchNorm's would)."""
    model = tiny_model()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x)[:2], model(x[:2]))


def test_augment_gives_k_views_and_keeps_the_channels():
    imgs = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    views = R.augment(imgs, data.ExampleRandom(0, 0, torch.arange(3)), 4, flip=True)
    assert views.shape == (3, 4, 1, 16, 16) and views.min() >= -1 and views.max() <= 1
    assert not torch.equal(views[0, 0], views[0, 1]) or not torch.equal(views[0, 1], views[0, 2])  # views differ
    # example 1's K views come from its own stream: the same alone as beside others
    alone = R.augment(imgs[1:2], data.ExampleRandom(0, 0, torch.tensor([1])), 4, flip=True)
    assert torch.equal(alone[0], views[1])


@pytest.mark.parametrize("phase", ["linear_probe", "fine_tune"])
def test_phase_switch(phase):
    """Phase II moves the head only (body bit-identical after a step, even with noise); phase III moves all."""
    model = tiny_model(torch.float32)
    params, buffers = functional(model)
    before = {k: v.clone() for k, v in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.5, momentum=0.9)
    views, labels = torch.randn(6, 2, 3, 16, 16), torch.randint(0, 4, (6,))
    trainable, frozen = R.trainable_split(params, buffers, phase)
    noisy, _ = R.dp_step(R.make_per_example_grads(model, R.classify_loss), trainable, frozen,
                         [(torch.arange(6), torch.ones(6, dtype=torch.bool))], lambda i: (views[i], labels[i]),
                         clip=1.0, noise_std=1.0, expected_batch=6, noise_gen=torch.Generator().manual_seed(0))
    for k, p in params.items():  # as main() does
        p.grad = noisy[k].to(p.dtype) if k in noisy else None
    opt.step()
    for k, p in model.named_parameters():  # the model's own parameters share storage with `params`
        moved = not torch.equal(p.detach(), before[k])
        assert moved == (phase == "fine_tune" or k.startswith("head.")), k
    assert set(noisy) == ({"head.weight", "head.bias"} if phase == "linear_probe" else set(params))


FLAGS = TINY["randp.py"]


def test_smoke_run_composes_its_two_phases(smoke_run):
    """The run's own outputs beyond the shared claim (test_scripts.py): phases II and III under one accountant,
    the EMA weights, the cached prior, and the test accuracy it reports."""
    cwd, r = smoke_run("randp.py")
    s = json.loads((cwd / "run" / "summary.json").read_text())
    assert [(p["phase"], p["steps"]) for p in s["phases"]] == [("linear_probe", 2), ("fine_tune", 2)]
    # the claim: one accountant composed over the logged phases
    composed = accountant.RDPAccountant()
    for p in s["phases"]:
        composed.step(q=p["q"], sigma=p["sigma"], steps=p["steps"])
    assert s["eps"] == pytest.approx(composed.epsilon(s["delta"]))
    lines = [json.loads(l) for l in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(l["step"], l["phase"]) for l in lines] == [(2, "linear_probe"), (4, "fine_tune")]
    assert lines[0]["eps"] < lines[1]["eps"] == pytest.approx(s["eps"])
    ck = torch.load(cwd / "run" / "checkpoint.pt", weights_only=True)
    assert set(ck["ema"]) == set(dict(R.WRN(0.25, 10).named_parameters()))
    assert len(list((cwd / "runs" / "cache").glob("randp_prior_*.pt"))) == 1
    # the accuracy printed is the summary's: a count of correct shapes-test images over all n of them
    ((n, printed),) = re.findall(r"test accuracy \(EMA weights, shapes-test, n=(\d+)\): ([\d.]+)", r.stdout)
    acc, n = s["test_accuracy"], int(n)
    assert s["test_data"] == "shapes-test" and float(printed) == pytest.approx(acc, abs=5e-5)
    assert acc * n == pytest.approx(round(acc * n))


def test_prior_is_cached_and_no_prior_is_phase_three_only(smoke_run, tmp_path):
    cwd = tmp_path
    shutil.copytree(smoke_run("randp.py")[0] / "runs", cwd / "runs")  # the phase I cache
    r = run_script("randp.py", "--eps", "4", "--steps", "2", "--lp-steps", "1", "--out", "run2", *FLAGS, cwd=cwd)
    assert r.returncode == 0 and "phase I: loaded" in r.stdout, r.stderr[-3000:]
    assert "phase I: built" not in r.stdout
    r = run_script("randp.py", "--eps", "4", "--steps", "2", "--no-prior", "--out", "base", *FLAGS, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((cwd / "base" / "summary.json").read_text())
    assert not s["prior"] and [(p["phase"], p["steps"]) for p in s["phases"]] == [("linear_probe", 0), ("fine_tune", 2)]
    assert not (cwd / "base" / "priors.png").exists()


def test_the_non_private_reference_has_its_own_lr_and_momentum(smoke_run, tmp_path, monkeypatch):
    """Unclipped, DP-SGD's lr 2.5 diverges: --eps inf defaults to lr 0.05 with momentum 0.9 (both chosen on the
    public proxy), and lp-lr 0.05; a DP run keeps lr 2.5, lp-lr 0.5, no momentum; a flag wins over either default."""
    cwd, _ = smoke_run("randp.py")
    s = json.loads((cwd / "run" / "summary.json").read_text())
    assert (s["args"]["lr"], s["args"]["lp_lr"], s["args"]["momentum"]) == (2.5, 0.5, 0.0)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cwd / "runs", tmp_path / "runs")  # the phase I cache
    R.main(["--eps", "inf", "--steps", "2", "--lp-steps", "1", "--out", "inf", *FLAGS])
    R.main(["--eps", "inf", "--steps", "2", "--lp-steps", "1", "--lr", "0.2", "--out", "inf_lr", *FLAGS])
    args = [json.loads((tmp_path / d / "summary.json").read_text())["args"] for d in ("inf", "inf_lr")]
    assert [(a["lr"], a["lp_lr"], a["momentum"]) for a in args] == [(0.05, 0.05, 0.9), (0.2, 0.05, 0.9)]


def test_eps_inf_probes_the_cached_features_when_asked(tmp_path, monkeypatch):
    """--eps inf --lp-features cached: the reference's phase II reads each example's cached features (B, D), as the
    DP run's does, not augmented images (B, K, C, H, W); phase III trains the whole model on images."""
    monkeypatch.chdir(tmp_path)
    seen, plain_step = [], R.plain_step

    def spy(grads_fn, params, buffers, physical_batches, load, **kw):
        seen.append((sorted(params) == ["head.bias", "head.weight"], load(physical_batches[0][0])[0].dim()))
        return plain_step(grads_fn, params, buffers, physical_batches, load, **kw)

    monkeypatch.setattr(R, "plain_step", spy)
    R.main(["--eps", "inf", "--steps", "3", "--lp-steps", "2", "--lp-features", "cached", "--out", "run", *FLAGS])
    assert seen == [(True, 2), (True, 2), (False, 5)]


def test_resume_of_a_checkpoint_older_than_the_cached_probe(tmp_path, monkeypatch):
    """A checkpoint written before --lp-features existed resumes as its run was, on augmented views, not on the
    newer default (cached features)."""
    monkeypatch.chdir(tmp_path)
    write = data.save_atomic

    def write_then_stop(obj, path, **kw):  # a run of 6 steps that ends once its step-2 checkpoint is written
        write(obj, path, **kw)
        if kw.get("step") == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(data, "save_atomic", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        R.main(["--eps", "4", "--steps", "6", "--lp-steps", "3", "--out", "run", *FLAGS])
    data.release_out_dirs()  # as the process's exit would
    monkeypatch.undo()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    del ck["args"]["lp_features"]
    torch.save(ck, tmp_path / "run" / "checkpoint.pt")
    r = run_script("randp.py", "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 6 and s["args"]["lp_features"] == "augmented"


def test_lp_steps_not_below_steps_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--lp-steps") as e:  # the script's handler prints it as one error: line
        R.main([*FLAGS, "--steps", "2", "--lp-steps", "2", "--out", "bad"])
    assert "\n" not in str(e.value)


def test_the_prior_builder_is_deterministic_and_cached_by_its_flags(tmp_path):
    """--build-prior trains phase I alone; the result depends on its flags only, and a second call reads it."""
    bodies = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        r = run_script("randp.py", "--build-prior", *FLAGS, cwd=tmp_path / d)
        assert r.returncode == 0 and "phase I: built" in r.stdout, r.stderr[-3000:]
        run = tmp_path / d / "runs" / "randp_eps3_s0"  # no DP run: no model, summary, log or checkpoint
        assert not [f for f in run.glob("*") if f.suffix in (".pt", ".json", ".jsonl")]
        (cache,) = (tmp_path / d / "runs" / "cache").glob("randp_prior_*_c3_*.pt")
        bodies.append(torch.load(cache, weights_only=True))
    assert bodies[0].keys() == bodies[1].keys() and all(torch.equal(bodies[0][k], bodies[1][k]) for k in bodies[0])
    r = run_script("randp.py", "--build-prior", *FLAGS, cwd=tmp_path / "a")
    assert r.returncode == 0 and "phase I: found" in r.stdout
    r = run_script("randp.py", "--build-prior", *FLAGS, "--prior-steps", "2", cwd=tmp_path / "a")  # other flags
    assert r.returncode == 0 and "phase I: built" in r.stdout
    assert len(list((tmp_path / "a" / "runs" / "cache").glob("randp_prior_*.pt"))) == 2


def test_a_grey_set_gets_a_grey_prior():
    """MNIST-like data (1 channel): the model's stem and the prior's images have one channel, the BT.601 luma of
    the colour random-process images (data.to_grey); the views' luma equals the colour views' luma."""
    model = R.WRN(0.25, 10, channels=1)
    assert model.stem.weight.shape[1] == 1
    imgs = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    grey = R.prior_views(imgs, torch.Generator().manual_seed(0), 1)
    colour = R.prior_views(imgs, torch.Generator().manual_seed(0), 3)
    assert grey.shape == (4, 1, 16, 16)
    torch.testing.assert_close(grey, (colour * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True))
    assert model(grey).shape == (4, 10)


def test_cached_feature_probe_grads_equal_naive_loop():
    """Phase II with --lp-features cached: the per-example gradient of the head on fixed features."""
    model = tiny_model()
    params, buffers = functional(model)
    trainable, frozen = R.trainable_split(params, buffers, "linear_probe")
    x, labels = torch.randn(5, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 3, 1, 3, 2])
    with torch.no_grad():
        feats = model.features(x)
    peg = R.make_per_example_grads(model, lambda f, z, y: torch.nn.functional.cross_entropy(f(z, True), y,
                                                                                            reduction="none"))
    grads, losses = peg(trainable, frozen, (feats, labels))
    assert set(grads) == {"head.weight", "head.bias"}
    for i in range(5):
        model.zero_grad()
        loss = R.classify_loss(model, x[i:i + 1, None], labels[i:i + 1])[0]  # through the whole model, K = 1
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach())
        for k in grads:
            torch.testing.assert_close(grads[k][i], dict(model.named_parameters())[k].grad, rtol=1e-9, atol=1e-12)


def test_cached_feature_probe_runs_end_to_end(smoke_run, tmp_path):
    cwd, _ = smoke_run("randp.py")
    shutil.copytree(cwd / "runs", tmp_path / "runs")  # the phase I cache
    r = run_script("randp.py", "--eps", "4", "--steps", "4", "--lp-steps", "2", "--lp-features", "cached",
                   "--out", "c", *FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["steps"] == 4 and s["eps"] <= 4 and s["test_accuracy"] > 0


def test_eps_inf_learns(tmp_path):
    """The non-private reference learns: a small --eps inf run at its own defaults (lr 0.05, lp-lr 0.05, momentum
    0.9) reaches 34-37% on shapes (chance 10%). At the DP learning rates (lr 2.5, momentum 0), unclipped SGD
    diverges and this run stays at 10-12%."""
    r = run_script("randp.py", "--eps", "inf", "--width", "0.25", "--n", "4000", "--batch-size", "128",
                   "--physical-batch", "128", "--steps", "150", "--lp-steps", "10", "--prior-steps", "50",
                   "--prior-batch", "32", "--log-every", "50", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["args"]["lr"], s["args"]["lp_lr"], s["args"]["momentum"]) == (0.05, 0.05, 0.9)
    assert s["test_accuracy"] > 0.25
