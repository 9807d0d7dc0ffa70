"""torchrun: two CPU processes under gloo, launched as users launch them
(`python -m torch.distributed.run --nproc_per_node=2 --standalone script.py ...`, i.e. torchrun).

Two processes must end where one process does, up to float32 summation order: the same global Poisson sample,
one noise draw per step, and each example's augmentation a function of (--seed, step, its index), whichever rank
computes it; a noise added on every rank instead of once would not. Then: outputs from rank 0 alone, the
accountant's epsilon, and a resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

import accountant
import cap_dp as C
import data
import mae_dp as M
from conftest import ROOT, TINY, run_script


def tiny_flags(script):
    """The script's TINY flags, with --n spelled --n-examples (torchrun takes --n for an ambiguous flag of its own)."""
    return ["--n-examples" if a == "--n" else a for a in TINY[script]]


def torchrun(script, *args, cwd, nproc=2, timeout=300, pythonpath=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(ROOT)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def model_of(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


def max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_processes_end_where_one_does_with_the_noise_added_once(tmp_path, monkeypatch):
    # --insecure-seed: both runs draw the same secret randomness, so they can be compared; --log-private: the log
    # then holds the loss and batch size compared below
    flags = ["--eps", "4", "--steps", "4", "--audit", "100", "--insecure-seed", "--log-private",
             *tiny_flags("cap_dp.py")]
    one = run_script("cap_dp.py", *flags, "--out", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("cap_dp.py", *flags, "--out", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    # the same global Poisson samples, one noise draw per step: the same parameters up to float32 sums
    diff = max_diff(model_of(tmp_path / "one"), model_of(tmp_path / "two"))
    assert diff < 1e-5, diff
    # ... and the same log: the global loss and batch size, written once (rank 0 alone writes metrics.jsonl)
    m1, m2 = ((tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("one", "two"))
    assert len(m1) == len(m2) == 2
    for a, b in zip(map(json.loads, m1), map(json.loads, m2)):
        assert a["batch"] == b["batch"] and a["eps"] == b["eps"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s1["eps"] == s2["eps"] and s1["sigma"] == s2["sigma"]  # the accountant never sees the world size
    assert two.stdout.count("done: eps=") == 1  # rank 0 alone prints
    # the audit's canaries are one global set, added once: the auditor saw the same released coordinates
    a1, a2 = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["audit"] for r in ("one", "two"))
    assert torch.allclose(torch.as_tensor(a1["scores"]), torch.as_tensor(a2["scores"]), rtol=1e-5, atol=1e-6)
    # Noise on every rank (each rank's noise_gen has the same seed) would release 2 sigma C z instead of sigma C z:
    # that run is one process with a doubled sigma, and it lands far outside the tolerance used above.
    plan = C.dp_sgd_plan
    monkeypatch.setattr(C, "dp_sgd_plan", lambda **kw: {**plan(**kw), "sigma": 2 * plan(**kw)["sigma"]})
    monkeypatch.chdir(tmp_path)
    C.main([*flags, "--out", "doubled"])
    doubled = max_diff(model_of(tmp_path / "doubled"), model_of(tmp_path / "two"))
    assert doubled > 100 * 1e-5, doubled


def test_every_rank_draws_rank_0s_secret_sample(tmp_path):
    """The secret seeds come from the OS, so each process would draw its own; the sampling seed must be rank 0's
    on every rank (a broadcast), or the shards would not split one global Poisson sample. Here each process's
    "OS entropy" is made rank-dependent (sitecustomize patches data.secret_seeds): two processes must still end
    where one process with rank 0's seeds ends."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nimport data\n"
        "data.secret_seeds = lambda pinned=None: (11 + 1000 * int(os.environ.get('RANK', 0)), 7)\n")
    flags = ["--eps", "4", "--steps", "4", *tiny_flags("cap_dp.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    one = subprocess.run([sys.executable, str(ROOT / "cap_dp.py"), *flags, "--out", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("cap_dp.py", *flags, "--out", "two", cwd=tmp_path, pythonpath=[tmp_path])
    assert two.returncode == 0, two.stderr[-3000:]
    assert max_diff(model_of(tmp_path / "one"), model_of(tmp_path / "two")) < 1e-5


def test_bad_input_under_torchrun_is_one_error_line(tmp_path):
    r = torchrun("cap_dp.py", *tiny_flags("cap_dp.py"), "--eps", "0", "--out", "bad", cwd=tmp_path)
    assert r.returncode != 0
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "eps" in errors[0], r.stderr[-3000:]  # rank 0's; torchrun then adds its report
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


@pytest.mark.parametrize("script, extra", [("mae_dp.py", []), ("clip_dp.py", []), ("randp.py", ["--lp-steps", "1"])])
def test_smoke_two_processes(tmp_path, monkeypatch, script, extra):
    # --insecure-seed: the same secret sample and noise in both runs, so that they can be compared
    flags = ["--eps", "4", "--steps", "2", "--insecure-seed", *extra, *tiny_flags(script)]
    r = torchrun(script, *flags, "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_script(script, *flags, "--out", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    # an example's crops, flips, masks and views are a function of (--seed, step, its index): the same on whichever
    # rank computes it, so two processes end where one does (a stream per rank, or one stream on every rank, would
    # give the examples other augmentations than in one process)
    diff = max_diff(model_of(tmp_path / "one"), model_of(tmp_path / "run"))
    assert diff < 1e-5, diff
    assert r.stdout.count("done: eps=") == 1 and "Traceback" not in r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 2 and s["eps"] <= 4
    assert s["eps"] == pytest.approx(accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=2, delta=s["delta"]))
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [2]
    if script != "mae_dp.py":
        return
    # resume under torchrun: both ranks load the one checkpoint; epsilon continues (a 3-step run stopped once its
    # step-2 checkpoint was written, here in this process)
    monkeypatch.chdir(tmp_path)
    write = data.save_atomic

    def write_then_stop(obj, path, **kw):
        write(obj, path, **kw)
        if kw.get("step") == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(data, "save_atomic", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        M.main([*flags, "--steps", "3", "--out", "run3"])
    data.release_out_dirs()  # as the process's exit would
    monkeypatch.undo()
    ck = torch.load(tmp_path / "run3" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["args"]["steps"] == 3
    r = torchrun(script, "--out", "run3", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("resumed at step 2") == 1
    s = json.loads((tmp_path / "run3" / "summary.json").read_text())
    assert s["steps"] == 3
    spent = accountant.RDPAccountant()
    spent.load_state_dict(ck["accountant"])
    spent.step(q=s["q"], sigma=s["sigma"])  # 2 steps from the checkpoint + 1 more, counted once, not once per rank
    assert s["eps"] == pytest.approx(spent.epsilon(s["delta"]))
