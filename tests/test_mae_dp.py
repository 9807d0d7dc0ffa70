"""mae_dp.py: per-example gradients, the masked loss, clipping, noise and canaries; what every script shares end to
end is in test_scripts.py."""
import json

import numpy as np
import torch

import mae_dp as M
from accountant import CanaryAudit


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
    g, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), clip=clip, noise_std=sigma * clip,
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
                     noise_std=0.0, expected_batch=1, noise_gen=torch.Generator())
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
    g, _ = M.dp_step(peg, params, buffers, empty, lambda i: (xs[i], noise[i]), clip=clip, noise_std=sigma * clip,
                     expected_batch=B, noise_gen=torch.Generator().manual_seed(3))
    z = flat(g)
    n = z.numel()
    assert n > 5000
    expected = sigma * clip / B
    # the sample std of n normals has relative standard error ~ 1/sqrt(2n); allow 5 of them
    assert abs(z.std().item() / expected - 1) < 5 / (2 * n) ** 0.5
    assert abs(z.mean().item()) < 5 * expected / n ** 0.5


def test_canaries_go_through_the_same_clip_sum_and_noise(monkeypatch):
    """--audit: canary rows (10 C along one coordinate each) are clipped by the examples' own clip_and_sum, summed,
    noised sigma*C and divided by B; the model's own gradient is unchanged by them apart from its noise draw."""
    model = tiny_model(torch.float32)
    params, buffers = functional(model)
    peg = M.make_per_example_grads(model, loss_fn)
    xs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    micro = [(torch.arange(4), torch.ones(4, dtype=torch.bool))]
    audit = CanaryAudit(3000, seed=0)
    sampled = torch.arange(0, audit.n_included, 3)  # every third joined canary
    rows = torch.as_tensor(audit.rows(sampled, 0.5))  # (units, m)
    ids = np.flatnonzero(audit.included)[sampled.numpy()]
    assert rows.shape == (len(ids), 3000) and torch.equal(rows.abs().sum(1), torch.full((len(ids),), 5.0))
    expected = torch.zeros(3000)
    expected[ids] = 0.5 / 8.0  # clipped to C, then / B
    kw = dict(clip=0.5, expected_batch=8.0)
    g0, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), noise_std=0.0,
                      noise_gen=torch.Generator().manual_seed(0), **kw)
    g, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), noise_std=0.0,
                     noise_gen=torch.Generator().manual_seed(0), canaries=rows, **kw)
    assert torch.allclose(g.pop("canaries"), expected, atol=1e-6)
    assert all(torch.equal(g[k], g0[k]) for k in g0)
    gn, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), noise_std=2.0 * 0.5,
                      noise_gen=torch.Generator().manual_seed(1), canaries=rows, **kw)
    z = gn["canaries"][torch.as_tensor(expected == 0)]  # the canaries not sampled: noise only
    assert abs(z.std().item() / (2.0 * 0.5 / 8.0) - 1) < 5 / (2 * z.numel()) ** 0.5
    # the canaries are clipped by the examples' function: a clip_and_sum that forgets to clip shows in them
    unclipped = lambda grads, keep, clip: ({k: torch.tensordot(keep.to(v.dtype), v, dims=1) for k, v in grads.items()},
                                           0)
    monkeypatch.setattr(M, "clip_and_sum", unclipped)
    g, _ = M.dp_step(peg, params, buffers, micro, lambda i: (xs[i], noise[i]), noise_std=0.0,
                     noise_gen=torch.Generator().manual_seed(0), canaries=rows, **kw)
    assert torch.allclose(g["canaries"], expected * 10, atol=1e-5)


def test_a_step_without_sampled_canaries_releases_their_noise_only():
    audit = CanaryAudit(50, seed=0)
    rows = torch.as_tensor(audit.rows(torch.zeros(0, dtype=torch.long), 1.0))
    sums, bad = M.clip_and_sum({"canaries": rows}, torch.ones(len(rows), dtype=torch.bool), 1.0)
    assert torch.equal(sums["canaries"], torch.zeros(50)) and bad == 0


def test_smoke_run_reports_its_probes(smoke_run):
    """The run's own outputs beyond the shared claim (test_scripts.py): a linear probe of each stage."""
    cwd, _ = smoke_run("mae_dp.py")
    s = json.loads((cwd / "run" / "summary.json").read_text())
    assert set(s["probe_accuracy_not_private"]) == {"random_init", "vip_syn", "vip"}
