"""What the documents claim: the README's list of what the eps does not cover, randp.py's account of how its
defaults were tuned, and docs/eps_curve.py's figure (spent eps on the x axis, --eps inf drawn apart)."""
import json
import re
import subprocess
import sys

from PIL import Image

import randp
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def section(text, title):
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    start = text.index(title)
    level = len(re.match(r"#+", title).group())
    rest = text[start + len(title):]
    end = re.search(rf"\n#{{1,{level}}} ", rest)
    return rest[:end.start()] if end else rest


def test_the_readme_lists_what_the_eps_does_not_cover_in_one_place():
    gaps = section(README, "### What the ε does not cover")
    for words in ("**N.**", "treats N as public",  # N is published exactly
                  "**Time.**", "side channel",  # wall time tracks the secret sample
                  "non-finite gradient", "checkpoint.pt", "--log-private", "console",
                  "--debug-no-noise", "--insecure-seed", "NOT PRIVATE",  # the test flags, as labelled
                  "not private", "How the defaults were chosen", "seed 0", "bare `python randp.py`",
                  "The audit proves nothing", "Floating point"):
        assert words in gaps, words
    # and nowhere else: the section above lists what is covered, with no "not covered" of its own
    assert "Not covered" not in section(README, "## What the ε covers").split("### What the ε does not cover")[0]


def test_the_readme_states_the_audits_limits():
    audit = section(README, "## Checking the claim")
    for words in ("same call", "clip_and_sum", "2C", "What it cannot", "clipping the sum instead of each row",
                  "not flagged"):
        assert words in audit, words
    assert "augmentation stream" not in README  # the augmentations are per example, not per process


def test_randp_says_where_its_defaults_were_tuned_as_the_readme_does():
    doc = " ".join(randp.__doc__.split())
    assert "never on the data reported" not in doc
    assert "default seed 0" in doc and "bare `python randp.py`" in doc and "--seed 1" in doc
    readme = " ".join(README.split())
    assert "tuned on the embedded set at the default seed 0" in readme and "bare `python randp.py`" in readme


def fake_run(path, *, eps, target, acc, private=True, reason=None):
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(dict(private=private, not_private_reason=reason, eps=eps,
                                                       target_eps=target, zero_shot=acc, chance=0.1),
                                                  allow_nan=False))
    return path


def eps_curve(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "docs" / "eps_curve.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_eps_curve_plots_the_spent_eps_and_draws_the_ceiling_apart(tmp_path):
    runs = [fake_run(tmp_path / "e8", eps=5.1, target=8.0, acc=0.25),  # a TAN run: it spent less than its target
            fake_run(tmp_path / "e1", eps=0.98, target=1.0, acc=0.20),
            fake_run(tmp_path / "c4", eps=4.0, target=4.0, acc=0.22),  # composed over --init: eps is the total
            fake_run(tmp_path / "inf", eps=None, target=None, acc=0.40, private=False, reason="--eps inf")]
    r = eps_curve(tmp_path / "out.png", "zero_shot", *runs, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "eps 0.980: 20.0%, eps 4.000: 22.0%, eps 5.100: 25.0%; ceiling (--eps inf, not private): 40.0%" in r.stdout
    img = Image.open(tmp_path / "out.png").convert("RGB")
    W, H = img.size
    ceiling_row = round(H - 50 - (H - 30 - 50) * 0.40 / (0.40 * 1.15))  # eps_curve.py's y(0.40)
    red = [x for x in range(W) if img.getpixel((x, ceiling_row)) == (200, 60, 40)]
    assert len(red) > W // 3  # a dashed line across the figure, not one more point of the curve


def test_eps_curve_refuses_a_run_labelled_not_private_with_an_eps(tmp_path):
    runs = [fake_run(tmp_path / "e1", eps=0.98, target=1.0, acc=0.2),
            fake_run(tmp_path / "pinned", eps=1.0, target=1.0, acc=0.3, private=False,
                     reason="--insecure-seed: the sample and the noise follow --seed")]
    r = eps_curve(tmp_path / "out.png", "zero_shot", *runs, cwd=tmp_path)
    assert r.returncode != 0 and "--insecure-seed" in r.stderr and not (tmp_path / "out.png").exists()
