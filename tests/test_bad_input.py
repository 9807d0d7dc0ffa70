"""Every bad input gets one clear line: exit code 2, one `error:` line naming the flag or file, no traceback, and
nothing already written changed (a prior run's files in --out stay byte-identical).

One table of cases, each run against every script it applies to. The scripts run in this process through their
own `__main__` block (runpy), so torch is imported once and the whole table stays well under a minute on 2 CPU
cores; an exception escaping that block is what a user would see as a traceback, and is reported as one. A few
cases also run as real subprocesses (the pid lock, a payload-carrying checkpoint).
"""
import contextlib
import io
import json
import os
import pickle
import runpy
import subprocess
import sys
import traceback
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import accountant
import data
from conftest import ROOT, run_script

SCRIPTS = ["mae_dp", "cap_dp", "clip_dp", "randp"]
# tiny flags with no --n: the small sets below have a handful of examples
TINY = {
    "mae_dp": ["--model", "tiny", "--size", "16", "--batch-size", "4", "--physical-batch", "16", "--syn-steps", "3",
               "--syn-batch", "8", "--probe-n", "200", "--init", "none"],
    "cap_dp": ["--model", "tiny", "--size", "16", "--batch-size", "4", "--physical-batch", "16", "--probe-n", "200",
               "--zero-shot-n", "20", "--max-len", "32"],
    "clip_dp": ["--model", "tiny", "--size", "16", "--batch-size", "4", "--micro-batch", "2", "--physical-batch",
                "16", "--text-len", "12", "--probe-n", "200", "--retrieval-n", "100"],
    "randp": ["--width", "0.25", "--size", "16", "--batch-size", "4", "--physical-batch", "16", "--aug-mult", "2",
              "--prior-steps", "3", "--prior-batch", "8", "--no-prior"],
}
SHAPES = ["--n", "300", "--steps", "2", "--log-every", "1"]  # the embedded set, for cases not about data


def run_main(file, *argv, cwd):
    """Run `python file argv...` in this process: its __main__ block, stdout and stderr captured, warnings shown as
    they would be on stderr, locks released as at process exit. Returns (returncode, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [str(ROOT / file), *map(str, argv)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            try:
                runpy.run_path(str(ROOT / file), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the user would see: a traceback
                traceback.print_exc(file=err)
                code = 1
        for w in caught:
            err.write(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n")
    finally:
        data.release_out_dirs()
        sys.argv = old_argv
        os.chdir(old_cwd)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line(r, words):
    """Exit code 2, exactly one `error:` line on stderr naming `words`, no traceback anywhere."""
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    for w in [words] if isinstance(words, str) else words:
        assert w in lines[0], (w, lines[0])


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# the bad inputs: small files written once


class Payload:  # a pickle that would touch a file if it were ever loaded unsafely
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _png(path, seed, grey=False):
    a = np.random.default_rng(seed).integers(0, 256, (20, 20) if grey else (20, 20, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


def _idx(path, a, ndim=None):
    header = bytes([0, 0, 8, a.ndim if ndim is None else ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    path.write_bytes(header + a.tobytes())


def _checkpoint(script, step=2):
    """A checkpoint dict as `script` writes it, of a prior run with the table's flags (weights left empty)."""
    mod = runpy.run_path(str(ROOT / f"{script}.py"))  # not __main__: the definitions only
    _, args = mod["parse_args"]([*TINY[script], *SHAPES, "--out", "run"])
    return dict(model={}, optimizer={}, args=vars(args), step=step, accountant={}, rng=[], audit=None, script=script)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    for name in ("folder/a", "folder/b", "one_class/a", "caps"):
        (d / name).mkdir(parents=True)
    for i in range(3):
        _png(d / "folder" / "a" / f"{i}.png", i)
        _png(d / "folder" / "b" / f"{i}.png", 10 + i)
        _png(d / "one_class" / "a" / f"{i}.png", 20 + i)
        _png(d / "caps" / f"{i}.png", 30 + i)
    (d / "caps.tsv").write_text("".join(f"caps/{i}.png\ta red circle {i}\n" for i in range(3)))
    (d / "empty_caps.tsv").write_text("".join(f"caps/{i}.png\t \n" for i in range(3)))
    (d / "coco.json").write_text(json.dumps({"images": [{"id": i, "file_name": f"caps/{i}.png"} for i in range(3)],
                                             "annotations": [{"id": i, "image_id": i} for i in range(3)]}))
    x = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    for name, labels, ndim in (("idx_ok", [0, 1, 0, 1, 0, 1], None), ("idx_label", [0, 1, 2, 3, 4, 12], None),
                               ("idx_dims", [0, 1, 0, 1, 0, 1], 255)):
        (d / name).mkdir()
        _idx(d / name / "train-images-idx3-ubyte", x, ndim)
        _idx(d / name / "train-labels-idx1-ubyte", np.array(labels, dtype=np.uint8))
    # bad checkpoints
    good = io.BytesIO()
    torch.save(_checkpoint("mae_dp"), good)
    (d / "truncated.pt").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "folder.pt").mkdir()
    torch.save({"model": {}, "step": 2}, d / "no_keys.pt")
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save({"x": Payload(d / "PWNED")}, d / "payload.pt")
    (d / "payload_raw.pt").write_bytes(pickle.dumps(Payload(d / "PWNED"), protocol=4))  # torch warns on protocol 4
    for s in SCRIPTS:
        torch.save(_checkpoint(s), d / f"{s}.pt")
        old = _checkpoint(s)
        del old["script"]  # written before checkpoints named their script: told apart by the args
        torch.save(old, d / f"{s}_old.pt")
    # data.py grid: a CIFAR folder whose first batch carries a payload
    (d / "cifar").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / "cifar" / name, "wb") as f:
            pickle.dump({b"data": Payload(d / "PWNED"), b"labels": []}, f, protocol=2)
    with open(d / "cifar" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"]}, f, protocol=2)
    return d


@pytest.fixture
def prior(tmp_path):
    """A folder holding a prior run's files: the --out that bad input must leave as it was."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n')
    (run / "summary.json").write_text("{}")
    return run


def other(script):
    return "randp" if script != "randp" else "mae_dp"


# Each case: (id, scripts it applies to, flags given S (the set folder) and the script, words the line must hold;
# "{other}" stands for another script's name). "@resume:<file>" puts the set folder's <file> at run/checkpoint.pt
# and resumes the prior run ("own": a good checkpoint of the script); "@lock": a live process holds run/run.lock.
ALL, ENCODERS = SCRIPTS, ["mae_dp", "cap_dp", "clip_dp"]
CASES = [
    # 1. checkpoints, --resume
    *[(f"resume-{k}", ALL, lambda S, s, k=k: [f"@resume:{k}.pt"], "checkpoint.pt")
      for k in ("truncated", "empty", "folder", "no_keys", "tensor")],
    ("resume-payload", ALL, lambda S, s: ["@resume:payload.pt"], ["refused", "posix.system"]),
    ("resume-payload-raw", ALL, lambda S, s: ["@resume:payload_raw.pt"], "refused"),
    ("resume-other-script", ALL, lambda S, s: [f"@resume:{other(s)}.pt"], "{other}.py"),
    ("resume-other-script-old", ALL, lambda S, s: [f"@resume:{other(s)}_old.pt"], "{other}.py"),
    # 1. checkpoints, --init (mae_dp, cap_dp, clip_dp start from a mae_dp.py encoder)
    ("init-randp", ENCODERS, lambda S, s: [*SHAPES, "--init", S / "randp.pt"], ["--init", "randp.py"]),
    ("init-payload", ENCODERS, lambda S, s: [*SHAPES, "--init", S / "payload.pt"], ["--init", "refused"]),
    ("init-tensor", ENCODERS, lambda S, s: [*SHAPES, "--init", S / "tensor.pt"], ["--init", "Tensor"]),
    ("init-truncated", ENCODERS, lambda S, s: [*SHAPES, "--init", S / "truncated.pt"], ["--init", "truncated"]),
    ("init-empty", ENCODERS, lambda S, s: [*SHAPES, "--init", S / "empty.pt"], ["--init", "0 bytes"]),
    ("init-folder", ENCODERS, lambda S, s: [*SHAPES, "--init", S / "folder.pt"], ["--init", "a folder"]),
    ("init-no-keys", ENCODERS, lambda S, s: [*SHAPES, "--init", S / "no_keys.pt"], ["--init", "no_keys.pt"]),
    # 2. --out
    ("out-file", ALL, lambda S, s: [*SHAPES, "--out", S / "caps.tsv"], "--out"),
    ("out-under-file", ALL, lambda S, s: [*SHAPES, "--out", S / "caps.tsv" / "run"], "is a file"),
    ("out-proc", ALL, lambda S, s: [*SHAPES, "--out", "/proc/dp-repr-run"], "--out /proc/dp-repr-run"),
    ("out-locked", ALL, lambda S, s: ["@resume:own", "@lock"], ["--out", "another run (pid"]),
    # 3. a new run into a folder that holds one
    ("out-holds-a-run", ALL, lambda S, s: [*SHAPES, "--out", "run"], ["--resume", "--out"]),
    # 5. numeric flags
    *[(f"flag{f}={v}", ALL, lambda S, s, f=f, v=v: [*SHAPES, f, v, "--out", "run"], f)
      for f, v in (("--clip", "0"), ("--clip", "-1"), ("--clip", "nan"), ("--lr", "nan"), ("--n", "0"),
                   ("--log-every", "0"), ("--warmup", "-1"), ("--eps", "nan"), ("--eps", "-inf"),
                   ("--delta", "nan"), ("--steps", "0"), ("--size", "0"), ("--physical-batch", "0"),
                   ("--seed", "-1"), ("--audit", "-1"), ("--steps", "two"), ("--bogus", "1"))],
    ("flag--eps=-inf", ALL, lambda S, s: [*SHAPES, "--eps=-inf", "--out", "run"], "--eps"),
    *[(f"flag{f}={v}", ENCODERS, lambda S, s, f=f, v=v: [*SHAPES, f, v, "--out", "run"], f)
      for f, v in (("--patch", "0"), ("--probe-n", "1"), ("--wd", "inf"), ("--wd", "-1"))],
    *[(f"flag{f}={v}", ["mae_dp"], lambda S, s, f=f, v=v: [*SHAPES, f, v, "--out", "run"], f)
      for f, v in (("--mask-ratio", "1"), ("--mask-ratio", "-0.1"), ("--syn-lr", "nan"))],
    *[(f"flag{f}={v}", ["randp"], lambda S, s, f=f, v=v: [*SHAPES, f, v, "--out", "run"], f)
      for f, v in (("--ema", "1"), ("--ema", "nan"), ("--prior-steps", "-1"), ("--momentum", "nan"),
                   ("--lp-lr", "0"), ("--width", "nan"), ("--aug-mult", "0"))],
    ("flag--tan-batch=0", ["cap_dp"], lambda S, s: [*SHAPES, "--tan-batch", "0", "--out", "run"], "--tan-batch"),
    ("flag--micro-batch=1", ["clip_dp"], lambda S, s: [*SHAPES, "--micro-batch", "1", "--out", "run"],
     "--micro-batch"),
    ("flag--text-len=1", ["clip_dp"], lambda S, s: [*SHAPES, "--text-len", "1", "--out", "run"], "--text-len"),
    ("flag--max-len=1", ["cap_dp"], lambda S, s: [*SHAPES, "--max-len", "1", "--out", "run"], "--max-len"),
    ("n-above-data", ["mae_dp", "randp"], lambda S, s: ["--data", S / "folder", "--n", "50", "--out", "new"],
     ["--n 50", "only 6"]),
    ("n-above-data", ["cap_dp", "clip_dp"], lambda S, s: ["--data", S / "caps.tsv", "--n", "50", "--out", "new"],
     ["--n 50", "only 3"]),
    # 6. devices
    ("device-tpu9", ALL, lambda S, s: [*SHAPES, "--device", "tpu9", "--out", "new"], "--device tpu9"),
    *([("device-cuda", ALL, lambda S, s: [*SHAPES, "--device", "cuda", "--out", "new"], "--device cuda")]
      if not torch.cuda.is_available() else []),
    # 7. data
    ("data-unreadable", ALL, lambda S, s: ["--data", "/proc", "--out", "new"], "/proc"),  # not listable as a whole
    ("coco-no-caption", ALL, lambda S, s: ["--data", S / "coco.json", "--out", "new"], "coco.json"),
    ("idx-label-12", ALL, lambda S, s: ["--data", S / "idx_label", "--out", "new"], "train-labels-idx1-ubyte"),
    ("idx-255-dims", ALL, lambda S, s: ["--data", S / "idx_dims", "--out", "new"], "train-images-idx3-ubyte"),
    ("one-class", ["randp"], lambda S, s: ["--data", S / "one_class", "--out", "new"], "same label"),
    ("captions-all-empty", ["cap_dp", "clip_dp"], lambda S, s: ["--data", S / "empty_caps.tsv", "--out", "new"],
     "every caption is empty"),
    ("grey-private-rgb-probe", ["mae_dp"], lambda S, s: ["--data", S / "idx_ok", "--out", "new"], "--probe-data"),
    ("probe-no-test-split", ENCODERS, lambda S, s: [*SHAPES, "--probe-data", S / "folder", "--out", "new"],
     "no test split"),
    ("data-no-test-split", ["randp"], lambda S, s: ["--data", S / "folder", "--out", "new"], "no test split"),
    # 10. randp names the flag at fault
    ("steps-0-no-prior", ["randp"], lambda S, s: [*SHAPES, "--steps", "0", "--out", "new"], "--steps must be"),
]
TABLE = [pytest.param(script, flags, words, id=f"{script}-{cid}")
         for cid, scripts, flags, words in CASES for script in scripts]


@pytest.mark.parametrize("script, flags, words", TABLE)
def test_bad_input_is_one_line(script, flags, words, sets, prior, tmp_path):
    argv = [str(x) for x in flags(sets, script)]
    sleeper = None
    if "@lock" in argv:  # a live process holds the lock: the first of two runs on one --out
        sleeper = subprocess.Popen(["sleep", "60"])
        (prior / "run.lock").write_text(f"{sleeper.pid}\n")
    resume = next((a.split(":", 1)[1] for a in argv if a.startswith("@resume:")), None)
    if resume == "own":  # the prior run's own, good checkpoint
        torch.save(_checkpoint(script), prior / "checkpoint.pt")
    elif resume and (sets / resume).is_dir():
        (prior / "checkpoint.pt").mkdir()
    elif resume:
        (prior / "checkpoint.pt").write_bytes((sets / resume).read_bytes())
    argv = ["--out", "run", "--resume"] if resume else [*TINY[script], *argv]
    before = snapshot(tmp_path), snapshot(sets)
    try:
        r = run_main(f"{script}.py", *argv, cwd=tmp_path)
    finally:
        if sleeper:
            sleeper.kill()
            sleeper.wait()
    assert_one_line(r, [w.format(other=other(script)) for w in ([words] if isinstance(words, str) else words)])
    assert "weights_only" not in r.stderr  # never suggest loading a checkpoint unsafely
    assert (snapshot(tmp_path), snapshot(sets)) == before  # nothing written, nothing spoiled
    assert not (sets / "PWNED").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_payload_checkpoint_as_a_user_sees_it(script, sets, prior, tmp_path):
    """The same check in a real process: what reaches the terminal, warnings included, is one line."""
    (prior / "checkpoint.pt").write_bytes((sets / "payload_raw.pt").read_bytes())
    before = snapshot(tmp_path)
    r = run_script(f"{script}.py", "--out", "run", "--resume", cwd=tmp_path)
    assert_one_line(r, ["--resume", "refused"])
    assert "weights_only" not in r.stderr and snapshot(tmp_path) == before and not (sets / "PWNED").exists()


# ----------------------------------------------------------------------------------------------------------------
# 8. data.py grid and 9. accountant.py's CLI


@pytest.mark.parametrize("argv, words", [
    (["grid", "/no/such/path", "g.png"], "/no/such/path"),
    (["grid", "{sets}/cifar", "g.png"], ["data_batch_1", "refused"]),
    (["grid", "shapes", "g.png", "abc"], "N must be"),
    (["grid", "shapes", "g.png", "0"], "N must be"),
    (["grid", "shapes", "{sets}"], "a folder"),
    (["grid", "shapes", "{sets}/nowhere/g.png"], "does not exist"),
], ids=["missing", "payload", "N-abc", "N-0", "out-folder", "out-nowhere"])
def test_data_grid_bad_argument_is_one_line(argv, words, sets, tmp_path):
    argv = [a.format(sets=sets) for a in argv]
    before = snapshot(sets)
    r = run_main("data.py", *argv, cwd=tmp_path)
    assert_one_line(r, words)
    assert snapshot(sets) == before and not list(tmp_path.iterdir())


def test_data_grid_without_arguments_prints_usage_and_fails(tmp_path):
    r = run_main("data.py", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("usage: python data.py grid") and "Traceback" not in r.stderr


def test_accountant_cli_refuses_delta_at_least_1_over_n(tmp_path):
    r = run_main("accountant.py", "--sigma", "1", "--batch-size", "10", "--n", "100", "--steps", "5", "--delta",
                 "0.01", cwd=tmp_path)
    assert_one_line(r, ["--delta", "1/N"])
    r = run_main("accountant.py", "--sigma", "1", "--batch-size", "10", "--n", "100", "--steps", "5", "--delta",
                 "0.009", cwd=tmp_path)
    assert r.returncode == 0 and "eps = " in r.stdout


# ----------------------------------------------------------------------------------------------------------------
# the shared helpers themselves


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_has_a_rule(script):
    parser, _ = runpy.run_path(str(ROOT / f"{script}.py"))["parse_args"]([])
    numeric = {a.dest for a in parser._actions if a.type in (int, float)}
    assert numeric and numeric <= set(data.FLAG_RULES), numeric - set(data.FLAG_RULES)


def test_check_flags_takes_inf_eps_and_defaults():
    data.check_flags(SimpleNamespace(eps=float("inf"), clip=1.0, n=None, delta=None, patch=None, seed=0))
    with pytest.raises(ValueError, match="--eps"):
        data.check_flags(SimpleNamespace(eps=float("nan")))


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(f"{dead.pid}\n")
    data.claim_out_dir(tmp_path / "run", resume=False)
    assert (tmp_path / "run" / "run.lock").read_text().strip() == str(os.getpid())
    data.release_out_dirs()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_second_run_on_one_out_is_refused_while_the_first_lives(tmp_path):
    """Two real processes: the first holds the lock while it lives; the second refuses; after the first exits,
    its lock is gone (cleared at exit) and the folder is free again."""
    code = ("import sys, time, data; data.claim_out_dir(sys.argv[1], resume=False); print('held', flush=True); "
            "time.sleep(30)")
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert first.stdout.readline().strip() == "held"
        r = run_script("randp.py", *TINY["randp"], *SHAPES, "--out", "run", cwd=tmp_path)
        assert_one_line(r, f"(pid {first.pid})")
    finally:
        first.terminate()
        first.wait()
    # terminated by a signal, its atexit never ran: the pid is gone, so the next run takes the lock over
    data.claim_out_dir(tmp_path / "run", resume=False)
    data.release_out_dirs()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_trim_metrics_drops_lines_past_the_step(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    data.trim_metrics(m, step=2)
    assert m.read_text() == '{"step": 1}\n{"step": 2}\n'
    stamp = m.stat().st_mtime_ns
    data.trim_metrics(m, step=2)  # nothing to drop: the file is not rewritten
    assert m.stat().st_mtime_ns == stamp


def test_check_captions_warns_with_the_count(capsys):
    ds = SimpleNamespace(captions=["a red circle", "", " "])
    data.check_captions(ds, flag="--data x")
    assert capsys.readouterr().err.strip() == "warning: --data x: 2 of 3 captions are empty"


# ----------------------------------------------------------------------------------------------------------------
# 4. a kill between a log line and its checkpoint: the resumed run never logs a step twice


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_kill_between_log_and_checkpoint(script, tmp_path):
    r = run_main(f"{script}.py", *TINY[script], *SHAPES, "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["script"] == script
    ck["args"]["steps"] = 3  # the run was to go on: its step-3 line was written, then the kill came
    torch.save(ck, tmp_path / "run" / "checkpoint.pt")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    r = run_main(f"{script}.py", "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not (tmp_path / "run" / "run.lock").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_of_an_older_or_a_damaged_checkpoint(script, tmp_path):
    r = run_main(f"{script}.py", *TINY[script], *SHAPES, "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ck["args"]["steps"] = 3
    del ck["args"]["log_private"]  # written before that flag existed: the resumed run takes its default
    torch.save(ck, tmp_path / "run" / "checkpoint.pt")
    r = run_main(f"{script}.py", "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ck["args"]["steps"] = 4
    name = next(iter(ck["model"]))
    ck["model"][name] = torch.zeros(7, 7, 7)  # a tensor that does not fit the model
    torch.save(ck, tmp_path / "run" / "checkpoint.pt")
    before = snapshot(tmp_path / "run")
    r = run_main(f"{script}.py", "--out", "run", "--resume", cwd=tmp_path)
    assert_one_line(r, "--resume")
    assert snapshot(tmp_path / "run") == before
