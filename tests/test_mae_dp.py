"""mae_dp.py: per-example gradients, clipping, noise, and the script end to end (tiny sizes)."""
import json

import pytest
import torch

import accountant
import mae_dp as M
from conftest import assert_one_error_line, run_script


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    return M.MAE(16, 4, 3, **M.SIZES["tiny"]).to(dtype)


def functional(model):
    return ({k: v.detach() for k, v in model.named_parameters()}, {k: v.detach() for k, v in model.named_buffers()})


def loss_fn(f, x, noise):
    return M.mae_loss(f, x, noise, 0.75, 4)


def test_per_example_grads_equal_naive_loop():
    model = tiny_model()
    params, buffers = functional(model)
    x, noise = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.rand(6, 16, dtype=torch.float64)
    grads, losses = M.make_per_example_grads(model, loss_fn)(params, buffers, (x, noise))
    for i in range(6):  # the naive reference: one backward pass per example
        model.zero_grad()
        loss = M.mae_loss(model, x[i:i + 1], noise[i:i + 1], 0.75, 4)[0]
        loss.backward()
        assert torch.allclose(losses[i], loss)
        for k, p in model.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_loss_reads_only_masked_patches():
    """Changing the target on a visible patch changes nothing; on a masked patch it changes the loss."""
    model = tiny_model()
    x, noise = torch.randn(1, 3, 16, 16, dtype=torch.float64), torch.rand(1, 16, dtype=torch.float64)
    fwd = lambda imgs, r, n: model(x, r, n)  # the model always sees x; only the target image varies
    base = M.mae_loss(fwd, x, noise, 0.75, 4)
    order = noise[0].argsort()  # the 4 smallest-noise patches are kept, the rest masked
    for patch, changes in ((order[0], False), (order[-1], True)):
        y = M.patchify(x, 4).clone()
        y[0, patch] = torch.randn_like(y[0, patch]) * 3
        loss = M.mae_loss(fwd, M.unpatchify(y, 4, 3), noise, 0.75, 4)
        assert (not torch.allclose(loss, base)) == changes


def step(model, xs, noise, *, clip, sigma, expected_batch, seed=0):
    params, buffers = functional(model)
    peg = M.make_per_example_grads(model, loss_fn)
    idx = torch.arange(len(xs))
    micro = [(idx, torch.ones(len(xs), dtype=torch.bool))]
    g, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), clip=clip, sigma=sigma,
                     expected_batch=expected_batch, noise_gen=torch.Generator().manual_seed(seed))
    return g


def flat(g):
    return torch.cat([v.reshape(-1) for v in g.values()])


def test_each_clipped_gradient_has_norm_at_most_C():
    model = tiny_model()
    xs, noise = torch.randn(5, 3, 16, 16, dtype=torch.float64) * 3, torch.rand(5, 16, dtype=torch.float64)
    params, buffers = functional(model)
    raw, _ = M.make_per_example_grads(model, loss_fn)(params, buffers, (xs, noise))
    raw_norms = torch.stack([flat({k: v[i] for k, v in raw.items()}).norm() for i in range(5)])
    clip = float(raw_norms.median())  # some examples above C, some below
    total = None
    for i in range(5):
        one = flat(step(model, xs[i:i + 1], noise[i:i + 1], clip=clip, sigma=0.0, expected_batch=1))
        assert one.norm() <= clip * (1 + 1e-9)
        # min(||g||, C), up to the 1e-6 that guards the division against a zero gradient
        torch.testing.assert_close(one.norm(), torch.minimum(raw_norms[i], torch.tensor(clip, dtype=torch.float64)),
                                   rtol=1e-5, atol=0)
        total = one if total is None else total + one
    # the step sums the clipped gradients and divides by the expected batch size, not the realised one
    together = flat(step(model, xs, noise, clip=clip, sigma=0.0, expected_batch=10))
    torch.testing.assert_close(together, total / 10)


def test_padding_slots_contribute_nothing():
    model = tiny_model()
    xs, noise = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.rand(4, 16, dtype=torch.float64)
    params, buffers = functional(model)
    peg = M.make_per_example_grads(model, loss_fn)
    mask = torch.tensor([True, False, True, False])
    g, _ = M.dp_step(peg, params, buffers, [(torch.arange(4), mask)], lambda i: (xs[i], noise[i]), clip=1.0,
                     sigma=0.0, expected_batch=1, noise_gen=torch.Generator())
    ref = flat(step(model, xs[[0, 2]], noise[[0, 2]], clip=1.0, sigma=0.0, expected_batch=1))
    torch.testing.assert_close(flat(g), ref)


def test_noise_has_std_sigma_C_over_B():
    """An empty Poisson sample leaves only the noise: its std must be sigma*C/B_expected per coordinate."""
    model = tiny_model(torch.float32)
    params, buffers = functional(model)
    peg = M.make_per_example_grads(model, loss_fn)
    xs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    empty = [(torch.arange(2), torch.zeros(2, dtype=torch.bool))]
    sigma, clip, B = 1.7, 0.5, 8.0
    g, _ = M.dp_step(peg, params, buffers, empty, lambda i: (xs[i], noise[i]), clip=clip, sigma=sigma,
                     expected_batch=B, noise_gen=torch.Generator().manual_seed(3))
    z = flat(g)
    n = z.numel()
    assert n > 5000
    expected = sigma * clip / B
    # the sample std of n normals has relative standard error ~ 1/sqrt(2n); allow 5 of them
    assert abs(z.std().item() / expected - 1) < 5 / (2 * n) ** 0.5
    assert abs(z.mean().item()) < 5 * expected / n ** 0.5


def test_canaries_go_through_the_same_clip_sum_and_noise():
    """--audit: canary gradients (one coordinate each) are clipped to C, summed, noised sigma*C, divided by B,
    like the examples' gradients; the model's own gradient is unchanged by them apart from its noise draw."""
    model = tiny_model(torch.float32)
    params, buffers = functional(model)
    peg = M.make_per_example_grads(model, loss_fn)
    xs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    micro = [(torch.arange(4), torch.ones(4, dtype=torch.bool))]
    canaries = torch.zeros(3000)
    canaries[::3] = 10.0  # 1000 sampled canaries of norm 10 C
    kw = dict(clip=0.5, expected_batch=8.0)
    g0, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), sigma=0.0,
                      noise_gen=torch.Generator().manual_seed(0), **kw)
    g, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), sigma=0.0,
                     noise_gen=torch.Generator().manual_seed(0), canaries=canaries, **kw)
    assert torch.allclose(g.pop("canaries"), (canaries > 0) * 0.5 / 8.0, atol=1e-6)  # clipped to C, then / B
    assert all(torch.equal(g[k], g0[k]) for k in g0)
    gn, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), sigma=2.0,
                      noise_gen=torch.Generator().manual_seed(1), canaries=canaries, **kw)
    z = gn["canaries"][1::3]  # the canaries not sampled: noise only
    assert abs(z.std().item() / (2.0 * 0.5 / 8.0) - 1) < 5 / (2 * z.numel()) ** 0.5

TINY = ["--model", "tiny", "--size", "16", "--n", "300", "--batch-size", "40", "--physical-batch", "16",
        "--syn-steps", "3", "--syn-batch", "8", "--probe-n", "200", "--log-every", "2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("mae")
    r = run_script("mae_dp.py", "--eps", "4", "--steps", "4", "--out", "run", *TINY, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, r


def test_smoke_run_writes_a_true_claim(smoke):
    cwd, r = smoke
    s = json.loads((cwd / "run" / "summary.json").read_text())
    assert s["steps"] == 4 and s["n"] == 300 and s["delta"] == pytest.approx(1 / 600)
    assert s["q"] == pytest.approx(40 / 300)
    assert s["eps"] <= 4.0
    assert s["eps"] == pytest.approx(accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=4, delta=s["delta"]))
    assert set(s["probe_accuracy_not_private"]) == {"random_init", "vip_syn", "vip"}
    lines = [json.loads(l) for l in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4]
    assert (cwd / "run" / "recon.png").stat().st_size > 0
    assert "eps=" in r.stdout


def test_resume_continues_step_and_epsilon(smoke, tmp_path):
    cwd, _ = smoke
    # a run of 6 steps stopped at 4: copy the 4-step checkpoint, pretend its plan was 6 steps, resume
    import shutil
    shutil.copytree(cwd / "run", tmp_path / "run")
    shutil.copytree(cwd / "runs", tmp_path / "runs")  # the ViP-Syn cache
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and ck["accountant"]
    ck["args"]["steps"] = 6
    eps4 = accountant.RDPAccountant()
    eps4.load_state_dict(ck["accountant"])
    torch.save(ck, tmp_path / "run" / "checkpoint.pt")
    r = run_script("mae_dp.py", "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step 4" in r.stdout
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 6
    # epsilon continues from the checkpoint: 4 steps at the old sigma + 2 more, not 2 from scratch
    eps4.step(q=s["q"], sigma=s["sigma"], steps=2)
    assert s["eps"] == pytest.approx(eps4.epsilon(s["delta"]))
    assert s["eps"] > accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=2, delta=s["delta"])


@pytest.mark.parametrize("flags, words", [
    (["--eps", "0"], "eps"),
    (["--eps", "-1"], "eps"),
    (["--delta", "0.01"], "delta"),  # >= 1/N for N = 300
    (["--batch-size", "301"], "batch"),
    (["--data", "/no/such/path"], "/no/such/path"),
])
def test_bad_flags_exit_with_one_line(tmp_path, flags, words):
    r = run_script("mae_dp.py", *TINY, "--steps", "2", *flags, "--out", "bad", cwd=tmp_path)
    assert_one_error_line(r, words)


def test_eps_inf_is_a_non_private_reference(tmp_path):
    """--eps inf: the same run without clipping, noise or accountant; it says so and records private: false."""
    r = run_script("mae_dp.py", "--eps", "inf", "--steps", "2", "--out", "run", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["private"] is False and s["eps"] == float("inf") and s["sigma"] == 0
    assert "NOT PRIVATE" in r.stdout
