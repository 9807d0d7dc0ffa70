"""DP-RandP: a prior learned from random processes, then a DP linear probe and DP fine-tuning.

Paper: Tang, Panda, Sehwag & Mittal, "Differentially Private Image Classification by Learning Priors from Random
Processes" (NeurIPS 2023). The recipe, in the order this file follows it:
  I.   Prior (public, no privacy cost): learn a representation from random-process images only (data.py's dead
       leaves, spectral noise and shaders stand in for the paper's StyleGAN-Oriented / Shaders sets), with the
       alignment + uniformity loss of Wang & Isola (2020) over two augmented views. No private example is read.
  II.  DP linear probe: DP-SGD (Abadi et al. 2016) on the private labelled images, training only the classifier
       head on the frozen prior, for --lp-steps steps.
  III. DP fine-tuning: DP-SGD on the whole network for the remaining steps.
  II and III are ONE private run: one accountant composes them, and sigma is calibrated for all --steps so the
  run's total epsilon is --eps. The paper's DP tricks (De et al. 2022): augmentation multiplicity (each
  example's gradient is the mean over K augmented copies, taken before clipping) and an exponential moving
  average (EMA) of the weights, used for evaluation (post-processing: free).
What is simplified: by default a narrow WRN-16-0.5 (widths 8, 16, 32; 45k parameters) at 32x32, K = 1, a 200-step
prior and 200 private steps of B = 512 (20 of them linear probe), so one run takes minutes on a 2-core CPU; the
MNIST and CIFAR-10 commands below trade batch for steps (B = 256), sized to a CPU time budget; the paper's
WRN-16-4, batch 4096, 875 steps, K = 16 is the last command (a GPU). What differs from De et al.'s WRN so that a
few hundred steps learn: one channel per GroupNorm group and He init (see norm(), WRN). The learning rates,
momentum, --lp-steps and the batch/steps trade were chosen on the embedded shapes set at the default seed 0
(docs/RESULTS.md): public data for the MNIST and CIFAR-10 runs reported, but the private set of a bare
`python randp.py`, whose eps does not cover that tuning (README, "What the ε does not cover"). The non-private
reference's (--eps inf: lr 0.05, lp-lr 0.05, momentum 0.9) were chosen on the proxy drawn at --seed 1
(docs/SWEEP_randp.md): clipping bounds every DP step, and unclipped the DP learning rates diverge along the
sharpest direction of the loss (docs/randp_sharpness.py). data.py's random-process generators stand in
for the paper's StyleGAN-Oriented images. The model takes the private set's channels and its prior is learned on
random-process images in those channels (grey sets such as MNIST: their BT.601 luma), so a grey set is not
fine-tuned from a prior that only ever saw colour. Phase I is public compute, cached per flags in runs/cache/
(`--build-prior` builds it alone). The test split is read once, at the end, for the report: nothing is chosen with
it.

  python randp.py --eps 3 --data ../shared/data/mnist --aug crop --batch-size 256 --steps 3000     # MNIST, ~17 min
  python randp.py --eps 3 --data ../shared/data/mnist --aug crop --batch-size 256 --steps 3000 --no-prior  # baseline
  python randp.py --eps 8 --data /tmp/cifar10 --batch-size 256 --steps 350       # CIFAR-10 (folder or pickles)
  python randp.py --eps 1 --data /tmp/cifar10 --width 4 --batch-size 4096 --steps 875 --lp-steps 50 --aug-mult 16 \\
      --physical-batch 64 --lr 4 --momentum 0 --prior-steps 20000 --prior-batch 512     # the paper's scale: a GPU
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap
from tqdm import tqdm

import data
from accountant import CanaryAudit, RDPAccountant, dp_sgd_plan, epsilon, init_prior, noise_budget

# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("privacy")
    g.add_argument("--eps", type=float, default=3.0, help="target epsilon of phases II and III together; 'inf': the "
                   "NOT private reference")
    g.add_argument("--delta", type=float, default=None, help="delta; default 1/(2N); must be < 1/N")
    g.add_argument("--clip", type=float, default=1.0, help="per-example gradient norm bound C")
    g.add_argument("--batch-size", type=int, default=1024, help="expected logical batch B (Poisson rate q = B/N)")
    g.add_argument("--physical-batch", type=int, default=64, help="examples per vmap call (memory only)")
    g.add_argument("--steps", type=int, default=300, help="logical DP-SGD steps of phases II + III together")
    g.add_argument("--lp-steps", type=int, default=20, help="phase II: DP linear-probe steps (none with --no-prior)")
    g.add_argument("--aug-mult", type=int, default=1, help="K: augmented copies per example, averaged before clipping")
    g.add_argument("--lp-features", choices=["augmented", "cached"], default="cached",
                   help="phase II input: each example's features computed once, or augmented views each step")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="private labelled images: 'shapes' (embedded) or a dataset path")
    g.add_argument("--n", "--n-examples", dest="n", type=int, default=None,
                   help="n private examples, a subset fixed by --seed (shapes: 200000); torchrun: --n-examples")
    g.add_argument("--size", type=int, default=32, help="image side H = W (images are resized to it)")
    g.add_argument("--aug", choices=["crop_flip", "crop"], default="crop_flip",
                   help="reflect-pad-4 crop, and a horizontal flip (not for digits)")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=float, default=0.5, help="k of WRN-16-k: 4 the paper's, 0.5 CPU, 0.25 tests")
    g = p.add_argument_group("optimisation (chosen on the public proxy: docs/SWEEP_randp.md)")
    g.add_argument("--lr", type=float, default=None, help="peak SGD lr of phase III (default 2.5; --eps inf: 0.05)")
    g.add_argument("--lp-lr", type=float, default=None, help="peak SGD lr of phase II (default 0.5; --eps inf: 0.05)")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0, De et al.; --eps inf: 0.9)")
    g.add_argument("--warmup", type=int, default=5, help="linear warm-up steps of each phase, then cosine decay")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the evaluated weights (ramped up)")
    g = p.add_argument_group("phase I: prior from random processes (public, no privacy cost)")
    g.add_argument("--no-prior", action="store_true", help="random init and phase III only: plain DP-SGD, the baseline")
    g.add_argument("--prior-steps", type=int, default=200, help="alignment + uniformity steps on random-process images")
    g.add_argument("--prior-batch", type=int, default=128, help="random-process images per step (two views each)")
    g.add_argument("--prior-lr", type=float, default=0.03, help="peak SGD learning rate of phase I (0.1 collapses)")
    g.add_argument("--build-prior", action="store_true", help="build (or find) the cached prior, then stop")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the public randomness (init, augmentation, data)")
    g.add_argument("--audit", type=int, default=0, metavar="M", help="a one-run privacy audit with M gradient canaries")
    g.add_argument("--debug-no-noise", action="store_true", help=argparse.SUPPRESS)  # breaks privacy: tests only
    g.add_argument("--insecure-seed", action="store_true", help=argparse.SUPPRESS)  # tests only: replayable
    g.add_argument("--log-private", action="store_true",
                   help="also log the loss and batch size (metrics.jsonl is then private)")
    g.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    g.add_argument("--name", default=None, help="run name (default randp_eps<eps>_s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--log-every", type=int, default=5, help="steps between log lines and checkpoints")
    g.add_argument("--device", default="auto", help="'auto' (cuda if present), 'cpu' or 'cuda'")
    return p, p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Model: WRN-16-k (Zagoruyko & Komodakis 2016), pre-activation blocks, GroupNorm instead of BatchNorm


def norm(c):
    """GroupNorm, never BatchNorm: BatchNorm normalises with statistics of the whole batch, so one example's output
    (and gradient) would depend on the others, and per-example clipping would no longer bound one example's
    influence. GroupNorm's statistics are those of the example itself. One channel per group (c groups): De et al.
    use 16 groups at width 4 (4-16 channels each), but at the CPU widths (8-32 channels) larger groups mix the few
    channels, and on MNIST, whose images are mostly one background value, each channel then needs its OWN spatial
    statistics to make a stroke stand out. First seen on a held-out part of MNIST's train split (private), then
    re-checked on the public proxy (docs/SWEEP_randp.md): one channel per group beat 2 per group there too."""
    return nn.GroupNorm(c, c)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):  # (B, C, H, W) -> (B, C', H/s, W/s)
        o = F.relu(self.norm1(x))
        y = self.conv2(F.relu(self.norm2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WRN(nn.Module):
    """WRN-16-k: a 3x3 stem, three groups of two blocks (widths 16k, 32k, 64k; strides 1, 2, 2), global average
    pooling to D = 64k features, and a linear classifier `head` (zero-initialised, as De et al.)."""

    def __init__(self, width, classes, channels=3):
        super().__init__()
        w = [16, max(4, round(16 * width)), max(4, round(32 * width)), max(4, round(64 * width))]
        self.stem = nn.Conv2d(channels, w[0], 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*(Block(w[i] if j == 0 else w[i + 1], w[i + 1], (1, 2, 2)[i] if j == 0 else 1)
                                      for i in range(3) for j in range(2)))
        self.norm = norm(w[3])
        self.dim = w[3]
        # feature standardisation (D,), fixed: set from PUBLIC random-process images after phase I, or at the random
        # init of the baseline (free either way: no private pixel is read), so the head starts on centred inputs
        self.register_buffer("feat_mean", torch.zeros(w[3]))
        self.register_buffer("feat_std", torch.ones(w[3]))
        self.head = nn.Linear(w[3], classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        for m in self.modules():  # He init as the WRN reference code: PyTorch's default conv init is 3x smaller in
            if isinstance(m, nn.Conv2d):  # variance, so each residual branch starts nearly silent
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):  # (B, C, H, W) in [-1, 1] -> (B, D)
        f = F.relu(self.norm(self.blocks(self.stem(x)))).mean((2, 3))
        return (f - self.feat_mean) / self.feat_std

    def forward(self, x, features_given=False):  # -> logits (B, classes); x: images, or features (B, D)
        return self.head(x if features_given else self.features(x))


def trainable_split(params, buffers, phase):
    """(trainable, frozen) tensors of a phase. Phase II ("linear_probe") trains the head only: the body joins the
    frozen tensors, so no gradient is computed for it, no noise is added to it, and the optimiser skips it."""
    if phase == "fine_tune":
        return params, buffers
    head = {k: v for k, v in params.items() if k.startswith("head.")}
    return head, {**{k: v for k, v in params.items() if k not in head}, **buffers}


# ----------------------------------------------------------------------------------------------------------------
# Per-example loss


def classify_loss(forward, views, labels):
    """Cross-entropy per example, (B,), averaged over its K augmented views (augmentation multiplicity, De et al.
    2022, Sec. 3.1): views (B, K, C, H, W), labels (B,). The mean over K is inside ONE example's loss, so its
    gradient is the mean of its K views' gradients, taken before clipping: still one example's gradient, and
    the sensitivity stays C. forward: the model, or its functional_call."""
    B, K = views.shape[:2]
    logits = forward(views.flatten(0, 1))  # (B*K, classes)
    return F.cross_entropy(logits, labels.repeat_interleave(K), reduction="none").view(B, K).mean(1)  # (B,)


def augment(imgs_uint8, rng, k, flip):
    """K augmented views per example, drawn per example (never mixing examples): a reflect-padded random crop and,
    for sets where mirroring keeps the label, a horizontal flip. Channels stay as they are: the model and its prior
    take the private set's channels (a grey set gets a grey prior). Returns views (B, K, C, H, W) in [-1, 1].
    rng: a data.ExampleRandom of these examples: each view draws from its own example's stream, so an example's
    views never depend on which other examples were sampled."""
    x = data.normalize(imgs_uint8).repeat_interleave(k, 0)  # (B*K, C, H, W)
    rng = rng.views(k)  # rows i*K .. i*K + K-1: example i's K views
    x = data.random_crop(x, pad=4, generator=rng)
    x = data.hflip(x, generator=rng) if flip else x
    return x.view(-1, k, *x.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# DP step: per-example gradients, clipping, one Gaussian noise draw per logical step (Abadi et al. 2016, Alg. 1)


def make_per_example_grads(model, loss_fn):
    """Returns f(params, buffers, batch) -> (per-example grads {name: (B, *shape)}, per-example losses (B,)).
    The gradient of ONE example's loss, vmapped over the batch: each example is computed as if it were alone,
    which is what clipping per example needs. batch: a tuple of tensors with the examples along dim 0.
    randomness="different": any random op inside the model would draw independently per example."""

    def one(params, buffers, example):  # a tuple: each tensor of one example, without the batch dim
        f = lambda *a: functional_call(model, (params, buffers), a)
        return loss_fn(f, *(t[None] for t in example))[0]

    return vmap(grad_and_value(one), in_dims=(None, None, 0), randomness="different")


def clip_and_sum(grads, keep, clip):
    """sum_i min(1, C / ||g_i||) g_i over the rows i where keep is True: grads {name: (B, *shape)}, keep (B,) bool.
    Returns ({name: shape}, in float32 at least; the number of kept rows whose norm is not finite). ||g_i|| is the
    norm over all of row i's tensors together. dp_step clips the examples' rows and the audit's canary rows with
    this one function, so a canary is clipped exactly as an example is."""
    up = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # float32 at least (a float64 test stays so)
    # ||g_i|| over all parameters together: the norm of the per-parameter norms (no squared copy of g)
    norms = torch.stack([torch.linalg.vector_norm(up(g).reshape(g.shape[0], -1), dim=1)
                         for g in grads.values()]).norm(dim=0)  # (B,)
    finite = torch.isfinite(norms)
    # g_i <- g_i * min(1, C / ||g_i||); rows not kept get factor 0 through where, never 0 * NaN
    factor = torch.where(keep & finite, (clip / (norms + 1e-6)).clamp(max=1.0), 0.0)  # (B,)
    whole = bool(finite.all())  # else zero the non-finite rows (padding only, or the run stops in dp_step)
    sums = {}
    for k, g in grads.items():
        g = up(g) if whole else torch.where(finite.view(-1, *[1] * (g.dim() - 1)), up(g), 0.0)
        sums[k] = torch.tensordot(factor.to(g.dtype), g, dims=1)  # sum_i factor_i g_i
    return sums, int((keep & ~finite).sum())


def dp_step(per_example_grads, params, buffers, physical_batches, load, *, clip, noise_std, expected_batch,
            noise_gen, canaries=None, stats=None):
    """One logical DP-SGD step. physical_batches: [(idx (B,), mask (B,))], one Poisson sample in fixed-shape
    vmap calls. noise_std: the Gaussian noise's standard deviation on the clipped sum, sigma * C (the sensitivity).
    Returns the privatised gradient {name: tensor} and the mean loss of the sampled examples (for logging).
    canaries: the audit's canary units of this step (accountant.CanaryAudit.rows), (units, m), one row each along
    the canary coordinates; clip_and_sum clips them like the examples' rows, and they are summed and noised with
    them, coming back under the key "canaries".
    A sampled example whose gradient is not finite stops the run (ValueError): no clip factor bounds a NaN.
    stats: a dict that receives "clipped_norm", ||sum_i clip(g_i)|| / B_expected before the noise, the real signal
    that accountant.noise_to_signal bounds from above (this process's share under torchrun). It reads the private
    data: logged only with --log-private."""
    up = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # float32 at least (a float64 test stays so)
    summed = {k: up(torch.zeros_like(v)) for k, v in params.items()}
    loss_sum, count, bad = 0.0, 0, 0
    for idx, mask in physical_batches:
        batch = load(idx)  # tensors of the B examples of one vmap call, e.g. (B, C, H, W)
        grads, losses = per_example_grads(params, buffers, batch)  # {name: (B, *shape)}, (B,)
        keep = mask.to(losses.device)  # (B,) bool; padding slots are False
        # The sensitivity argument lives here, so it runs in float32 (at least) whatever the autocast: a bf16
        # matmul would round the clipped sum, and one example could then move it by more than C.
        with torch.autocast(losses.device.type, enabled=False):
            sums, nonfinite = clip_and_sum(grads, keep, clip)  # sum_i min(1, C / ||g_i||) g_i, padding left out
            for k, s in sums.items():
                summed[k] += s
        bad += nonfinite
        loss_sum += float(torch.where(keep, up(losses), 0.0).sum())
        count += int(mask.sum())
    # torchrun: summed covers this rank's shard of the one global Poisson sample. Rank 0 alone adds the noise and
    # the canaries (one global set; the other ranks add zeros, so every rank reduces the same keys); the all-reduce
    # then sums the shards, so the released sum is the one-process sum plus ONE noise draw, whatever the world
    # size. (The alternative, a shared noise seed on every rank after the reduction, draws world times for nothing.)
    first = not dist.is_initialized() or dist.get_rank() == 0
    if stats is not None:
        stats["clipped_norm"] = float(torch.stack([s.norm() for s in summed.values()]).norm()) / expected_batch
    with torch.autocast(next(iter(summed.values())).device.type, enabled=False):
        if canaries is not None:  # each canary unit is clipped as an example is, by the same function
            every = torch.ones(len(canaries), dtype=torch.bool, device=canaries.device)
            summed["canaries"] = clip_and_sum({"canaries": up(canaries)}, every, clip)[0]["canaries"] * first
        # g~ = (sum_i clip(g_i) + N(0, noise_std^2 I)) / B_expected, noise_std = sigma C: noise once per step, on
        # the sum; dividing by the expected batch size (a public constant, the GLOBAL one) instead of the realised
        # one keeps the sensitivity at C. The noise generator's seed is secret (data.secret_seeds).
        noisy = {k: s + noise_std * torch.randn(s.shape, generator=noise_gen, device=s.device, dtype=s.dtype)
                 if first else s
                 for k, s in summed.items()}
    if dist.is_initialized():
        for s in noisy.values():
            dist.all_reduce(s)  # sum over ranks
        loss_sum, count, bad = all_ranks_sum(loss_sum), all_ranks_sum(count), all_ranks_sum(bad)
    if bad:  # every rank raises alike; the caller has not yet stepped, so the last checkpoint stays the last good one
        raise ValueError(f"{int(bad)} sampled example(s) gave a non-finite (NaN or inf) gradient: the run stops "
                         "here, its last checkpoint kept (a smaller --lr, or check the data)")
    return {k: s / expected_batch for k, s in noisy.items()}, loss_sum / max(count, 1)


def all_ranks_sum(x):
    """A number summed over the torchrun ranks (x itself in one process). Every rank must call it at the same point."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item()


# --- the non-private reference (--eps inf): the same sample and divisor as dp_step, without clipping or noise ---


def make_batch_grad(model, loss_fn):
    """Returns f(params, buffers, batch, mask) -> (gradient of the masked sum of losses {name: shape}, losses (B,)):
    one backward pass over the whole batch, no per-example gradients, since nothing is clipped."""

    def total(params, buffers, batch, mask):
        f = lambda *a: functional_call(model, (params, buffers), a)
        losses = loss_fn(f, *batch)  # (B,)
        return (losses * mask.to(losses)).sum(), losses.detach()

    return grad(total, has_aux=True)


def plain_step(batch_grad, params, buffers, physical_batches, load, *, expected_batch):
    """One logical step of --eps inf, NOT private: sum of the sampled examples' gradients / expected batch, so it
    differs from dp_step only by the missing clipping and noise. Returns (gradient {name: tensor}, mean loss)."""
    summed = {k: torch.zeros_like(v) for k, v in params.items()}
    loss_sum, count = 0.0, 0
    for idx, mask in physical_batches:
        grads, losses = batch_grad(params, buffers, load(idx), mask)
        for k, g in grads.items():
            summed[k] += g
        loss_sum += float((losses.float() * mask.to(losses.device)).sum())
        count += int(mask.sum())
    if dist.is_initialized():
        for s in summed.values():
            dist.all_reduce(s)
        loss_sum, count = all_ranks_sum(loss_sum), all_ranks_sum(count)
    return {k: s / expected_batch for k, s in summed.items()}, loss_sum / max(count, 1)


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to 0 (as in MAE and ViP)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------------------------
# Phase I: the prior, ordinary (non-private) training on public random-process images (no privacy cost, cached)


def align_uniform_loss(z1, z2, t=2.0):
    """Wang & Isola (2020): z1, z2 (B, D) on the unit sphere, two views of the same B images.
    alignment: E ||z1 - z2||^2 pulls views of one image together; uniformity: log E exp(-t ||zi - zj||^2) over
    pairs of different images spreads the features over the sphere. Loss = align + (unif(z1) + unif(z2)) / 2."""
    align = (z1 - z2).pow(2).sum(1).mean()
    unif = lambda z: torch.pdist(z).pow(2).mul(-t).exp().mean().log()
    return align + (unif(z1) + unif(z2)) / 2


def prior_views(imgs_uint8, gen, channels):
    """Phase I augmentation (stronger than phase II's: contrastive learning needs it): random resized crop, flip
    and colour jitter, then the private set's channels (grey: BT.601 luma). (B, 3, H, W) uint8 -> (B, C, H, W)
    float in [-1, 1]."""
    x = data.random_resized_crop(data.normalize(imgs_uint8), scale=(0.2, 1.0), generator=gen)
    x = data.color_jitter(data.hflip(x, generator=gen), strength=0.4, generator=gen)
    return data.to_grey(x) if channels == 1 else x


def prior_body(args, channels, device, autocast, master=True):
    """Phase I's weights: the body (stem, blocks, norm) of a WRN trained on random-process images alone. A function
    of its flags only (its own seeds), so it is built once, cached in runs/cache/ under a name made of those flags,
    and read back by every later run: the cost is public compute, paid once, and no privacy.
    Returns (body state_dict, cache path, built: True when this call trained it)."""
    cache = Path("runs/cache") / (f"randp_prior_v3_wrn16-{args.width:g}_c{channels}_s{args.size}_{args.prior_steps}x"
                                  f"{args.prior_batch}_lr{args.prior_lr}_seed{args.seed}.pt")
    body = data.read_cache(cache)  # None until built; checked like a checkpoint
    if body is not None:
        return body, cache, False
    with torch.random.fork_rng(devices=[]):  # the init from the prior's own seed, whatever ran before
        torch.manual_seed(30_000 + args.seed)
        model = WRN(args.width, 10, channels).to(device)  # the head is not kept: any class count will do
        train_prior(model, args, device, autocast, channels)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "feat_"))}
    if master:  # torchrun: every rank trains this public phase (rather than wait idle past the collective
        data.write_cache(cache, body)  # timeout); rank 0 alone writes the cache
    return body, cache, True


def train_prior(model, args, device, autocast, channels):
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    # Projection head of phase I only (discarded, as in SimCLR). Its LayerNorm (no parameters) makes the loss blind
    # to the pooled features' common scale and offset: without it phase I at --prior-lr 0.03 collapsed (every image
    # to one point) in both builds tried, grey and colour. It lives in the head, so phases II and III never see it.
    proj = nn.Sequential(nn.LayerNorm(model.dim, elementwise_affine=False), nn.Linear(model.dim, 128)).to(device)
    opt = torch.optim.SGD([*model.parameters(), *proj.parameters()], lr=args.prior_lr, momentum=0.9, weight_decay=5e-4)
    master = os.environ.get("RANK", "0") == "0"
    bar = tqdm(range(args.prior_steps), desc="phase I: prior (public)", dynamic_ncols=True, disable=not master)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.prior_steps, args.prior_lr, max(1, args.prior_steps // 20))
        imgs = data.random_process_images(args.prior_batch, args.size, generator=gen)
        x1, x2 = (prior_views(imgs, gen, channels).to(device) for _ in range(2))
        with autocast:
            z1, z2 = (F.normalize(proj(model.features(x)).float(), dim=1) for x in (x1, x2))  # (B, 128)
            loss = align_uniform_loss(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    # A collapsed prior maps every image to one point: uniformity log E exp(-t d^2) -> 0, so the loss ends near 0
    # (a spread one ends near -2). Public images only, so checking it costs no privacy.
    if loss.item() > -0.5:
        print(f"WARNING: phase I ended at loss {loss.item():.3f}: the prior collapsed (try a smaller --prior-lr)")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (once, at the end, on the test split: nothing is selected with it)


@torch.no_grad()
def accuracy(model, ds, device, batch=500):
    model.eval()
    correct = 0
    for i in range(0, len(ds), batch):
        idx = torch.arange(i, min(i + batch, len(ds)))
        x = data.normalize(ds.images(idx)).to(device)
        correct += int((model(x).argmax(1).cpu() == ds.labels[idx]).sum())
    return correct / len(ds)


# ----------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: run plumbing (resume, torchrun, secret generators, checkpoint, log, release). It teaches no
# DP method and is identical in every script; tests/test_scripts.py compares the copies.


def resumed(parser, args, out, older=None):
    """--resume continues the checkpoint's run with the checkpoint's flags. Returns (args, checkpoint or None).
    A flag typed with --resume must agree with the checkpoint's run, even one typed at its default value (`--eps 8`
    over a run at eps 4 is refused, not continued at 4); only --out, --name, --device and --log-every may change.
    older: the values an older checkpoint's run had for flags added since (else a newer flag takes its default).
    A folder whose run stopped before its first checkpoint has nothing to continue: it starts again at step 0."""
    data.check_command(parser, args)  # --out, --name, and flags typed where this run would not use them
    path = data.resume_point(out) if args.resume else None
    if path is None:
        return args, None
    ckpt = data.load_checkpoint(path, flag="--resume", script=Path(__file__).stem)
    data.check_run_args(parser, ckpt["args"], where=f"--resume {path}")  # each flag of the type it parses to
    run = {k: parser.get_default(k) for k in vars(args)} | (older or {}) | ckpt["args"]  # the checkpoint's flags
    if ckpt["step"] > run["steps"]:
        raise data.DataError(f"--resume {path}: step {ckpt['step']} is past the run's --steps {run['steps']}")
    typed = data.typed_flags(parser, vars(args))
    free = ("resume", "out", "name", "device", "log_every")
    changed = [k for k in typed if k not in free and not getattr(args, k) == run.get(k)]  # NaN differs from all
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {run.get(k)})" for k in changed)
        raise ValueError(f"--resume continues the checkpoint's run with its flags; these differ from it: {flags}")
    return argparse.Namespace(**{**run, "out": str(out), "resume": True, "device": args.device,
                                 "log_every": args.log_every if "log_every" in typed else run["log_every"]}), ckpt


def start(args, out, ckpt, device):
    """Seeding, the run folder and torchrun. Returns (rank, world, device).
    --seed is public: it fixes the initialisation, augmentation and embedded data, never the sample or the noise.
    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (`python script.py`) no process group exists.
    Every rank builds the same model and draws the same global Poisson sample, then keeps its shard
    (data.poisson_batches); dp_step sums the shards and adds the noise once; rank 0 alone prints and writes."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    data.claim_out_dir(out, resume=args.resume)  # one run per --out; refused before anything is written
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.type == "cuda":  # one GPU per process, NCCL between them; gloo between CPU processes
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank:  # errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return rank, world, device


def private_set(args, shapes_n=20000):
    """The private training set (--data, --n): a seeded subset of n examples, or all; the embedded set draws
    shapes_n. A subset never silently becomes the whole set."""
    n_default = shapes_n if args.data in data.EMBEDDED else None
    private = data.load_dataset(args.data, split="train", size=args.size, n=args.n or n_default, seed=args.seed)
    if args.n and len(private) < args.n:
        raise ValueError(f"--n {args.n}: --data {args.data} has only {len(private)} examples")
    return private


def earlier_runs(args, ckpt, scripts):
    """--init from an earlier run: a DP run on the same data composes with this one; public weights cost nothing."""
    if ckpt:
        return ckpt.get("init", dict(prior=None, note=None, pipeline=[]))
    if getattr(args, "init", "none") in ("none", "syn"):
        return dict(prior=None, note=None, pipeline=[])
    return init_prior(data.load_checkpoint(args.init, flag="--init", script=scripts, keys=()),
                      path=args.init, disjoint=args.init_data_disjoint)


def privacy_plan(args, private, audit, earlier, detail=""):
    """accountant.py turns --eps, --delta, B, N and the steps into q and sigma; printed in one block."""
    n = len(private)
    n_total = n + (audit.n_included if audit else 0)  # --audit M: joined canaries are private data too
    if audit and args.eps == math.inf:
        raise ValueError("--audit checks a privacy claim; --eps inf makes none")
    plan = dp_sgd_plan(target_eps=args.eps, delta=args.delta, n=n_total, batch_size=args.batch_size,
                       steps=args.steps, prior=earlier["prior"])
    canaries = f" ({n} + {n_total - n} canaries)" if audit else ""
    print(f"private data: {private.name}, N={n_total}{canaries} | q={plan['q']:.5f} (B={args.batch_size}) "
          f"sigma={plan['sigma']:.4f} steps={args.steps}{detail} clip={args.clip} delta={plan['delta']:.3g} "
          f"-> target eps={args.eps}")
    if args.debug_no_noise:
        print("WARNING: --debug-no-noise adds NO noise: this run is NOT private and the eps it prints is false "
              "(a deliberately broken run, for testing the audit)")
    if earlier["note"]:
        print(earlier["note"] + (f" (eps {plan['prior_eps']:.3f} spent before this run)" if earlier["prior"] else ""))
    if args.insecure_seed:
        print("WARNING: --insecure-seed: the Poisson sample and the noise follow --seed, which summary.json "
              "publishes: this run is NOT private, whatever eps it prints (for tests that replay a run)")
    if args.eps == math.inf:
        print("NOT PRIVATE: --eps inf trains without clipping or noise, the reference a DP run is measured against")
    return plan, n_total


def generators(args, device, world):
    """(sample_gen, noise_gen). The Poisson sample and the noise draw from secret 256-bit seeds (the OS), never
    from the public --seed, through data.secret_generator (which keeps all of a seed that the generator can); under
    torchrun every rank draws the same global sample, so takes rank 0's sampling seed. The augmentations need no
    generator: each example draws from its own stream (data.ExampleRandom), the same on every rank."""
    sample_seed, noise_seed = data.secret_seeds(args.seed if args.insecure_seed else None)
    if world > 1:
        shared = [sample_seed]
        dist.broadcast_object_list(shared, src=0)
        sample_seed = shared[0]
    return (data.secret_generator(sample_seed),  # Poisson sampling (secret), on the CPU
            data.secret_generator(noise_seed, device))  # DP noise (secret)


def restore(ckpt, model, opt, accountant, audit, gens, plan):
    """Load a checkpoint's weights, optimiser, accountant, audit and random streams, each checked against this run:
    its accountant must hold the earlier runs' steps and `step` steps at this run's (q, sigma). Then metrics.jsonl
    loses the lines logged after that step, which the resumed run logs again. Returns its step."""
    step = data.restore_checkpoint(ckpt, where="--resume checkpoint.pt", model=model, opt=opt, accountant=accountant,
                                   audit=audit, gens=gens, q=plan["q"], sigma=plan["sigma"])
    print(f"resumed at step {step}, eps so far {accountant.epsilon(plan['delta']):.3f}")
    return step


def save_checkpoint(path, gens, rank, **state):
    """Rank 0 writes the checkpoint, atomically; its generator states are secret (never publish the file)."""
    if rank:
        return
    sample_gen, noise_gen = gens
    rng = [sample_gen.get_state(), noise_gen.get_state(), torch.get_rng_state()]
    # a temp file, then a rename, signals held meanwhile: a crash or a Ctrl-C never leaves half a checkpoint
    data.save_atomic(dict(state, rng=rng, script=Path(__file__).stem), path, step=state["step"])


def log_line(log, args, *, step, eps, lr, t0, params, loss, batch, signal=None, **extra):
    """One metrics.jsonl line: released or public values only. The clean loss and the realised batch size read
    the private data (the batch size counts the sampling coins), and so does the time (it grows with the number
    of physical batches, i.e. with the sample): they are logged only with --log-private. Strict JSON: eps inf
    (--eps inf) is null."""
    update = [p.grad.float().norm() for p in params.values() if p.grad is not None]
    rec = dict(step=step, **extra, eps=eps if eps < math.inf else None, lr=lr,
               noisy_grad_norm=float(torch.stack(update).norm()))
    if args.log_private:
        rec.update(loss=loss, batch=batch, clipped_grad_norm=signal, time=round(time.time() - t0, 3), private=True)
    log.write(json.dumps(rec, allow_nan=False) + "\n")
    log.flush()
    phase = "".join(f" ({v})" for v in extra.values())
    tqdm.write(f"step {step}/{args.steps}{phase} loss {loss:.4f} eps {eps:.3f}")


def end_processes(world):
    """Training is over: the process group ends (torchrun); evaluation and outputs are rank 0's alone."""
    if world > 1:
        dist.barrier()  # every rank leaves together: gloo aborts a process whose peer is torn down mid-collective
        dist.destroy_process_group()


def not_private_reason(args):
    """Why a run's eps is no privacy claim (the words its release records), or None for a DP run."""
    if args.eps == math.inf:
        return "--eps inf: no clipping, no noise"
    if args.debug_no_noise:
        return "--debug-no-noise: no noise was added"
    if args.insecure_seed:
        return "--insecure-seed: the sample and the noise follow --seed, which summary.json publishes"
    return None


def release(out, model, summary, *, args, plan, accountant, earlier, audit, n_total, steps, data_name):
    """Write the release, model.pt (weights + privacy record) and summary.json, and print the privacy lines.
    checkpoint.pt holds the secret generator states, metrics.jsonl written with --log-private the clean loss:
    never publish those two. Both records are strict JSON (an infinite eps is null; "private": false and
    "not_private_reason" say why), written with allow_nan=False so that a stray inf fails loudly."""
    q, sigma, delta = plan["q"], plan["sigma"], plan["delta"]
    eps_spent, why_not = accountant.epsilon(delta), not_private_reason(args)
    finite = lambda e: e if e < math.inf else None  # JSON has no infinity
    audit_result = audit.result(delta=delta, claimed_eps=eps_spent) if audit else None
    eps_alone = epsilon(q=q, sigma=sigma, steps=steps, delta=delta)
    pipeline = earlier["pipeline"] + [dict(script=Path(__file__).name, file=str(out / "model.pt"), data=data_name,
                                           eps_alone=finite(eps_alone), delta=delta, q=q, sigma=sigma, steps=steps)]
    privacy = dict(private=why_not is None, not_private_reason=why_not, eps=finite(eps_spent), delta=delta,
                   data=data_name, n=n_total, init=earlier["note"], accountant=accountant.state_dict(),
                   pipeline=pipeline)
    json.dumps(privacy, allow_nan=False)  # the record must be strict JSON too
    weights = dict(model=model.state_dict(), privacy=privacy, script=Path(__file__).stem)
    summary = dict(private=why_not is None, not_private_reason=why_not, eps=finite(eps_spent),
                   target_eps=finite(args.eps), delta=delta, sigma=sigma, q=q, n=n_total, steps=steps, clip=args.clip,
                   data=data_name) | summary
    summary.update(eps_this_run=finite(eps_alone), init_privacy=earlier["note"], privacy_pipeline=pipeline,
                   audit=audit_result, debug_no_noise=args.debug_no_noise, args=vars(args) | dict(eps=finite(args.eps)))
    with data.signals_held():  # the release is whole or absent: a Ctrl-C now waits for both files
        data.save_atomic(weights, out / "model.pt")
        data.save_atomic(json.dumps(summary, indent=2, allow_nan=False), out / "summary.json", released=True)
    print(f"done: eps={eps_spent:.3f} (delta={delta:.3g}, sigma={sigma:.4f}, q={q:.5f}, steps={steps})" +
          ("" if why_not is None else f": NOT PRIVATE ({why_not})"))
    if earlier["prior"]:
        print(f"eps={eps_spent:.3f} is composed with the --init run's; this run alone: eps={eps_alone:.3f}")
    if audit_result:
        verdict = ("VIOLATION, the run is less private than it claims" if audit_result["violation"]
                   else "consistent with the claim")
        saturated = (" (SATURATED: every guess right, as in a run without noise; this many canaries cannot check a"
                     " larger eps)") if audit_result["saturated"] else ""
        print(f"privacy audit (Steinke et al. 2023, {audit.m} canaries): eps >= "
              f"{audit_result['eps_lower_bound']:.3f} at {audit_result['confidence']:.0%} confidence vs claimed eps "
              f"{eps_spent:.3f}: {verdict}{saturated}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    parser, args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out or f"runs/{args.name or f'randp_eps{args.eps:g}_s{args.seed}'}")
    # a resumed run is the same run: its flags come from the checkpoint (an older one's probed augmented images)
    args, ckpt = resumed(parser, args, out, older=dict(lp_features="augmented"))
    # DP-SGD's and the non-private reference's optimiser defaults differ: clipping bounds every DP step, so lr 2.5
    # is safe there; unclipped, the same model needs plain SGD's small lr, and momentum to make up the distance
    reference = args.eps == math.inf
    args.lr = (0.05 if reference else 2.5) if args.lr is None else args.lr
    args.lp_lr = (0.05 if reference else 0.5) if args.lp_lr is None else args.lp_lr
    args.momentum = (0.9 if reference else 0.0) if args.momentum is None else args.momentum
    data.check_flags(args)  # every numeric flag and the device, before any data is read
    device = data.pick_device(args.device)
    lp_steps = 0 if args.no_prior else args.lp_steps  # without a prior there is nothing to probe: phase III only
    if not 0 <= lp_steps < args.steps:
        raise ValueError(f"--lp-steps {args.lp_steps} must be >= 0 and < --steps {args.steps} (phase III needs a step)")
    rank, world, device = start(args, out, ckpt, device)
    master = rank == 0  # rank 0 alone prints, logs, checkpoints and evaluates
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # --- data and privacy plan: sigma for ALL steps of phases II and III, so the whole run is one plan ---
    private = private_set(args, shapes_n=200_000)  # generated: a large N keeps q, hence sigma, small
    if private.labels is None:
        raise ValueError(f"--data {args.data} has no labels: DP-RandP trains a classifier")
    n_classes = data.check_labels(private, flag=f"--data {args.data}")
    if args.build_prior:  # phase I alone: random-process images, in the private set's channels (its only use here)
        _, cache, built = prior_body(args, private.channels, device, autocast, master)
        print(f"phase I: {'built' if built else 'found'} {cache} in {time.time() - t0:.0f}s (public: no privacy cost)")
        return
    # the test split is opened before training (its labels are read only after it): a missing one fails now
    test = data.load_dataset(args.data, split="test", size=args.size, n=None, seed=args.seed)
    audit = CanaryAudit(args.audit, seed=args.seed) if args.audit else None
    earlier = earlier_runs(args, ckpt, scripts=())  # the prior is public: nothing earlier to compose with
    plan, n_total = privacy_plan(args, private, audit, earlier, detail=f" (linear probe {lp_steps}, fine-tune "
                                 f"{args.steps - lp_steps}) K={args.aug_mult}")
    q, sigma, delta, N = plan["q"], plan["sigma"], plan["delta"], len(private)
    is_private = args.eps < math.inf  # --eps inf: sigma 0, and the accountant reports eps inf

    # --- phase I: the prior from random processes (public), or a random init ---
    model = WRN(args.width, n_classes, private.channels).to(device)
    t_prior = time.time()
    if not args.no_prior:  # the body only: the head is new, zero, for this task's classes; phase II starts every
        body, cache, built = prior_body(args, private.channels, device, autocast, master)  # rank from rank 0's
        data.load_weights(model, body, where=f"cache {cache}", missing_ok=("head.", "feat_"))
        print(f"phase I: {'built' if built else 'loaded'} {cache}")
    gen = torch.Generator().manual_seed(20_000 + args.seed)
    public = data.to_channels(data.random_process_images(2048, args.size, generator=gen), private.channels)
    with torch.no_grad():  # statistics of public images only: no privacy cost
        f = torch.cat([model.features(data.normalize(x).to(device)).float() for x in public.split(256)])
    model.feat_mean.copy_(f.mean(0))
    model.feat_std.copy_(f.std(0) + 1e-3)
    if master and not args.no_prior:
        data.save_grid(public[:32], out / "priors.png", scale=2)
    t_prior = time.time() - t_prior

    # --- phases II and III: DP-SGD on the private images, one accountant for both ---
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    budget = {}  # noise sigma*C on a sum of B clipped per-example gradients, over each phase's trained coordinates
    for phase in (["linear_probe"] if lp_steps else []) + ["fine_tune"]:
        d = sum(v.numel() for v in trainable_split(params, buffers, phase)[0].values())
        budget[phase], line = noise_budget(sigma=sigma, trained=d, units=args.batch_size)
        print(f"{phase}: {line}")
    opt = torch.optim.SGD(params.values(), lr=args.lr, momentum=args.momentum)
    ema = {k: v.clone() for k, v in params.items()}  # evaluated weights: a function of released ones, so free
    accountant = RDPAccountant()
    gens = sample_gen, noise_gen = generators(args, device, world)
    step = 0
    if ckpt:
        step = restore(ckpt, model, opt, accountant, audit, gens, plan)
        ema = {k: v.to(device) for k, v in ckpt["ema"].items()}
    if world > 1:  # every rank starts from rank 0's weights (a GPU's non-deterministic kernels could part them)
        for v in [*params.values(), *buffers.values()]:
            dist.broadcast(v, src=0)
    # --eps inf takes one gradient of the batch (nothing to clip) where DP-SGD takes per-example ones; same inputs
    make_grads = make_per_example_grads if is_private else make_batch_grad
    train_grads = make_grads(model, classify_loss)
    flip = args.aug == "crop_flip"
    # each example's K views: a function of (--seed, the step being taken, its index) alone
    example_rng = lambda idx: data.ExampleRandom(args.seed, step, idx)
    load = lambda idx: (augment(private.images(idx), example_rng(idx), args.aug_mult, flip).to(device),
                        private.labels[idx].to(device))
    probe_grads, load_probe = train_grads, load
    if lp_steps > step and args.lp_features == "cached":  # phase II freezes the body, so each example's features
        with torch.no_grad():  # are computed once, unaugmented: a probe step is then a matmul, not a forward pass
            feats = torch.cat([model.features(data.normalize(private.images(i)).to(device)).float()
                               for i in torch.arange(N).split(512)])  # (N, D)
        probe_grads = make_grads(model, lambda f, x, y: F.cross_entropy(f(x, True), y, reduction="none"))
        load_probe = lambda idx: (feats[idx.to(feats.device)], private.labels[idx].to(device))
    noise_std = 0.0 if args.debug_no_noise else sigma * args.clip  # on the sum; one example moves it by <= C
    checkpoint = lambda: save_checkpoint(
        out / "checkpoint.pt", gens, rank, model=model.state_dict(), optimizer=opt.state_dict(),
        args=vars(args), step=step, accountant=accountant.state_dict(), audit=audit and audit.state_dict(),
        init=earlier, ema=ema)

    # one logical step: Poisson sample -> per-example gradients -> clip -> noise -> step -> account
    batches = data.poisson_batches(N, q, args.steps - step, args.physical_batch, generator=sample_gen,
                                   shard=(rank, world), canaries=audit.n_included if audit else 0)
    bar = tqdm(batches, total=args.steps - step, desc="DP-SGD (phases II+III)", dynamic_ncols=True, disable=not master)
    stats = {}  # dp_step's clipped-sum norm: private, logged only with --log-private
    with open(out / "metrics.jsonl" if master else os.devnull, "a") as log:
        for physical_batches, sampled_canaries in bar:
            model.train()
            probing = step < lp_steps  # phase II: the head alone, on the frozen prior; phase III: everything
            first, total, peak = (0, lp_steps, args.lp_lr) if probing else (lp_steps, args.steps - lp_steps, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr_at(step - first, total, peak, min(args.warmup, total))
            trainable, frozen = trainable_split(params, buffers, "linear_probe" if probing else "fine_tune")
            grads_fn, inputs = (probe_grads, load_probe) if probing else (train_grads, load)
            canaries = audit and torch.as_tensor(audit.rows(sampled_canaries, args.clip)).to(device)
            with autocast:
                if is_private:
                    noisy, loss = dp_step(grads_fn, trainable, frozen, physical_batches, inputs, clip=args.clip,
                                          noise_std=noise_std, expected_batch=args.batch_size, noise_gen=noise_gen,
                                          canaries=canaries, stats=stats)
                else:  # NOT private: the same sample and inputs, unclipped and unnoised
                    noisy, loss = plain_step(grads_fn, trainable, frozen, physical_batches, inputs,
                                             expected_batch=args.batch_size)
            if audit:  # the auditor reads what DP-SGD releases: the privatised gradient's canary coordinates
                audit.observe(noisy.pop("canaries").float().cpu())
            for k, p in params.items():  # in phase II the body gets no gradient, so SGD leaves it untouched
                p.grad = noisy[k].to(p.dtype) if k in noisy else None
            opt.step()
            accountant.step(q=q, sigma=sigma)
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))  # EMA warm-up (De et al.): early weights fade fast
            for k, p in params.items():
                ema[k].lerp_(p, 1 - decay)
            # the loss reads private data: shown as a monitoring aid, never used for any decision or selection
            bar.set_postfix(loss=f"{loss:.3f}", eps=f"{accountant.epsilon(delta):.2f}")
            if step % args.log_every == 0 or step == args.steps:
                batch = int(all_ranks_sum(sum(int(m.sum()) for _, m in physical_batches)))  # every rank: a collective
                log_line(log, args, step=step, phase="linear_probe" if probing else "fine_tune",
                         eps=accountant.epsilon(delta), lr=opt.param_groups[0]["lr"], t0=t0, params=params,
                         loss=loss, batch=batch, signal=stats.get("clipped_norm"))
                checkpoint()
    end_processes(world)
    if not master:
        return

    # --- evaluation: the EMA weights, on the test split, once (the report; nothing is chosen with it) ---
    model.load_state_dict(ema, strict=False)  # parameters only; GroupNorm keeps no running statistics
    acc = accuracy(model, test, device)
    phases = [dict(phase="linear_probe", steps=lp_steps, q=q, sigma=sigma),
              dict(phase="fine_tune", steps=args.steps - lp_steps, q=q, sigma=sigma)]
    summary = dict(method="DP-RandP (randp.py)", phases=phases, noise_signal=budget, batch_size=args.batch_size,
                   aug_mult=args.aug_mult,
                   prior=not args.no_prior, width=args.width, test_data=test.name, test_accuracy=acc,
                   prior_time_s=t_prior, device=str(device))
    release(out, model, summary, args=args, plan=plan, accountant=accountant, earlier=earlier, audit=audit,
            n_total=n_total, steps=step, data_name=private.name)
    print(f"test accuracy (EMA weights, {test.name}, n={len(test)}): {acc:.4f}")
    print(f"wrote {out}/model.pt, summary.json, metrics.jsonl, checkpoint.pt{'' if args.no_prior else ', priors.png'} "
          f"in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    # bad input is one `error:` line and exit code 2; Ctrl-C or SIGTERM one line once the last checkpoint is safe
    sys.exit(data.run_main(main))
