"""ViP: a masked autoencoder trained with DP-SGD, initialised from MAE on synthetic images.

Paper: Yu, Sanjabi, Ma, Chaudhuri & Guo, "ViP: A Differentially Private Foundation Model for Computer Vision"
(2023). The recipe, in the order this file follows it:
  1. ViP-Syn: train an MAE (He et al. 2022) without privacy on synthetic images. They are public, so this stage
     costs no privacy budget. The paper uses Shaders21k; here data.py's random-process generators stand in.
  2. ViP: continue MAE training on the private images with DP-SGD (Abadi et al. 2016): Poisson sampling,
     per-example gradients clipped to C, Gaussian noise sigma*C added once per logical step, RDP accounting.
  3. Evaluate like the paper (not private): a linear probe on frozen encoder features, for a random-init encoder,
     the ViP-Syn encoder and the ViP encoder side by side.
What is simplified: tiny widths and 32x32 images by default, so a laptop CPU runs it in minutes (the paper's
ViT-B/16 at 224x224 is `--model base`); the paper's 2-billion-image LAION set becomes the embedded "shapes" set
(or `--data PATH`); the probe is full-batch logistic regression on pooled tokens.

  python mae_dp.py --eps 8                                      # embedded data, 2-core CPU: see README for time
  python mae_dp.py --eps 8 --audit 5000                         # + a one-run privacy audit: eps lower bound (README)
  python mae_dp.py --eps 8 --out runs/vip --resume              # continue a run: same step, same epsilon so far
  python mae_dp.py --eps 8 --data /tmp/cifar10 --probe-data /tmp/cifar10   # CIFAR-10 image folder or pickles
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
    g.add_argument("--eps", type=float, default=8.0,
                   help="target epsilon of the whole run; 'inf': the NOT private reference")
    g.add_argument("--delta", type=float, default=None, help="delta; default 1/(2N); must be < 1/N")
    g.add_argument("--clip", type=float, default=1.0, help="per-example gradient norm bound C")
    g.add_argument("--batch-size", type=int, default=1024, help="expected logical batch B (Poisson rate q = B/N)")
    g.add_argument("--physical-batch", type=int, default=64, help="examples per vmap call (memory only)")
    g.add_argument("--steps", type=int, default=60, help="logical DP-SGD steps")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="private images: 'shapes' (embedded) or a dataset path")
    g.add_argument("--n", "--n-examples", dest="n", type=int, default=None,
                   help="n private examples, a subset fixed by --seed (shapes: 20000); torchrun: --n-examples")
    g.add_argument("--size", type=int, default=32, help="image side H = W")
    g.add_argument("--probe-data", default="shapes", help="labelled set for the (non-private) linear probe")
    g.add_argument("--probe-n", type=int, default=5000, help="probe training examples")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(SIZES), default="small",
                   help="tiny: tests; small: CPU; base: the paper's ViT-B/16")
    g.add_argument("--patch", type=int, default=None, help="patch side (default 4 small, 16 base)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden from the encoder")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate of the private stage")
    g.add_argument("--wd", type=float, default=0.005, help="AdamW weight decay")
    g.add_argument("--warmup", type=int, default=5, help="linear warm-up steps, then cosine decay")
    g = p.add_argument_group("stage 1: ViP-Syn (public synthetic data, no privacy cost)")
    g.add_argument("--init", default="syn", help="'syn' (ViP-Syn, cached), 'none' (random), or a checkpoint path")
    g.add_argument("--syn-steps", type=int, default=1000, help="non-private MAE steps on synthetic images")
    g.add_argument("--syn-batch", type=int, default=128, help="batch size of stage 1")
    g.add_argument("--syn-lr", type=float, default=2e-3, help="peak learning rate of stage 1")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of everything random")
    g.add_argument("--audit", type=int, default=0, metavar="M", help="check the claim: a one-run privacy audit with "
                   "M gradient canaries (accountant.CanaryAudit; eps then covers N + the canaries that joined)")
    g.add_argument("--debug-no-noise", action="store_true", help=argparse.SUPPRESS)  # breaks privacy: tests only
    g.add_argument("--insecure-seed", action="store_true", help=argparse.SUPPRESS)  # tests only: replayable
    g.add_argument("--log-private", action="store_true", help="also log the training loss and batch size "
                   "(they read the private data: metrics.jsonl must then not be published)")
    g.add_argument("--init-data-disjoint", action="store_true", help="the --init run trained on data "
                   "disjoint from this run's: its eps is not composed with this run's")
    g.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    g.add_argument("--name", default=None, help="run name (default mae_dp_eps<eps>_s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--log-every", type=int, default=5, help="steps between log lines and checkpoints")
    g.add_argument("--device", default="auto", help="'auto' (cuda if present), 'cpu' or 'cuda'")
    return p, p.parse_args(argv)


SIZES = {  # D width, depth, heads; decoder width, depth, heads
    "tiny": dict(dim=32, depth=1, heads=2, dec_dim=16, dec_depth=1, dec_heads=2),
    "small": dict(dim=128, depth=4, heads=4, dec_dim=64, dec_depth=2, dec_heads=4),
    "base": dict(dim=768, depth=12, heads=12, dec_dim=512, dec_depth=4, dec_heads=16),
}

# ----------------------------------------------------------------------------------------------------------------
# Model: ViT encoder and MAE decoder (He et al. 2022), pre-norm blocks, fixed 2-D sin-cos positions


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos position embedding (MAE's), (grid*grid, dim): half the channels code y, half code x."""
    pos = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(pos, pos, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    out = [f(c.reshape(-1, 1) * omega) for c in (y, x) for f in (torch.sin, torch.cos)]  # 4 x (L, D/4)
    return torch.cat(out, dim=1).float()  # (L, D)


def patchify(imgs, p):
    """imgs: (B, C, H, W) -> (B, L, P) with L = (H/p)*(W/p) patches of P = p*p*C pixels."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, C):
    """x: (B, L, P) -> (B, C, H, W)."""
    B, L, _ = x.shape
    h = int(math.isqrt(L))
    return x.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, h * p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hs)
        # Written out, not F.scaled_dot_product_attention: the fused kernel has no vmap rule on CPU and
        # would fall back to a Python loop over examples inside the per-example gradient.
        att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, nh, L, L)
        y = att.softmax(dim=-1) @ v  # (B, nh, L, hs)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Patch embedding + [cls] + fixed positions + pre-norm blocks. cap_dp.py and clip_dp.py use the same names,
    so their `--init` loads this encoder's weights straight from a mae_dp.py checkpoint."""

    def __init__(self, size, patch, channels, dim, depth, heads):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.patch_embed = nn.Linear(patch * patch * channels, dim)  # a stride-p conv, written as a matmul on patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, size // patch), persistent=False)  # (L, D)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, imgs, mask_ratio=0.0, noise=None):
        """imgs: (B, C, H, W) in [-1, 1]; noise: (B, L) uniform, one draw per patch (drawn here if None).
        Returns tokens (B, 1+L_keep, D), mask (B, L) with 0 keep / 1 remove, and ids_restore (B, L)."""
        x = self.patch_embed(patchify(imgs, self.patch)) + self.pos_embed  # (B, L, D)
        B, L, D = x.shape
        # Random masking by argsort of uniform noise (MAE): each example draws its own subset of patches.
        keep = int(L * (1 - mask_ratio))
        if noise is None:  # nothing masked: the tokens keep their order, and no generator is read
            noise = torch.rand(B, L, device=x.device) if keep < L else torch.arange(L, device=x.device).expand(B, L)
        ids_shuffle = torch.argsort(noise, dim=1)  # (B, L): the patches with the smallest noise are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))  # (B, L_keep, D)
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # (B, L), in the original patch order
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def features(self, imgs):
        """Frozen features for the linear probe: the mean of the output patch tokens, (B, D)."""
        return self.forward(imgs, mask_ratio=0.0)[0][:, 1:].mean(dim=1)


class MAE(nn.Module):
    def __init__(self, size, patch, channels, dim, depth, heads, dec_dim, dec_depth, dec_heads):
        super().__init__()
        self.encoder = ViTEncoder(size, patch, channels, dim, depth, heads)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dec_dim, size // patch), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * channels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, imgs, mask_ratio, noise=None):
        """imgs: (B, C, H, W). Returns pred (B, L, P) for every patch, and mask (B, L), 1 = removed."""
        latent, mask, ids_restore = self.encoder(imgs, mask_ratio, noise)  # (B, 1+L_keep, D)
        x = self.decoder_embed(latent)  # (B, 1+L_keep, Dd)
        B, L = ids_restore.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, L + 1 - x.shape[1], -1)], dim=1)  # (B, L, Dd)
        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_ + self.decoder_pos_embed], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:], mask


# ----------------------------------------------------------------------------------------------------------------
# Per-example loss


def mae_loss(forward, imgs, noise, mask_ratio, patch):
    """MAE loss per example, (B,): MSE between predicted and true pixels of the *masked* patches, each target
    patch normalised by its own mean and variance (MAE's norm_pix_loss: statistics of the example itself, so
    nothing is shared across examples), averaged over that image's masked patches.
    forward(imgs, mask_ratio, noise) -> (pred (B, L, P), mask (B, L)): the model, or its functional_call.
    noise (B, L) picks each example's masked patches: drawn with the example, like its crop, so that the
    per-example gradient and a naive loop over examples see the same mask."""
    pred, mask = forward(imgs, mask_ratio, noise)
    target = patchify(imgs, patch)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)  # (B, L)
    return (per_patch * mask).sum(-1) / mask.sum(-1)  # (B,)


def augment(imgs_uint8, rng, patch):
    """MAE's augmentation, per example (never mixes examples): random resized crop and flip, and the uniform
    noise (B, L) whose argsort picks the masked patches. Returns (imgs (B, C, H, W) in [-1, 1], noise).
    rng: for private images a data.ExampleRandom, so that each example's crop, flip and mask come from its own
    stream and never depend on which other examples were sampled; a torch.Generator for the public ViP-Syn images."""
    x = data.normalize(imgs_uint8)
    x = data.hflip(data.random_resized_crop(x, scale=(0.35, 1.0), generator=rng), generator=rng)
    return x, data.uniforms(x.shape[0], (x.shape[2] // patch) * (x.shape[3] // patch), generator=rng)


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
# Stage 1: ViP-Syn, ordinary MAE training on public synthetic images (no privacy cost, cached)


def train_syn(model, args, device, autocast):
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.syn_lr, betas=(0.9, 0.95), weight_decay=0.05)
    master = os.environ.get("RANK", "0") == "0"
    bar = tqdm(range(args.syn_steps), desc="ViP-Syn (public)", dynamic_ncols=True, disable=not master)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.syn_steps, args.syn_lr, max(1, args.syn_steps // 20))
        imgs = data.random_process_images(args.syn_batch, args.size, generator=gen)
        if model.encoder.channels == 1:
            imgs = imgs.float().mean(1, keepdim=True).round().to(torch.uint8)  # grey private data: a grey prior
        x, noise = (t.to(device) for t in augment(imgs, gen, args.patch))
        with autocast:
            loss = mae_loss(model, x, noise, args.mask_ratio, args.patch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (NOT private: it reads labels of the probe set; the private model is already fixed).
# The linear probe is data.linear_probe, shared by every script; here, the picture of what MAE reconstructs.


@torch.no_grad()
def save_reconstructions(model, ds, path, device, mask_ratio, k=8):
    """recon.png: row 1 originals, row 2 what the encoder sees, row 3 the reconstruction (visible patches pasted)."""
    model.eval()
    x = data.normalize(ds.images(torch.arange(k))).to(device)
    noise = torch.rand(k, x.shape[-1] ** 2 // model.encoder.patch ** 2, generator=torch.Generator().manual_seed(0))
    pred, mask = model(x, mask_ratio, noise.to(device))
    p, C = model.encoder.patch, model.encoder.channels
    target = patchify(x, p)  # un-normalise the predicted patches with each patch's own statistics
    pred = pred.float() * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    m = mask[..., None]
    masked = unpatchify(target * (1 - m) - m, p, C)  # hidden patches drawn black
    recon = unpatchify(target * (1 - m) + pred * m, p, C)
    data.save_grid(torch.cat([x, masked, recon]).clamp(-1, 1).cpu(), path, nrow=k, scale=4)


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


def build_model(args, channels):
    cfg = SIZES[args.model]
    return MAE(args.size, args.patch, channels, **cfg)


def vip_syn(model, args, channels, device, autocast, master):
    """Stage 1, ViP-Syn: the MAE trained on public random-process images, cached per flags (no privacy cost)."""
    cache = Path("runs/cache") / (f"vip_syn_{args.model}_p{args.patch}_s{args.size}_c{channels}_m{args.mask_ratio}"
                                  f"_{args.syn_steps}x{args.syn_batch}_lr{args.syn_lr}_seed{args.seed}.pt")
    state = data.read_cache(cache)  # None until built; checked like a checkpoint
    if state is not None:
        data.load_weights(model, state, where=f"cache {cache}")
        print(f"ViP-Syn: loaded {cache}")
        return
    # torchrun: every rank trains this public stage (rather than wait idle, past the collective timeout, for
    # rank 0); rank 0 alone writes the cache, and stage 2 starts every rank from rank 0's weights
    train_syn(model, args, device, autocast)
    if master:
        data.write_cache(cache, model.state_dict())


def main(argv=None):
    parser, args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out or f"runs/{args.name or f'mae_dp_eps{args.eps:g}_s{args.seed}'}")
    args, ckpt = resumed(parser, args, out)  # a resumed run is the same run: its flags come from the checkpoint
    data.check_flags(args)  # every numeric flag and the device, before any data is read
    device = data.pick_device(args.device)
    args.patch = args.patch or (4 if args.model == "small" else 16)
    rank, world, device = start(args, out, ckpt, device)
    master = rank == 0  # rank 0 alone prints, logs, checkpoints and evaluates
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # --- data and privacy plan ---
    private = private_set(args)
    if args.size % args.patch:
        raise ValueError(f"--size {args.size} is not a multiple of --patch {args.patch}")
    # the evaluation sets are opened before training (their labels are read only after it), so that one the
    # encoder cannot take, or a missing test split, fails now rather than after the private run
    probe_train = data.load_dataset(args.probe_data, split="train", size=args.size, n=args.probe_n,
                                    seed=args.seed + 100)
    probe_test = data.load_dataset(args.probe_data, split="test", size=args.size, n=2000, seed=args.seed + 100)
    if probe_train.labels is None:
        raise ValueError(f"--probe-data {args.probe_data} has no labels")
    if probe_train.channels != private.channels:
        raise ValueError(f"--probe-data {args.probe_data} has {probe_train.channels} channel(s), --data {args.data} "
                         f"{private.channels}: the encoder takes one kind; give a probe set like the private data")
    audit = CanaryAudit(args.audit, seed=args.seed) if args.audit else None
    earlier = earlier_runs(args, ckpt, scripts="mae_dp")
    plan, n_total = privacy_plan(args, private, audit, earlier)
    q, sigma, delta, N = plan["q"], plan["sigma"], plan["delta"], len(private)
    is_private = args.eps < math.inf  # --eps inf: sigma 0, and the accountant reports eps inf

    # --- stage 1: ViP-Syn (public) or another initialisation ---
    model = build_model(args, private.channels).to(device)
    random_init = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    if args.init == "syn":
        vip_syn(model, args, private.channels, device, autocast, master)
    elif args.init != "none":  # a mae_dp.py checkpoint or model.pt, or a bare ViP-Syn cache file
        state = data.load_checkpoint(args.init, flag="--init", script="mae_dp", keys=())
        data.load_weights(model, state.get("model", state), where=f"--init {args.init}")
    syn_init = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}

    # --- stage 2: ViP, DP-SGD on the private images ---
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    # noise sigma*C on a sum of B clipped per-example gradients, over every trained coordinate
    budget, line = noise_budget(sigma=sigma, trained=sum(v.numel() for v in params.values()), units=args.batch_size)
    print(line)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.wd)
    accountant = RDPAccountant()
    if earlier["prior"]:  # eps from here on is the composed one: the earlier runs' and this one's
        accountant.load_state_dict(earlier["prior"])
    gens = sample_gen, noise_gen = generators(args, device, world)
    step = restore(ckpt, model, opt, accountant, audit, gens, plan) if ckpt else 0
    if world > 1:  # every rank starts from rank 0's weights (a GPU's non-deterministic kernels could part them)
        for v in [*params.values(), *buffers.values()]:
            dist.broadcast(v, src=0)
    loss_fn = lambda f, x, noise: mae_loss(f, x, noise, args.mask_ratio, args.patch)
    per_example_grads = make_per_example_grads(model, loss_fn)
    batch_grad = None if is_private else make_batch_grad(model, loss_fn)
    # each example's crop, flip and mask: a function of (--seed, the step being taken, its index) alone
    example_rng = lambda idx: data.ExampleRandom(args.seed, step, idx)
    load = lambda idx: tuple(t.to(device) for t in augment(private.images(idx), example_rng(idx), args.patch))
    noise_std = 0.0 if args.debug_no_noise else sigma * args.clip  # on the sum; one example moves it by <= C
    checkpoint = lambda: save_checkpoint(
        out / "checkpoint.pt", gens, rank, model=model.state_dict(), optimizer=opt.state_dict(),
        args=vars(args), step=step, accountant=accountant.state_dict(), audit=audit and audit.state_dict(),
        init=earlier)

    # one logical step: Poisson sample -> per-example gradients -> clip -> noise -> step -> account
    batches = data.poisson_batches(N, q, args.steps - step, args.physical_batch, generator=sample_gen,
                                   shard=(rank, world), canaries=audit.n_included if audit else 0)
    bar = tqdm(batches, total=args.steps - step, desc="ViP (DP-SGD)", dynamic_ncols=True, disable=not master)
    stats = {}  # dp_step's clipped-sum norm: private, logged only with --log-private
    with open(out / "metrics.jsonl" if master else os.devnull, "a") as log:
        for physical_batches, sampled_canaries in bar:
            model.train()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            canaries = audit and torch.as_tensor(audit.rows(sampled_canaries, args.clip)).to(device)
            with autocast:
                if is_private:
                    noisy, loss = dp_step(per_example_grads, params, buffers, physical_batches, load, clip=args.clip,
                                          noise_std=noise_std, expected_batch=args.batch_size, noise_gen=noise_gen,
                                          canaries=canaries, stats=stats)
                else:  # NOT private: the same sample, unclipped and unnoised
                    noisy, loss = plain_step(batch_grad, params, buffers, physical_batches, load,
                                             expected_batch=args.batch_size)
            if audit:  # the auditor reads what DP-SGD releases: the privatised gradient's canary coordinates
                audit.observe(noisy.pop("canaries").float().cpu())
            for k, p in params.items():
                p.grad = noisy[k].to(p.dtype)
            opt.step()
            accountant.step(q=q, sigma=sigma)
            step += 1
            # the loss reads private data: shown as a monitoring aid, never used for any decision or selection
            bar.set_postfix(loss=f"{loss:.3f}", eps=f"{accountant.epsilon(delta):.2f}")
            if step % args.log_every == 0 or step == args.steps:
                batch = int(all_ranks_sum(sum(int(m.sum()) for _, m in physical_batches)))  # every rank: a collective
                log_line(log, args, step=step, eps=accountant.epsilon(delta), lr=opt.param_groups[0]["lr"], t0=t0,
                         params=params, loss=loss, batch=batch, signal=stats.get("clipped_norm"))
                checkpoint()
    end_processes(world)
    if not master:
        return

    # --- evaluation: NOT private (probe labels are downstream data, read after training ends) ---
    encoder = build_model(args, private.channels).encoder.to(device).eval()
    acc = {}
    for name, state in (("random_init", random_init), ("vip_syn", syn_init), ("vip", model.encoder.state_dict())):
        encoder.load_state_dict(state)
        acc[name] = data.linear_probe(encoder.features, probe_train, probe_test, device=device)
    save_reconstructions(model, probe_test, out / "recon.png", device, args.mask_ratio)
    summary = dict(method="ViP (mae_dp.py)", batch_size=args.batch_size, noise_signal=budget, init=args.init,
                   probe_data=probe_train.name,
                   probe_accuracy_not_private=acc, device=str(device))
    release(out, model, summary, args=args, plan=plan, accountant=accountant, earlier=earlier, audit=audit,
            n_total=n_total, steps=step, data_name=private.name)
    print("linear probe accuracy (not private): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"wrote {out}/model.pt, summary.json, metrics.jsonl, checkpoint.pt, recon.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    # bad input is one `error:` line and exit code 2; Ctrl-C or SIGTERM one line once the last checkpoint is safe
    sys.exit(data.run_main(main))
