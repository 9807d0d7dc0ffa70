"""Shared test setup: the repository root on sys.path, where the optional real data lives, each script's tiny
flags, and one smoke run per script shared by the test files that read it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ../shared/data beside the checkout (see its README); tests that need it skip when it is absent.
SHARED_DATA = Path(os.environ.get("DP_REPR_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Each script at its smallest: 300 shapes, an expected batch of 40, a log line and a checkpoint every 2 steps.
# A run adds --eps and --steps (tiny()); under torchrun --n is spelled --n-examples (test_torchrun.py).
TINY = {
    "mae_dp.py": ["--model", "tiny", "--size", "16", "--n", "300", "--batch-size", "40", "--physical-batch", "16",
                  "--syn-steps", "3", "--syn-batch", "8", "--probe-n", "200", "--log-every", "2"],
    "cap_dp.py": ["--model", "cnn-tiny", "--size", "16", "--n", "300", "--batch-size", "40", "--physical-batch", "16",
                  "--probe-n", "200", "--zero-shot-n", "20", "--max-len", "8", "--log-every", "2"],
    "clip_dp.py": ["--model", "cnn-tiny", "--size", "16", "--n", "300", "--batch-size", "40", "--micro-batch", "4",
                   "--physical-batch", "16", "--text-len", "12", "--probe-n", "200", "--retrieval-n", "100",
                   "--log-every", "2"],
    "randp.py": ["--width", "0.25", "--size", "16", "--n", "300", "--batch-size", "40", "--physical-batch", "16",
                 "--aug-mult", "2", "--prior-steps", "3", "--prior-batch", "8", "--log-every", "2"],
}


def tiny(script, steps):
    """TINY flags for a run of `steps` steps; randp.py, whose --lp-steps must stay below --steps, spends half of
    them on its linear probe (phase II) so that both of its DP phases run."""
    return [*TINY[script], "--steps", str(steps), *(["--lp-steps", str(steps // 2)] if script == "randp.py" else [])]


def run_script(script, *args, cwd, timeout=600):
    """Run one of the project's scripts as a user would (a subprocess), from `cwd`, one thread per process
    so the suite stays predictable on a 2-core machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(r, words):
    """Bad input as a user sees it (DP rule 6): exit code 2, one `error:` line naming the problem, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr[-2000:]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """smoke_run(script) -> (cwd, completed process): `script --eps 4` for 4 tiny steps into cwd/run, run once per
    session however many test files read it (its outputs are read, never changed; copy them to change them)."""
    done = {}

    def get(script):
        if script not in done:
            cwd = tmp_path_factory.mktemp(Path(script).stem)
            r = run_script(script, "--eps", "4", *tiny(script, 4), "--out", "run", cwd=cwd)
            assert r.returncode == 0, r.stderr[-3000:]
            done[script] = cwd, r
        return done[script]
    return get
