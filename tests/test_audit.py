"""The one-run privacy audit (accountant.audit_*, accountant.CanaryAudit, --audit in every script).

The statistic is checked against hand-computed cases and an exact rational-arithmetic re-derivation; the scripts
are run at tiny size with the audit on: a run with the noise switched off (--debug-no-noise, a deliberately
broken run) must be flagged, a run at the normal setting must not."""
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import accountant
import clip_dp
import data
import mae_dp
from accountant import CanaryAudit, audit_epsilon_lower_bound, audit_p_value
from conftest import TINY, run_script


# --- the statistic -----------------------------------------------------------------------------------------------

def exact_p_value(m, r, v, eps, delta):
    """Steinke et al.'s p-value in exact rational arithmetic (p_eps rounded once to a Fraction)."""
    p = Fraction(1 / (1 + math.exp(-eps)))
    pmf = [math.comb(r, k) * p ** k * (1 - p) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    return min(1.0, float(beta + alpha * Fraction(delta) * 2 * m))


@pytest.mark.parametrize("m, r, v, eps, delta", [
    (100, 30, 25, 1.3, 1e-3), (100, 30, 30, 2.0, 1e-4), (50, 50, 40, 0.5, 0.0), (1000, 40, 12, 0.0, 1e-5),
    (200, 60, 55, 3.1, 1e-5),
])
def test_p_value_matches_exact_arithmetic(m, r, v, eps, delta):
    assert audit_p_value(m=m, guesses=r, correct=v, eps=eps, delta=delta) == pytest.approx(
        exact_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_no_right_guess_gives_bound_zero():
    assert audit_p_value(m=100, guesses=10, correct=0, eps=0.0, delta=1e-5) == 1.0
    assert audit_epsilon_lower_bound(m=100, guesses=10, correct=0, delta=1e-5) == 0.0
    # half right is what a coin does: no evidence against eps = 0 either
    assert audit_epsilon_lower_bound(m=1000, guesses=200, correct=100, delta=1e-5) == 0.0


def test_all_right_with_delta_zero_is_the_closed_form():
    # P[Bin(r, p) >= r] = p^r = 0.05  ->  p = 0.05^(1/r), eps = log(p / (1 - p))
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        assert audit_epsilon_lower_bound(m=r, guesses=r, correct=r, delta=0.0) == pytest.approx(
            math.log(p / (1 - p)), rel=1e-9)
    assert audit_epsilon_lower_bound(m=10, guesses=10, correct=10, delta=0.0) == pytest.approx(1.0518732, rel=1e-6)


def test_many_right_gives_a_large_bound_and_the_bound_is_tight():
    b = audit_epsilon_lower_bound(m=10000, guesses=2000, correct=2000, delta=1e-6)
    assert b > 5
    level = 0.05
    assert audit_p_value(m=10000, guesses=2000, correct=2000, eps=b, delta=1e-6) < level
    assert audit_p_value(m=10000, guesses=2000, correct=2000, eps=b + 1e-6, delta=1e-6) >= level


def test_bound_is_monotone():
    bounds = [audit_epsilon_lower_bound(m=500, guesses=100, correct=v, delta=1e-5) for v in range(0, 101, 5)]
    assert bounds == sorted(bounds) and bounds[0] == 0 and bounds[-1] > 3
    # more canaries at the same guesses: the 2 m delta term grows, the bound cannot grow
    by_m = [audit_epsilon_lower_bound(m=m, guesses=100, correct=100, delta=1e-4) for m in (100, 1000, 10000)]
    assert by_m[0] >= by_m[1] >= by_m[2]
    # higher confidence: a smaller bound
    assert (audit_epsilon_lower_bound(m=500, guesses=100, correct=90, delta=1e-5, confidence=0.99)
            < audit_epsilon_lower_bound(m=500, guesses=100, correct=90, delta=1e-5, confidence=0.9))


@pytest.mark.parametrize("kw", [dict(guesses=10, correct=11), dict(guesses=200, correct=1),
                                dict(correct=-1, guesses=5)])
def test_bad_counts_raise(kw):
    with pytest.raises(ValueError, match="audit"):
        audit_p_value(m=100, eps=1.0, delta=1e-5, **kw)


# --- the canaries ------------------------------------------------------------------------------------------------

def test_canary_rows_of_the_sampled_canaries():
    """rows(sampled): one row of 10 C per canary that the run's Poisson sample drew (numbered in the order the
    canaries joined, as data.poisson_batches returns them), along that canary's own coordinate."""
    a = CanaryAudit(4000, seed=3)
    assert abs(a.n_included - 2000) < 4 * math.sqrt(1000)
    joined = np.flatnonzero(a.included)
    rows = a.rows(np.array([0, 5, a.n_included - 1]), clip=2.0)
    assert rows.shape == (3, 4000) and rows.dtype == np.float32
    assert [np.flatnonzero(r).tolist() for r in rows] == [[joined[0]], [joined[5]], [joined[-1]]]
    assert set(np.unique(rows)) == {0.0, 20.0}  # strength 10 x C: clipping has work to do
    assert np.array_equal(CanaryAudit(4000, seed=3).included, a.included)  # the same canaries on resume
    assert not a.rows(np.array([], dtype=np.int64), clip=2.0).any()  # none sampled: nothing added


def test_flip_canaries_move_their_coordinate_by_2C():
    """flip (clip_dp.py): every canary is a unit at every step, -10 C along its coordinate, +10 C when sampled;
    clipped, its unit moves from -C to +C when it joins: 2C, the sensitivity clip_dp.py's noise sigma 2C covers."""
    a = CanaryAudit(50, seed=1, flip=True)
    sampled = np.array([0, 2])
    rows = a.rows(sampled, clip=1.0)
    assert rows.shape == (50, 50) and np.array_equal(np.diag(np.diag(rows)), rows)
    on = np.flatnonzero(a.included)[sampled]
    assert np.array_equal(np.flatnonzero(np.diag(rows) > 0), np.sort(on)) and set(np.abs(np.diag(rows))) == {10.0}


def test_separated_scores_are_flagged_and_noise_is_not():
    a = CanaryAudit(2000, seed=0)
    a.observe(a.included * 1.0)  # a perfect auditor: in-canaries score 1, the others 0
    res = a.result(delta=1e-5, claimed_eps=1.0)
    assert res["violation"] and res["saturated"] and res["eps_lower_bound"] > 3
    assert not a.result(delta=1e-5, claimed_eps=20.0)["violation"]  # above the ceiling: only "saturated" tells
    b = CanaryAudit(2000, seed=0)
    b.observe(np.random.default_rng(1).normal(size=2000))  # scores that ignore the coins
    assert b.result(delta=1e-5, claimed_eps=1.0)["eps_lower_bound"] == 0.0
    assert not b.result(delta=1e-5, claimed_eps=1.0)["saturated"]
    c = CanaryAudit(2000, seed=0)
    c.load_state_dict(a.state_dict())
    assert c.result(delta=1e-5, claimed_eps=1.0) == res
    with pytest.raises(ValueError):
        CanaryAudit(2000, seed=1).load_state_dict(a.state_dict())


# --- the scripts: a broken run is flagged, a normal one is not ---------------------------------------------------

@pytest.mark.parametrize("script, broken", [("mae_dp.py", False), ("mae_dp.py", True), ("randp.py", False),
                                            ("randp.py", True), ("cap_dp.py", True), ("clip_dp.py", True)])
def test_audit_flags_a_run_without_noise(tmp_path, script, broken):
    flags = ["--eps", "1", "--delta", "1e-5", "--steps", "10", "--audit", "1000", "--out", "run"]
    flags += ["--lp-steps", "5"] if script == "randp.py" else []
    r = run_script(script, *TINY[script], *flags, *(["--debug-no-noise"] if broken else []), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    a = s["audit"]
    assert a["canaries"] == 1000 and s["n"] == 300 + a["included"]  # eps covers the canaries that joined
    # the claim audited is what this run's (q, sigma, steps) cost, recomputed here: not the target --eps
    spent = accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=s["steps"], delta=s["delta"])
    assert a["claimed_eps"] == pytest.approx(spent, rel=1e-12) and s["eps"] <= 1.0
    assert a["violation"] is broken and a["saturated"] is broken
    if broken:
        assert a["eps_lower_bound"] > 2.5 and "NOT private" in r.stdout and "VIOLATION" in r.stdout
    else:
        assert a["eps_lower_bound"] <= 1.0 and "consistent with the claim" in r.stdout


# --- broken variants the audit must flag: the canaries take the examples' sampler and clipping ---------------------

AUDITED = ["--eps", "1", "--delta", "1e-5", "--steps", "10", "--audit", "1000", "--out", "run"]


def audited_summary(M, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    M.main([*TINY[f"{M.__name__}.py"], *AUDITED])
    return json.loads((tmp_path / "run" / "summary.json").read_text())["audit"]


def test_a_run_without_clipping_is_flagged(tmp_path, monkeypatch):
    """clip_and_sum without its clip factor: the canaries, clipped by the same function, reach the sum at 10 C."""
    unclipped = lambda grads, keep, clip: ({k: torch.tensordot(keep.to(g.dtype), g.float(), dims=1)
                                            for k, g in grads.items()}, 0)
    monkeypatch.setattr(mae_dp, "clip_and_sum", unclipped)
    a = audited_summary(mae_dp, tmp_path, monkeypatch)
    assert a["violation"] and a["eps_lower_bound"] > 1.5


def test_a_run_that_samples_everything_is_flagged(tmp_path, monkeypatch):
    """A sampler that ignores q (the whole data at every step) while the accountant counts q: the canaries are
    drawn by the same call, so they are in every step too."""
    monkeypatch.setattr(data, "poisson_sample", lambda n, q, *, generator=None, indices=None: torch.arange(n))
    a = audited_summary(mae_dp, tmp_path, monkeypatch)
    assert a["violation"] and a["eps_lower_bound"] > 1.5


def test_clip_dp_canaries_test_the_2C_sensitivity():
    """clip_dp.py's noise is sigma 2C because one pair moves its micro-batch's clipped vector by up to 2C. Its
    canaries realise that worst case (flip): in the released sum a sampled canary's coordinate is 2C above an
    unsampled one's, so the audit measures noise 2 sigma C against a 2C signal, the claimed noise multiplier sigma
    (a canary that moved the sum by C would test 2 sigma, and could not see a missing factor 2)."""
    a = CanaryAudit(40, seed=0, flip=True)
    sampled = torch.tensor([0, 3, 4])
    rows = torch.as_tensor(a.rows(sampled, 0.5))
    members, pair_mask = torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.bool)  # no pair sampled
    peg = lambda params, buffers, batch: ({"w": torch.zeros(len(batch[0]), 3)}, torch.zeros(len(batch[0])))
    load_pairs = lambda idx, mask: (torch.zeros(*idx.shape, 1), torch.zeros(*idx.shape, 1), mask)
    g, _ = clip_dp.micro_batch_step(peg, {"w": torch.zeros(3)}, {}, members, pair_mask, load_pairs, clip=0.5,
                                    noise_std=0.0, per_call=2, noise_gen=None, canaries=rows)
    released = g["canaries"] * 4  # the clipped sum (micro_batch_step divides by K = 4)
    on = np.flatnonzero(a.included)[sampled.numpy()]
    assert torch.allclose(released[on], torch.full((3,), 0.5), atol=1e-6)
    off = np.setdiff1d(np.arange(40), on)
    assert torch.allclose(released[off], torch.full((37,), -0.5), atol=1e-6)  # 2C below: joining moves it by 2C
