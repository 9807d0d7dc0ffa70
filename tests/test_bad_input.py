"""Every bad input gets one clear line: exit code 2, one `error:` line naming the flag or file, no traceback, and
nothing already written changed (a prior run's files in --out stay byte-identical).

Tables of cases, each run against every script it applies to. The scripts run in this process through their own
`__main__` block (as runpy does, the compiled code kept), so torch is imported once and the whole file stays under a
minute on 2 CPU cores; an exception escaping that block is what a user would see as a traceback, and is reported as
one. A few cases also run as real processes, beside the others (the pid lock, a payload-carrying checkpoint, a closed
pipe, a full disk).
"""
import contextlib
import gzip
import io
import json
import os
import pickle
import runpy
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import traceback
import types
import warnings
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import accountant
import data
from conftest import ROOT

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


def quick(script, S):
    """Flags of a run that goes to its end quickly: 2 steps, evaluated on the 16 test images of S/small (randp.py:
    trained on its 8 images too)."""
    if script == "randp":
        return ["--data", S / "small", "--steps", "2", "--log-every", "1"]
    return [*SHAPES, "--probe-data", S / "small"]


@lru_cache(maxsize=None)
def compiled(file):
    """A script's code, compiled once for all the table's runs (runpy.run_path compiles it again at every call)."""
    return compile((ROOT / file).read_text(), str(ROOT / file), "exec")


def run_as_main(file):
    """What runpy.run_path(file, run_name="__main__") does, with the compiled code kept: a fresh __main__ module."""
    module = types.ModuleType("__main__")
    module.__file__ = str(ROOT / file)
    old, sys.modules["__main__"] = sys.modules["__main__"], module
    try:
        exec(compiled(file), module.__dict__)
    finally:
        sys.modules["__main__"] = old


def run_main(file, *argv, cwd, stdout=None, env=None):
    """Run `python file argv...` in this process: its __main__ block, stdout and stderr captured, warnings shown as
    they would be on stderr, locks released as at process exit. stdout: another stream to print to; env: variables
    set for the run. Returns (returncode, stdout, stderr)."""
    out, err, code = io.StringIO() if stdout is None else stdout, io.StringIO(), 0
    old_argv, old_cwd = sys.argv, os.getcwd()
    old_env = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    sys.argv = [str(ROOT / file), *map(str, argv)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            try:
                run_as_main(file)
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
        for k, v in old_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return SimpleNamespace(returncode=code, stdout=out.getvalue() if stdout is None else "", stderr=err.getvalue())


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


def signature(root):
    """{path: (size, mtime)} of every file under root: what snapshot tells, cheaply, for the big folder of sets."""
    return {os.path.join(d, f): (s.st_size, s.st_mtime_ns) for d, _, fs in os.walk(root) for f in fs
            for s in [os.lstat(os.path.join(d, f))]}


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
    states = [torch.zeros(8, dtype=torch.uint8)] * 3  # of the right type: a resume refuses them later, at restore
    return dict(model={}, optimizer=dict(state={}, param_groups=[]), args=vars(args), step=step,
                accountant=dict(history=[]), rng=states, audit=None, script=script,
                **(dict(ema={}) if script == "randp" else {}))


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
    for split, k in (("train", 4), ("test", 8)):  # "small": both splits, 16 test images (what the pictures show)
        for c in ("a", "b"):
            (d / "small" / split / c).mkdir(parents=True)
            for i in range(k):
                _png(d / "small" / split / c / f"{i}.png", 50 + 20 * (c == "b") + i)
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
    before = snapshot(tmp_path), signature(sets)
    try:
        r = run_main(f"{script}.py", *argv, cwd=tmp_path)
    finally:
        if sleeper:
            sleeper.kill()
            sleeper.wait()
    assert_one_line(r, [w.format(other=other(script)) for w in ([words] if isinstance(words, str) else words)])
    assert "weights_only" not in r.stderr  # never suggest loading a checkpoint unsafely
    assert (snapshot(tmp_path), signature(sets)) == before  # nothing written, nothing spoiled
    assert not (sets / "PWNED").exists()


# Real processes, as a user starts them: begun with this file's first test and checked by the tests that name them,
# so that they run on the second core meanwhile; only those whose tests are selected are started.


def start_user_run(script, *args, cwd, logs, stdout=None, **env):
    """Popen `python script args` in cwd, stderr to a file in logs (not in cwd, whose files the test compares)."""
    err = open(logs / f"{cwd.name}.stderr", "w+")
    p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, stdout=stdout,
                         stderr=err, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env))
    return p, err


def finished(run):
    """Wait for a user run: SimpleNamespace(returncode, stderr)."""
    p, err = run
    code = p.wait(timeout=600)
    err.seek(0)
    return SimpleNamespace(returncode=code, stdout="", stderr=err.read())


@pytest.fixture(scope="module", autouse=True)
def user_runs(request, sets, tmp_path_factory):
    wanted = {item.originalname for item in request.session.items if item.module is request.module}
    logs, runs = tmp_path_factory.mktemp("logs"), {}
    if "test_a_payload_checkpoint_as_a_user_sees_it" in wanted:
        for script in SCRIPTS:
            cwd = tmp_path_factory.mktemp(f"payload_{script}")
            (cwd / "run").mkdir()
            (cwd / "run" / "summary.json").write_text("{}")
            (cwd / "run" / "checkpoint.pt").write_bytes((sets / "payload_raw.pt").read_bytes())
            runs["payload", script] = cwd, snapshot(cwd), start_user_run(f"{script}.py", "--out", "run", "--resume",
                                                                         cwd=cwd, logs=logs)
    if "test_a_real_closed_pipe_and_an_ascii_terminal" in wanted:
        cwd = tmp_path_factory.mktemp("pipe")
        run = start_user_run("randp.py", *TINY["randp"], *quick("randp", sets), "--out", "run-é", cwd=cwd, logs=logs,
                             stdout=subprocess.PIPE, PYTHONIOENCODING="ascii")

        def head_1():  # the reader leaves after one line, as `| head -1` does
            run[0].stdout.readline()
            run[0].stdout.close()
        threading.Thread(target=head_1, daemon=True).start()
        runs["pipe"] = cwd, None, run
    if "test_a_real_full_disk_on_stdout" in wanted:
        cwd = tmp_path_factory.mktemp("full")
        with open("/dev/full", "w") as full:
            runs["full"] = cwd, None, start_user_run("mae_dp.py", *TINY["mae_dp"], *quick("mae_dp", sets), "--out",
                                                     "run", cwd=cwd, logs=logs, stdout=full)
    if "test_a_second_run_on_one_out_is_refused_while_the_first_lives" in wanted:
        cwd = tmp_path_factory.mktemp("lock")
        code = ("import sys, time, data; data.claim_out_dir(sys.argv[1], resume=False); print('held', flush=True); "
                "time.sleep(60)")
        first = subprocess.Popen([sys.executable, "-c", code, str(cwd / "run")], cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        second = []

        def then_the_second():  # once the first holds the lock
            if first.stdout.readline().strip() == "held":
                second.append(start_user_run("randp.py", *TINY["randp"], *SHAPES, "--out", "run", cwd=cwd, logs=logs))
        started = threading.Thread(target=then_the_second, daemon=True)
        started.start()
        runs["lock"] = cwd, (first, None), (started, second)
    yield runs
    for name, (_, a, b) in runs.items():
        for p, err in [a, *b[1]] if name == "lock" else [b]:
            p.kill()
            p.wait()
            err and err.close()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_payload_checkpoint_as_a_user_sees_it(script, sets, user_runs):
    """The same check in a real process: what reaches the terminal, warnings included, is one line."""
    cwd, before, run = user_runs["payload", script]
    r = finished(run)
    assert_one_line(r, ["--resume", "refused"])
    assert "weights_only" not in r.stderr and snapshot(cwd) == before and not (sets / "PWNED").exists()


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


@pytest.mark.parametrize("argv", [[], ["grid"], ["grid", "shapes"], ["grid", "shapes", "g.png", "4", "extra"],
                                  ["tile", "shapes", "g.png"]], ids=["none", "grid", "kind", "extra", "tile"])
def test_data_grid_without_its_arguments_is_one_line_with_the_usage(argv, tmp_path):
    r = run_main("data.py", *argv, cwd=tmp_path)
    assert_one_line(r, ["usage: python data.py grid"])
    assert not list(tmp_path.iterdir())
    r = run_main("data.py", "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: python data.py grid") and not r.stderr


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


def test_a_second_run_on_one_out_is_refused_while_the_first_lives(user_runs):
    """Two real processes: the first holds the lock while it lives; the second refuses; after the first exits,
    its lock is gone (cleared at exit) and the folder is free again."""
    cwd, (first, _), (started, second) = user_runs["lock"]
    try:
        started.join(timeout=600)
        assert second, "the first process never said it held the lock"
        r = finished(second[0])
        assert_one_line(r, f"(pid {first.pid})")
    finally:
        first.terminate()
        first.wait()
    # terminated by a signal, its atexit never ran: the pid is gone, so the next run takes the lock over
    data.claim_out_dir(cwd / "run", resume=False)
    data.release_out_dirs()
    assert not (cwd / "run" / "run.lock").exists()


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
# 4. runs stopped part-way: a run of 3 steps (a checkpoint each step) stopped by SIGINT once step 2's is written


def send_after_checkpoint(step, signum):
    """data.save_atomic as it is, and then, once the checkpoint of `step` is written, `signum` to this very process
    (caught by the scripts' handler, never by pytest: the handler is checked first)."""
    real = data.save_atomic

    def save(obj, path, **kw):
        real(obj, path, **kw)
        if kw.get("step") == step:
            assert signal.getsignal(signum) is data._on_signal
            os.kill(os.getpid(), signum)
    return save


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, sets):
    """{script: a folder holding a run of 3 steps stopped by SIGINT after its step-2 checkpoint}: copy it to use it."""
    root, runs, real = tmp_path_factory.mktemp("stopped"), {}, data.save_atomic
    for script in SCRIPTS:
        data.save_atomic = send_after_checkpoint(2, signal.SIGINT)
        try:
            r = run_main(f"{script}.py", *TINY[script], *quick(script, sets), "--steps", "3", "--out", script,
                         cwd=root)
        finally:
            data.save_atomic = real
        assert r.returncode == 130 and "interrupted (SIGINT) at step 2" in r.stderr, r.stderr[-2000:]
        runs[script] = root / script
    return runs


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_kill_between_log_and_checkpoint(script, stopped, tmp_path):
    run = copy_run(stopped[script], tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["script"] == script and ck["args"]["steps"] == 3
    with open(run / "metrics.jsonl", "a") as f:  # its step-3 line was written, then the kill came
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    r = run_main(f"{script}.py", "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not (run / "run.lock").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_of_an_older_or_a_damaged_checkpoint(script, stopped, tmp_path):
    run = copy_run(stopped[script], tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    del ck["args"]["log_private"]  # written before that flag existed: the resumed run takes its default
    torch.save(ck, run / "checkpoint.pt")
    r = run_main(f"{script}.py", "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3
    name = next(iter(ck["model"]))
    ck["model"][name] = torch.zeros(7, 7, 7)  # a tensor that does not fit the model
    torch.save(ck, run / "checkpoint.pt")
    before = snapshot(run)
    r = run_main(f"{script}.py", "--out", "run", "--resume", cwd=tmp_path)
    assert_one_line(r, "--resume")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------------------------------------------
# 11. the kinds of input a hostile new user tries: each case names what its line must hold, and the earlier run
# (run/, the prior fixture) and every file already there must be left byte-identical. A case's setup(S, T, script)
# gets the folder of bad files S and the working folder T (where it may lay out a folder first) and returns the
# flags; the table's TINY flags come first unless they start with "@own"; "@env:K=V" sets a variable for the run.


def _jpeg(path, seed, cut=None):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:cut])


def _cifar(d, *, data=None, labels=None, names=None):
    """A CIFAR-10 folder of 6 images per batch; data/labels/names replace the fields of data_batch_1 / the meta."""
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, part in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 4, 5]}
        if i == 0:
            batch.update({k: v for k, v in ((b"data", data), (b"labels", labels)) if v is not None})
        with open(d / part, "wb") as f:
            pickle.dump({k: (None if isinstance(v, str) and v == "None" else v) for k, v in batch.items()}, f, 2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"] if names is None else names}, f, 2)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def _png_bytes(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile(sets):
    """Bad files of the kinds the first table does not hold, beside its own (the same folder S)."""
    d = sets
    (d / "notes.txt").write_text("a text file, not an image\n")
    for name in ("img_bad", "img_cut"):  # class folders with a train and a test split, one bad file in train/b
        for split in ("train", "test"):
            for c in ("a", "b"):
                (d / name / split / c).mkdir(parents=True)
                for i in range(3):
                    _png(d / name / split / c / f"{i}.png", 40 + i)
    (d / "img_bad" / "train" / "b" / "text.jpg").write_text("not a jpeg\n")  # a text file named .jpg
    _jpeg(d / "img_cut" / "train" / "b" / "cut.jpg", 7, cut=300)  # a JPEG cut short
    (d / "tsv_bad.tsv").write_text("caps/0.png\ta circle\ncaps/1.png\ta star\nnotes.txt\ta square\n")
    coco = lambda images, anns: json.dumps({"images": images, "annotations": anns})
    good_images = [{"id": i, "file_name": f"caps/{i}.png"} for i in range(3)]
    good_anns = [{"id": i, "image_id": i, "caption": f"a circle {i}"} for i in range(3)]
    (d / "coco_bad.json").write_text(coco(good_images[:2] + [{"id": 2, "file_name": "notes.txt"}], good_anns))
    variants = {
        "coco_ann_dict": coco(good_images, {"0": good_anns[0]}),
        "coco_ann_ints": coco(good_images, [1, 2, 3]),
        "coco_fname_5": coco([{"id": 0, "file_name": 5}], good_anns),
        "coco_fname_null": coco([{"id": 0, "file_name": None}], good_anns),
        "coco_imgid_list": coco(good_images, [{"id": 0, "image_id": [0], "caption": "a circle"}]),
        "coco_caption_null": coco(good_images, [{"id": i, "image_id": i, "caption": None} for i in range(3)]),
        "coco_id_twice": coco(good_images + good_images[:1], good_anns),
        "coco_deep": "[" * 200_000 + "]" * 200_000,
        "coco_name_surrogate": coco(good_images, good_anns).replace("caps/1.png", "caps/\\ud800.png"),
        "coco_caption_surrogate": coco(good_images, good_anns).replace("a circle 1", "a \\udcff circle"),
        "coco_not_an_object": "[1, 2, 3]",
    }
    for name, text in variants.items():
        (d / f"{name}.json").write_text(text)
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    for name, images in (("idx_zero_n", x[:0]), ("idx_zero_h", np.zeros((6, 0, 8), np.uint8))):
        (d / name).mkdir()
        _idx(d / name / "train-images-idx3-ubyte", images)
        _idx(d / name / "train-labels-idx1-ubyte", np.zeros(len(images), np.uint8))
    (d / "idx_gz").mkdir()
    body = gzip.compress(b"\0" * 500)
    (d / "idx_gz" / "train-images-idx3-ubyte.gz").write_bytes(body[:12] + b"\xff" * 40 + body[52:])  # corrupt body
    _idx(d / "idx_gz" / "train-labels-idx1-ubyte", np.zeros(6, np.uint8))
    _cifar(d / "cifar_data_none", data="None")
    _cifar(d / "cifar_labels_none", labels="None")
    _cifar(d / "cifar_names_5", names=5)
    _cifar(d / "cifar_60_labels", labels=list(range(10)) * 6)  # 6 images, 60 labels
    _cifar(d / "cifar_float_labels", labels=[0.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    _cifar(d / "cifar_label_12", labels=[0, 1, 2, 3, 4, 12])
    (d / "wds").mkdir()
    _tar(d / "wds" / "shard-0.tar", [(f"k{i}.{ext}", body) for i in range(3) for ext, body in
                                     (("png", _png_bytes(i)), ("txt", b"a circle"), ("cls", "²".encode()))])
    os.mkfifo(d / "fifo")
    os.mkfifo(d / "fifo.pt")
    for name, record in (("init_private_words", {"private": "no", "accountant": {"history": []}, "pipeline": []}),
                         ("init_pipeline_text", {"private": True, "accountant": {"history": []}, "pipeline": "x"}),
                         ("init_accountant_text", {"private": True, "accountant": {"history": "x"}, "pipeline": []})):
        torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 32)}, "privacy": record, "script": "mae_dp"},
                   d / f"{name}.pt")
    return d


def data_case(name, *extra):
    """--data S/name into a new folder; a batch of 2, so that the 3 examples of the small sets are enough."""
    return lambda S, T, s: ["--data", S / name, "--batch-size", "2", *extra, "--out", "new"]


def flag_case(*flags):
    return lambda S, T, s: [*SHAPES, *flags, "--out", "new"]


def lay_out(name, kind, own=None):
    """A folder T/r2 whose file `name` is a folder or a FIFO, then the run's flags into it (own: {script: flags}
    instead of the table's)."""
    def setup(S, T, s):
        (T / "r2").mkdir()
        os.mkfifo(T / "r2" / name) if kind == "fifo" else (T / "r2" / name).mkdir()
        return ["@own", *own[s], "--out", "r2"] if own else [*SHAPES, "--out", "r2"]
    return setup


# the flags of a run that builds (and caches) its public stage: mae_dp's ViP-Syn, randp's prior
PUBLIC_STAGE = {"mae_dp": [*TINY["mae_dp"], *SHAPES, "--init", "syn"],
                "randp": [f for f in TINY["randp"] if f != "--no-prior"] + SHAPES + ["--lp-steps", "1"]}


@lru_cache(maxsize=None)
def cache_name(script):
    """The runs/cache path a run with PUBLIC_STAGE's flags reads: asked of the script itself (read_cache stops it)."""
    seen, real = [], data.read_cache

    def spy(path):
        seen.append(str(path))
        raise data.DataError("stop")
    data.read_cache = spy
    try:
        with tempfile.TemporaryDirectory() as d:
            run_main(f"{script}.py", *PUBLIC_STAGE[script], "--out", "probe", cwd=d)
    finally:
        data.read_cache = real
    return seen[0]


def cache_case(write):
    def setup(S, T, s):
        path = T / cache_name(s)
        path.parent.mkdir(parents=True)
        write(path, S)
        return ["@own", *PUBLIC_STAGE[s], "--out", "new"]
    return setup


def _truncated_cache(path, S):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(100)}, buf)
    path.write_bytes(buf.getvalue()[:200])


def in_the_way(*parts):
    """runs/cache (or runs) is a file where the cache folder goes."""
    def setup(S, T, s):
        T.joinpath(*parts[:-1]).mkdir(parents=True, exist_ok=True)
        T.joinpath(*parts).write_text("not a folder\n")
        return ["@own", *PUBLIC_STAGE[s], "--out", "new"]
    return setup


def edited(edit):
    """The stopped run of the script, copied to T/k, its checkpoint edited by edit(ckpt) (or its folder, given as
    edit(ckpt, folder)), then resumed."""
    def setup(S, T, s):
        run = copy_run(STOPPED[s], T / "k")
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        ck = edit(ck, run) if edit.__code__.co_argcount == 2 else edit(ck)
        if ck is not None:
            torch.save(ck, run / "checkpoint.pt")
        return ["@own", "--out", "k", "--resume"]
    return setup


STOPPED = {}  # filled from the `stopped` fixture by the table's test


def _set(d, path, value):
    """d with d[path[0]][path[1]]... = value (returned, for edited())."""
    target = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return d


def _first_state(ck):
    """The first optimiser state tensor that has a parameter's shape, replaced by one of another shape."""
    states = ck["optimizer"]["state"]
    k, name = next((k, n) for k, s in states.items() for n, t in s.items() if isinstance(t, torch.Tensor) and t.dim())
    states[k][name] = torch.zeros(3)
    return ck


def _nan_weight(ck):
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = torch.full_like(ck["model"][name], float("nan"))
    return ck


def _wd(ck):
    ck["optimizer"]["param_groups"][0]["weight_decay"] = 5.0
    return ck


def _bad_metrics(ck, run):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe not utf-8\n")


ENV = lambda **kw: lambda S, T, s: [*[f"@env:{k}={v}" for k, v in kw.items()], *SHAPES, "--out", "new"]
HOSTILE = [
    # 2. an image that cannot be read: found before training, whatever the sample; no folder left behind
    ("text-named-jpg", ALL, data_case("img_bad"), "text.jpg"),
    ("truncated-jpeg", ALL, data_case("img_cut"), ["cut.jpg", "cannot read image"]),
    ("tsv-row-not-an-image", ALL, data_case("tsv_bad.tsv"), "notes.txt"),
    ("coco-entry-not-an-image", ALL, data_case("coco_bad.json"), "notes.txt"),
    ("probe-not-an-image", ENCODERS, lambda S, T, s: [*SHAPES, "--probe-data", S / "img_bad", "--out", "new"],
     "text.jpg"),
    # 3. file contents of the wrong type: the line names the file
    *[(name.replace("_", "-"), ALL, data_case(f"{name}.json"), f"{name}.json")
      for name in ("coco_ann_dict", "coco_ann_ints", "coco_fname_5", "coco_fname_null", "coco_imgid_list",
                   "coco_caption_null", "coco_id_twice", "coco_deep", "coco_name_surrogate", "coco_caption_surrogate",
                   "coco_not_an_object")],
    ("idx-zero-examples", ALL, data_case("idx_zero_n"), ["train-images-idx3-ubyte", "zero"]),
    ("idx-zero-height", ALL, data_case("idx_zero_h"), ["train-images-idx3-ubyte", "zero"]),
    ("idx-corrupt-gz", ALL, data_case("idx_gz"), "train-images-idx3-ubyte.gz"),
    *[(name.replace("_", "-"), ALL, data_case(name), [name, what]) for name, what in (
        ("cifar_data_none", "data_batch_1"), ("cifar_labels_none", "data_batch_1"), ("cifar_names_5", "batches.meta"),
        ("cifar_60_labels", "60 labels"), ("cifar_float_labels", "whole numbers"), ("cifar_label_12", "12"))],
    # 4. files that are not files
    ("data-fifo", ALL, data_case("fifo"), ["fifo", "FIFO"]),
    ("data-dev-zero", ALL, lambda S, T, s: ["--data", "/dev/zero", "--out", "new"], "/dev/zero"),
    ("probe-fifo", ENCODERS, lambda S, T, s: [*SHAPES, "--probe-data", S / "fifo", "--out", "new"], "FIFO"),
    ("init-fifo", ENCODERS, lambda S, T, s: [*SHAPES, "--init", S / "fifo.pt", "--out", "new"], ["--init", "FIFO"]),
    *[(f"init-{name}", ENCODERS, lambda S, T, s, n=name: [*SHAPES, "--init", S / f"init_{n}.pt", "--out", "new"],
       ["--init", f"init_{name}.pt", what]) for name, what in (
        ("private_words", "privacy record"), ("pipeline_text", "privacy record"), ("accountant_text", "accountant"))],
    ("cache-folder-is-a-file", ["mae_dp", "randp"], in_the_way("runs", "cache"), "runs/cache"),
    ("runs-is-a-file", ["mae_dp", "randp"], in_the_way("runs"), "runs"),
    *[(f"{name}-is-a-{kind}", ALL, lay_out(name, kind), name) for name, kind in (
        ("run.lock", "folder"), ("metrics.jsonl", "folder"), ("summary.json", "folder"), ("model.pt", "folder"),
        ("checkpoint.pt.tmp", "folder"), ("metrics.jsonl", "fifo"), ("summary.json", "fifo"))],
    ("recon.png-is-a-folder", ["mae_dp"], lay_out("recon.png", "folder"), "recon.png"),
    ("priors.png-is-a-folder", ["randp"], lay_out("priors.png", "folder", PUBLIC_STAGE), "priors.png"),
    # 5. caches and checkpoints are checked, field by field, against the run that reads them
    ("cache-truncated", ["mae_dp", "randp"], cache_case(_truncated_cache), ["runs/cache", "truncated", "delete"]),
    ("cache-payload", ["mae_dp", "randp"], cache_case(lambda p, S: p.write_bytes((S / "payload.pt").read_bytes())),
     ["runs/cache", "refused"]),
    ("cache-foreign-keys", ["mae_dp", "randp"], cache_case(lambda p, S: torch.save({"w": torch.zeros(2)}, p)),
     ["runs/cache", "do not fit"]),
    ("cache-a-tensor", ["mae_dp", "randp"], cache_case(lambda p, S: torch.save(torch.zeros(2), p)),
     ["runs/cache", "state_dict"]),
    ("cache-empty", ["mae_dp", "randp"], cache_case(lambda p, S: p.write_bytes(b"")), ["runs/cache", "0 bytes"]),
    ("ckpt-steps-two", ALL, edited(lambda ck: _set(ck, ("args", "steps"), "two")), ["--resume", "--steps", "'two'"]),
    ("ckpt-args-bool", ALL, edited(lambda ck: _set(ck, ("args", "insecure_seed"), "yes")), "--insecure-seed"),
    ("ckpt-model-giant", ALL, edited(lambda ck: _set(ck, ("model",), "giant")), ["--resume", "model"]),
    ("ckpt-rng-shape", ALL, edited(lambda ck: _set(ck, ("rng", 0), torch.zeros(10, dtype=torch.uint8))),
     ["--resume", "sampling generator"]),
    ("ckpt-rng-not-tensors", ALL, edited(lambda ck: _set(ck, ("rng",), [1, 2, 3])), ["--resume", "rng"]),
    ("ckpt-optimizer-empty", ALL, edited(lambda ck: _set(ck, ("optimizer",), {})), ["--resume", "optimizer"]),
    ("ckpt-optimizer-wd", ALL, edited(_wd), ["--resume", "weight_decay"]),
    ("ckpt-optimizer-state-shape", ENCODERS, edited(_first_state), ["--resume", "shape"]),
    ("ckpt-weight-nan", ALL, edited(_nan_weight), ["--resume", "NaN"]),
    ("ckpt-step-negative", ALL, edited(lambda ck: _set(ck, ("step",), -5)), ["--resume", "step"]),
    ("ckpt-step-1e9", ALL, edited(lambda ck: _set(ck, ("step",), 10 ** 9)), ["--resume", "past"]),
    ("ckpt-step-float", ALL, edited(lambda ck: _set(ck, ("step",), 1e9)), ["--resume", "step"]),
    ("ckpt-step-moved", ALL, edited(lambda ck: _set(ck, ("step",), 1)), ["--resume", "accountant"]),
    ("ckpt-args-eps", ALL, edited(lambda ck: _set(ck, ("args", "eps"), 2.0)), ["--resume", "accountant"]),
    ("ckpt-args-steps", ALL, edited(lambda ck: _set(ck, ("args", "steps"), 5)), ["--resume", "accountant"]),
    ("ckpt-accountant-history", ALL, edited(lambda ck: _set(ck, ("accountant", "history"), [[0.5, 0.1, 2]])),
     ["--resume", "accountant"]),
    ("ckpt-init-pipeline", ALL, edited(lambda ck: _set(ck, ("init",), dict(prior=None, note=None, pipeline="x"))),
     ["--resume", "init"]),
    ("ckpt-ema-shape", ["randp"], edited(lambda ck: _set(ck, ("ema", "head.weight"), torch.zeros(3))),
     ["--resume", "ema"]),
    ("ckpt-no-ema", ["randp"], edited(lambda ck: ck.pop("ema") and ck), ["--resume", "ema"]),
    ("metrics-not-utf8", ALL, edited(_bad_metrics), ["metrics.jsonl:3", "UTF-8"]),
    # 6. numbers that pass a sign check but cannot run: the line gives the bound
    *[(f"{f}={v}", ALL, flag_case(f, v), [f, "<="]) for f, v in (
        ("--clip", "1e308"), ("--lr", "1e308"), ("--n", str(10 ** 12)), ("--size", "100000"), ("--audit", "1000000000"),
        ("--physical-batch", "1000000000"), ("--batch-size", str(10 ** 12)), ("--steps", str(10 ** 12)))],
    *[(f"{f}={v}", ENCODERS, flag_case(f, v), [f, "<="]) for f, v in (
        ("--wd", "1e308"), ("--probe-n", "10000000000"))],
    *[(f"{f}={v}", [s], flag_case(f, v), [f, "<="]) for s, f, v in (
        ("cap_dp", "--max-len", "1000000"), ("clip_dp", "--text-len", "1000000"), ("randp", "--width", "1e6"),
        ("randp", "--aug-mult", "1000000"), ("clip_dp", "--retrieval-n", "1000000000"),
        ("cap_dp", "--zero-shot-n", "1000000000"), ("mae_dp", "--syn-batch", "1000000000"),
        ("randp", "--prior-batch", "1000000000"), ("mae_dp", "--syn-lr", "1e308"), ("randp", "--lp-lr", "1e308"))],
    ("shapes-beyond-memory", ALL, flag_case("--n", "100000000", "--size", "1024"), ["shapes", "GiB"]),
    # 7. flags that would be changed or dropped without a word
    ("micro-batch-above-batch", ["clip_dp"], flag_case("--micro-batch", "5"), ["--micro-batch 5", "--batch-size 4"]),
    ("micro-batch-far-above", ["clip_dp"], flag_case("--micro-batch", "1000"), "--micro-batch 1000"),
    ("tan-batch-above-batch", ["cap_dp"], flag_case("--tan-batch", "8"), "--tan-batch"),
    ("width-1e-9", ["randp"], flag_case("--width", "1e-9"), ["--width", "0.25"]),
    ("width-0.1", ["randp"], flag_case("--width", "0.1"), ["--width", "0.25"]),
    ("out-empty", ALL, lambda S, T, s: [*SHAPES, "--out", ""], "--out is empty"),
    ("out-blank", ALL, lambda S, T, s: [*SHAPES, "--out", "  "], "--out is empty"),
    ("out-root", ALL, lambda S, T, s: [*SHAPES, "--out", "/"], "filesystem root"),
    ("out-root-dots", ALL, lambda S, T, s: [*SHAPES, "--out", "/tmp/../.."], "filesystem root"),
    *[(f"name-{label}", ALL, lambda S, T, s, n=n: [*SHAPES, "--name", n], "--name") for label, n in (
        ("escapes", "../../x"), ("slash", "a/b"), ("dots", ".."), ("dot", "."), ("empty", ""), ("absolute", "/x"))],
    # 8. the environment
    ("env-rank-alone", ALL, ENV(RANK=1), ["RANK=1", "WORLD_SIZE"]),
    ("env-rank-words", ALL, ENV(RANK="abc"), ["RANK='abc'", "whole number"]),
    ("env-world-words", ALL, ENV(RANK=0, WORLD_SIZE="two"), "WORLD_SIZE='two'"),
    ("env-local-rank-negative", ALL, ENV(RANK=0, WORLD_SIZE=2, LOCAL_RANK=-1), "LOCAL_RANK='-1'"),
    ("env-world-without-torchrun", ALL, ENV(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0), ["MASTER_ADDR", "torchrun"]),
    ("env-rank-past-world", ALL, ENV(RANK=3, WORLD_SIZE=2), ["RANK=3", "WORLD_SIZE=2"]),
    ("env-world-zero", ALL, ENV(RANK=0, WORLD_SIZE=0), "WORLD_SIZE=0"),
    ("env-world-alone", ALL, ENV(WORLD_SIZE=2), ["WORLD_SIZE=2", "RANK is not"]),
    ("wds-cls-superscript", ALL, data_case("wds"), ["shard-0.tar:k0.cls", "whole-number"]),
]
HOSTILE_TABLE = [pytest.param(script, setup, words, id=f"{script}-{cid}")
                 for cid, scripts, setup, words in HOSTILE for script in scripts]


@pytest.mark.parametrize("script, setup, words", HOSTILE_TABLE)
def test_hostile_input_is_one_line(script, setup, words, hostile, stopped, prior, tmp_path):
    STOPPED.update(stopped)
    argv = [str(x) for x in setup(hostile, tmp_path, script)]
    env = dict(a[len("@env:"):].split("=", 1) for a in argv if a.startswith("@env:"))
    argv = [a for a in argv if not a.startswith("@env:")]
    argv = argv[1:] if argv[:1] == ["@own"] else [*TINY[script], *argv]
    before = snapshot(tmp_path), signature(hostile)
    r = run_main(f"{script}.py", *argv, cwd=tmp_path, env=env)
    assert_one_line(r, words)
    assert "weights_only" not in r.stderr
    assert (snapshot(tmp_path), signature(hostile)) == before  # nothing written, nothing spoiled
    # no folder left that a rerun refuses: whatever the run made holds no run's files
    assert not any((tmp_path / "new" / f).exists() for f in data.RUN_FILES)
    assert not (hostile / "PWNED").exists()


@pytest.mark.parametrize("argv, words", [
    (["--sigma", "1e300", "--q", "0.01", "--steps", "10"], "--sigma"),
    (["--sigma", "1e-300", "--q", "0.01", "--steps", "10"], "--sigma"),
    (["--sigma", "1", "--batch-size", "10", "--n", "1000", "--epochs", "1e308"], "--epochs"),
    (["--sigma", "1", "--q", "0.01", "--steps", str(10 ** 16)], "--steps"),
    (["--eps", "1", "--q", "0.01", "--steps", str(10 ** 16)], "--steps"),
], ids=["sigma-1e300", "sigma-1e-300", "epochs-1e308", "steps-1e16", "eps-steps-1e16"])
def test_accountant_cli_numbers_that_cannot_run_are_one_line(argv, words, tmp_path):
    r = run_main("accountant.py", *argv, cwd=tmp_path)
    assert_one_line(r, [words, "<="])


def test_data_grid_of_too_many_images_is_one_line(tmp_path):
    r = run_main("data.py", "grid", "shapes", "g.png", "100000000000", cwd=tmp_path)
    assert_one_line(r, ["N must be", "1024"])
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# 12. signals and streams: Ctrl-C or SIGTERM is one line once the last checkpoint is safe, exit code 128 + the
# signal; a stdout that fails or cannot encode never stops a run nor spoils its release. In this process, through
# the scripts' own __main__: the signal is sent to this process at the moment the case names.


class FailingStdout(io.TextIOBase):
    """A stdout whose writes fail once `after` characters are written, as a pipe whose reader left (`| head -1`),
    or a full disk (`> /dev/full`)."""

    def __init__(self, error, after=0):
        self.error, self.left = error, after

    def write(self, text):
        if len(text) > self.left:
            raise self.error
        self.left -= len(text)
        return len(text)


def send_on(name, signum, when=lambda *a, **kw: True, owner=data):
    """Patch owner.<name> to send `signum` to this process before it runs, the first time when(...) holds."""
    real, fired = getattr(owner, name), []

    def call(*args, **kw):
        if not fired and when(*args, **kw):
            fired.append(1)
            assert signal.getsignal(signum) is data._on_signal
            os.kill(os.getpid(), signum)
        return real(*args, **kw)
    return owner, name, call


SIGNAL_CASES = {  # case -> (patch of data, stdout, exit code, words of the one line, what the folder holds after)
    "sigint-after-first-checkpoint": (lambda: (data, "save_atomic", send_after_checkpoint(1, signal.SIGINT)), None,
                                      130, ["interrupted (SIGINT) at step 1", "--resume --out new"], "checkpoint"),
    "sigterm-after-first-checkpoint": (lambda: (data, "save_atomic", send_after_checkpoint(1, signal.SIGTERM)), None,
                                       143, ["interrupted (SIGTERM) at step 1", "--resume"], "checkpoint"),
    # torch.save of checkpoint.pt.tmp: inside the write, whose signals are held
    "sigint-while-a-checkpoint-is-written": (
        lambda: send_on("save", signal.SIGINT, lambda o, p, *a, **kw: str(p).endswith("checkpoint.pt.tmp"),
                        owner=torch), None, 130, ["interrupted (SIGINT) at step 1"], "checkpoint"),
    "sigint-while-data-loads": (lambda: send_on("load_dataset", signal.SIGINT), None, 130,
                                ["interrupted (SIGINT) before the first checkpoint", "at step 0"], "nothing"),
    "sigterm-before-the-out-is-claimed": (lambda: send_on("claim_out_dir", signal.SIGTERM), None, 143,
                                          ["interrupted (SIGTERM) before the run started"], "nothing"),
    "sigterm-while-the-release-is-written": (
        lambda: send_on("save_atomic", signal.SIGTERM, lambda o, p, **kw: Path(p).name == "model.pt"), None, 143,
        ["interrupted (SIGTERM) after the release was written"], "release"),
    "stdout-closed-pipe": (None, lambda: FailingStdout(BrokenPipeError(32, "Broken pipe"), after=40), 0,
                           ["warning: stdout", "BrokenPipeError"], "release"),
    "stdout-disk-full": (None, lambda: FailingStdout(OSError(28, "No space left on device")), 0,
                         ["warning: stdout", "No space left"], "release"),
    "stdout-ascii": (None, lambda: io.TextIOWrapper(io.BytesIO(), encoding="ascii"), 0, None, "release"),
}


@pytest.mark.parametrize("case", SIGNAL_CASES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_signals_and_streams_are_one_line_and_leave_a_folder_to_continue(script, case, sets, prior, tmp_path):
    patch, stdout, code, words, after = SIGNAL_CASES[case]
    patch = patch and patch()
    out = "new" if case != "stdout-ascii" else "new-é"  # a name the ascii stdout cannot print as it is
    before = snapshot(prior)
    real = patch and getattr(*patch[:2])
    if patch:
        setattr(*patch)
    try:
        r = run_main(f"{script}.py", *TINY[script], *quick(script, sets), "--out", out, cwd=tmp_path,
                     stdout=stdout and stdout())
    finally:
        if patch:
            setattr(*patch[:2], real)
    assert "Traceback" not in r.stderr and r.returncode == code, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith(("error:", "warning:"))]
    if words is None:
        assert not lines, lines
    else:
        assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert snapshot(prior) == before  # the earlier run is left as it was
    run = tmp_path / out
    held = {f for f in data.RUN_FILES if (run / f).exists()}
    if after == "nothing":  # a rerun or --resume starts it again
        log = run / "metrics.jsonl"
        assert not held and (not log.exists() or not log.stat().st_size)
    elif after == "checkpoint":  # a whole checkpoint of step 1, no release
        assert held == {"checkpoint.pt"}
        assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1
    else:  # the whole release
        assert held == set(data.RUN_FILES)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 2 and torch.load(run / "model.pt", weights_only=True)["privacy"]["n"] == summary["n"]
    assert not (run / "run.lock").exists() and not list(run.glob("*.tmp"))


def test_a_real_closed_pipe_and_an_ascii_terminal(user_runs):
    """`python randp.py ... --out run-é | head -1` with PYTHONIOENCODING=ascii, as a user runs it: the run goes on
    to its whole release, no traceback (not even at exit), exit code 0."""
    cwd, _, run = user_runs["pipe"]
    r = finished(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    assert [l for l in r.stderr.splitlines() if l.startswith(("warning:", "error:"))] == [
        "warning: stdout: BrokenPipeError: [Errno 32] Broken pipe; the run goes on without printing"]
    assert all((cwd / "run-é" / f).exists() for f in data.RUN_FILES)


def test_a_real_full_disk_on_stdout(user_runs):
    """`python mae_dp.py ... > /dev/full`: one warning, the whole release, exit code 0."""
    cwd, _, run = user_runs["full"]
    r = finished(run)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith(("warning:", "error:"))] == [
        "warning: stdout: OSError: [Errno 28] No space left on device; the run goes on without printing"]
    assert all((cwd / "run" / f).exists() for f in data.RUN_FILES)


def test_a_signal_during_a_write_waits_for_the_write(tmp_path):
    """save_atomic holds SIGINT while it writes: the file is whole, then the interruption comes."""
    def main():
        with data.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            data.save_atomic("whole\n", tmp_path / "f.txt")
            assert (tmp_path / "f.txt").read_text() == "whole\n"
        raise AssertionError("not reached: the interruption comes as the held block ends")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert data.run_main(main) == 130
    assert (tmp_path / "f.txt").read_text() == "whole\n" and not (tmp_path / "f.txt.tmp").exists()
    assert err.getvalue().startswith("error: interrupted (SIGINT) before the run started")
    assert signal.getsignal(signal.SIGINT) is not data._on_signal  # the handler this process had is back


# ----------------------------------------------------------------------------------------------------------------
# 13. what bad input must not break: folders a dead run left, locks that hold no pid, files readers must accept


def test_a_folder_whose_run_died_before_its_first_checkpoint_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "priors.png").write_bytes(b"x")
    data.claim_out_dir(run, resume=False)  # a rerun
    data.release_out_dirs()
    assert (run / "metrics.jsonl").read_text() == ""
    assert "stopped before its first checkpoint" in capsys.readouterr().out
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert data.resume_point(run) is None and "starting at step 0" in capsys.readouterr().out  # --resume
    data.claim_out_dir(run, resume=True)
    data.release_out_dirs()
    assert (run / "metrics.jsonl").read_text() == ""
    (run / "checkpoint.pt").write_bytes(b"x")  # a checkpoint: a run to keep, refused to a new run
    with pytest.raises(data.DataError, match="already holds a run"):
        data.claim_out_dir(run, resume=False)
    (run / "checkpoint.pt").unlink()
    (run / "summary.json").write_text("{}")  # finished, its checkpoint gone: nothing to resume
    with pytest.raises(data.DataError, match="finished run"):
        data.resume_point(run)
    with pytest.raises(data.DataError, match="no such folder"):
        data.resume_point(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["99999999999999999999\n", "-5\n", "-1\n", "0\n", "abc\n", "", "٣\n"])
def test_a_lock_that_holds_no_pid_is_taken_over(text, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(text)
    data.claim_out_dir(tmp_path / "run", resume=False)
    assert (tmp_path / "run" / "run.lock").read_text().strip() == str(os.getpid())
    data.release_out_dirs()


def test_a_table_with_a_bom_or_a_carriage_return_reads_as_written(tmp_path):
    (tmp_path / "caps").mkdir()
    for i in range(3):
        _png(tmp_path / "caps" / f"{i}.png", i)
    (tmp_path / "bom.csv").write_text("\ufeffimage,caption\ncaps/0.png,a circle\ncaps/1.png,a star\r\n",
                                      encoding="utf-8")
    assert data.load_dataset(str(tmp_path / "bom.csv")).captions == ["a circle", "a star"]
    (tmp_path / "cr.tsv").write_text("caps/0.png\ta red\rcircle\r\ncaps/2.png\ta star\n")
    ds = data.load_dataset(str(tmp_path / "cr.tsv"))
    assert ds.captions == ["a red circle", "a star"] and len(ds) == 2


def test_a_forged_webdataset_index_is_rebuilt(tmp_path):
    _tar(tmp_path / "s.tar", [(f"k{i}.{ext}", body) for i in range(2)
                              for ext, body in (("png", _png_bytes(i)), ("txt", f"cap {i}".encode()))])
    good = data.load_dataset(str(tmp_path / "s.tar"))
    index = tmp_path / "s.tar.idx.json"
    honest = json.loads(index.read_text())
    for forged in ([["k0", 10 ** 9, 5, "x", None]], [["k0", "0", 5, None, None]], [[1, 2]], "entries"):
        index.write_text(json.dumps(dict(honest, entries=forged)))
        ds = data.load_dataset(str(tmp_path / "s.tar"))
        assert ds.captions == good.captions and torch.equal(ds.images([0, 1]), good.images([0, 1]))


def test_flags_typed_where_the_run_would_not_use_them_are_named(capsys):
    for script, argv, named in (("cap_dp", ["--captions", "full", "--data", "x.tsv"], "--captions"),
                                ("mae_dp", ["--init", "none", "--syn-steps", "3"], "--syn-steps"),
                                ("randp", ["--no-prior", "--prior-steps", "3", "--lp-lr", "1"],
                                 "--prior-steps, --lp-lr"),
                                ("clip_dp", ["--init-data-disjoint"], "--init-data-disjoint"),
                                ("mae_dp", ["--eps", "inf", "--clip", "2"], "--clip"),
                                ("randp", ["--out", "x", "--name", "y"], "--name")):
        parser, args = runpy.run_path(str(ROOT / f"{script}.py"))["parse_args"](argv)
        data.check_command(parser, args)
        assert f"note: {named} not used" in capsys.readouterr().out, (script, argv)
    parser, args = runpy.run_path(str(ROOT / "cap_dp.py"))["parse_args"](["--captions", "full"])
    data.check_command(parser, args)  # used: nothing to say
    assert capsys.readouterr().out == ""


def test_memory_is_estimated_before_a_big_allocation():
    with pytest.raises(data.DataError, match="GiB"):
        data.check_memory(2 ** 62, "a test")
    with pytest.raises(data.DataError, match="random-process"):
        data.random_process_images(65536, 1024)
