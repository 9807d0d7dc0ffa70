"""What a run releases, and why its eps is true: secret sampling and noise, model.pt, a public log, float32
clipping under autocast, float64 Poisson coins, eps composed over --init, and a stop on a non-finite gradient."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import accountant
import cap_dp
import clip_dp
import data
import mae_dp
import randp
from conftest import ROOT, TINY, run_script

SCRIPTS = [mae_dp, cap_dp, clip_dp, randp]
FLAGS = TINY["mae_dp.py"]  # the end-to-end runs here are mae_dp.py's


# --- 1-3: the secret seeds, model.pt and the public log, end to end (mae_dp.py, tiny) ---

@pytest.fixture(scope="module")
def two_default_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("release")
    for out in ("a", "b"):  # identical flags, no --insecure-seed
        r = run_script("mae_dp.py", "--eps", "4", "--steps", "2", "--out", out, *FLAGS, cwd=cwd)
        assert r.returncode == 0, r.stderr[-3000:]
    return cwd


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_two_default_runs_release_different_models(two_default_runs):
    a, b = (weights(two_default_runs / r / "model.pt") for r in ("a", "b"))
    # same --seed, so the same init, data and augmentations: only the secret sample and noise differ
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3


def test_pinned_seed_replays_the_run_exactly_and_says_it_is_not_private(tmp_path):
    for out in ("a", "b"):
        r = run_script("mae_dp.py", "--eps", "4", "--steps", "2", "--insecure-seed", "--out", out, *FLAGS, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (weights(tmp_path / r / "model.pt") for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # summary.json publishes the seed that replays the sample and the noise: no privacy claim, wherever one is written
    done = next(l for l in r.stdout.splitlines() if l.startswith("done: eps="))
    assert "NOT PRIVATE (--insecure-seed" in done
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["private"] is False and "--insecure-seed" in s["not_private_reason"] and s["args"]["seed"] == 0
    record = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["privacy"]
    assert record["private"] is False and "--insecure-seed" in record["not_private_reason"]
    r = run_script("mae_dp.py", "--eps", "4", "--steps", "2", "--init", "b/model.pt", "--out", "next", *FLAGS,
                   cwd=tmp_path)  # refused as a DP --init, like an --eps inf run
    assert r.returncode == 2 and "NOT private run (--insecure-seed" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("M", SCRIPTS, ids=lambda m: m.__name__)
def test_the_secret_generators_keep_every_bit_of_their_seeds(monkeypatch, M):
    """Two runs whose OS seeds differ only above bit 32 must draw different samples and noise (a generator seeded
    by torch's CPU manual_seed would draw the same: it keeps 32 bits)."""
    args = argparse.Namespace(seed=0, insecure_seed=False)
    draws = []
    for seeds in ((123, 456), (123 + 2**32, 456 + 2**32)):
        monkeypatch.setattr(data, "secret_seeds", lambda pinned=None, seeds=seeds: seeds)
        sample_gen, noise_gen = M.generators(args, torch.device("cpu"), 1)
        draws.append((torch.rand(8, generator=sample_gen, dtype=torch.float64), torch.randn(8, generator=noise_gen)))
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][1], draws[1][1])


def test_the_secret_generators_stay_in_the_checkpoint(two_default_runs):
    run = two_default_runs / "a"
    draws = []
    for r in ("a", "b"):  # same flags and --seed: the generators' states in the checkpoints draw different numbers
        sample_state, noise_state, _ = torch.load(two_default_runs / r / "checkpoint.pt", weights_only=True)["rng"]
        g, h = torch.Generator(), torch.Generator()
        g.set_state(sample_state)
        h.set_state(noise_state)
        draws.append((torch.rand(8, generator=g, dtype=torch.float64), torch.randn(8, generator=h)))
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][1], draws[1][1])
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    model = torch.load(run / "model.pt", weights_only=True)
    assert set(model) == {"model", "privacy", "script"}  # no generator state, no optimizer, no args
    assert all(torch.equal(v, ck["model"][k]) for k, v in model["model"].items())
    # the release's own accountant gives the eps it states (2 steps at the summary's q and sigma)
    s = json.loads((run / "summary.json").read_text())
    released = accountant.RDPAccountant()
    released.load_state_dict(model["privacy"]["accountant"])
    assert model["privacy"]["eps"] == pytest.approx(released.epsilon(model["privacy"]["delta"]))
    assert model["privacy"]["eps"] == pytest.approx(accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=2,
                                                                       delta=s["delta"]))


def test_the_log_holds_only_released_values_unless_asked(two_default_runs, tmp_path):
    lines = [json.loads(l) for l in (two_default_runs / "a" / "metrics.jsonl").read_text().splitlines()]
    s = json.loads((two_default_runs / "a" / "summary.json").read_text())
    assert lines and all("loss" not in l and "batch" not in l for l in lines)
    # the time grows with the number of physical batches, i.e. with the secret sample: not released either
    assert all("time" not in l for l in lines) and not [k for k in s if "time" in k]
    assert all(l["noisy_grad_norm"] > 0 for l in lines)
    # each line's eps is the eps spent by its step, not the run's final one
    assert [l["eps"] for l in lines] == pytest.approx(
        [accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=l["step"], delta=s["delta"]) for l in lines])
    r = run_script("mae_dp.py", "--eps", "4", "--steps", "2", "--log-private", "--out", "p", *FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert all(l["private"] and l["loss"] > 0 and l["batch"] > 0 and l["time"] > 0 for l in lines)


# --- 4: float32 clipping under autocast: one example moves the released sum by at most C ---

def big_grads(P, D=20000, seed=0, dtype=torch.float32):
    """Stand-in per-example gradients: norms far above C, so every example is clipped."""
    g = torch.Generator().manual_seed(seed)
    G = (30 * torch.randn(P, D, generator=g)).to(dtype)

    def per_example_grads(params, buffers, idx):
        return {"w": G[idx]}, torch.ones(len(idx))
    return per_example_grads


# bf16 gradients are clipped and summed in float32 too (dp_step's cast; in bf16 one example moves the sum by ~2e-3 C).
# The float32 norm of such bf16-valued rows comes out ~2.4e-6 low, hence their looser 1e-5.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-5)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", SCRIPTS, ids=lambda m: m.__name__)
def test_one_example_moves_the_sum_by_at_most_C_under_bf16_autocast(M, dtype, tol):
    C, P = 1.0, 16
    peg = big_grads(P, dtype=dtype)
    params = {"w": torch.zeros(20000)}
    idx = torch.arange(P)
    worst = 0.0
    for out in range(P):  # the sum with every example, and with example `out` removed (its slot masked)
        sums = []
        for mask in (torch.ones(P, dtype=torch.bool), torch.arange(P) != out):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                g, _ = M.dp_step(peg, params, {}, [(idx, mask)], lambda i: i, clip=C, noise_std=0.0, expected_batch=1,
                                 noise_gen=torch.Generator().manual_seed(0))
            assert g["w"].dtype == torch.float32
            sums.append(g["w"].double())
        worst = max(worst, (sums[0] - sums[1]).norm().item())
    assert worst <= C * (1 + tol), worst


# --- 5: Poisson coins in float64 ---

@pytest.mark.parametrize("q", [0.3, 1e-6, 1e-9])
def test_poisson_coins_are_float64_uniforms(q):
    """By construction: example i joins iff u_i < q for u_i a float64 uniform (resolution 2^-53), so the
    realised rate is q to ~1e-16 at any q; a float32 uniform (a multiple of 2^-24) would stall below 6e-8."""
    n = 1_000_000
    g = torch.Generator().manual_seed(7)
    replay = torch.Generator().manual_seed(7)
    picked = data.poisson_sample(n, q, generator=g)
    u = torch.rand(n, generator=replay, dtype=torch.float64)
    assert torch.equal(picked, (u < q).nonzero().squeeze(1))
    assert torch.equal(g.get_state(), replay.get_state())  # nothing else was drawn
    assert np.unique(u.numpy() * 2.0**53 % 1).tolist() == [0.0]  # and these are 53-bit uniforms


# --- 6: eps composed over --init ---

def test_plan_with_a_prior_meets_the_composed_target():
    prior = accountant.RDPAccountant()
    prior.step(q=0.05, sigma=1.0, steps=100)
    delta = 1e-5
    first = prior.epsilon(delta)
    plan = accountant.dp_sgd_plan(target_eps=first + 2, n=20000, batch_size=1000, steps=50, delta=delta,
                                  prior=prior.state_dict())
    assert plan["prior_eps"] == pytest.approx(first)
    both = accountant.RDPAccountant()
    both.load_state_dict(prior.state_dict())
    both.step(q=plan["q"], sigma=plan["sigma"], steps=50)
    assert first + 2 - 1e-2 <= both.epsilon(delta) <= first + 2  # composed: met, and tight
    alone = accountant.dp_sgd_plan(target_eps=first + 2, n=20000, batch_size=1000, steps=50, delta=delta)
    assert plan["sigma"] > 1.05 * alone["sigma"]  # composing costs noise
    with pytest.raises(ValueError, match="already spent"):
        accountant.dp_sgd_plan(target_eps=first * 0.9, n=20000, batch_size=1000, steps=50, delta=delta,
                               prior=prior.state_dict())


def test_init_prior_reads_what_a_file_costs():
    acc = accountant.RDPAccountant()
    acc.step(q=0.1, sigma=1.0, steps=10)
    record = dict(private=True, accountant=acc.state_dict(), pipeline=[{"file": "a/model.pt"}])
    public = accountant.init_prior({"encoder.w": torch.zeros(1)}, path="p")  # public weights: cost nothing, say so
    assert public["prior"] is None and "cost no privacy" in public["note"]
    got = accountant.init_prior({"model": {}, "privacy": record}, path="p")
    assert got["prior"]["history"] == acc.state_dict()["history"] and got["pipeline"] == [{"file": "a/model.pt"}]
    old = accountant.init_prior({"model": {}, "accountant": acc.state_dict()}, path="p")  # an older checkpoint
    assert old["prior"]["history"] == acc.state_dict()["history"]
    assert accountant.init_prior({"model": {}, "privacy": record}, path="p", disjoint=True)["prior"] is None
    with pytest.raises(ValueError, match="NOT private"):
        accountant.init_prior({"privacy": dict(record, private=False)}, path="p")


def test_init_from_a_dp_run_composes_end_to_end(two_default_runs, tmp_path):
    shutil.copytree(two_default_runs / "runs", tmp_path / "runs")  # the ViP-Syn cache
    first = json.loads((two_default_runs / "a" / "summary.json").read_text())
    src = two_default_runs / "a" / "model.pt"
    r = run_script("mae_dp.py", "--eps", "6", "--steps", "2", "--init", src, "--out", "c", *FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert 5.9 < s["eps"] <= 6 and s["eps_this_run"] < 5.9  # the budget is shared with the first run
    both = accountant.RDPAccountant()  # an independent recomputation of the composed eps
    both.step(q=first["q"], sigma=first["sigma"], steps=first["steps"])
    both.step(q=s["q"], sigma=s["sigma"], steps=s["steps"])
    assert s["eps"] == pytest.approx(both.epsilon(s["delta"]), rel=1e-9)
    assert [p["eps_alone"] for p in s["privacy_pipeline"]] == pytest.approx([first["eps"], s["eps_this_run"]])
    assert f"eps={s['eps']:.3f} is composed with the --init run's; this run alone: eps={s['eps_this_run']:.3f}" \
        in r.stdout
    r = run_script("mae_dp.py", "--eps", "6", "--steps", "2", "--init", src, "--init-data-disjoint", "--out", "d",
                   *FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert d["eps"] == pytest.approx(d["eps_this_run"]) and 5.9 < d["eps"] <= 6  # not composed: all of it
    assert len(d["privacy_pipeline"]) == 1


# --- 7: a non-finite gradient never reaches the release ---

@pytest.mark.parametrize("M", SCRIPTS, ids=lambda m: m.__name__)
def test_a_nan_in_a_padding_slot_leaves_the_release_finite(M):
    G = torch.randn(4, 10)
    G[3] = float("nan")  # slot 3 is padding (mask False)

    def peg(params, buffers, idx):
        return {"w": G[idx]}, torch.ones(len(idx))
    mask = torch.tensor([True, True, True, False])
    g, loss = M.dp_step(peg, {"w": torch.zeros(10)}, {}, [(torch.arange(4), mask)], lambda i: i, clip=1.0,
                        noise_std=1.0, expected_batch=3, noise_gen=torch.Generator().manual_seed(0))
    assert torch.isfinite(g["w"]).all() and np.isfinite(loss)
    mask[3] = True  # the same NaN in a sampled example stops the step
    with pytest.raises(ValueError, match="non-finite"):
        M.dp_step(peg, {"w": torch.zeros(10)}, {}, [(torch.arange(4), mask)], lambda i: i, clip=1.0, noise_std=1.0,
                  expected_batch=4, noise_gen=torch.Generator().manual_seed(0))


def test_a_run_that_diverges_stops_with_one_line_and_keeps_its_last_checkpoint(tmp_path):
    # lr 1e30: the first update is finite, the second step's gradients are not
    flags = [*FLAGS, "--eps", "4", "--steps", "6", "--lr", "1e30", "--warmup", "0", "--log-every", "1"]
    r = run_script("mae_dp.py", *flags, "--out", "nan", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr  # stderr also holds the progress bar here
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "non-finite" in errors[0], r.stderr[-2000:]
    ck = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert 1 <= ck["step"] < 6
    assert not (tmp_path / "nan" / "model.pt").exists()  # nothing is released


@pytest.mark.parametrize("script", ["cap_dp.py", "clip_dp.py"])
def test_cap_and_clip_compose_with_the_mae_run_they_start_from(two_default_runs, tmp_path, script):
    first = json.loads((two_default_runs / "a" / "summary.json").read_text())
    r = run_script(script, "--eps", "6", "--steps", "2", "--init", two_default_runs / "a" / "model.pt", "--out", "c",
                   *TINY[script], "--model", "tiny", "--stem", "linear",  # the ViT encoder of mae_dp.py
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert 5.9 < s["eps"] <= 6 and s["eps_this_run"] < 5.9
    assert [p["script"] for p in s["privacy_pipeline"]] == ["mae_dp.py", script]
    assert s["privacy_pipeline"][0]["eps_alone"] == pytest.approx(first["eps"])


def test_a_run_without_noise_is_recorded_as_not_private_and_refused_as_init(two_default_runs, tmp_path):
    shutil.copytree(two_default_runs / "runs", tmp_path / "runs")  # the ViP-Syn cache
    r = run_script("mae_dp.py", "--eps", "4", "--steps", "2", "--debug-no-noise", "--out", "bad", *FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    done = next(l for l in r.stdout.splitlines() if l.startswith("done: eps="))
    assert "NOT PRIVATE (--debug-no-noise" in done
    record = torch.load(tmp_path / "bad" / "model.pt", weights_only=True)["privacy"]
    assert record["private"] is False and "--debug-no-noise" in record["not_private_reason"]
    assert json.loads((tmp_path / "bad" / "summary.json").read_text())["private"] is False
    r = run_script("mae_dp.py", "--eps", "4", "--steps", "2", "--init", "bad/model.pt", "--out", "next", *FLAGS,
                   cwd=tmp_path)
    assert r.returncode == 2 and "NOT private" in r.stderr and "Traceback" not in r.stderr


# --- 8: one example's augmentation never depends on which other examples were sampled (rule 3) ---
# Each script's own load path, captured at its first DP step: a sample S and S plus one extra example at the front,
# the middle and the end; every example of S must get bit-equal inputs. A batch-order generator (draws handed out
# by batch slot) fails this: one more example shifts every later slot.

class FirstStep(Exception):
    """Raised by the spy in place of the first DP step: main() has built its load path, and stops there."""


def first_step_inputs(monkeypatch, tmp_path, module, flags, spied):
    """Run module.main(flags) in tmp_path up to its first call of module.<spied> and return that call's arguments."""
    got = {}

    def spy(*args, **kw):
        got["args"], got["kw"] = args, kw
        raise FirstStep
    monkeypatch.setattr(module, spied, spy)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FirstStep):
        module.main([*flags, "--eps", "4", "--steps", "2", "--out", "run"])
    monkeypatch.undo()
    return got["args"]


SAMPLE = [i for i in range(1, 299, 7) if i != 148]  # 43 examples in data set order; 0, 148 and 299 are not in it
EXTRA = {"front": 0, "middle": 148, "end": 299}


def inputs_by_example(load, sample, physical_batch=16):
    """{example index: its loaded tensors}, through load over the physical batches of `sample` as dp_step calls it."""
    out = {}
    for idx, mask in data.physical_batches(torch.tensor(sorted(sample)), physical_batch):
        batch = load(idx)
        for r in mask.nonzero().squeeze(1).tolist():
            out[int(idx[r])] = tuple(t[r] for t in batch)
    return out


@pytest.mark.parametrize("M", [mae_dp, cap_dp, randp], ids=lambda m: m.__name__)
def test_adding_an_example_leaves_every_other_examples_input_bit_equal(monkeypatch, tmp_path, M):
    flags = TINY[f"{M.__name__}.py"] + (["--lp-steps", "0"] if M is randp else [])  # randp: phase III's views
    load = first_step_inputs(monkeypatch, tmp_path, M, flags, "dp_step")[4]
    base = inputs_by_example(load, SAMPLE)
    for where, x in EXTRA.items():
        more = inputs_by_example(load, SAMPLE + [x])
        assert set(more) == set(base) | {x}
        for i in SAMPLE:
            assert all(torch.equal(a, b) for a, b in zip(base[i], more[i])), (where, i)
    if M is not cap_dp:  # (cap_dp.py does not augment) the inputs are augmented: not the plain normalised images
        private = data.load_dataset("shapes", split="train", size=16, n=300, seed=0)
        assert not torch.equal(base[SAMPLE[0]][0].flatten(), data.normalize(private.images([SAMPLE[0]]))[0].flatten())


def test_adding_a_pair_leaves_the_other_micro_batches_bit_equal(monkeypatch, tmp_path):
    """clip_dp.py: the vmap calls are ordered by micro-batch size, which one more pair changes; the 2C argument needs
    every micro-batch without the added pair to get exactly its inputs, and every pair its crop."""
    args = first_step_inputs(monkeypatch, tmp_path, clip_dp, TINY["clip_dp.py"], "micro_batch_step")
    load_pairs = args[5]
    slots = {i: (i * 5) % 9 for i in SAMPLE + list(EXTRA.values())}  # 9 micro-batches of 4-6 pairs

    def members_of(sample):
        rows = [[i for i in sorted(sample) if slots[i] == j] for j in range(9)]
        M = max(map(len, rows))
        members = torch.tensor([r + [0] * (M - len(r)) for r in rows])
        return members, torch.tensor([[True] * len(r) + [False] * (M - len(r)) for r in rows])

    def inputs(sample):
        """{micro-batch j: (images, tokens) of its real pairs, as dp_step's load gives them}."""
        members, pair_mask = members_of(sample)
        seen = {}

        def spy(per_example_grads, params, buffers, calls, load, **kw):
            for ids, mask in calls:
                imgs, tokens, m = load(ids)
                for r in mask.nonzero().squeeze(1).tolist():
                    seen[int(ids[r])] = (imgs[r][m[r]], tokens[r][m[r]], members[int(ids[r])][pair_mask[int(ids[r])]])
            return {}, 0.0
        monkeypatch.setattr(clip_dp, "dp_step", spy)
        clip_dp.micro_batch_step(None, {}, {}, members, pair_mask, load_pairs, clip=1.0, noise_std=0.0, per_call=2,
                                 noise_gen=None)
        monkeypatch.undo()
        return seen

    base = inputs(SAMPLE)
    crop = {int(i): img for imgs, _, who in base.values() for i, img in zip(who, imgs)}
    for where, x in EXTRA.items():
        more = inputs(SAMPLE + [x])
        assert set(more) == set(base) == set(range(9))
        for j in range(9):
            if j == slots[x]:  # its own micro-batch: one more pair, the others' crops unchanged
                imgs, _, who = more[j]
                assert all(torch.equal(img, crop[int(i)]) for i, img in zip(who, imgs) if int(i) != x), where
            else:
                assert all(torch.equal(a, b) for a, b in zip(base[j], more[j])), (where, j)


# --- 9: a resumed run is the run: the same weights as one that was never stopped ---

class Killed(Exception):
    """Raised right after the first checkpoint is written: the run stops there, as a killed one would."""


@pytest.mark.parametrize("M", [mae_dp, clip_dp, randp], ids=lambda m: m.__name__)
def test_a_resumed_run_ends_exactly_where_an_unbroken_one_does(M, tmp_path, monkeypatch):
    """The checkpoint holds the secret generators' states and the step (each example's augmentation is a function
    of the step): stopped at step 2 and resumed, a run ends with the weights of the same run never stopped.
    --insecure-seed gives both runs the same secret streams."""
    flags = [*TINY[f"{M.__name__}.py"], "--eps", "4", "--steps", "4", "--insecure-seed",
             *(["--lp-steps", "1"] if M is randp else [])]
    monkeypatch.chdir(tmp_path)
    M.main([*flags, "--out", "whole"])
    write = M.save_checkpoint

    def write_then_stop(*args, **kw):
        write(*args, **kw)
        raise Killed
    monkeypatch.setattr(M, "save_checkpoint", write_then_stop)
    with pytest.raises(Killed):
        M.main([*flags, "--out", "cut"])
    monkeypatch.setattr(M, "save_checkpoint", write)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    M.main(["--out", "cut", "--resume"])
    a, b = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def start_live(script, *args, cwd):
    """The script in a real process, its stdout unbuffered (read line by line), stderr kept."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def interrupted(p, signum):
    """Send signum to a live run; its exit code and the error: lines it printed."""
    p.send_signal(signum)
    out, err = p.communicate(timeout=300)
    return p.returncode, [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Two classes of 20x20 PNGs, 4 a class to train and 8 to test: a run that ends evaluates on 16 images."""
    root = tmp_path_factory.mktemp("small")
    for split, k in (("train", 4), ("test", 8)):
        for c, label in (("a", 0), ("b", 1)):
            (root / split / c).mkdir(parents=True)
            for i in range(k):
                pixels = np.random.default_rng([label, i, k]).integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("M, signum", [(mae_dp, signal.SIGINT), (cap_dp, signal.SIGTERM), (clip_dp, signal.SIGTERM),
                                       (randp, signal.SIGINT)], ids=lambda x: getattr(x, "__name__", None) or x.name)
def test_a_live_run_interrupted_before_and_after_its_first_checkpoint_resumes_to_the_unbroken_run(M, signum, tmp_path,
                                                                                                   monkeypatch,
                                                                                                   small_set):
    """A real process interrupted by a signal (as Ctrl-C or a scheduler would) says so in one line and leaves a folder
    that --resume continues: stopped before its first checkpoint, then after it, then resumed to the end, the run ends
    with the weights and eps of the same run never stopped (--insecure-seed: the same secret streams). Evaluated
    on the small set (randp.py: trained on it too), so that the runs that end are quick."""
    script = f"{M.__name__}.py"
    evaluated = (["--data", small_set, "--n", "8", "--batch-size", "4", "--lp-steps", "3"] if M is randp
                 else ["--probe-data", small_set])
    flags = [*TINY[script], "--eps", "4", "--steps", "10", "--insecure-seed", *map(str, evaluated)]
    monkeypatch.chdir(tmp_path)  # the public stage's cache, built by the unbroken run, serves the others
    M.main([*flags, "--out", "whole"])
    # 1. before its first checkpoint: once it has printed its privacy plan, before the model is trained
    p = start_live(script, *flags, "--out", "cut", cwd=tmp_path)
    while not p.stdout.readline().startswith("private data:"):
        assert p.poll() is None, p.stderr.read()[-3000:]
    code, errors = interrupted(p, signum)
    assert code == 128 + signum and len(errors) == 1 and "before the first checkpoint" in errors[0], errors
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    # 2. --resume finds no checkpoint, so starts again at step 0; interrupted once its first checkpoint is written
    p = start_live(script, *flags, "--out", "cut", "--resume", cwd=tmp_path)
    while not (tmp_path / "cut" / "checkpoint.pt").exists():
        assert p.poll() is None, p.stderr.read()[-3000:]
        time.sleep(0.005)
    code, errors = interrupted(p, signum)
    step = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"]
    assert code == 128 + signum and len(errors) == 1, errors
    assert f"interrupted ({signal.Signals(signum).name}) at step {step}" in errors[0] and "--resume" in errors[0]
    assert not (tmp_path / "cut" / "summary.json").exists() or step == 10
    # 3. --resume to its end
    M.main(["--out", "cut", "--resume"])
    a, b = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "cut" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s, t = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("whole", "cut"))
    assert s["eps"] == t["eps"] and s["steps"] == t["steps"] == 10
