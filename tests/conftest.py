"""Shared test setup: the repository root on sys.path, and where the optional real data lives."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ../shared/data beside the checkout (see its README); tests that need it skip when it is absent.
SHARED_DATA = Path(os.environ.get("DP_REPR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def run_script(script, *args, cwd, timeout=600):
    """Run one of the project's scripts as a user would (a subprocess), from `cwd`, one thread per process
    so the suite stays predictable on a 2-core machine."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(r, words):
    """Bad input as a user sees it (DP rule 6): exit code 2, one `error:` line naming the problem, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr[-2000:]
