"""What the four scripts share: the DP block and the labelled plumbing, copied on purpose and kept byte-identical,
and the behaviour every script must have end to end (tiny sizes): a true privacy claim, a resume that continues
step and epsilon, bad flags as one line, and the --eps inf ceiling. What is one method's own is in its test file."""
import collections
import difflib
import inspect
import json
import re
import shutil

import pytest
import torch

import accountant
import cap_dp
import clip_dp
import data
import mae_dp
import randp
from conftest import assert_one_error_line, run_script, tiny

MODULES = {"mae_dp.py": mae_dp, "cap_dp.py": cap_dp, "clip_dp.py": clip_dp, "randp.py": randp}
ALL = tuple(MODULES)
VIT = ("mae_dp.py", "cap_dp.py", "clip_dp.py")  # the three ViT scripts; randp.py is a WRN
PLUMBED = ALL
BANNER = "# " + "-" * 112 + "\n"

# Each file stands alone (STYLE.md, CleanRL), so these are copies; this list is what keeps them one text. Each entry:
# (name, the scripts sharing it). A name is a top-level function or class of the script; "plumbing" is the section
# under the "TRY NOT TO MODIFY: run plumbing" banner, up to the next banner (resume, torchrun, the generators,
# checkpoint, log and release); "__main__" is the closing handler that turns a bad input into one `error:` line.
# Not listed, as the copies differ by design: ViTEncoder (mae_dp.py's has no conv stem).
SHARED = (
    ("make_per_example_grads", ALL),
    ("dp_step", ALL),
    ("all_ranks_sum", ALL),
    ("make_batch_grad", ALL),
    ("plain_step", ALL),
    ("lr_at", ALL),
    ("plumbing", PLUMBED),
    ("__main__", ALL),
    ("sincos_pos_embed", VIT),
    ("patchify", VIT),
    ("Attention", VIT),
    ("Block", VIT),
    ("ConvStem", ("cap_dp.py", "clip_dp.py")),
    ("ConvEncoder", ("cap_dp.py", "clip_dp.py")),
    ("clip_and_sum", ALL),
)


def main_blocks(module):
    """{banner words: text} of the `    # --- words ---` blocks of module.main, each up to the next banner."""
    blocks, words = {}, None
    for line in inspect.getsource(module.main).splitlines(keepends=True):
        m = re.match(r"    # --- (.*)", line)
        if m:
            words = m.group(1)
            blocks[words] = ""
        if words is not None:
            blocks[words] += line
    return blocks


def shared_source(module, name):
    if name == "__main__":
        src = inspect.getsource(module)
        return src[src.index('\nif __name__ == "__main__":'):]
    if name == "plumbing":
        src = inspect.getsource(module)
        start = src.index(BANNER + "# TRY NOT TO MODIFY: run plumbing")
        return src[start:src.index(BANNER, start + len(BANNER))]
    return inspect.getsource(getattr(module, name))


@pytest.mark.parametrize("name, scripts", SHARED, ids=[re.sub(r"\W+", "_", name) for name, _ in SHARED])
def test_shared_code_is_identical_in_every_script(name, scripts):
    sources = {s: shared_source(MODULES[s], name) for s in scripts}
    # the copy most scripts hold is the reference, so the message names the script that drifted from it
    reference, _ = collections.Counter(sources.values()).most_common(1)[0]
    holders = [s for s in scripts if sources[s] == reference]
    drifted = [s for s in scripts if s not in holders]
    diffs = ["".join(difflib.unified_diff(reference.splitlines(True), sources[s].splitlines(True),
                                          f"{holders[0]}: {name}", f"{s}: {name}")) for s in drifted]
    assert not drifted, f"{name} drifted in {', '.join(drifted)} from the copy in {', '.join(holders)}:\n" + \
        "\n".join(diffs)


def test_main_holds_no_unlisted_copy():
    """Plumbing belongs in the labelled section the identity test compares, not pasted into main()."""
    for script, module in MODULES.items():
        for words in main_blocks(module):
            assert "identical in every script" not in words, f"{script}: main() holds '# --- {words}'"


# --- end to end: each script's tiny run (conftest.smoke_run), shared with its own test file ---

# Per script: the picture its run writes, and the line of its checkpoint's step-6 log that a resume must keep
# (randp.py's phase); its own summary keys are tested in its own file.
PICTURE = {"mae_dp.py": "recon.png", "cap_dp.py": "captions.png", "clip_dp.py": "zero_shot.png",
           "randp.py": "priors.png"}
RESUMED_LOG = {"mae_dp.py": {}, "cap_dp.py": {}, "clip_dp.py": {}, "randp.py": {"phase": "fine_tune"}}
each_script = pytest.mark.parametrize("script", ALL, ids=[s[:-3] for s in ALL])


def log_of(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@each_script
def test_smoke_run_writes_a_true_claim(smoke_run, script):
    cwd, r = smoke_run(script)
    s = json.loads((cwd / "run" / "summary.json").read_text())
    assert s["steps"] == 4 and s["n"] == 300 and s["delta"] == pytest.approx(1 / 600)
    assert s["q"] == pytest.approx(40 / 300) and s["private"] is True
    # sigma is calibrated to the target: eps met, and not by an overshooting sigma that would waste utility
    assert 3.9 < s["eps"] <= 4.0
    assert s["eps"] == pytest.approx(accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=4, delta=s["delta"]))
    assert [l["step"] for l in log_of(cwd / "run")] == [2, 4]
    assert (cwd / "run" / PICTURE[script]).stat().st_size > 0
    # the released file carries the accountant of what ran (4 steps at q, sigma), not only a number
    privacy = torch.load(cwd / "run" / "model.pt", weights_only=True)["privacy"]
    released = accountant.RDPAccountant()
    released.load_state_dict(privacy["accountant"])
    assert privacy["private"] is True and released.epsilon(privacy["delta"]) == pytest.approx(s["eps"])
    assert f"done: eps={s['eps']:.3f}" in r.stdout  # what the user reads is the eps of the summary


def trained_parameters(script, phase="fine_tune"):
    """d of the TINY model of each script, counted on a model built here (TINY: size 16, the default patch 16 of
    the tiny ViT, 259 word ids, text length 12 / 8 words)."""
    if script == "mae_dp.py":
        model = mae_dp.MAE(16, 16, 3, **mae_dp.SIZES["tiny"])
    elif script == "cap_dp.py":
        model = cap_dp.Captioner(16, 16, 3, **cap_dp.SIZES["cnn-tiny"], max_len=8, vocab=259)
    elif script == "clip_dp.py":
        model = clip_dp.CLIP(16, 16, 3, 12, 259, **clip_dp.SIZES["cnn-tiny"])
    else:
        model = randp.WRN(0.25, 10, 3)
        model = model.head if phase == "linear_probe" else model
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("batch", [40, 20])
@each_script
def test_the_noise_signal_budget_is_printed_and_saved_before_training(smoke_run, tmp_path, script, batch):
    """mult * sigma * sqrt(d) / K by hand, for two settings (B = 40, the smoke run's, and B = 20): K = B clipped
    examples, or for clip_dp.py K = B / m micro-batches with mult 2; sigma from the accountant for that run."""
    if batch == 40:
        cwd, r = smoke_run(script)
        out = cwd / "run"
    else:
        flags = [*tiny(script, 2), "--batch-size", "20", "--eps", "4", "--out", "b20"]
        r = run_script(script, *flags, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        out = tmp_path / "b20"
    steps = 4 if batch == 40 else 2
    sigma = accountant.dp_sgd_plan(target_eps=4, n=300, batch_size=batch, steps=steps)["sigma"]
    mult, K = (2, batch / 4) if script == "clip_dp.py" else (1, batch)
    budget = json.loads((out / "summary.json").read_text())["noise_signal"]
    phases = {"linear_probe": budget["linear_probe"], "fine_tune": budget["fine_tune"]} if script == "randp.py" else {
        "fine_tune": budget}
    printed = re.findall(r"noise/signal budget: d=([\d,]+) .*= ([\d.]+),", r.stdout)
    assert len(printed) == len(phases)
    for (phase, b), (d_text, ratio_text) in zip(phases.items(), printed):
        d = trained_parameters(script, phase)
        ratio = mult * sigma * d ** 0.5 / K
        assert b["trained_parameters"] == d == int(d_text.replace(",", "")) and b["units_per_step"] == K
        assert b["ratio"] == pytest.approx(ratio, rel=1e-9) and float(ratio_text) == pytest.approx(ratio, abs=5e-4)
    assert r.stdout.index("noise/signal budget") < r.stdout.index("done: eps=")


class Stopped(Exception):
    """Raised right after a checkpoint is written: the run ends there, as a killed one would."""


@each_script
def test_resume_continues_step_and_epsilon(tmp_path, monkeypatch, script):
    # a run of 6 steps stopped once its step-4 checkpoint is written, then resumed as a user would
    monkeypatch.chdir(tmp_path)
    write = data.save_atomic

    def write_then_stop(obj, path, **kw):
        write(obj, path, **kw)
        if kw.get("step") == 4:
            raise Stopped
    monkeypatch.setattr(data, "save_atomic", write_then_stop)
    with pytest.raises(Stopped):
        MODULES[script].main(["--eps", "4", *tiny(script, 6), "--out", "run"])
    data.release_out_dirs()  # as the process's exit would
    monkeypatch.undo()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and ck["args"]["steps"] == 6 and ck["accountant"]
    eps4 = accountant.RDPAccountant()
    eps4.load_state_dict(ck["accountant"])
    before = log_of(tmp_path / "run")
    r = run_script(script, "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"resumed at step 4, eps so far {eps4.epsilon(s['delta']):.3f}" in r.stdout
    assert s["steps"] == 6
    # epsilon continues from the checkpoint: 4 steps + 2 more, not 2 from scratch, and ends at the plan's 6 steps
    assert s["eps"] > accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=2, delta=s["delta"])
    eps4.step(q=s["q"], sigma=s["sigma"], steps=2)
    assert s["eps"] == pytest.approx(eps4.epsilon(s["delta"]))
    assert s["eps"] == pytest.approx(accountant.epsilon(q=s["q"], sigma=s["sigma"], steps=6, delta=s["delta"]))
    # the log continues too: the lines up to step 4 as they were, then step 6, none repeated
    after = log_of(tmp_path / "run")
    assert after[:2] == before and [l["step"] for l in after] == [2, 4, 6]
    assert RESUMED_LOG[script].items() <= after[2].items()


@each_script
@pytest.mark.parametrize("flags, words", [  # as a user sees them: the script's handler, one line, exit code 2
    (["--eps", "0"], "eps"),  # a ValueError
    (["--data", "/no/such/path"], "/no/such/path"),  # a data.DataError
])
def test_bad_flags_exit_with_one_line(tmp_path, script, flags, words):
    r = run_script(script, *tiny(script, 2), *flags, "--out", "bad", cwd=tmp_path)
    assert_one_error_line(r, words)
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


@each_script
@pytest.mark.parametrize("flags, words", [  # in process: main() raises the one-line error the handler prints
    (["--eps", "-1"], "eps"),
    (["--delta", "0.01"], "delta"),  # >= 1/N for N = 300
    (["--batch-size", "301"], "batch"),  # > N
    (["--eps", "inf", "--audit", "10"], "--audit"),  # an audit checks a claim; --eps inf makes none
])
def test_bad_flags_raise_one_line_errors(tmp_path, monkeypatch, script, flags, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, data.DataError), match=words) as e:
        MODULES[script].main([*tiny(script, 2), *flags, "--out", "bad"])
    assert "\n" not in str(e.value)


@each_script
def test_eps_inf_is_a_non_private_reference(tmp_path, script):
    """--eps inf: the same run without clipping, noise or accountant; it says so and records private: false."""
    r = run_script(script, "--eps", "inf", *tiny(script, 2), "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # strict JSON: an infinite eps is null (json.loads would take Infinity; this parser refuses it)
    s = strict_json((tmp_path / "run" / "summary.json").read_text())
    assert s["private"] is False and s["eps"] is None and s["sigma"] == 0 and s["steps"] == 2
    assert s["target_eps"] is None and s["args"]["eps"] is None and "--eps inf" in s["not_private_reason"]
    assert all(strict_json(l)["eps"] is None for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert "NOT PRIVATE" in r.stdout
    release = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert release["privacy"]["private"] is False  # a file refused as a private --init (test_release.py)
    assert strict_json(json.dumps(release["privacy"]))["eps"] is None


def strict_json(text):
    """json.loads that refuses Infinity and NaN, which are not JSON (Python writes and reads them by default)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@each_script
@pytest.mark.parametrize("typed", [["--eps", "8"], ["--steps", "60"], ["--seed", "0", "--clip", "1"],
                                   ["--insecure-seed"]], ids=["eps-default", "steps", "seed-clip", "insecure"])
def test_resume_refuses_a_typed_flag_that_differs_from_the_run(smoke_run, tmp_path, monkeypatch, script, typed):
    """The checkpoint's run is at eps 4 (4 steps, seed 0, clip 1): a flag typed with --resume is compared with it
    even when typed at its default value (--eps 8 is every script's default), and one that differs is refused."""
    cwd, _ = smoke_run(script)
    shutil.copytree(cwd / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    resume = ["--out", "run", "--resume", *typed]
    if typed[:2] == ["--seed", "0"]:  # typed and equal to the run's (seed 0, clip 1): accepted
        args, ckpt = MODULES[script].resumed(*MODULES[script].parse_args(resume), tmp_path / "run")
        assert ckpt["step"] == 4 and args.eps == 4 and args.steps == 4
        return
    with pytest.raises(ValueError, match=typed[0]) as e:
        MODULES[script].main(resume)
    assert "\n" not in str(e.value) and "differ" in str(e.value)
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before  # nothing written
