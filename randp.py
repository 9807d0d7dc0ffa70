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
few hundred steps learn (issue #5): one channel per GroupNorm group, LayerNorm on the pooled features and He init
(see norm(), WRN). The learning rates, momentum, --lp-steps and the batch/steps trade were chosen on a public
proxy, the embedded shapes set (README, "how the defaults were chosen"), never on the data reported; so were the
non-private reference's (--eps inf: lr 0.05, lp-lr 0.05, momentum 0.9; docs/SWEEP_randp.md): clipping bounds every
DP step, and unclipped the DP learning rates diverge. data.py's random-process generators stand in for the
paper's StyleGAN-Oriented images. The model takes the private set's channels and its prior is learned on
random-process images in those channels (grey sets such as MNIST: their BT.601 luma), so a grey set is not
fine-tuned from a prior that only ever saw colour. Phase I is public compute, cached per flags in runs/cache/
(`--build-prior` builds it alone). The test split is read once, at the end, for the report: nothing is chosen
with it.

  python randp.py --eps 3 --data ../shared/data/mnist --aug crop --batch-size 256 --steps 500            # MNIST (README)
  python randp.py --eps 3 --data ../shared/data/mnist --aug crop --batch-size 256 --steps 500 --no-prior # DP-SGD alone
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
from accountant import CanaryAudit, RDPAccountant, dp_sgd_plan, epsilon

# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("privacy")
    g.add_argument("--eps", type=float, default=3.0, help="target epsilon of the private run (phases II and III together); 'inf': the non-private reference (no clipping, no noise)")
    g.add_argument("--delta", type=float, default=None, help="delta; default 1/(2N); must be < 1/N")
    g.add_argument("--clip", type=float, default=1.0, help="per-example gradient norm bound C")
    g.add_argument("--batch-size", type=int, default=512, help="expected logical batch B (Poisson rate q = B/N)")
    g.add_argument("--physical-batch", type=int, default=64, help="examples per vmap call (memory only)")
    g.add_argument("--steps", type=int, default=200, help="logical DP-SGD steps of phases II + III together")
    g.add_argument("--lp-steps", type=int, default=20, help="phase II: steps of DP linear probing (head only); ignored with "
                   "--no-prior. 20 beat 0, 40 and 80 on the public proxy (README, 'how the defaults were chosen')")
    g.add_argument("--aug-mult", type=int, default=1, help="K: augmented copies per example, averaged before clipping")
    g.add_argument("--lp-features", choices=["augmented", "cached"], default="cached", help="phase II input: "
                   "each example's features computed once (unaugmented), or augmented views through the frozen body "
                   "each step. cached beat augmented in two runs each on the public proxy (docs/SWEEP_randp.md), "
                   "and a probe step is then a matmul, not a forward pass")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="private labelled images: 'shapes' (embedded) or a dataset path")
    g.add_argument("--n", "--n-examples", dest="n", type=int, default=None, help="use n private examples, a seeded random subset (default: all; shapes: generate 20000); under torchrun write --n-examples (torchrun reads --n as its own, ambiguous)")
    g.add_argument("--size", type=int, default=32, help="image side H = W (images are resized to it)")
    g.add_argument("--aug", choices=["crop_flip", "crop"], default="crop_flip", help="private augmentation: reflect-pad-4 crop, and a horizontal flip (not for digits)")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=float, default=0.5, help="k of WRN-16-k (widths 16k, 32k, 64k): 4 = the paper's, 0.5 = CPU default, 0.25 = tests")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="peak SGD learning rate of phase III (fine-tuning), with "
                   "or without the prior; default 2.5, or 0.05 with --eps inf. Chosen with --momentum on a PUBLIC proxy "
                   "only (embedded shapes, validated on shapes-test; README, 'how the defaults were chosen'): 2.5 beat "
                   "1.25 at momentum 0, and 0.25-1 at momentum 0.9. From a random init no lr learned the proxy, so "
                   "--no-prior shares this one. 0.05 is the non-private reference's lr, chosen on the proxy "
                   "(docs/SWEEP_randp.md): unclipped, lr 0.25 and up diverge")
    g.add_argument("--lp-lr", type=float, default=None, help="peak SGD learning rate of phase II (linear probe, on "
                   "standardised features); default 0.5, or 0.05 with --eps inf. 0.5 beat 2 on the public proxy; 0.05 is "
                   "the non-private reference's, chosen on the proxy: with its momentum, 0.5 leaves a head so large that "
                   "phase III starts unstable")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum of phases II and III; default 0, or 0.9 "
                   "with --eps inf. DP: none, as De et al.; on the public proxy momentum 0 at lr 2.5 beat momentum 0.9 at "
                   "lr 0.25, 0.5 and 1. --eps inf: the non-private reference's momentum, chosen on the proxy with its lr "
                   "(docs/SWEEP_randp.md): plain SGD must keep its lr under the sharpest direction's limit, and momentum "
                   "moves it 10x faster along the flat ones")
    g.add_argument("--warmup", type=int, default=5, help="linear warm-up steps of each phase, then cosine decay")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights evaluated (ramped up over the first steps)")
    g = p.add_argument_group("phase I: prior from random processes (public, no privacy cost)")
    g.add_argument("--no-prior", action="store_true", help="random init and phase III only: plain DP-SGD, the baseline")
    g.add_argument("--prior-steps", type=int, default=200, help="alignment + uniformity steps on random-process images")
    g.add_argument("--prior-batch", type=int, default=128, help="random-process images per step (two views each)")
    g.add_argument("--prior-lr", type=float, default=0.1, help="peak SGD learning rate of phase I")
    g.add_argument("--build-prior", action="store_true", help="build (or find) the phase I prior for these flags "
                   "in runs/cache/ and stop: public images only, no DP run")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of everything random")
    g.add_argument("--audit", type=int, default=0, metavar="M", help="check the claim: a one-run privacy audit with "
                   "M gradient canaries (accountant.CanaryAudit; eps then covers N + the canaries that joined)")
    g.add_argument("--debug-no-noise", action="store_true", help=argparse.SUPPRESS)  # breaks privacy: tests only
    g.add_argument("--insecure-seed", action="store_true", help=argparse.SUPPRESS)  # tests only: replayable
    g.add_argument("--log-private", action="store_true", help="also log the training loss and batch size "
                   "(they read the private data: metrics.jsonl must then not be published)")
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
    statistics to make a stroke stand out: in short clipped runs validated on a held-out part of the MNIST train
    split (issue #5), one channel per group learned far faster than 2 per group. That split is private, so MNIST's
    eps does not cover this one choice (README, "What the eps covers"); the learning rates and momentum were re-chosen
    on shapes."""
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
        # Scale-invariant features: a LayerNorm (no parameters) over one example's D features. Average pooling a
        # mostly-background image gives features that differ between examples by a few percent of their size, so the zero
        # head needs huge weights before it separates classes, and the body, whose gradient flows through the head,
        # learns nothing meanwhile: the cause of issue #5's flat 23-30% on MNIST. Per example, so DP-safe, and
        # fitted on nothing.
        f = F.layer_norm(f, f.shape[-1:])
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


def augment(imgs_uint8, gen, k, flip):
    """K augmented views per example, drawn per example (never mixing examples): a reflect-padded random crop and,
    for sets where mirroring keeps the label, a horizontal flip. Channels stay as they are: the model and its prior
    take the private set's channels (a grey set gets a grey prior). Returns views (B, K, C, H, W) in [-1, 1]."""
    x = data.normalize(imgs_uint8).repeat_interleave(k, 0)  # (B*K, C, H, W)
    x = data.random_crop(x, pad=4, generator=gen)
    x = data.hflip(x, generator=gen) if flip else x
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


def dp_step(per_example_grads, params, buffers, micro_batches, load, *, clip, sigma, expected_batch, noise_gen,
            canaries=None):
    """One logical DP-SGD step. micro_batches: [(idx (P,), mask (P,))] of one Poisson sample.
    Returns the privatised gradient {name: tensor} and the mean loss of the sampled examples (for logging).
    canaries: the audit's sampled canary gradients (m,), canary i along its own coordinate i (accountant.CanaryAudit);
    they are clipped, summed and noised exactly like the examples and come back under the key "canaries".
    A sampled example whose gradient is not finite stops the run (ValueError): no clip factor bounds a NaN."""
    up = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # float32 at least (a float64 test stays so)
    summed = {k: up(torch.zeros_like(v)) for k, v in params.items()}
    loss_sum, count, bad = 0.0, 0, 0
    for idx, mask in micro_batches:
        batch = load(idx)  # tensors of P examples, e.g. images (P, C, H, W)
        grads, losses = per_example_grads(params, buffers, batch)  # {name: (P, *shape)}, (P,)
        # The sensitivity argument lives here, so it runs in float32 (at least) whatever the autocast: a bf16
        # matmul would round the clipped sum, and one example could then move it by more than C.
        with torch.autocast(losses.device.type, enabled=False):
            keep = mask.to(losses.device)  # (P,) bool; padding slots are False
            # ||g_i|| over all parameters together: the norm of the per-parameter norms (no squared copy of g)
            norms = torch.stack([torch.linalg.vector_norm(up(g).reshape(g.shape[0], -1), dim=1)
                                 for g in grads.values()]).norm(dim=0)  # (P,)
            finite = torch.isfinite(norms)
            bad += int((keep & ~finite).sum())
            # g_i <- g_i * min(1, C / ||g_i||); padding slots get factor 0 through where, never 0 * NaN
            factor = torch.where(keep & finite, (clip / (norms + 1e-6)).clamp(max=1.0), 0.0)  # (P,)
            whole = bool(finite.all())  # else zero the non-finite rows (padding only, or the run stops below)
            for k, g in grads.items():
                g = up(g) if whole else torch.where(finite.view(-1, *[1] * (g.dim() - 1)), up(g), 0.0)
                summed[k] += torch.tensordot(factor.to(g.dtype), g, dims=1)  # sum_i factor_i g_i
        loss_sum += float(torch.where(keep, up(losses), 0.0).sum())
        count += int(mask.sum())
    # torchrun: summed covers this rank's shard of the one global Poisson sample. Rank 0 alone adds the noise and
    # the canaries (one global set; the other ranks add zeros, so every rank reduces the same keys); the all-reduce
    # then sums the shards, so the released sum is the one-process sum plus ONE noise draw, whatever the world
    # size. (The alternative, a shared noise seed on every rank after the reduction, draws world times for nothing.)
    first = not dist.is_initialized() or dist.get_rank() == 0
    with torch.autocast(next(iter(summed.values())).device.type, enabled=False):
        if canaries is not None:  # each canary is one example whose gradient has a single non-zero coordinate
            canaries = up(canaries)
            summed["canaries"] = canaries * (clip / (canaries.abs() + 1e-6)).clamp(max=1.0) * first
        # g~ = (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / B_expected: noise once per step, on the sum; dividing by
        # the expected batch size (a public constant, the GLOBAL one) instead of the realised one keeps the
        # sensitivity at C. The noise generator's seed is secret (data.secret_seeds).
        noisy = {k: s + sigma * clip * torch.randn(s.shape, generator=noise_gen, device=s.device, dtype=s.dtype)
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


def plain_step(batch_grad, params, buffers, micro_batches, load, *, expected_batch):
    """One logical step of --eps inf, NOT private: sum of the sampled examples' gradients / expected batch, so it
    differs from dp_step only by the missing clipping and noise. Returns (gradient {name: tensor}, mean loss)."""
    summed = {k: torch.zeros_like(v) for k, v in params.items()}
    loss_sum, count = 0.0, 0
    for idx, mask in micro_batches:
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


def prior_body(args, channels, device, autocast, rank=0):
    """Phase I's weights: the body (stem, blocks, norm) of a WRN trained on random-process images alone. A function
    of its flags only (its own seeds), so it is built once, cached in runs/cache/ under a name made of those flags,
    and read back by every later run: the cost is public compute, paid once, and no privacy.
    Returns (body state_dict, cache path, built: True when this call trained it)."""
    cache = Path("runs/cache") / (f"randp_prior_v2_wrn16-{args.width:g}_c{channels}_s{args.size}_{args.prior_steps}x"
                                  f"{args.prior_batch}_lr{args.prior_lr}_seed{args.seed}.pt")
    if cache.exists():
        return torch.load(cache, map_location=device, weights_only=True), cache, False
    with torch.random.fork_rng(devices=[]):  # the init from the prior's own seed, whatever ran before
        torch.manual_seed(30_000 + args.seed)
        model = WRN(args.width, 10, channels).to(device)  # the head is not kept: any class count will do
        train_prior(model, args, device, autocast, channels)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "feat_"))}
    if rank == 0:  # torchrun: every rank trains this public phase (rather than wait idle past the collective
        cache.parent.mkdir(parents=True, exist_ok=True)  # timeout); rank 0 alone writes the cache
        torch.save(body, str(cache) + ".tmp")
        os.replace(str(cache) + ".tmp", cache)
    return body, cache, True


def train_prior(model, args, device, autocast, channels):
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    proj = nn.Linear(model.dim, 128).to(device)  # projection head of phase I only (discarded, as in SimCLR)
    opt = torch.optim.SGD([*model.parameters(), *proj.parameters()], lr=args.prior_lr, momentum=0.9, weight_decay=5e-4)
    bar = tqdm(range(args.prior_steps), desc="phase I: prior (public)", dynamic_ncols=True, disable=os.environ.get("RANK", "0") != "0")
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
# Main


def main(argv=None):
    parser, args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out or f"runs/{args.name or f'randp_eps{args.eps:g}_s{args.seed}'}")
    ckpt_path = out / "checkpoint.pt"
    if args.resume:  # a resumed run is the same run: its flags come from the checkpoint
        if not ckpt_path.exists():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = data.load_checkpoint(ckpt_path, flag="--resume", script=Path(__file__).stem)
        changed = [k for k, v in vars(args).items() if k != "resume" and v != parser.get_default(k) and v != ckpt["args"].get(k)]
        if any(k not in ("out", "name", "device", "log_every") for k in changed):
            raise ValueError(f"--resume continues the checkpoint's run; flags differ from it: {', '.join('--' + k.replace('_', '-') for k in changed)}")
        defaults = {k: parser.get_default(k) for k in vars(args)}  # flags newer than the checkpoint: defaults
        args = argparse.Namespace(**{**defaults, **ckpt["args"], "out": str(out), "resume": True,
                                     "device": args.device})
        if args.lr is None:  # a checkpoint from before issue #5's proxy defaults: its run used this lr rule
            args.lr = 2.0 if args.no_prior else 1.0
    # DP-SGD's and the non-private reference's optimiser defaults differ: clipping bounds every DP step, so lr 2.5
    # is safe there; unclipped, the same model needs plain SGD's small lr, and momentum to make up the distance
    reference = args.eps == math.inf
    args.lr = (0.05 if reference else 2.5) if args.lr is None else args.lr
    args.lp_lr = (0.05 if reference else 0.5) if args.lp_lr is None else args.lp_lr
    args.momentum = (0.9 if reference else 0.0) if args.momentum is None else args.momentum
    # --- TRY NOT TO MODIFY: every numeric flag and the device checked before any data is read ---
    data.check_flags(args)
    device = data.pick_device(args.device)
    lp_steps = 0 if args.no_prior else args.lp_steps  # without a prior there is nothing to probe: phase III only
    if not 0 <= lp_steps < args.steps:
        raise ValueError(f"--lp-steps {args.lp_steps} must be >= 0 and < --steps {args.steps} (phase III needs a step)")

    # --- seeding and run naming (identical in every script) ---
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    data.claim_out_dir(out, resume=args.resume)  # one run per --out; refused before anything is written
    if args.resume:  # lines logged after the checkpoint's step would repeat in metrics.jsonl
        data.trim_metrics(out / "metrics.jsonl", step=ckpt["step"])

    # --- many processes (torchrun; identical in every script): one logical step is one global Poisson sample ---
    # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (`python script.py`) nothing here runs and no
    # process group exists. Every rank builds the same model and draws the same global sample from the same
    # seeded sample_gen, then keeps its shard (data.poisson_batches); dp_step sums the shards and adds the noise
    # once. Augmentations draw from a stream per rank (aug_gen); rank 0 alone prints, logs, checkpoints, evaluates.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.type == "cuda":  # one GPU per process, NCCL between them; gloo between CPU processes
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank:  # errors still reach stderr
        sys.stdout = open(os.devnull, "w")

    # --- data and privacy plan (accountant.py turns eps, delta, B, N, steps into q and sigma) ---
    n_default = 20000 if args.data in ("shapes", "shapes-grey") else None
    private = data.load_dataset(args.data, split="train", size=args.size, n=args.n or n_default, seed=args.seed)
    if args.n and len(private) < args.n:  # a subset never silently becomes the whole set
        raise ValueError(f"--n {args.n}: --data {args.data} has only {len(private)} examples")
    if private.labels is None:
        raise ValueError(f"--data {args.data} has no labels: DP-RandP trains a classifier")
    n_classes = data.check_labels(private, flag=f"--data {args.data}")
    if args.build_prior:  # phase I alone: random-process images, in the private set's channels (its only use here)
        _, cache, built = prior_body(args, private.channels, device, autocast, rank)
        print(f"phase I: {'built' if built else 'found'} {cache} in {time.time() - t0:.0f}s (public: no privacy cost)")
        return
    # the test split is opened before training (its labels are read only after it): a missing one fails now
    test = data.load_dataset(args.data, split="test", size=args.size, n=None, seed=args.seed)
    # sigma for ALL steps of phases II and III: the same q and sigma in both, so the whole run is one plan
    # --audit M: canaries join the private data with fair coins; the privacy claim covers them too
    audit = CanaryAudit(args.audit, seed=args.seed) if args.audit else None
    n_total = len(private) + (audit.n_included if audit else 0)
    if audit and args.eps == math.inf:
        raise ValueError("--audit checks a privacy claim; --eps inf makes none")
    earlier = dict(prior=None, note=None, pipeline=[])  # the prior is public: nothing earlier to compose with
    plan = dp_sgd_plan(target_eps=args.eps, delta=args.delta, n=n_total, batch_size=args.batch_size, steps=args.steps)
    q, sigma, delta, N = plan["q"], plan["sigma"], plan["delta"], len(private)
    is_private = args.eps < math.inf  # --eps inf: sigma 0, and the accountant reports eps inf
    print(f"private data: {private.name}, N={n_total}{f' ({N} + {n_total - N} canaries)' * bool(audit)} | q={q:.5f} (B={args.batch_size}) sigma={sigma:.4f} "
          f"steps={args.steps} (linear probe {lp_steps}, fine-tune {args.steps - lp_steps}) K={args.aug_mult} "
          f"clip={args.clip} delta={delta:.3g} -> target eps={args.eps}")
    if args.debug_no_noise:
        print("WARNING: --debug-no-noise adds NO noise: this run is NOT private and the eps it prints is false "
              "(a deliberately broken run, for testing the audit)")
    if earlier["note"]:
        print(earlier["note"] + (f" (eps {plan['prior_eps']:.3f} spent before this run)" if earlier["prior"] else ""))
    if args.insecure_seed:
        print("WARNING: --insecure-seed: the Poisson sample and the noise follow --seed, which is public; the eps "
              "printed holds only while that seed stays secret (for tests that replay a run)")
    if not is_private:
        print("NOT PRIVATE: --eps inf trains without clipping or noise, the reference a DP run is measured against")

    # --- phase I: the prior from random processes (public), or a random init ---
    model = WRN(args.width, n_classes, private.channels).to(device)
    t_prior = time.time()
    if not args.no_prior:  # the body only: the head is new, zero, for this task's classes; phase II starts every
        body, cache, built = prior_body(args, private.channels, device, autocast, rank)  # rank from rank 0's weights
        model.load_state_dict(body, strict=False)
        print(f"phase I: {'built' if built else 'loaded'} {cache}")
    gen = torch.Generator().manual_seed(20_000 + args.seed)
    public = data.to_channels(data.random_process_images(2048, args.size, generator=gen), private.channels)
    with torch.no_grad():  # statistics of public images only: no privacy cost
        f = torch.cat([model.features(data.normalize(x).to(device)).float() for x in public.split(256)])
    model.feat_mean.copy_(f.mean(0))
    model.feat_std.copy_(f.std(0) + 1e-3)
    if rank == 0 and not args.no_prior:
        data.save_grid(public[:32], out / "priors.png", scale=2)
    t_prior = time.time() - t_prior

    # --- phases II and III: DP-SGD on the private images, one accountant for both ---
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    opt = torch.optim.SGD(params.values(), lr=args.lr, momentum=args.momentum)
    ema = {k: v.clone() for k, v in params.items()}  # evaluated weights: a function of released ones, so free
    accountant = RDPAccountant()
    if earlier["prior"]:  # eps from here on is the composed one: the earlier runs' and this one's
        accountant.load_state_dict(earlier["prior"])
    # secret randomness (rule 3): the Poisson sample and the noise draw from the OS, never from the public --seed;
    # torchrun: every rank draws the same global sample, so every rank takes rank 0's sampling seed
    sample_seed, noise_seed = data.secret_seeds(args.seed if args.insecure_seed else None)
    if world > 1:
        shared = [sample_seed]
        dist.broadcast_object_list(shared, src=0)
        sample_seed = shared[0]
    sample_gen = torch.Generator().manual_seed(sample_seed)  # Poisson sampling
    aug_gen = torch.Generator().manual_seed(args.seed + 1 + 2**32 * rank)  # crops and flips (public)
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed)  # DP noise
    step = 0
    if args.resume:
        data.load_weights(model, ckpt["model"], where=f"--resume {ckpt_path}")
        opt.load_state_dict(ckpt["optimizer"])
        accountant.load_state_dict(ckpt["accountant"])
        if audit:
            audit.load_state_dict(ckpt["audit"])
        step = ckpt["step"]
        sample_state, aug_states, noise_state, torch_state = ckpt["rng"]
        # every rank: the same sample stream, its own augmentation stream (round-robin if the world size changed)
        for g, s in zip((sample_gen, aug_gen, noise_gen), (sample_state, aug_states[rank % len(aug_states)], noise_state)):
            g.set_state(s)
        torch.set_rng_state(torch_state)
        ema = {k: v.to(device) for k, v in ckpt["ema"].items()}
        print(f"resumed at step {step}, eps so far {accountant.epsilon(delta):.3f}")
    if world > 1:  # every rank starts from rank 0's weights (a GPU's non-deterministic kernels could part them)
        for v in [*params.values(), *buffers.values()]:
            dist.broadcast(v, src=0)

    # --eps inf takes one gradient of the batch (nothing to clip) where DP-SGD takes per-example ones; same inputs
    make_grads = make_per_example_grads if is_private else make_batch_grad
    train_grads = make_grads(model, classify_loss)
    probe_grads, load_features = train_grads, None
    if lp_steps > step and args.lp_features == "cached":  # phase II freezes the body, so each example's features
        with torch.no_grad():  # are computed once, unaugmented: a probe step is then a matmul, not a forward pass
            feats = torch.cat([model.features(data.normalize(private.images(i)).to(device)).float()
                               for i in torch.arange(N).split(512)])  # (N, D)
        probe_grads = make_grads(model, lambda f, x, y: F.cross_entropy(f(x, True), y, reduction="none"))
        load_features = lambda idx: (feats[idx.to(feats.device)], private.labels[idx].to(device))
    flip = args.aug == "crop_flip"
    load = lambda idx: (augment(private.images(idx), aug_gen, args.aug_mult, flip).to(device), private.labels[idx].to(device))

    def save_checkpoint():  # every rank calls it: each holds its own augmentation stream; rank 0 writes the file
        aug_states = [aug_gen.get_state()] * world
        if world > 1:
            dist.all_gather_object(aug_states, aug_gen.get_state())
        if rank:
            return
        ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), args=vars(args), step=step,
                    accountant=accountant.state_dict(), phase=phase, ema=ema,
                    rng=[sample_gen.get_state(), aug_states, noise_gen.get_state(), torch.get_rng_state()],
                    audit=audit.state_dict() if audit else None, init=earlier, script=Path(__file__).stem)
        torch.save(ckpt, str(ckpt_path) + ".tmp")
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)  # atomic: a crash never leaves half a checkpoint

    batches = data.poisson_batches(N, q, args.steps - step, args.physical_batch, generator=sample_gen,
                                   shard=(rank, world))
    bar = tqdm(batches, total=args.steps - step, initial=0, desc="DP-SGD (phases II+III)", dynamic_ncols=True, disable=rank > 0)
    with open(out / "metrics.jsonl" if rank == 0 else os.devnull, "a") as log:
        for micro_batches in bar:
            model.train()
            phase = "linear_probe" if step < lp_steps else "fine_tune"
            first, total, peak = (0, lp_steps, args.lp_lr) if phase == "linear_probe" else (lp_steps, args.steps - lp_steps, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr_at(step - first, total, peak, min(args.warmup, total))
            trainable, frozen = trainable_split(params, buffers, phase)
            canaries = torch.as_tensor(audit.gradients(step, q, args.clip), dtype=torch.float32, device=device) if audit else None
            with autocast:
                cached = phase == "linear_probe" and load_features is not None
                grads_fn, inputs = (probe_grads, load_features) if cached else (train_grads, load)
                if is_private:
                    noisy, loss = dp_step(grads_fn, trainable, frozen, micro_batches, inputs, clip=args.clip,
                                          sigma=0.0 if args.debug_no_noise else sigma, expected_batch=args.batch_size,
                                          noise_gen=noise_gen, canaries=canaries)
                else:  # NOT private: the same sample and inputs, unclipped and unnoised
                    noisy, loss = plain_step(grads_fn, trainable, frozen, micro_batches, inputs,
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
            # the logged loss reads private data: a monitoring aid only, never used for any decision or selection
            bar.set_postfix(loss=f"{loss:.3f}", eps=f"{accountant.epsilon(delta):.2f}")
            if step % args.log_every == 0 or step == args.steps:
                eps_now = accountant.epsilon(delta)
                # released or public values only: the loss and the realised batch size read the private data
                # (the batch size counts the sampling coins), so they are logged only with --log-private
                batch = int(all_ranks_sum(sum(int(m.sum()) for _, m in micro_batches)))  # a collective: every rank
                update = [p.grad.float().norm() for p in params.values() if p.grad is not None]
                rec = dict(step=step, phase=phase, eps=eps_now, lr=opt.param_groups[0]["lr"], time=time.time() - t0,
                           noisy_grad_norm=float(torch.stack(update).norm()))
                if args.log_private:
                    rec.update(loss=loss, batch=batch, private=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                tqdm.write(f"step {step}/{args.steps} ({phase}) loss {loss:.4f} eps {eps_now:.3f}")
                save_checkpoint()
    if world > 1:  # training is over: evaluation and outputs are rank 0's alone
        dist.barrier()  # every rank leaves together: gloo aborts a process whose peer is torn down mid-collective
        dist.destroy_process_group()
        if rank:
            return
    eps_spent = accountant.epsilon(delta)
    audit_result = audit.result(delta=delta, claimed_eps=eps_spent) if audit else None

    # --- evaluation: the EMA weights, on the test split, once (the report; nothing is chosen with it) ---
    model.load_state_dict(ema, strict=False)  # parameters only; GroupNorm keeps no running statistics
    acc = accuracy(model, test, device)
    phases = [dict(phase="linear_probe", steps=lp_steps, q=q, sigma=sigma),
              dict(phase="fine_tune", steps=args.steps - lp_steps, q=q, sigma=sigma)]
    summary = dict(method="DP-RandP (randp.py)", private=is_private and not args.debug_no_noise, eps=eps_spent, target_eps=args.eps, delta=delta, sigma=sigma, q=q,
                   n=n_total, steps=step, phases=phases, batch_size=args.batch_size, clip=args.clip, aug_mult=args.aug_mult,
                   prior=not args.no_prior, width=args.width, data=private.name, test_data=test.name,
                   test_accuracy=acc, prior_time_s=t_prior, wall_time_s=time.time() - t0, device=str(device),
                   args=vars(args))
    # --- the release: model.pt (weights + privacy record) and summary.json. checkpoint.pt holds the secret
    # generator states, and metrics.jsonl written with --log-private the clean loss: never publish those two ---
    eps_alone = epsilon(q=q, sigma=sigma, steps=step, delta=delta)
    pipeline = earlier["pipeline"] + [dict(script=Path(__file__).name, file=str(out / "model.pt"), data=private.name,
                                           eps_alone=eps_alone, delta=delta, q=q, sigma=sigma, steps=step)]
    privacy = dict(private=is_private and not args.debug_no_noise, eps=eps_spent, delta=delta, data=private.name, n=n_total,
                   init=earlier["note"], accountant=accountant.state_dict(), pipeline=pipeline)
    release = dict(model=model.state_dict(), privacy=privacy, script=Path(__file__).stem)
    torch.save(release, str(out / "model.pt") + ".tmp")
    os.replace(str(out / "model.pt") + ".tmp", out / "model.pt")
    summary.update(eps_this_run=eps_alone, init_privacy=earlier["note"], privacy_pipeline=pipeline)
    summary.update(audit=audit_result, debug_no_noise=args.debug_no_noise)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: eps={eps_spent:.3f} (delta={delta:.3g}, sigma={sigma:.4f}, q={q:.5f}, steps={step})" +
          ("" if is_private else ": NOT PRIVATE (--eps inf)"))
    if earlier["prior"]:
        print(f"eps={eps_spent:.3f} is composed with the --init run's; this run alone: eps={eps_alone:.3f}")
    if audit_result:
        print(f"privacy audit (Steinke et al. 2023, {audit.m} canaries): eps >= {audit_result['eps_lower_bound']:.3f} "
              f"at {audit_result['confidence']:.0%} confidence vs claimed eps {eps_spent:.3f}: " +
              ("VIOLATION, the run is less private than it claims" if audit_result["violation"] else "consistent with the claim") +
              (" (SATURATED: every guess right, as in a run without noise; this many canaries cannot check a larger eps)"
               if audit_result["saturated"] else ""))
    print(f"test accuracy (EMA weights, {test.name}, n={len(test)}): {acc:.4f}")
    print(f"wrote {out}/model.pt, summary.json, metrics.jsonl, checkpoint.pt{'' if args.no_prior else ', priors.png'} "
          f"in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError) as e:  # bad input: one clear line, exit code 2
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; rank 0 says why
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
