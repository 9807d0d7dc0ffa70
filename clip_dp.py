"""DP-CLIP: contrastive image-text training with DP-SGD, clipping the gradient of each micro-batch of pairs.

Paper: Huang, Liu, Nakada, Zhang & Zhang, "Safeguarding Data in Multimodal AI: A Differentially Private Approach
to CLIP Training" (2023). The recipe, in the order this file follows it:
  1. CLIP (Radford et al. 2021): a ViT image encoder and a transformer text encoder, linear projections to a
     shared space, and the symmetric InfoNCE loss with a learnable temperature: in a batch of pairs, each image
     must pick out its own caption among the batch's captions, and each caption its own image.
  2. DP-CLIP: that loss couples the pairs of a batch, so there is no per-example gradient to clip. DP-SGD's unit
     becomes a micro-batch of about m pairs (`--micro-batch m`): Poisson-sample the logical batch, split it into
     micro-batches, compute each micro-batch's InfoNCE loss within itself and its gradient (vmap over
     micro-batches), clip each micro-batch gradient to C, sum, add Gaussian noise, divide by the number of
     micro-batches. Larger m gives each loss more negatives but fewer micro-batches to average the noise over.
  3. Evaluate (not private): zero-shot classification with one text prompt set per class, image-text retrieval
     recall@1/5 on held-out captioned pairs, and a linear probe of the image encoder.

Privacy: why the noise is sigma*2C, and how the micro-batches are formed. Neighbouring data sets differ by adding
or removing one pair (the accountant's relation). The natural split -- chunk the sampled index list into
consecutive groups of m -- breaks the usual argument: removing one pair shifts every later pair into another
group, so one pair can change every micro-batch. Here the split does not depend on which other pairs exist:
each step, every pair joins the sample with probability q = B/N (Poisson, as in DP-SGD) and, independently, picks
one of K = round(B/m) micro-batches uniformly at random (K comes from the flags, not the data). Condition on
everything about the other pairs (whether they were sampled, where they went, their crops) and on the micro-batch
j that x would join: all of it is distributed the same with or without x (a pair's crop is a function of --seed,
the step and its own index, data.ExampleRandom, never of the other pairs or of the order of the vmap calls).
Given it, if x is not sampled the sum is unchanged; if it is, only micro-batch j changes, and its clipped gradient
moves from one vector of norm <= C to another: by at most 2C. So each step is the Poisson-subsampled Gaussian
mechanism with sensitivity 2C; noise N(0, (2C sigma)^2 I) on the sum makes it exactly the mechanism the RDP
accountant analyses at noise multiplier sigma (Mironov, Talwar & Zhang 2019), and (eps, delta) follow as for
DP-SGD. (Rényi divergence of the mixtures over the conditioning is at most its worst
case, by joint quasi-convexity.) The 2 does not cancel: a micro-batch gradient is not a sum over its pairs, so
"remove x" can turn one clipped vector into a quite different one, not into zero. Dividing by K, a public
constant, is post-processing. Micro-batch sizes vary (about m on average); each is padded with masked slots that
the loss ignores, and a micro-batch with fewer than 2 pairs has no contrastive loss and gives a zero gradient
(with random assignment that wastes a fraction e^-m (1 + m) of micro-batches: 41% at m = 2, 0.3% at m = 8).
The text encoder reads utf-8 bytes (data.ByteTokenizer): a fixed vocabulary fitted on nothing, so it leaks nothing.

What is simplified: tiny widths and 32x32 images so a laptop CPU runs it in minutes (the paper fine-tunes
pretrained CLIP models); the "shapes" set of synthetic scenes, captioned by their shapes only (`--captions full`
adds colours and positions, which a micro-batch of 8 tells apart without ever looking at shape), stands in for
image-text data (or `--data PATH`: COCO json, webdataset shards, TSV/CSV with captions); a small conv stem (Xiao et
al. 2021) makes the image tokens. Both were chosen on a public proxy (docs/SWEEP_learn_first.md). `--init` (with
`--stem linear`) can start the image encoder from a mae_dp.py run (public ViP-Syn or private ViP; the latter
spends that run's budget too).

  python clip_dp.py --eps 8                                      # embedded data: ~3 min on a 2-core CPU (README)
  python clip_dp.py --eps inf                                    # the same run without DP: its ceiling (NOT private)
  python clip_dp.py --eps 8 --audit 5000                        # + a one-run privacy audit: eps lower bound (README)
  python clip_dp.py --eps 8 --micro-batch 32                     # fewer, larger micro-batches: more negatives
  python clip_dp.py --eps 8 --model small --stem linear --init runs/mae_dp_eps8_s0/model.pt  # ViP's encoder
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
    g.add_argument("--clip", type=float, default=1.0, help="norm bound C of each micro-batch's gradient")
    g.add_argument("--batch-size", type=int, default=2048, help="expected logical batch B (Poisson rate q = B/N)")
    g.add_argument("--micro-batch", type=int, default=4,
                   help="m: expected pairs per clipped micro-batch (>= 2); K = round(B/m) micro-batches per step")
    g.add_argument("--physical-batch", type=int, default=256, help="pairs per vmap call, about (memory only)")
    g.add_argument("--steps", type=int, default=600, help="logical DP-SGD steps")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes",
                   help="private image-caption pairs: 'shapes' (embedded) or a dataset path")
    g.add_argument("--n", "--n-examples", dest="n", type=int, default=None,
                   help="n private examples, a subset fixed by --seed (shapes: 500000); torchrun: --n-examples")
    g.add_argument("--size", type=int, default=32, help="image side H = W")
    g.add_argument("--captions", choices=data.CAPTION_STYLES, default="shapes",
                   help="embedded captions: shapes and sizes only, or 'full' (+ colours, positions)")
    g.add_argument("--text-len", type=int, default=16,
                   help="T: caption words read, with BOS and EOS (longer captions are cut)")
    g.add_argument("--vocab", type=int, default=256, help="word hash buckets (data.WordTokenizer; real data: more)")
    g.add_argument("--crop", type=int, default=0, help="augmentation: random shift of up to this many pixels")
    g.add_argument("--probe-data", default="shapes",
                   help="labelled set for the (non-private) zero-shot and linear-probe evaluations")
    g.add_argument("--probe-n", type=int, default=5000, help="probe training examples")
    g.add_argument("--retrieval-data", default="shapes",
                   help="captioned set whose test split is used for (non-private) retrieval")
    g.add_argument("--retrieval-n", type=int, default=1000, help="held-out pairs to retrieve among")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(SIZES), default="cnn",
                   help="cnn: the CPU default (a conv net, bag-of-words text); cnn-tiny: tests; ViTs: tiny (tests), "
                   "xs, small and base (mae_dp.py's encoders; base: ViT-B/16)")
    g.add_argument("--patch", type=int, default=None, help="ViT patch side (default 8 xs, 4 small, 16 base)")
    g.add_argument("--stem", choices=["conv", "linear"], default="conv",
                   help="conv stem (Xiao et al. 2021) or ViT's linear patch embedding (for --init from mae_dp.py)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    g.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine decay")
    g = p.add_argument_group("initialisation")
    g.add_argument("--init", default="none",
                   help="image encoder: 'none' (random init) or a mae_dp.py checkpoint / ViP-Syn cache file")
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
    g.add_argument("--name", default=None, help="run name (default clip_dp_eps<eps>_s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--log-every", type=int, default=5, help="steps between log lines and checkpoints")
    g.add_argument("--device", default="auto", help="'auto' (cuda if present), 'cpu' or 'cuda'")
    return p, p.parse_args(argv)


SIZES = {  # image encoder (conv widths, or ViT D width, depth, heads); text encoder width, depth, heads (depth 0: a
    # bag of words); E the shared embedding; scale: a fixed logit scale (None: learned, CLIP's)
    "cnn": dict(widths=(16, 32, 64), text_dim=32, text_depth=0, text_heads=1, embed_dim=32, scale=10.0),
    "cnn-tiny": dict(widths=(4, 8, 8), text_dim=8, text_depth=0, text_heads=1, embed_dim=8, scale=10.0),
    "tiny": dict(dim=32, depth=1, heads=2, text_dim=32, text_depth=1, text_heads=2, embed_dim=32),
    "xs": dict(dim=64, depth=2, heads=4, text_dim=64, text_depth=1, text_heads=4, embed_dim=64),
    "small": dict(dim=128, depth=4, heads=4, text_dim=128, text_depth=2, text_heads=4, embed_dim=128),
    "base": dict(dim=768, depth=12, heads=12, text_dim=512, text_depth=12, text_heads=8, embed_dim=512),
}

# ----------------------------------------------------------------------------------------------------------------
# Model: a small conv net (the CPU default) or mae_dp.py's ViT encoder (He et al. 2022); a word-level text encoder;
# CLIP's projections (Radford et al. 2021)


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


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): log2(p) stride-2
    3x3 convolutions, widths doubling up to D, then a 1x1 to D, in the place of the linear patch embedding. Same
    tokens out, (B, L, D) with L = (H/p)*(W/p), but each sees a local edge and corner detector first: on the
    shapes the linear embedding alone did not learn to tell shapes apart at CPU budgets (docs/SWEEP_learn_first.md).
    No normalisation layer: a batch norm would mix examples, which per-example clipping forbids."""

    def __init__(self, patch, channels, dim):
        super().__init__()
        n = int(math.log2(patch))
        if 2 ** n != patch or n < 1:
            raise ValueError(f"--stem conv needs --patch a power of 2 (>= 2), got {patch}")
        layers, c = [], channels
        for i in range(n):
            w = max(8, dim // 2 ** (n - 1 - i))
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GELU()]
            c = w
        self.net = nn.Sequential(*layers, nn.Conv2d(c, dim, 1))

    def forward(self, imgs):  # (B, C, H, W) -> (B, L, D)
        return self.net(imgs).flatten(2).transpose(1, 2)


class ViTEncoder(nn.Module):
    """Patch embedding (or a conv stem) + [cls] + fixed positions + pre-norm blocks. With stem="linear" cap_dp.py
    and clip_dp.py use the same names, so their `--init` loads this encoder's weights from a mae_dp.py checkpoint."""

    def __init__(self, size, patch, channels, dim, depth, heads, stem="linear"):
        super().__init__()
        self.patch, self.channels = patch, channels
        if stem == "conv":
            self.stem = ConvStem(patch, channels, dim)
        else:
            self.patch_embed = nn.Linear(patch * patch * channels, dim)  # a stride-p conv, as a matmul on patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, size // patch), persistent=False)  # (L, D)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, imgs, mask_ratio=0.0, noise=None):
        """imgs: (B, C, H, W) in [-1, 1]; noise: (B, L) uniform, one draw per patch (drawn here if None).
        Returns tokens (B, 1+L_keep, D), mask (B, L) with 0 keep / 1 remove, and ids_restore (B, L)."""
        x = self.stem(imgs) if hasattr(self, "stem") else self.patch_embed(patchify(imgs, self.patch))
        x = x + self.pos_embed  # (B, L, D)
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


class ConvEncoder(nn.Module):
    """The CPU default image tower: three stages of two 3x3 convolutions, the first of each with stride 2
    (H -> H/2 -> H/4 -> H/8), each followed by GroupNorm and ReLU. GroupNorm, never BatchNorm: its statistics are
    one image's own, so one example's gradient never depends on another's. Two convolutions per stage learn the
    shapes several times faster per step than one (docs/RESULTS.md), and d ~ 0.07M parameters keeps the noise
    small against about a thousand clipped units per step."""

    def __init__(self, channels, widths):
        super().__init__()
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(min(4, w), w, affine=False), nn.ReLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(min(4, w), w, affine=False), nn.ReLU()]
            c = w
        self.net, self.dim, self.channels = nn.Sequential(*layers), c, channels

    def tokens(self, imgs):  # (B, C, H, W) -> the final map as tokens (B, L, c), L = (H/8)*(W/8)
        return self.net(imgs).flatten(2).transpose(1, 2)

    def features(self, imgs):
        """The representation (also for the linear probe): the final map, averaged over positions, (B, c)."""
        return self.net(imgs).mean((2, 3))


class TextEncoder(nn.Module):
    """Word tokens (data.WordTokenizer: a fixed hash, fitted on nothing, so it leaks nothing) -> one vector per
    caption: the mean over its words of token embeddings, after `depth` pre-norm blocks with learned positions
    (bidirectional: a caption is read whole). depth 0 is a bag of words (no attention, so no order): for captions
    that name a shape and a size, all the text tower needs, at a few thousand parameters."""

    def __init__(self, length, dim, depth, heads, vocab):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        if depth:
            self.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
            self.norm = nn.LayerNorm(dim)
            nn.init.normal_(self.tok_embed.weight, std=0.02)
            nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, tokens):
        """tokens: (B, T) word ids, PAD-padded on the right -> (B, D)."""
        x = self.tok_embed(tokens)  # (B, T, D)
        if len(self.blocks):
            x = x + self.pos_embed
            for blk in self.blocks:
                x = blk(x)  # PAD tokens are attended to; they carry only the caption's length
            x = self.norm(x)
        words = (tokens >= data.WordTokenizer.OFFSET).to(x.dtype)[..., None]  # (B, T, 1): not PAD, BOS, EOS
        return (x * words).sum(1) / words.sum(1).clamp(min=1)


class CLIP(nn.Module):
    def __init__(self, size, patch, channels, text_len, vocab, text_dim, text_depth, text_heads, embed_dim,
                 scale=None, widths=None, dim=None, depth=None, heads=None, stem="linear"):
        super().__init__()
        if widths:
            self.encoder = ConvEncoder(channels, widths)
        else:
            self.encoder = ViTEncoder(size, patch, channels, dim, depth, heads, stem)
        dim = widths[-1] if widths else dim
        self.text = TextEncoder(text_len, text_dim, text_depth, text_heads, vocab)
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False) if text_depth else nn.Identity()
        if scale is None:  # CLIP's learned inverse temperature, from its init 1/0.07
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:  # fixed: under DP a learned scale is one more noisy coordinate, and on the proxy it did not help
            self.register_buffer("logit_scale", torch.tensor(math.log(scale)), persistent=False)

    def encode_image(self, imgs):  # (B, C, H, W) -> unit vectors (B, E)
        return F.normalize(self.image_proj(self.encoder.features(imgs)), dim=-1)

    def encode_text(self, tokens):  # (B, T) -> unit vectors (B, E)
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def forward(self, imgs, tokens):
        """imgs (B, C, H, W), tokens (B, T) -> image and text embeddings (B, E) each, and the logit scale (a scalar,
        clamped at 100 like CLIP's so that a noisy step cannot make the softmax arbitrarily sharp)."""
        return self.encode_image(imgs), self.encode_text(tokens), self.logit_scale.clamp(max=math.log(100)).exp()


# ----------------------------------------------------------------------------------------------------------------
# Per-micro-batch loss, and how the micro-batches are formed


def clip_loss(forward, imgs, tokens, pair_mask):
    """Symmetric InfoNCE per micro-batch, (G,): imgs (G, M, C, H, W), tokens (G, M, T), pair_mask (G, M) True for
    real pairs, False for padding. The micro-batch is the smallest unit with a loss of its own (each pair's loss
    depends on the other pairs' embeddings), so this plays the part of mae_dp.py's per-example loss: one scalar
    per micro-batch, clipped per micro-batch. Padding slots are masked out of the logits, so they change nothing;
    a micro-batch with fewer than 2 real pairs has loss 0 (a 1-way softmax has nothing to contrast).
    Another pair with the same caption is no negative: image i and caption j match as well as i and its own, so
    both leave the candidates of each other's softmax (else short captions, many of them equal, would put a floor
    under the loss and push equal captions apart). Which pairs are equal is read from this micro-batch's own tokens
    alone, so the micro-batch stays the unit of the 2C argument."""
    G, M = pair_mask.shape
    img, txt, scale = forward(imgs.flatten(0, 1), tokens.flatten(0, 1))  # (G*M, E) x 2
    logits = scale * img.view(G, M, -1) @ txt.view(G, M, -1).transpose(1, 2)  # (G, M, M): image i vs caption j
    same = (tokens[:, :, None] == tokens[:, None, :]).all(-1) & ~torch.eye(M, dtype=torch.bool, device=tokens.device)
    both = pair_mask[:, :, None] & pair_mask[:, None, :] & ~same  # (G, M, M): candidates
    logits = logits.masked_fill(~both, -1e4)  # exp(-1e4 - 100) == 0: a padding slot is never a candidate
    diag = logits.diagonal(dim1=1, dim2=2)  # (G, M): each pair's own similarity
    per_pair = 0.5 * ((logits.logsumexp(2) - diag) + (logits.logsumexp(1) - diag))  # image->text and text->image
    n = pair_mask.sum(1)  # (G,) real pairs
    return (per_pair * pair_mask).sum(1) / n.clamp(min=1) * (n >= 2)  # (G,)


def sample_micro_batches(n, q, K, *, generator, canaries=0):
    """One logical step's sample, split so that a pair's micro-batch depends on nothing but its own draws.
    Each of the n pairs joins with probability q (data.poisson_sample) and is assigned to one of the K
    micro-batches uniformly at random: the assignment is drawn for all n pairs, whether sampled or not, so adding
    or removing one pair changes its own micro-batch and leaves every other micro-batch exactly as it was.
    Returns members (K, M) dataset indices and pair_mask (K, M), real pairs first in each row (in dataset order),
    padding idx 0 / mask False; M = the largest micro-batch of this step (at least 2); and the canaries sampled.
    canaries: how many --audit canaries joined the data, indices n .. n + canaries - 1 of the same Poisson draw;
    the ones sampled come back apart (canary numbers 0 .. canaries - 1), as each canary has a micro-batch of its
    own (accountant.CanaryAudit with flip)."""
    picked = data.poisson_sample(n + canaries, q, generator=generator)  # (B_t,) B_t ~ Binomial(n + canaries, q)
    slot = torch.randint(K, (n + canaries,), generator=generator)[picked]  # (B_t,) micro-batch of each sampled pair
    sampled_canaries = picked[picked >= n] - n
    slot, picked = slot[picked < n], picked[picked < n]
    counts = torch.bincount(slot, minlength=K)  # (K,) about Poisson(m) each
    slot, order = torch.sort(slot, stable=True)
    picked = picked[order]  # grouped by micro-batch, dataset order inside each
    rank = torch.arange(len(slot)) - (counts.cumsum(0) - counts)[slot]  # position inside its micro-batch
    M = max(2, int(counts.max()) if len(slot) else 0)
    members = torch.zeros(K, M, dtype=torch.long)
    pair_mask = torch.zeros(K, M, dtype=torch.bool)
    members[slot, rank], pair_mask[slot, rank] = picked, True
    return members, pair_mask, sampled_canaries


def augment(imgs_uint8, rng, pad):
    """CLIP's only augmentation, a random crop, per pair (never mixes pairs): here a shift of up to `pad` pixels
    (--crop; 0, the default: none), so the caption's "at the top left" stays true. No flip, for the same reason.
    Returns (B, C, H, W) in [-1, 1].
    rng: a data.ExampleRandom of these pairs, so that a pair's crop comes from its own stream: it never depends on
    which other pairs were sampled, on its micro-batch, nor on the order of the vmap calls (which the module
    docstring's 2C argument needs: the micro-batches without the added pair must stay exactly as they were)."""
    x = data.normalize(imgs_uint8)
    return data.random_crop(x, pad=pad, generator=rng) if pad else x


# ----------------------------------------------------------------------------------------------------------------
# DP step: per-example gradients, clipping, one Gaussian noise draw per logical step (Abadi et al. 2016, Alg. 1)
# In DP-CLIP the "example" of mae_dp.py's DP block is a micro-batch of pairs; the block itself is unchanged.


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


def micro_batch_step(per_example_grads, params, buffers, members, pair_mask, load_pairs, *, clip, noise_std,
                     per_call, noise_gen, canaries=None, shard=(0, 1), batch_grad=None, stats=None):
    """One logical DP-CLIP step: mae_dp.py's dp_step with micro-batches in the place of examples.
    members, pair_mask (K, M) from sample_micro_batches; load_pairs(idx (P, M'), mask (P, M')) -> the tensors of
    those micro-batches; noise_std is the noise on the clipped sum, sigma * 2C (module docstring).
    Returns dp_step's (gradient, mean loss).
    shard=(rank, world), for torchrun: every rank holds the whole step's micro-batches and computes rank, rank +
    world, ... of them; dp_step sums the ranks' shares. The divisor K counts the micro-batches of the whole step.
    batch_grad (from make_batch_grad): --eps inf, the same micro-batches through plain_step, unclipped and unnoised."""
    K = members.shape[0]
    members, pair_mask = members[shard[0]::shard[1]], pair_mask[shard[0]::shard[1]]
    sizes = pair_mask.sum(1)  # (K,)
    # micro-batches of similar size share a vmap call, padded only to the largest among them (compute only:
    # which call a micro-batch goes through changes no value)
    calls = data.physical_batches(torch.argsort(sizes, stable=True), per_call)  # [(micro-batch ids (P,), mask (P,))]
    # a micro-batch with < 2 pairs has gradient 0 anyway; leaving it out of the mask keeps it out of the logged loss
    calls = [(ids, mask & (sizes[ids] >= 2)) for ids, mask in calls]

    def load(ids):
        M = max(2, int(sizes[ids].max()))  # real pairs come first in each row: columns after M are all padding
        return load_pairs(members[ids, :M], pair_mask[ids, :M])

    if batch_grad is not None:  # NOT private
        return plain_step(batch_grad, params, buffers, calls, load, expected_batch=K)
    # divide by K, the micro-batches per step (public: from the flags alone)
    return dp_step(per_example_grads, params, buffers, calls, load, clip=clip, noise_std=noise_std, expected_batch=K,
                   noise_gen=noise_gen, canaries=canaries, stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (NOT private: it reads labels and held-out captions; the private model is already fixed).
# The linear probe is data.linear_probe, shared by every script; here, zero-shot classification and retrieval.

TEMPLATES = ["a {}", "a large {}"]  # CLIP's prompt ensembling: a class's text embedding is the mean over these


@torch.no_grad()
def embed(fn, inputs, device, batch=256):
    """fn over inputs (a tensor, or an ImageDataset whose images are normalised here) in chunks -> (N, E)."""
    out = []
    for i in range(0, len(inputs), batch):
        idx = torch.arange(i, min(i + batch, len(inputs)))
        x = data.normalize(inputs.images(idx)) if isinstance(inputs, data.ImageDataset) else inputs[idx]
        out.append(fn(x.to(device)).float().cpu())
    return torch.cat(out)


def zero_shot(model, ds, tok, text_len, device):
    """Zero-shot classification: each image takes the class whose prompt embedding is the most similar.
    Returns (accuracy, predicted class ids (N,))."""
    model.eval()
    prompts = tok.encode([t.format(c) for c in ds.classes for t in TEMPLATES], text_len)
    per_template = embed(model.encode_text, prompts, device).view(len(ds.classes), len(TEMPLATES), -1)
    classes = F.normalize(per_template.mean(1), dim=-1)
    pred = (embed(model.encode_image, ds, device) @ classes.T).argmax(1)  # (N,)
    return (pred == ds.labels).float().mean().item(), pred


def retrieval(model, ds, tok, text_len, device):
    """Recall@1/5 on N held-out pairs, over their distinct captions (U of them; short captions repeat, and ranking
    copies of one caption against each other would count a tie as a miss): image -> text, is an image's caption
    among the k distinct captions most similar to it? text -> image, is one of a caption's own images among the
    k images most similar to it? Returns those four figures and U."""
    model.eval()
    distinct = sorted(set(ds.captions))
    which = torch.tensor([distinct.index(c) for c in ds.captions])  # (N,) each image's caption
    img = embed(model.encode_image, ds, device)
    txt = embed(model.encode_text, tok.encode(distinct, text_len), device)
    sim = img @ txt.T  # (N, U)
    own = sim.gather(1, which[:, None])  # (N, 1)
    rank = (sim > own).sum(1)  # distinct captions that beat the image's own
    out = {f"image_to_text_r@{k}": (rank < k).float().mean().item() for k in (1, 5)}
    top = sim.T.topk(min(5, len(ds)), dim=1).indices  # (U, 5) the images most similar to each caption
    hit = which[top] == torch.arange(len(distinct))[:, None]  # (U, 5)
    out.update({f"text_to_image_r@{k}": hit[:, :k].any(1).float().mean().item() for k in (1, 5)})
    return out | dict(distinct_captions=len(distinct))


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
    return CLIP(args.size, args.patch, channels, args.text_len, args.vocab + data.WordTokenizer.OFFSET, **cfg,
                stem=args.stem)


def load_encoder(encoder, path, device):
    """--init: the image encoder from a mae_dp.py checkpoint ({"model": MAE state_dict, ...}) or a bare MAE
    state_dict (the ViP-Syn cache, runs/cache/vip_syn_*.pt); its "encoder.*" keys, loaded strictly."""
    if not Path(path).is_file():
        raise ValueError(f"--init {path}: no such file (use 'none' or a mae_dp.py checkpoint path)")
    state = data.load_checkpoint(path, flag="--init", script=("mae_dp", "clip_dp"), keys=())
    state = state.get("model", state)
    state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:  # torch lists every mismatch on many lines: keep the first
        raise ValueError(f"--init {path}: not this image encoder (same --model, --patch, --size, --stem linear?): "
                         f"{' '.join(str(e).split())[:300]}") from None


def main(argv=None):
    parser, args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out or f"runs/{args.name or f'clip_dp_eps{args.eps:g}_s{args.seed}'}")
    args, ckpt = resumed(parser, args, out)  # a resumed run is the same run: its flags come from the checkpoint
    data.check_flags(args)  # every numeric flag and the device, before any data is read
    device = data.pick_device(args.device)
    args.patch = args.patch or {"xs": 8, "small": 4}.get(args.model, 16)
    rank, world, device = start(args, out, ckpt, device)
    master = rank == 0  # rank 0 alone prints, logs, checkpoints and evaluates
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # --- data and privacy plan ---
    private = private_set(args, shapes_n=500_000)  # generated: a large N keeps q, hence sigma, small
    if private.captions is None:
        raise ValueError(f"--data {args.data}: no captions (DP-CLIP trains on image-caption pairs)")
    if args.data in data.EMBEDDED:
        private.captions = data.shapes_captions(private.captions, args.captions)
    data.check_captions(private, flag=f"--data {args.data}")
    if "widths" not in SIZES[args.model] and args.size % args.patch:
        raise ValueError(f"--size {args.size} is not a multiple of --patch {args.patch}")
    # the evaluation sets are opened before training (their labels are read only after it), so that one the
    # encoder cannot take, or a missing test split, fails now rather than after the private run
    probe_train = data.load_dataset(args.probe_data, split="train", size=args.size, n=args.probe_n,
                                    seed=args.seed + 100)
    probe_test = data.load_dataset(args.probe_data, split="test", size=args.size, n=2000, seed=args.seed + 100)
    if probe_train.labels is None or probe_train.classes is None:
        raise ValueError(f"--probe-data {args.probe_data} has no labels and class names")
    if probe_train.channels != private.channels:
        raise ValueError(f"--probe-data {args.probe_data} has {probe_train.channels} channel(s), --data {args.data} "
                         f"{private.channels}: the encoder takes one kind; give a probe set like the private data")
    held_out = data.load_dataset(args.retrieval_data, split="test", size=args.size, n=args.retrieval_n,
                                 seed=args.seed + 200)
    if held_out.captions is None:
        raise ValueError(f"--retrieval-data {args.retrieval_data} has no captions")
    if args.retrieval_data in data.EMBEDDED:  # retrieved in the training captions' style
        held_out.captions = data.shapes_captions(held_out.captions, args.captions)
    K = max(1, round(args.batch_size / args.micro_batch))  # micro-batches per step: public, from the flags alone
    if K < world:  # torchrun: every rank computes at least one micro-batch
        raise ValueError(f"--batch-size / --micro-batch gives K={K} micro-batches per step, fewer than the {world} "
                         "processes")
    # --audit: each canary is a micro-batch of its own, flipped by joining, so it moves the sum by 2C
    audit = CanaryAudit(args.audit, seed=args.seed, flip=True) if args.audit else None
    earlier = earlier_runs(args, ckpt, scripts=("mae_dp", "clip_dp"))
    plan, n_total = privacy_plan(args, private, audit, earlier)
    q, sigma, delta, N = plan["q"], plan["sigma"], plan["delta"], len(private)
    is_private = args.eps < math.inf  # --eps inf: sigma 0, and the accountant reports eps inf
    print(f"micro-batches: K={K} per step of about m={args.batch_size / K:.1f} pairs; noise sigma*2C="
          f"{2 * sigma * args.clip:.4f} on their sum")

    # --- initialisation: random, or the image encoder of a mae_dp.py run ---
    model = build_model(args, private.channels).to(device)
    random_init = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    if args.init != "none":
        load_encoder(model.encoder, args.init, device)
        print(f"image encoder: loaded {args.init}")
    init = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}

    # --- DP-CLIP: DP-SGD on the private pairs, clipped per micro-batch ---
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    # noise sigma*2C on a sum of K micro-batch gradients of norm <= C, over every trained coordinate
    budget, line = noise_budget(sigma=sigma, trained=sum(v.numel() for v in params.values()), units=K, mult=2)
    print(line)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.wd)
    accountant = RDPAccountant()
    if earlier["prior"]:  # eps from here on is the composed one: the earlier runs' and this one's
        accountant.load_state_dict(earlier["prior"])
    gens = sample_gen, noise_gen = generators(args, device, world)
    step = restore(ckpt, model, opt, accountant, audit, gens, plan) if ckpt else 0
    if world > 1:  # every rank starts from rank 0's weights (a GPU's non-deterministic kernels could part them)
        for v in [*params.values(), *buffers.values()]:
            dist.broadcast(v, src=0)
    per_example_grads = make_per_example_grads(model, clip_loss)  # here: per-micro-batch gradients
    batch_grad = None if is_private else make_batch_grad(model, clip_loss)
    tok = data.WordTokenizer(args.vocab)
    tokens = tok.encode(private.captions, args.text_len)  # (N, T), once
    shape = (private.channels, args.size, args.size)
    # each pair's crop: a function of (--seed, the step being taken, its index) alone
    crops = lambda idx: augment(private.images(idx.reshape(-1)), data.ExampleRandom(args.seed, step, idx), args.crop)
    load_pairs = lambda idx, mask: (crops(idx).view(*idx.shape, *shape).to(device), tokens[idx].to(device),
                                    mask.to(device))
    per_call = max(1, round(args.physical_batch / args.micro_batch))
    noise_std = 0.0 if args.debug_no_noise else sigma * 2 * args.clip  # one pair moves a micro-batch sum by <= 2C
    checkpoint = lambda: save_checkpoint(
        out / "checkpoint.pt", gens, rank, model=model.state_dict(), optimizer=opt.state_dict(),
        args=vars(args), step=step, accountant=accountant.state_dict(), audit=audit and audit.state_dict(),
        init=earlier)

    # one logical step: Poisson sample -> micro-batches -> per-micro-batch gradients -> clip -> noise -> step -> account
    bar = tqdm(range(args.steps - step), desc="DP-CLIP", dynamic_ncols=True, disable=not master)
    stats = {}  # dp_step's clipped-sum norm: private, logged only with --log-private
    with open(out / "metrics.jsonl" if master else os.devnull, "a") as log:
        for _ in bar:
            members, pair_mask, sampled_canaries = sample_micro_batches(N, q, K, generator=sample_gen,
                                                                        canaries=audit.n_included if audit else 0)
            model.train()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            canaries = audit and torch.as_tensor(audit.rows(sampled_canaries, args.clip)).to(device)
            with autocast:  # dp_step over micro-batches (--eps inf: plain_step, unclipped and unnoised)
                noisy, loss = micro_batch_step(per_example_grads, params, buffers, members, pair_mask, load_pairs,
                                               clip=args.clip, noise_std=noise_std, per_call=per_call,
                                               noise_gen=noise_gen, canaries=canaries, shard=(rank, world),
                                               batch_grad=batch_grad, stats=stats)
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
                batch = int(pair_mask.sum())  # every rank holds the whole step's sample
                log_line(log, args, step=step, eps=accountant.epsilon(delta), lr=opt.param_groups[0]["lr"], t0=t0,
                         params=params, loss=loss, batch=batch, signal=stats.get("clipped_norm"))
                checkpoint()
    end_processes(world)
    if not master:
        return

    # --- evaluation: NOT private (labels and held-out captions are read after training ends) ---
    zs_acc, pred = zero_shot(model, probe_test, tok, args.text_len, device)
    recall = retrieval(model, held_out, tok, args.text_len, device)
    encoder = build_model(args, private.channels).encoder.to(device).eval()
    acc = {}
    states = [("random_init", random_init)] + ([("init", init)] if args.init != "none" else [])
    for name, state in states + [("clip", model.encoder.state_dict())]:
        encoder.load_state_dict(state)
        acc[name] = data.linear_probe(encoder.features, probe_train, probe_test, device=device)
    k = 16  # zero_shot.png: test images with the predicted class (and the true one when wrong)
    names = [probe_test.classes[p] + ("" if p == t else f" ({probe_test.classes[t]})")
             for p, t in zip(pred[:k].tolist(), probe_test.labels[:k].tolist())]
    data.save_grid(probe_test.images(torch.arange(k)), out / "zero_shot.png", nrow=8, captions=names, scale=3)
    summary = dict(method="DP-CLIP (clip_dp.py)", batch_size=args.batch_size, micro_batch=args.micro_batch,
                   micro_batches_per_step=K, noise_signal=budget, noise_std_on_sum=2 * sigma * args.clip,
                   init=args.init,
                   probe_data=probe_train.name, zero_shot_accuracy_not_private=zs_acc,
                   chance=1 / len(probe_test.classes), retrieval_data=held_out.name, retrieval_not_private=recall,
                   probe_accuracy_not_private=acc, device=str(device))
    release(out, model, summary, args=args, plan=plan, accountant=accountant, earlier=earlier, audit=audit,
            n_total=n_total, steps=step, data_name=private.name)
    print("linear probe accuracy (not private): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"zero-shot accuracy (not private): {zs_acc:.3f} (chance {1 / len(probe_test.classes):.3f})")
    print(f"retrieval among {len(held_out)} held-out pairs, {recall['distinct_captions']} distinct captions (not "
          "private): " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items() if k != "distinct_captions"))
    print(f"wrote {out}/model.pt, summary.json, metrics.jsonl, checkpoint.pt, zero_shot.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    # bad input is one `error:` line and exit code 2; Ctrl-C or SIGTERM one line once the last checkpoint is safe
    sys.exit(data.run_main(main))
