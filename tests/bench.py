"""Speed benchmarks: a plain script, not a test (pytest collects only test_*.py).

    python tests/bench.py               # every section
    python tests/bench.py accountant    # only the named sections (accountant: a few seconds)

To add a section: write `def bench_<name>():` that prints its own lines, and register it in SECTIONS.
Timings are medians over several calls: wall clock, and this process's CPU time (time.process_time), which a
machine shared with other jobs inflates less. Every verdict against a target (ms per call, images/s per core)
uses the CPU time. The DP / non-private ratios use wall time instead: the two steps run interleaved, so load
hits both alike, and CPU time would add up the threads of a multi-threaded step.
"""
import argparse
import ast
import inspect
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_wall_cpu_ms(calls):
    """(median wall ms, median CPU ms of this process) over the zero-argument callables in `calls`."""
    wall, cpu = [], []
    for call in calls:
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def default_patch(script, args):
    """The patch side `python <script>.py` uses with these args. It depends on --model, so it is no argparse
    default: main() sets it in one line, `args.patch = args.patch or ...`, which is read from the script's own
    source and evaluated here, so that a changed default in the script changes what is measured."""
    for node in ast.walk(ast.parse(inspect.getsource(script.main))):
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["args.patch"]:
            return eval(compile(ast.Expression(node.value), script.__file__, "eval"), {}, {"args": args})
    raise RuntimeError(f"{script.__name__}.main() no longer sets args.patch in one line: update tests/bench.py")


def report(name, wall, cpu, target=None):
    verdict = "" if target is None else f"target <= {target:g} ms  {'ok' if cpu <= target else 'OVER TARGET'}"
    print(f"  {name:<44} {wall:8.2f} ms wall  {cpu:8.2f} ms cpu   {verdict}")


# --- accountant.py --------------------------------------------------------------------------------------------------

def bench_accountant():
    import warnings

    import numpy as np

    import accountant as acc

    warnings.simplefilter("ignore")  # edge-of-grid warnings are not what is measured here
    # one call first: builds the per-grid binomial tables, once per process
    acc.epsilon(q=0.01, sigma=1.0, steps=100, delta=1e-5)

    # epsilon(): a different (q, sigma) every call, so nothing computed for one call helps the next
    settings = [(q, s) for q in (256 / 60000, 0.01, 0.1, 0.5) for s in np.linspace(0.6, 8.0, 15)]
    wall, cpu = median_wall_cpu_ms([lambda q=q, s=s: acc.epsilon(q=q, sigma=s, steps=10_000, delta=1e-5)
                           for q, s in settings])
    report(f"epsilon() over {len(acc.DEFAULT_ORDERS)} orders", wall, cpu, 5)

    cases = [(eps, q, steps) for eps in (0.5, 1, 3, 8) for q, steps in ((256 / 60000, 14063), (0.01, 5000),
                                                                         (0.1, 200))]
    wall, cpu = median_wall_cpu_ms([lambda e=e, q=q, t=t: acc.calibrate_sigma(target_eps=e, q=q, steps=t, delta=1e-5)
                           for e, q, t in cases])
    report("calibrate_sigma()", wall, cpu, 100)

    # what a training loop pays per progress-bar update: same (q, sigma), RDP cached by the accountant
    a = acc.RDPAccountant()
    a.step(q=0.01, sigma=1.0, steps=100)
    a.epsilon(1e-5)
    wall, cpu = median_wall_cpu_ms([lambda: (a.step(q=0.01, sigma=1.0), a.epsilon(1e-5)) for _ in range(200)])
    report("RDPAccountant.step + epsilon (cached RDP)", wall, cpu)


# --- data.py --------------------------------------------------------------------------------------------------------

def bench_data():
    """Random-process generators and shapes on one thread (target >= 5,000 images/s at 32x32); loader throughput."""
    import tarfile
    import tempfile

    import torch

    import data
    from conftest import SHARED_DATA

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the generator target is per CPU core
    try:
        for kind in data.PRIOR_KINDS:
            fn = {"dead_leaves": data.dead_leaves, "spectral": data.spectral_noise, "shaders": data.shaders}[kind]
            fn(256, 32, torch.Generator().manual_seed(0))  # warm-up
            # the target is per core: CPU time, which other jobs on the machine do not inflate as they do wall time
            wall, cpu = median_wall_cpu_ms([lambda fn=fn, s=s: fn(2000, 32, torch.Generator().manual_seed(s))
                                            for s in range(3)])
            verdict = "ok" if 2000 / cpu * 1e3 >= 5000 else "UNDER TARGET"
            print(f"  {kind + ' 3x32x32, 1 thread':<44} {2000 / cpu * 1e3:8.0f} images/s per CPU second "
                  f"({2000 / wall * 1e3:.0f} per wall second; target >= 5000)  {verdict}")
        data._shapes_cached.cache_clear()
        t0 = time.perf_counter()
        ds = data.load_dataset("shapes")
        dt = time.perf_counter() - t0
        print(f"  {'shapes train (10,000 x 3x32x32), 1 thread':<44} {len(ds) / dt:8.0f} images/s  ({dt:.2f} s)")
    finally:
        torch.set_num_threads(threads)
    tarball = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not tarball.exists():
        print(f"  cifar10 image folder: skipped ({tarball} absent)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, members=[m for m in tar if m.name.lstrip("./").startswith("test/")], filter="data")
        print(f"  read {tarball}: extracted test/ in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        ds = data.load_dataset(tmp, split="test")  # small enough to keep: each file decoded (and checked) once
        dt = time.perf_counter() - t0
        print(f"  {'cifar10 jpeg folder: load ' + str(len(ds)) + ', each decoded':<44} {dt:8.2f} s")
        memo, full = data.MEMO_BYTES, data.FULL_CHECK_N
        data.MEMO_BYTES = data.FULL_CHECK_N = 0  # as a set too big to keep: headers checked at load, decoded at use
        try:
            t0 = time.perf_counter()
            ds = data.load_dataset(tmp, split="test")
            print(f"  {'... as a set too big to keep: check headers':<44} {time.perf_counter() - t0:8.2f} s")
        finally:
            data.MEMO_BYTES, data.FULL_CHECK_N = memo, full
        count, t0 = 0, time.perf_counter()
        g = torch.Generator().manual_seed(0)
        for step, _ in data.poisson_batches(len(ds), 256 / len(ds), 10, 128, generator=g):
            for idx, mask in step:  # what a training step pays: decode a fixed-shape micro-batch, augment it
                data.random_crop(data.normalize(ds.images(idx)))
                count += int(mask.sum())
        dt = time.perf_counter() - t0
        print(f"  {'cifar10 jpeg: Poisson ~256, decode + crop':<44} {count / dt:8.0f} sampled images/s")


# --- DP step vs non-private step: the shared measurement every script's section uses -------------------------------

def dp_vs_nonprivate(dp_step, plain_step, batch, *, rounds=6, device="cpu"):
    """Time a DP step and a non-private step of the same model on the same physical batch, interleaved
    (DP, plain, DP, plain, ...) so that any load on the machine hits both alike, after one warm-up call each.
    Prints samples/s of each, their ratio (DP / non-private), and peak memory: on CUDA the allocator's peak of each
    mode; on CPU the process's peak RSS after the non-private steps and after the DP steps (run second)."""
    import resource

    import torch

    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = {}
    for name, step in (("plain", plain_step), ("dp", dp_step)):  # warm-up; plain first so RSS after it is its own
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak[name] = (torch.cuda.max_memory_allocated() if cuda
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    times = {"plain": [], "dp": []}
    for _ in range(rounds):
        for name, step in (("dp", dp_step), ("plain", plain_step)):
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    mem = "peak GPU memory" if cuda else "peak RSS (process, cumulative)"
    print(f"  non-private step: {rate['plain']:8.1f} samples/s   {mem} {peak['plain'] / 2**20:8.0f} MiB")
    print(f"  DP step:          {rate['dp']:8.1f} samples/s   {mem} {peak['dp'] / 2**20:8.0f} MiB")
    print(f"  DP / non-private throughput: {rate['dp'] / rate['plain']:.3f}   (batch {batch}, {rounds} rounds, "
          f"{torch.get_num_threads()} threads, {device})")
    return rate["dp"] / rate["plain"]


# --- mae_dp.py ------------------------------------------------------------------------------------------------------

def bench_mae():
    """The default model, image size, patch and physical batch of `python mae_dp.py`."""
    import torch

    import mae_dp as M

    args = M.parse_args([])[1]
    args.patch = default_patch(M, args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = M.build_model(args, 3).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    B = args.physical_batch
    L = (args.size // args.patch) ** 2
    x, noise = torch.rand(B, 3, args.size, args.size, device=device) * 2 - 1, torch.rand(B, L, device=device)
    loss_fn = lambda f, x, n: M.mae_loss(f, x, n, args.mask_ratio, args.patch)
    per_example_grads = M.make_per_example_grads(model, loss_fn)
    micro = [(torch.arange(B), torch.ones(B, dtype=torch.bool))]
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def dp():
        with autocast:
            M.dp_step(per_example_grads, params, buffers, micro, lambda idx: (x, noise), clip=1.0, noise_std=1.0,
                      expected_batch=B, noise_gen=gen)

    def plain():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = M.mae_loss(model, x, noise, args.mask_ratio, args.patch).mean()
        loss.backward()

    print(f"  model '{args.model}': {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters, "
          f"{args.size}x{args.size}, patch {args.patch}")
    dp_vs_nonprivate(dp, plain, B, device=device)


# --- cap_dp.py ------------------------------------------------------------------------------------------------------

def bench_cap():
    """The default captioner (model, image size, patch, stem, captions of --max-len tokens) and physical batch of
    `python cap_dp.py`."""
    import torch

    import cap_dp as M
    import data

    args = M.parse_args([])[1]
    args.patch = default_patch(M, args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = M.build_model(args, 3).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    B = args.physical_batch
    x = torch.rand(B, 3, args.size, args.size, device=device) * 2 - 1
    caps = data.load_dataset("shapes", n=B).captions  # real caption lengths: padding is part of the cost
    tokens = data.WordTokenizer(args.vocab).encode(caps, args.max_len).to(device)
    per_example_grads = M.make_per_example_grads(model, M.caption_loss)
    micro = [(torch.arange(B), torch.ones(B, dtype=torch.bool))]
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def dp():
        with autocast:
            M.dp_step(per_example_grads, params, buffers, micro, lambda idx: (x, tokens), clip=1.0, noise_std=1.0,
                      expected_batch=B, noise_gen=gen)

    def plain():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = M.caption_loss(model, x, tokens).mean()
        loss.backward()

    print(f"  model '{args.model}': {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters, "
          f"{args.size}x{args.size}, patch {args.patch}, {args.stem} stem")
    dp_vs_nonprivate(dp, plain, B, device=device)


# --- clip_dp.py -----------------------------------------------------------------------------------------------------

def bench_clip():
    """The default model (size, patch, stem), micro-batch m and physical batch of `python clip_dp.py`: one vmap call
    over its K = physical / m full micro-batches, against one backward pass of the same K micro-batch losses."""
    import torch

    import clip_dp as M

    args = M.parse_args([])[1]
    args.patch = default_patch(M, args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = M.build_model(args, 3).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    B, m = args.physical_batch, args.micro_batch
    K = B // m
    x = torch.rand(K, m, 3, args.size, args.size, device=device) * 2 - 1
    tokens = torch.randint(3, 259, (K, m, args.text_len), device=device)
    pair_mask = torch.ones(K, m, dtype=torch.bool, device=device)
    members = torch.arange(B).view(K, m)
    per_example_grads = M.make_per_example_grads(model, M.clip_loss)
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def dp():
        with autocast:
            M.micro_batch_step(per_example_grads, params, buffers, members, pair_mask.cpu(),
                               lambda idx, mask: (x, tokens, pair_mask), clip=1.0, noise_std=2.0, per_call=K,
                               noise_gen=gen)

    def plain():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = M.clip_loss(model, x, tokens, pair_mask).mean()
        loss.backward()

    print(f"  model '{args.model}': {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters, "
          f"{args.size}x{args.size}, patch {args.patch}, {args.stem} stem, {K} micro-batches of {m} pairs")
    dp_vs_nonprivate(dp, plain, B, device=device)


# --- randp.py -------------------------------------------------------------------------------------------------------

def bench_randp():
    """The default model (WRN-16-k at `--width`), image size, physical batch and K (`--aug-mult`) of
    `python randp.py`: a phase III (fine-tuning) DP step and a phase II (linear probe: head only) DP step, each
    against one ordinary backward pass over the same P x K views."""
    import torch

    import randp as M

    args = M.parse_args([])[1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = M.WRN(args.width, 10).to(device)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a zero head would make the body's gradients trivially zero
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    B, K = args.physical_batch, args.aug_mult
    views = torch.rand(B, K, 3, args.size, args.size, device=device) * 2 - 1  # (B, K, C, H, W)
    labels = torch.randint(0, 10, (B,), device=device)
    per_example_grads = M.make_per_example_grads(model, M.classify_loss)
    micro = [(torch.arange(B), torch.ones(B, dtype=torch.bool))]
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def dp(phase):
        trainable, frozen = M.trainable_split(params, buffers, phase)
        with autocast:
            M.dp_step(per_example_grads, trainable, frozen, micro, lambda idx: (views, labels), clip=1.0, noise_std=1.0,
                      expected_batch=B, noise_gen=gen)

    def plain():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = M.classify_loss(model, views, labels).mean()
        loss.backward()

    print(f"  WRN-16-{args.width:g}: {sum(p.numel() for p in params.values()) / 1e6:.3f}M parameters, "
          f"{args.size}x{args.size}, K = {K} views per example")
    for phase in ("fine_tune", "linear_probe"):
        title = "III (fine-tune, all parameters)" if phase == "fine_tune" else "II (linear probe, head only)"
        print(f"  phase {title}:")
        dp_vs_nonprivate(lambda: dp(phase), plain, B, device=device)


SECTIONS = {"accountant": bench_accountant, "data": bench_data, "mae": bench_mae, "cap": bench_cap,
            "clip": bench_clip, "randp": bench_randp}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"sections to run, in this order (default: all): {', '.join(SECTIONS)}")
    names = p.parse_args(argv).sections
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    for name in names or SECTIONS:
        print(f"[{name}]")
        SECTIONS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
