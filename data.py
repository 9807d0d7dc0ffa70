"""Data for dp-repr: Poisson sampling, embedded datasets, random-process priors, real formats.

Every script imports this file and nothing else for data. It holds, in this order:
- Poisson sampling and the logical/physical batch split that DP-SGD's accounting assumes (rule 1), and the
  secret seeds of the sampling and noise generators and the generators that keep all of them (rule 3);
- the one dataset type every loader returns (ImageDataset) and the fixed pixel conventions;
- "shapes", an embedded labelled and captioned set of procedurally drawn scenes (no files, no network);
- random-process image generators (dead leaves, spectral 1/f^a noise, "shaders"): the public priors of ViP
  (Yu et al. 2023, synthetic Shaders21k pre-training) and DP-RandP (Tang et al. 2023, after Baradad et al.
  2021 "Learning to see by looking at noise"), simplified to vectorised torch so they run on the fly;
- a PNG grid to look at a batch (`python data.py grid`);
- batched torch augmentations, drawing for private data from each example's own random stream (ExampleRandom:
  a function of the public seed, the step and the example's index, never of the other examples sampled; rule 3),
  and a word tokenizer (a fixed hash) that reads no data (rule 4);
- the linear probe the scripts evaluate with;
- the run plumbing the scripts share, so that bad input is one `error:` line and a signal one line after the last
  checkpoint: the scripts' __main__ (run_main), checks of the flags, the environment, the device and --out (one run
  per folder, a pid lock, a folder whose run died before its first checkpoint started again), checkpoints and
  caches read safely and checked against the run, written atomically, metrics.jsonl trimmed on resume;
- last, real formats behind one loader (CIFAR pickles, MNIST IDX, image folders, COCO captions, webdataset
  shards, TSV/CSV of path<TAB>caption), all returned as one ImageDataset.

    from data import load_dataset, poisson_batches, normalize
    ds = load_dataset("shapes", split="train")               # 10,000 32x32 scenes, ~2 s, cached in memory
    for step, _ in poisson_batches(len(ds), 256 / len(ds), 100, 64, generator=torch.Generator().manual_seed(0)):
        for idx, mask in step:                               # idx [64], mask [64]: fixed shapes for vmap
            x = normalize(ds.images(idx))                    # [64, 3, 32, 32] in [-1, 1]

    python tests/bench.py data                               # generator and loader throughput
    python data.py grid shapes runs/shapes.png               # look at a batch (also: dead_leaves, spectral, shaders)
"""
import argparse
import atexit
import contextlib
import csv
import gzip
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import re
import secrets
import signal
import stat
import sys
import tarfile
import threading
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# -----------------------------------------------------------------------------
# Poisson sampling and the logical/physical batch split (rule 1)


def poisson_sample(n, q, *, generator=None, indices=None):
    """Each of range(n) joins independently with probability q -> LongTensor of the included indices.

    This is the sampling the RDP accountant's subsampled-Gaussian bound assumes: the batch size is random
    (mean qn, variance q(1-q)n), never fixed. indices: optional LongTensor [n] to sample from instead of
    range(n) (e.g. one worker's shard); each entry still joins with probability q.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q}")
    if indices is not None:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) != n:
            raise ValueError(f"poisson_sample: n={n} but {len(indices)} indices given")
    if n < 0:
        raise ValueError(f"poisson_sample: n must be >= 0, got {n}")
    # float64: a float32 uniform is a multiple of 2^-24, so `u < q` would include with probability
    # ceil(q 2^24) / 2^24 (and q < 6e-8 would stall at that floor); float64 is exact to 2^-53.
    keep = torch.rand(n, generator=generator, dtype=torch.float64) < q
    picked = keep.nonzero().squeeze(1)
    return picked if indices is None else indices[picked]


def secret_seeds(pinned=None):
    """(sampling seed, noise seed) for the two generators DP-SGD's guarantee needs kept secret (rule 3).

    The accountant's bound assumes that nobody knows which examples a step sampled (else amplification by
    subsampling is lost) nor the noise it added (else it can be subtracted). `--seed` is public (it is in
    summary.json and in every command), so these two seeds are 256-bit numbers from the operating system's
    entropy, never from it; secret_generator turns each into a generator. pinned: an int for tests that must
    replay a run (`--insecure-seed`): the seeds then follow it, and such a run is labelled NOT private.
    """
    if pinned is not None:
        return int(pinned), int(pinned) + 2
    return secrets.randbits(256), secrets.randbits(256)


_MT_WORDS = 624  # mt19937's state: 624 words of 32 bits


def secret_generator(seed, device="cpu"):
    """A torch.Generator on `device` holding as much of `seed` (an int in [0, 2^256)) as its kind can.

    CPU (mt19937): manual_seed keeps only the low 32 bits of a seed (seeds equal there draw the same numbers), and
    2^32 streams are a search away. So the generator's 624 state words are filled from SHAKE-256 of the seed
    instead, through set_state; get_state/set_state then save and restore it exactly, as for any generator. The
    state is torch's CPUGeneratorImplState: the initial seed (8 bytes, unused by the draws), `left` and `seeded`
    (4 bytes each), `next` (8), the 624 words (8 bytes each, their low 32 bits used), then the cached normal
    samples, left as a fresh generator has them (none). left = 1 makes the first draw regenerate the state from
    the words. CUDA (Philox) and MPS: a 64-bit seed through manual_seed, all that their generators take.
    """
    seed_bytes = int(seed).to_bytes(32, "little")
    device = torch.device(device)
    g = torch.Generator(device=device)
    if device.type != "cpu":
        return g.manual_seed(int.from_bytes(hashlib.shake_256(seed_bytes).digest(8), "little"))
    state = g.get_state().numpy().copy()  # uint8
    words = np.frombuffer(hashlib.shake_256(seed_bytes).digest(4 * _MT_WORDS), dtype="<u4").astype("<u8")
    head = np.array([0, 1 | 1 << 32, 0], dtype="<u8")  # initial seed 0; left = 1, seeded = 1; next = 0
    if len(state) != 24 + 8 * _MT_WORDS + 40:
        raise RuntimeError(f"torch's CPU generator state has {len(state)} bytes, not the layout secret_generator "
                           "writes; check data.secret_generator against this torch version")
    state[:24 + 8 * _MT_WORDS] = np.concatenate([head, words]).view(np.uint8)
    g.set_state(torch.from_numpy(state))
    return g


def physical_batches(indices, physical_batch):
    """Split a logical batch into fixed-shape micro-batches: list of (idx LongTensor [P], mask BoolTensor [P]).

    Fixed P keeps vmap shapes and memory constant; padding rows have idx 0 and mask False, and must contribute
    nothing (multiply per-example losses/gradients by mask). An empty sample gives one all-False batch, so a
    step still adds noise (the accountant counts it).
    """
    P = int(physical_batch)
    if P <= 0:
        raise ValueError(f"physical batch must be positive, got {physical_batch}")
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    k = max(1, math.ceil(len(indices) / P))
    idx = torch.zeros(k * P, dtype=torch.long)
    mask = torch.zeros(k * P, dtype=torch.bool)
    idx[: len(indices)] = indices
    mask[: len(indices)] = True
    return list(zip(idx.view(k, P).unbind(0), mask.view(k, P).unbind(0)))


def poisson_batches(n, q, steps, physical_batch, *, generator=None, shard=(0, 1), canaries=0):
    """Iterator over `steps` logical steps; each item is (physical_batches(the examples sampled), the canaries
    sampled).

    canaries: how many audit canaries joined the data (accountant.CanaryAudit). They are data set indices n ..
    n + canaries - 1 of the same Poisson draw: each gets its coin from the same call as the examples, and comes
    back apart as a LongTensor of canary numbers 0 .. canaries - 1 (empty without an audit), having no image to
    load.
    shard=(rank, world), for torchrun: every rank draws the same global sample (the same generator, seeded and
    stepped alike on every rank) and keeps the sampled examples rank, rank + world, ... of it. The shards are
    disjoint and their union is exactly the one-process sample, so one logical step is one global Poisson sample
    whatever the world size (and each rank's share is itself an independent-inclusion sample of its examples).
    Every rank gets all the sampled canaries (dp_step adds them on rank 0 alone).
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"poisson_batches: shard must be (rank, world) with 0 <= rank < world, got {shard}")
    for _ in range(int(steps)):
        picked = poisson_sample(n + canaries, q, generator=generator)
        examples = picked[picked < n]
        yield physical_batches(examples[rank::world], physical_batch), picked[picked >= n] - n


# -----------------------------------------------------------------------------
# errors, the dataset type, pixel conventions


class DataError(Exception):
    """A user-facing data problem. The message is one line and names the file, path or problem."""


MEMO_BYTES = 2 * 1024 ** 3  # lazy sets keep decoded pixels in memory up to this size
FULL_CHECK_N = 50_000  # lazy sets up to this size that fit in MEMO_BYTES are decoded in full before training


class ImageDataset:
    """The one kind of dataset every loader returns.

    Small sets hold all pixels in memory (uint8 [N, C, H, W]); file-backed ones (image folders, webdataset,
    COCO, TSV) hold a `decode(i) -> uint8 [C, H, W]` function and decode in images(idx), keeping what they
    decoded when the whole set fits in MEMO_BYTES (so only the first epoch pays for decoding).
    channels is 3 (RGB), or 1 for grey sets (MNIST, Fashion-MNIST): to_rgb() / to_grey() convert.
    labels: LongTensor [N] or None; classes: class names or None; captions: one str per example or None.
    check(i): a cheaper test that example i can be decoded (its file's header and end), for check_all.
    """

    def __init__(self, name, *, size, channels, n=None, pixels=None, decode=None, check=None, labels=None,
                 classes=None, captions=None):
        if pixels is None and decode is None:
            raise ValueError("ImageDataset needs pixels or decode")
        self.name, self.size, self.channels = name, size, channels
        self._pixels, self._decode, self._check = pixels, decode, check
        self._memo, self._memo_done = None, None  # decoded images of a lazy set, when they fit in MEMO_BYTES
        self._n = len(pixels) if pixels is not None else n
        self.labels = labels
        self.classes = classes
        self.captions = captions
        if self._n == 0:
            raise DataError(f"{name}: the dataset is empty")

    def __len__(self):
        return self._n

    def images(self, idx):
        """idx: LongTensor or list of ints [B] -> uint8 [B, C, H, W] (decoded now for lazy formats)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if self._pixels is not None:
            return self._pixels[idx]
        if self._memo is None and self._n * self.channels * self.size ** 2 <= MEMO_BYTES:
            # small enough to keep: each image is decoded once, later epochs read memory (CIFAR at 32px: 150 MB)
            self._memo = torch.empty(self._n, self.channels, self.size, self.size, dtype=torch.uint8)
            self._memo_done = torch.zeros(self._n, dtype=torch.bool)
        if self._memo is not None:
            for i in idx[~self._memo_done[idx]].unique().tolist():
                self._memo[i] = self._decode(i)
                self._memo_done[i] = True
            return self._memo[idx]
        out = torch.empty(len(idx), self.channels, self.size, self.size, dtype=torch.uint8)
        for j, i in enumerate(idx.tolist()):
            out[j] = self._decode(i)
        return out

    def check_all(self):
        """Read every example of a file-backed set once, before any training, so that a file that is not an image
        or is cut short is one DataError line now, not when (and whether) a secret sample draws it mid-run. A set
        that fits in MEMO_BYTES with at most FULL_CHECK_N examples is decoded in full (and kept: training then
        reads memory); a larger one has each file's header and end checked."""
        if self._decode is None:
            return
        if self._n * self.channels * self.size ** 2 <= MEMO_BYTES and self._n <= FULL_CHECK_N:
            for s in range(0, self._n, 1024):
                self.images(torch.arange(s, min(s + 1024, self._n)))
        elif self._check is not None:
            print(f"{self.name}: checking the {self._n} images' files once, before training")
            for i in range(self._n):
                self._check(i)

    def __repr__(self):
        extra = [k for k in ("labels", "captions") if getattr(self, k) is not None]
        shape = f"{self.channels}x{self.size}x{self.size}"
        return f"ImageDataset({self.name!r}, n={self._n}, {shape}, {'+'.join(extra) or 'images'})"


def normalize(x):
    """uint8 [..., C, H, W] -> float in [-1, 1]. Fixed (x/255 - 0.5)/0.5: dataset statistics would leak data."""
    return x.float().div(255).sub(0.5).div(0.5)


def to_rgb(x):
    """[B, 1, H, W] -> [B, 3, H, W] by repeating the grey channel; 3-channel input is returned as is."""
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def to_grey(x):
    """[B, 3, H, W] -> [B, 1, H, W]: luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, as PIL's "L"), rounded
    for uint8, exact for float (in [-1, 1] too: the map is linear, weights summing to 1); 1 channel returned as is.
    Random-process images go through it when the private set is grey, so a prior sees the kind of input it will be
    fine-tuned on."""
    if x.shape[1] == 1:
        return x
    y = (x.float() * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y.to(x.dtype)  # float: as is


def to_channels(x, channels):
    """uint8 [B, C, H, W] -> [B, channels, H, W]: to_grey for 1, to_rgb for 3."""
    return to_grey(x) if channels == 1 else to_rgb(x)


def _why(e):
    """An exception as one short line for a DataError message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def _whole(x):
    """An int that is no bool (numpy integers count): a label, an id, an offset."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _text(s):
    """A str that can be written as UTF-8: no lone surrogates, which JSON's \\ud800 escapes can produce."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(x):
    """What x is, in a few words, for a message about a field of the wrong type."""
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} array of shape {x.shape}"
    if isinstance(x, (list, tuple)):
        inner = sorted({type(v).__name__ for v in x[:1000]})
        return f"a {type(x).__name__} of {len(x)}" + (f" ({', '.join(inner)})" if inner else "")
    return ascii(x)[:60] if isinstance(x, (str, bytes, int, float)) or x is None else f"a {type(x).__name__}"


def _seed_from(*parts):
    """A 63-bit seed from any tuple: example streams for (seed, split, chunk) never overlap by construction."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def _uniform(shape, lo, hi, g):
    return torch.rand(shape, generator=g) * (hi - lo) + lo


# -----------------------------------------------------------------------------
# the embedded "shapes" dataset: one object on a textured background ("shapes3": one to three), labelled and captioned

SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart", "crescent", "hexagon"]
COLOURS = {  # saturated named colours, so a caption can name them and a background (muted) rarely matches
    "red": (220, 30, 35), "orange": (250, 140, 20), "yellow": (245, 225, 35), "green": (40, 175, 60),
    "cyan": (40, 215, 225), "blue": (35, 70, 230), "purple": (135, 45, 190), "pink": (250, 120, 200),
    "white": (250, 250, 250), "black": (15, 15, 15),
}
COLOUR_NAMES = list(COLOURS)
SHAPES_N = {"train": 10_000, "test": 2_000}
_CHUNK = 500  # examples are drawn in chunks with their own seed: example i is the same whatever n is


def _shape_mask(c, u, v):
    """Inside test for class c in object coordinates (u right, v down, object radius 1). u, v: [b, H, W]."""
    au, av = u.abs(), v.abs()
    if c == "circle":
        return u * u + v * v <= 1
    if c == "square":
        return torch.maximum(au, av) <= 0.8
    if c == "triangle":  # apex up, base at v = 0.55
        return (v <= 0.55) & (1.73 * au - v <= 1.0)
    if c == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if c == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1) & (rho2 >= 0.36)
    if c == "diamond":  # a tall rhombus: never a rotated square
        return au / 0.65 + av <= 1.0
    if c == "hexagon":
        return torch.maximum(av * 0.866 + au * 0.5, au) <= 0.9
    if c == "star":  # five points: the radius swings between 0.42 and 1 with the angle
        rho = torch.sqrt(u * u + v * v)
        phi = torch.atan2(u, -v)
        return rho <= 0.42 + 0.58 * torch.cos(2.5 * phi).abs() ** 3
    if c == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled to fit the unit disc
        x, y = u * 1.25, -v * 1.25 + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if c == "crescent":
        return (u * u + v * v <= 1) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.6)
    raise KeyError(c)


def _position_words(cx, cy):
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the centre"


def _draw_shapes(n, size, g, objects=3):
    """n scenes of 1 to `objects` objects -> (uint8 [n, 3, S, S], labels [n], captions). Vectorised over the batch
    for each object slot. Every scene draws the same random numbers whatever `objects` is, so a one-object scene
    is its 1-3-object twin's main object and background without the smaller distractors."""
    S = size
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / S  # pixel centres in (0, 1)
    # background: a muted colour with a random texture (stripes, checks or blotchy noise)
    grey = _uniform((n, 1), 60, 190, g)
    base = (grey + _uniform((n, 3), -25, 25, g))[:, :, None, None]
    theta = _uniform((n, 1, 1), 0, math.pi, g)
    freq = _uniform((n, 1, 1), 3, 12, g)
    ramp = coords[None, None, :] * torch.cos(theta) + coords[None, :, None] * torch.sin(theta)
    stripes = torch.sin(2 * math.pi * freq * ramp + _uniform((n, 1, 1), 0, 6.3, g))
    wave_x = torch.sin(math.pi * freq * coords[None, None, :])
    wave_y = torch.sin(math.pi * freq * coords[None, :, None])
    checks = torch.sign(wave_x * wave_y)
    blotch = F.interpolate(torch.randn(n, 1, 6, 6, generator=g), size=(S, S), mode="bilinear")[:, 0]
    kind = torch.randint(0, 3, (n, 1, 1), generator=g)
    texture = torch.where(kind == 0, stripes, torch.where(kind == 1, checks, blotch.clamp(-1.5, 1.5)))
    img = base + _uniform((n, 1, 1, 1), 8, 30, g) * texture[:, None]  # [n, 3, S, S]

    n_obj = torch.randint(1, 4, (n,), generator=g).clamp(max=objects)
    cls = torch.randint(0, len(SHAPE_CLASSES), (n, 3), generator=g)
    col = torch.randint(0, len(COLOURS), (n, 3), generator=g)
    # slot 0 is the largest object (the label); distractors are strictly smaller, so the label is never a tie
    radius = torch.cat([_uniform((n, 1), 0.22, 0.36, g), _uniform((n, 2), 0.10, 0.17, g)], 1)
    cx = torch.cat([_uniform((n, 1), 0.25, 0.75, g), _uniform((n, 2), 0.1, 0.9, g)], 1)
    cy = torch.cat([_uniform((n, 1), 0.25, 0.75, g), _uniform((n, 2), 0.1, 0.9, g)], 1)
    for _ in range(6):  # redraw distractors that sit mostly behind the main object, so captions name visible things
        dist2 = (cx[:, 1:] - cx[:, :1]) ** 2 + (cy[:, 1:] - cy[:, :1]) ** 2
        hidden = dist2 < (radius[:, :1] + 0.3 * radius[:, 1:]) ** 2
        cx[:, 1:] = torch.where(hidden, _uniform((n, 2), 0.1, 0.9, g), cx[:, 1:])
        cy[:, 1:] = torch.where(hidden, _uniform((n, 2), 0.1, 0.9, g), cy[:, 1:])
    rot = _uniform((n, 3), -0.5, 0.5, g)  # about +-30 degrees: a diamond stays a diamond, a heart stays upright
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    rgb = palette[col] + _uniform((n, 3, 3), -15, 15, g)  # [n, slot, 3]
    for k in (2, 1, 0):  # the largest (labelled) object last: distractors never hide it
        if not (n_obj > k).any():  # an empty slot in every scene draws nothing (the same images, sooner)
            continue
        dx = (coords[None, None, :] - cx[:, k, None, None]) / radius[:, k, None, None]  # [n, 1, S]
        dy = (coords[None, :, None] - cy[:, k, None, None]) / radius[:, k, None, None]  # [n, S, 1]
        c, s = torch.cos(rot[:, k, None, None]), torch.sin(rot[:, k, None, None])
        u, v = c * dx + s * dy, c * dy - s * dx  # [n, S, S]
        mask = torch.zeros(n, S, S, dtype=torch.bool)
        for ci, name in enumerate(SHAPE_CLASSES):
            sel = ((cls[:, k] == ci) & (n_obj > k)).nonzero().squeeze(1)
            if len(sel):
                mask[sel] = _shape_mask(name, u[sel], v[sel])
        img = torch.where(mask[:, None], rgb[:, k, :, None, None], img)
    img = img + torch.randn(img.shape, generator=g) * 4  # sensor noise: no pixel value is exactly a palette colour
    images = img.round().clamp(0, 255).to(torch.uint8)

    captions = []
    for i, (m, cl, co, r, x, y) in enumerate(zip(n_obj.tolist(), cls.tolist(), col.tolist(), radius.tolist(),
                                                  cx.tolist(), cy.tolist())):
        parts = []
        for k in range(m):
            size_word = "large " if r[k] > 0.29 else "" if k == 0 else "small "
            words = f"{size_word}{COLOUR_NAMES[co[k]]} {SHAPE_CLASSES[cl[k]]} {_position_words(x[k], y[k])}"
            parts.append(("an " if words[0] in "aeiou" else "a ") + words)
        captions.append(parts[0] if m == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    return images, cls[:, 0].clone(), captions


CAPTION_STYLES = ("full", "shapes")
_COLOUR = re.compile(rf"\b(?:a|an) ((?:large |small )?)(?:{'|'.join(COLOUR_NAMES)}) ")  # "an orange" -> "a"
_PLACE = re.compile(r" (?:at the (?:top|bottom)(?: left| right)?|on the (?:left|right)|in the centre)")


def shapes_captions(captions, style="full"):
    """The embedded set's captions in one of CAPTION_STYLES. "full": as drawn ("a large red circle at the top left
    and a small blue star on the right"). "shapes": the same phrases without colours and positions ("a large circle
    and a small star"), so the words left to match are the objects' shapes and sizes: a contrastive or captioning
    loss can no longer be lowered by colour and position alone, which the models learn long before shape.
    A pure function of the caption text (the images and labels are the same in both styles)."""
    if style not in CAPTION_STYLES:
        raise DataError(f"unknown caption style {style!r} (choose from {', '.join(CAPTION_STYLES)})")
    if style == "full":
        return list(captions)
    return [_PLACE.sub("", _COLOUR.sub(r"a \1", c)) for c in captions]


@lru_cache(maxsize=8)
def _shapes_cached(seed, split, size, n, objects):
    chunks = []
    for c in range(math.ceil(n / _CHUNK)):
        g = torch.Generator().manual_seed(_seed_from("shapes", seed, split, size, c))
        chunks.append(_draw_shapes(_CHUNK, size, g, objects))  # always whole chunks: vectorised draws depend on shape
    images = torch.cat([ch[0] for ch in chunks])[:n]
    labels = torch.cat([ch[1] for ch in chunks])[:n]
    captions = [cap for ch in chunks for cap in ch[2]][:n]
    return images.clone(), labels.clone(), captions


def shapes(split="train", *, size=32, n=None, seed=0, objects=1):
    """The embedded scenes: uint8 RGB, labels = class of the largest object, one English caption each.

    objects=1 (the "shapes" set): one object per scene, the default private set of every script, on which small
    models learn the label within CPU minutes, with DP too. objects=3 ("shapes3"): one to three objects, the
    label being the largest, a harder set. Deterministic from (seed, split, size); train and test draw from
    separate seed streams, so they share no example. n defaults to 10,000 (train) / 2,000 (test). Cached in memory
    per (seed, split, size, n, objects).
    """
    if split not in SHAPES_N:
        raise DataError(f"shapes: unknown split {split!r} (use train or test)")
    n = SHAPES_N[split] if n is None else int(n)
    if n <= 0:
        raise DataError(f"shapes: n must be positive, got {n}")
    if size < 8:
        raise DataError(f"shapes: size must be at least 8, got {size}")
    # the set is kept (twice while its chunks are joined) and each chunk of 500 is drawn in float tensors
    check_memory(2 * n * 3 * size ** 2 + _CHUNK * size ** 2 * 96, f"shapes: {n} scenes of 3x{size}x{size}")
    images, labels, captions = _shapes_cached(int(seed), split, int(size), n, int(objects))
    name = "shapes" if objects == 1 else f"shapes{objects}"
    return ImageDataset(f"{name}-{split}", size=size, channels=3, pixels=images, labels=labels,
                        classes=list(SHAPE_CLASSES), captions=list(captions))


# -----------------------------------------------------------------------------
# random-process priors (public data): dead leaves, spectral noise, shaders. All -> uint8 [n, 3, S, S].

PRIOR_KINDS = ("dead_leaves", "spectral", "shaders")


def dead_leaves(n, size=32, generator=None, *, leaves=40):
    """Occluding discs and squares with radii from a power law p(r) ~ r^-3 and uniform random colours.

    The r^-3 law gives scale-invariant statistics, as in natural images (Baradad et al. 2021, Sec. 3).
    Each pixel takes the colour of the last leaf covering it (a leaf falls on top of earlier ones).
    """
    g, S, K = generator, size, leaves
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    out = torch.empty(n, 3, S, S, dtype=torch.uint8)
    rmin, rmax = 0.05, 0.6
    weight = torch.arange(1, K + 1, dtype=torch.uint8).view(1, K, 1, 1)
    for s in range(0, n, 256):  # blocks bound the [b, K, S, S] memory
        b = min(256, n - s)
        u = torch.rand(b, K, generator=g)
        r = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5  # inverse CDF of p(r) ~ r^-3 on [rmin, rmax]
        cx, cy = _uniform((b, K), -0.1, 1.1, g), _uniform((b, K), -0.1, 1.1, g)
        square = torch.rand(b, K, 1, generator=g) < 0.5
        ax = ((coords - cx[..., None]) / r[..., None]).abs()  # [b, K, S]
        ay = ((coords - cy[..., None]) / r[..., None]).abs()
        # disc: ax^2 + ay^2 <= 1; square: max(ax, ay) <= 1, written as a sum of 0 (inside) or 2 (outside).
        # In uint8 (x100, saturated at 101) the [b, K, S, S] sum and tests run several times faster than float.
        ax = torch.where(square, (ax > 1).float() * 2, ax * ax).mul(100).clamp(max=101).to(torch.uint8)
        ay = torch.where(square, (ay > 1).float() * 2, ay * ay).mul(100).clamp(max=101).to(torch.uint8)
        inside = ax[:, :, None, :] + ay[:, :, :, None]  # [b, K, S, S]
        inside.le_(100)  # in place on uint8: 1 inside, 0 outside
        top = inside.mul_(weight).amax(1).long()  # index of the top leaf, 0 = background
        colours = torch.rand(b, K + 1, 3, generator=g)
        rgb = colours.gather(1, top.view(b, -1, 1).expand(-1, -1, 3))  # [b, S*S, 3]
        out[s:s + b] = (rgb * 255).round().to(torch.uint8).view(b, S, S, 3).permute(0, 3, 1, 2)
    return out


def spectral_noise(n, size=32, generator=None):
    """Gaussian noise with a 1/f^a amplitude spectrum (a random in [0.5, 2.5]) and random colour.

    The three channels are mixed by a random 3x3 matrix, so colour varies with the field instead of per channel
    independently; each image then gets a random mean colour and contrast.
    """
    g, S = generator, size
    fy = torch.fft.fftfreq(S)[:, None]
    fx = torch.fft.rfftfreq(S)[None, :]
    f = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / S)
    a = _uniform((n, 1, 1, 1), 0.5, 2.5, g)
    amp = f ** -a  # [n, 1, S, S//2+1]
    amp[..., 0, 0] = 0  # no DC: the mean colour is set below
    spec = torch.view_as_complex(torch.randn(n, 3, S, S // 2 + 1, 2, generator=g))
    field = torch.fft.irfft2(spec * amp, s=(S, S))  # [n, 3, S, S]
    mix = torch.randn(n, 3, 3, generator=g) + torch.eye(3) * _uniform((n, 1, 1), 0, 2, g)
    field = torch.einsum("nij,njhw->nihw", mix, field)
    field = field / field.flatten(1).std(1).clamp_min(1e-8)[:, None, None, None]
    img = _uniform((n, 3, 1, 1), 50, 205, g) + _uniform((n, 1, 1, 1), 25, 70, g) * field
    return img.round().clamp(0, 255).to(torch.uint8)


def shaders(n, size=32, generator=None):
    """Procedural "shader" images: random periodic and radial fields over warped image coordinates.

    A simplification of the Shaders21k idea (Baradad et al. 2022): t(x, y) = sum of sin(linear) waves, a radial
    wave and an angular wave about a random centre, on coordinates warped by other sin fields; colour is a
    random cosine palette rgb = A + B cos(2 pi (C t + D)) per channel (Quilez).
    """
    g, S = generator, size
    c1 = torch.linspace(-1, 1, S)
    x, y = c1[None, None, :], c1[None, :, None]  # [1, 1, S], [1, S, 1]

    def p(lo, hi):
        return _uniform((n, 1, 1), lo, hi, g)

    w = p(0, 0.5) * (torch.rand(n, 1, 1, generator=g) < 0.7)  # warp strength; 30% unwarped
    xw = x + w * torch.sin(p(1, 6) * y + p(0, 6.3))  # [n, S, S]
    yw = y + w * torch.sin(p(1, 6) * x + p(0, 6.3))
    t = torch.zeros(n, S, S)
    for _ in range(3):
        ang = p(0, math.pi)
        t = t + p(0, 1) * torch.sin(p(1, 12) * (torch.cos(ang) * xw + torch.sin(ang) * yw) + p(0, 6.3))
    dx, dy = xw - p(-0.8, 0.8), yw - p(-0.8, 0.8)
    t = t + p(0, 1.5) * torch.sin(p(2, 20) * torch.sqrt(dx * dx + dy * dy + 1e-6) + p(0, 6.3))
    t = t + p(0, 1) * torch.sin(torch.randint(1, 8, (n, 1, 1), generator=g) * torch.atan2(dy, dx) + p(0, 6.3))
    t = t / t.flatten(1).abs().amax(1).clamp_min(1e-6)[:, None, None]  # [-1, 1]
    A, B = _uniform((n, 3, 1, 1), 0.3, 0.7, g), _uniform((n, 3, 1, 1), 0.2, 0.5, g)
    C, D = _uniform((n, 3, 1, 1), 0.3, 1.5, g), _uniform((n, 3, 1, 1), 0, 1, g)
    img = A + B * torch.cos(2 * math.pi * (C * t[:, None] + D))
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


_GENERATORS = {"dead_leaves": dead_leaves, "spectral": spectral_noise, "shaders": shaders}


def random_process_images(n, size=32, *, kinds=PRIOR_KINDS, generator=None):
    """n images mixing the given kinds in equal shares (the remainder drawn at random), shuffled."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in _GENERATORS]
    if bad or not kinds:
        raise ValueError(f"unknown random-process kind(s) {bad or kinds}; choose from {PRIOR_KINDS}")
    need = max(min(n, 256) * 40 * size ** 2 * 2, n * size ** 2 * 96)  # dead leaves' [256, 40, S, S]; float fields
    if need > 2 ** 28:
        check_memory(need, f"{n} random-process images of {size}x{size}")
    counts = [n // len(kinds)] * len(kinds)
    for j in torch.randperm(len(kinds), generator=generator)[: n - sum(counts)].tolist():
        counts[j] += 1
    parts = [_GENERATORS[k](c, size, generator) for k, c in zip(kinds, counts) if c > 0]
    out = torch.cat(parts) if parts else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return out[torch.randperm(n, generator=generator)]


# -----------------------------------------------------------------------------
# looking at a batch: a PNG grid, and `python data.py grid`


def save_grid(images, path, *, nrow=8, captions=None, scale=1):
    """Write images [B, C, H, W] (uint8, or float in [0, 1] or [-1, 1]) as one PNG grid, captions under each."""
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = x.float()
        if x.min() < 0:  # [-1, 1], the normalize() range
            x = (x + 1) / 2
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    x = to_rgb(x)
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    B, _, H, W = x.shape
    nrow = max(1, min(nrow, B))
    rows = math.ceil(B / nrow)
    font, lines = ImageFont.load_default(), []
    if captions is not None:
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        for cap in captions:  # greedy word wrap to the tile width
            out, cur = [], ""
            for word in str(cap).split():
                trial = f"{cur} {word}".strip()
                if cur and draw.textlength(trial, font=font) > W:
                    out.append(cur)
                    cur = word
                else:
                    cur = trial
            lines.append(out + [cur])
    line_h = 12
    text_h = line_h * max((len(l) for l in lines), default=0)
    pad = 2
    grid = Image.new("RGB", (nrow * (W + pad) + pad, rows * (H + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        r, c = divmod(i, nrow)
        x0, y0 = pad + c * (W + pad), pad + r * (H + text_h + pad)
        grid.paste(Image.fromarray(x[i].permute(1, 2, 0).numpy()), (x0, y0))
        for j, line in enumerate(lines[i] if i < len(lines) else []):
            draw.text((x0, y0 + H + j * line_h), line, fill=(0, 0, 0), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


GRID_MAX = 1024  # images in one grid PNG


def _grid_main(argv):
    """python data.py grid KIND OUT.png [N]: a grid of shapes (with captions), of a dataset, or of a random-process
    kind. Returns the exit code; bad arguments are one `error:` line, exit code 2."""
    usage = "usage: python data.py grid {shapes|dead_leaves|spectral|shaders|PATH} OUT.png [N]"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) not in (3, 4) or argv[0] != "grid":
        print(f"error: {'expected grid KIND OUT.png [N]' if argv else 'no command'}, got {len(argv)} "
              f"argument(s) ({usage})", file=sys.stderr)
        return 2
    kind, out, n_arg = argv[1], Path(argv[2]), argv[3] if len(argv) == 4 else "32"
    try:
        if not (n_arg.isascii() and n_arg.isdigit()) or not 1 <= int(n_arg) <= GRID_MAX:
            raise DataError(f"N must be a whole number in [1, {GRID_MAX}] (one PNG holds them all), got {n_arg!r}")
        count = int(n_arg)
        if out.is_dir() or not out.parent.is_dir():
            raise DataError(f"{out}: {'a folder' if out.is_dir() else 'its folder does not exist'}; give a .png path")
        if kind in _GENERATORS:
            save_grid(_GENERATORS[kind](count, 32, torch.Generator().manual_seed(0)), out, scale=2)
        else:
            ds = load_dataset(kind, n=count)
            idx = torch.arange(min(count, len(ds)))
            save_grid(ds.images(idx), out, captions=ds.captions and [ds.captions[i] for i in idx], scale=4, nrow=8)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


# -----------------------------------------------------------------------------
# augmentations: torch, batched, on x's device. Random draws come from `generator`: a torch.Generator (on its own
# device) for public images, or an ExampleRandom for private ones, so that each example draws from its own stream.

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's increment; constants above 2^63 as their signed int64 value
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64


def _shift_right(z, k):
    """Logical right shift of an int64 tensor: >> is arithmetic (it copies the sign bit), so mask those bits off."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z):
    """splitmix64's finaliser (Steele, Lea & Flood 2014), a bijection of 64-bit words; int64 arithmetic wraps
    modulo 2^64, as the unsigned original does."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


class ExampleRandom:
    """Each example's own random numbers, for the augmentations and masks of private data (rule 3).

    A batch-order generator hands out draws by batch slot: one more example sampled shifts every later slot, so
    the other examples' crops would depend on who else was sampled, and the sensitivity argument would fail. Here
    draw j of example i is a pure function of (seed, step, i, j): the same whoever else is in the batch, in
    whatever order, on whichever torchrun process. The stream of example i is splitmix64 started from
    h = mix(mix(mix(seed + g) + step + g) + i + g), g its golden-ratio increment: draw j is the top 53 bits of
    mix(h + (j + 1) g), a float64 in [0, 1). Pass it to the augmentations as their `generator`; each call takes
    the next draws of every example's stream.

    seed: the public --seed; step: the logical step; idx: LongTensor [B] of dataset indices (padding slots draw
    too, for a fixed shape; their draws are never used). views(k) gives k rows per example (rows i*k .. i*k+k-1),
    each view drawing its own numbers from its example's stream (augmentation multiplicity).
    """

    def __init__(self, seed, step, idx):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        h = torch.zeros((), dtype=torch.long)
        for word in (int(seed), int(step)):
            h = _mix64(h + word + _GOLDEN)
        self.state = _mix64(h + idx + _GOLDEN)  # (B,) each example's splitmix64 state
        self.per_example, self.drawn = 1, 0

    def __len__(self):
        return len(self.state) * self.per_example

    def views(self, k):
        """The same examples as k rows each; draws continue from this stream's position."""
        out = ExampleRandom.__new__(ExampleRandom)
        out.state, out.per_example, out.drawn = self.state, self.per_example * int(k), self.drawn
        return out

    def uniform(self, c):
        """The next c draws of every row: float64 [len(self), c] in [0, 1), 53 random bits each."""
        k = self.per_example
        j = self.drawn + torch.arange(k * c).view(1, k, c)  # draw numbers: view v takes v*c .. v*c + c - 1
        self.drawn += k * c
        z = _mix64(self.state.view(-1, 1, 1) + (j + 1) * _GOLDEN)  # (B, k, c)
        return (_shift_right(z, 11).double() * 2.0 ** -53).view(-1, c)


def _rand(shape, generator, device):
    """Uniforms of `shape` (B, or (k, B): k per example) on `device`. From an ExampleRandom: each example's next k
    draws (float32 from the float64 uniforms); from a torch.Generator: torch.rand."""
    if isinstance(generator, ExampleRandom):
        k, B = (1, shape) if isinstance(shape, int) else shape
        if B != len(generator):
            raise ValueError(f"augmentation of {B} examples with an ExampleRandom of {len(generator)}")
        return generator.uniform(k).T.reshape(shape).float().to(device)
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def uniforms(B, k, *, generator=None, device="cpu"):
    """float32 [B, k] uniforms in [0, 1): each example's next k draws (an ExampleRandom), or torch.rand's."""
    if isinstance(generator, ExampleRandom):
        return _rand((k, B), generator, device).T.contiguous()
    return _rand((B, k), generator, device)


def random_crop(x, pad=4, *, generator=None):
    """x [B, C, H, W] float -> same shape: reflect-pad by `pad`, then crop H x W at a random offset per example."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = (_rand(B, generator, x.device) * (2 * pad + 1)).long().clamp_max(2 * pad)
    ox = (_rand(B, generator, x.device) * (2 * pad + 1)).long().clamp_max(2 * pad)
    rows = oy[:, None] + torch.arange(H, device=x.device)  # [B, H]
    cols = ox[:, None] + torch.arange(W, device=x.device)  # [B, W]
    b = torch.arange(B, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def hflip(x, *, generator=None):
    """Mirror each example left-right with probability 1/2."""
    flip = _rand(x.shape[0], generator, x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(x, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), *, generator=None):
    """Crop a random area fraction in `scale` with aspect in `ratio`, resize back to H x W (bilinear)."""
    B, C, H, W = x.shape
    r = _rand((4, B), generator, x.device)
    area = scale[0] + (scale[1] - scale[0]) * r[0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[1]
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (2 * r[2] - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop kept inside the image
    cy = (2 * r[3] - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x, strength=0.2, *, generator=None):
    """Light brightness, contrast and saturation jitter, each factor in [1 - s, 1 + s].

    x is in the normalize() range [-1, 1]; the result is clamped to it. Grey (1-channel) input skips saturation.
    """
    B = x.shape[0]
    f = 1 + strength * (2 * _rand((3, B), generator, x.device) - 1)
    f = f.to(x.dtype)[..., None, None, None]  # [3, B, 1, 1, 1]
    y = (x + 1) / 2
    y = y * f[0]
    y = (y - y.mean((1, 2, 3), keepdim=True)) * f[1] + y.mean((1, 2, 3), keepdim=True)
    if x.shape[1] == 3:
        grey = (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3])
        y = (y - grey) * f[2] + grey
    return (y * 2 - 1).clamp(-1, 1)


# -----------------------------------------------------------------------------
# word tokenizer: a fixed hash, fitted on nothing, so it carries no information about any data (rule 4)


class WordTokenizer:
    """Words hashed into a fixed number of buckets: a vocabulary fitted on nothing, so it reveals nothing about the
    captions it reads (the privacy unit is one pair; a vocabulary counted from the private captions would publish
    which words they use). PAD=0, BOS=1, EOS=2, word w -> 3 + blake2b(w) mod buckets; words are the lowercase runs
    of letters (any script), digits and apostrophes. At the default 256 buckets no two words of the embedded captions and
    prompts share a bucket (tests/test_data.py checks it); on real captions, give more buckets (e.g. 8192: rare
    collisions, a larger embedding). Word tokens, not bytes: a caption's image-dependent words are a few tokens
    out of a few, so the captioning loss and the text tower put their weight on them.

    encode: BOS + word ids + EOS, right-padded to exactly max_len (fixed shape for vmap); long captions are cut so
    that EOS always fits. decode: ids back to words through a public word list (hashing has no inverse); an id no
    listed word hashes to is shown as <id>.
    """
    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    WORD = re.compile(r"[\w']+")

    def __init__(self, buckets=256):
        if not 1 <= int(buckets) <= 2**20:
            raise ValueError(f"the word hash needs 1 to {2**20} buckets, got {buckets}")
        self.buckets = int(buckets)
        self.vocab_size = self.buckets + self.OFFSET

    def word_id(self, word):
        h = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        return self.OFFSET + h % self.buckets

    def words(self, text):
        return self.WORD.findall(text.lower())

    def encode(self, texts, max_len):
        """texts: list[str] -> LongTensor [B, T], T = max_len >= 2."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (BOS and EOS), got {max_len}")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), max_len), self.PAD, dtype=torch.long)
        cache = {}
        for i, text in enumerate(texts):
            ids = [cache.setdefault(w, self.word_id(w)) for w in self.words(text)[: max_len - 2]]
            out[i, : len(ids) + 2] = torch.tensor([self.BOS, *ids, self.EOS])
        return out

    def decode(self, ids, words=()):
        """LongTensor [B, T] (or [T]) -> list[str]: stops at EOS, skips PAD/BOS; ids named through `words`."""
        names = {self.word_id(w): w for w in words}
        ids = torch.as_tensor(ids)
        rows = ids[None].tolist() if ids.dim() == 1 else ids.tolist()
        texts = []
        for row in rows:
            out = []
            for t in row:
                if t == self.EOS:
                    break
                if t >= self.OFFSET:
                    out.append(names.get(t, f"<{t}>"))
            texts.append(" ".join(out))
        return texts


def embedded_words():
    """Every word the embedded captions and the scripts' prompts use: public (the generator's own lists)."""
    fixed = "a an and large small at the top bottom left right on in centre photo of image"
    return sorted(set(fixed.split()) | set(SHAPE_CLASSES) | set(COLOUR_NAMES))


# -----------------------------------------------------------------------------
# evaluation shared by the scripts: a linear probe on frozen features (NOT private: it reads probe labels)


def linear_probe(encode, train, test, *, device, batch=256, steps=200):
    """Test accuracy of logistic regression on frozen features (the linear-probe protocol of MAE, ViP, DP-Cap).

    encode(x) maps float images (B, C, H, W) in [-1, 1] on `device` to features (B, D). Features are standardised
    with the probe *training* set's mean and std (downstream data, not the private set), then a linear head is fit
    full-batch with L-BFGS and a small L2 penalty. Grey sets are fed as they are: encode decides on channels.
    """
    if train.labels is None or test.labels is None:
        raise DataError(f"{train.name}: the linear probe needs labels")

    @torch.no_grad()
    def features(ds):
        out = []
        for i in range(0, len(ds), batch):
            x = normalize(ds.images(torch.arange(i, min(i + batch, len(ds))))).to(device)
            out.append(encode(x).float().cpu())
        return torch.cat(out)  # (N, D)

    ftr, fte = features(train), features(test)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    with torch.enable_grad():
        head = torch.nn.Linear(ftr.shape[1], int(max(train.labels.max(), test.labels.max())) + 1)
        opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(ftr), train.labels) + 1e-4 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return (head(fte).argmax(1) == test.labels).float().mean().item()


# -----------------------------------------------------------------------------
# run plumbing shared by the scripts (no DP here): the __main__ wrapper, flags, device, output folder, checkpoints
# and caches read and written safely, metrics, labels and captions.
# Each script calls these at the same place with the same lines, so that bad input ends in one `error:` line (exit
# code 2) before anything is read or written, Ctrl-C or SIGTERM in one line once the last checkpoint is safe, and a
# run never leaves a folder that neither a rerun nor --resume accepts.


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised wherever the run is, except inside a checkpoint or release write (held to its end).
    A KeyboardInterrupt, so that no `except Exception` on the way turns it into another error."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class EnvError(ValueError):
    """A launcher variable (RANK, WORLD_SIZE, ...) that does not describe a torchrun process: every process says it."""


# What the current run has reached, for the line an interruption prints: its --out, the step of its last checkpoint
# (written, or resumed from), whether its release is written; and the signal state (a write in progress holds it).
_RUN = dict(out=None, step=None, released=False, holding=0, pending=None, stopping=False)


def _on_signal(signum, frame):
    if _RUN["stopping"]:  # the run is already stopping: a second Ctrl-C waits for it to end
        return
    if _RUN["holding"]:  # a checkpoint or the release is being written: stop right after it
        _RUN["pending"] = signum
        return
    _RUN["stopping"] = True
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM while a file is written and renamed into place; an interruption that came meanwhile
    is raised when the block ends (never while an exception is already on its way)."""
    _RUN["holding"] += 1
    try:
        yield
    finally:
        _RUN["holding"] -= 1
    if not _RUN["holding"] and _RUN["pending"] is not None and not _RUN["stopping"]:
        _RUN["stopping"] = True
        raise Interrupted(_RUN["pending"])


class _Stream:
    """stdout or stderr such that printing can never stop a run or spoil its release: text the terminal's encoding
    lacks (PYTHONIOENCODING=ascii) is escaped, and once a write fails (a closed pipe: `| head -1`; a full disk:
    `> /dev/full`) the rest is dropped, one warning saying so on stderr, and the run goes on to its end."""

    def __init__(self, stream, name):
        self._stream, self._name, self._dead = stream, name, False
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass

    def write(self, text):
        if not self._dead:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._die(e)
        return len(text)

    def flush(self):
        if not self._dead:
            try:
                self._stream.flush()
            except OSError as e:
                self._die(e)

    def _die(self, e):
        self._dead = True
        try:  # the interpreter flushes the stream again at exit: its file descriptor now points at /dev/null
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass
        if self._name == "stdout":
            print(f"warning: stdout: {_why(e)}; the run goes on without printing", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def check_environment():
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (with MASTER_ADDR and MASTER_PORT), or none of them.
    Anything else would run a process that waits for peers that never come, or stays silent as a rank > 0."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if env["RANK"] is None and env["WORLD_SIZE"] is None:  # one process (a LOCAL_RANK alone is another launcher's)
        return
    bad = [f"{k}={v!r}" for k, v in env.items() if v is not None and not (v.isascii() and v.isdigit())]
    if bad:
        raise EnvError(f"{', '.join(bad)}: not a whole number >= 0; torchrun sets these (unset them to run one "
                       f"process)")
    if env["RANK"] is None or env["WORLD_SIZE"] is None:
        given, lacking = ("RANK", "WORLD_SIZE") if env["WORLD_SIZE"] is None else ("WORLD_SIZE", "RANK")
        raise EnvError(f"{given}={env[given]} is set but {lacking} is not: start the processes with torchrun, or "
                       f"unset {given}")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if not 0 <= rank < world:
        raise EnvError(f"RANK={rank} with WORLD_SIZE={world}: a rank must be in [0, WORLD_SIZE)")
    if world > 1:
        missing = [k for k in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise EnvError(f"WORLD_SIZE={world} without {', '.join(missing)}: start the processes with torchrun "
                           f"(it sets them all), or unset RANK and WORLD_SIZE")


def _out_of_memory(e):
    return isinstance(e, MemoryError) or isinstance(e, torch.OutOfMemoryError) or any(
        w in str(e) for w in ("can't allocate memory", "out of memory", "not enough memory"))


def run_main(main, *, torchrun=True):
    """What each script's __main__ runs: main() with bad input (DataError, ValueError, an OSError of a file) as one
    `error:` line and exit code 2; SIGINT or SIGTERM as one line once the last checkpoint is safe, exit code
    128 + the signal (130, 143); stdout and stderr that cannot fail the run (_Stream). Returns the exit code.
    Under torchrun every rank fails alike, so rank 0 alone says why; torchrun=False: a command that never runs
    under it (data.py grid), whose environment is not checked."""
    _RUN.update(out=None, step=None, released=False, holding=0, pending=None, stopping=False)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Stream(sys.stdout, "stdout"), _Stream(sys.stderr, "stderr")
    say = lambda line: print(f"error: {' '.join(str(line).split())}", file=sys.stderr)
    master = lambda: os.environ.get("RANK", "0") == "0"
    try:
        if torchrun:
            check_environment()
        main()
        return 0
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if master():
            say(_interrupted_line(signal.Signals(signum).name))
        return 128 + signum
    except EnvError as e:
        say(e)
        return 2
    except (DataError, ValueError) as e:
        if master():
            say(e)
        return 2
    except OSError as e:  # a file this run reads or writes: disk full, no permission, not a file
        if master():
            say(f"{e.filename}: {e.strerror or _why(e)}" if e.filename else _why(e))
        return 2
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        if master():
            say(f"out of memory ({_why(e)[:160]}): lower --physical-batch (memory only), --size or the model")
        return 2
    finally:
        _RUN["stopping"] = True  # a signal from here on no longer interrupts anything: it is ignored
        sys.stdout.flush()  # a stdout that fails only at its last flush fails here, through _Stream, not at exit
        sys.stdout, sys.stderr = streams
        for s, h in handlers.items():
            signal.signal(s, h)


def _interrupted_line(name):
    out, step = _RUN["out"], _RUN["step"]
    if _RUN["released"]:
        return f"interrupted ({name}) after the release was written: {out} holds the finished run"
    if step is not None:
        return f"interrupted ({name}) at step {step}, its last checkpoint; continue with --resume --out {out}"
    if out is not None:
        return (f"interrupted ({name}) before the first checkpoint: nothing to resume; a rerun (or --resume) "
                f"starts {out} again at step 0")
    return f"interrupted ({name}) before the run started; nothing was written"


def _between(lo, hi, why="", *, above=False):
    """(what, test) of a flag in [lo, hi] ((lo, hi] with above=True)."""
    what = f"{'>' if above else '>='} {lo:g} and <= {hi:g}" + (f" ({why})" if why else "")
    return what, (lambda v: (lo < v if above else lo <= v) and v <= hi)


_FLOAT32 = "larger overflows float32 in the optimiser step"
FLAG_RULES = {  # numeric flag -> (what it must be, test); NaN fails every test. A None value (not given) passes.
    # The upper bounds are what can run: beyond them a run overflows float32 or memory, or cannot end.
    "eps": ("> 0 (inf: the non-private reference)", lambda v: v > 0),
    "delta": ("in (0, 1)", lambda v: 0 < v < 1),
    "clip": _between(0, 1e30, "larger overflows the float32 noise sigma*C", above=True),
    "width": _between(0.25, 16, "WRN-16-k: narrower is widened to 4 channels a layer; 16 has 44M parameters"),
    **{k: _between(0, 1e30, _FLOAT32, above=True) for k in ("lr", "lp_lr", "syn_lr", "prior_lr")},
    "wd": _between(0, 1e30, _FLOAT32),
    **{k: ("in [0, 1)", lambda v: 0 <= v < 1) for k in ("mask_ratio", "ema", "momentum")},
    "batch_size": _between(1, 1e8, "at most N, the examples it samples from"),
    "n": _between(1, 1e8, "the Poisson draw holds a float64 per example each step"),
    "steps": _between(1, 1e9),
    "log_every": _between(1, 1e9),
    **{k: _between(0, 1e9) for k in ("warmup", "syn_steps", "prior_steps", "lp_steps")},
    "size": _between(1, 1024, "one image must fit a per-example gradient in memory"),
    "patch": _between(1, 1024),
    **{k: _between(1, 65536, "images in one call") for k in ("physical_batch", "syn_batch", "prior_batch")},
    "tan_batch": _between(1, 1e8),
    "aug_mult": _between(1, 64, "each example's views go through one call; the paper uses 16"),
    "probe_n": _between(2, 1e6, "the probe standardises features over its examples and fits them in one batch"),
    "zero_shot_n": _between(1, 1e5),
    "retrieval_n": _between(1, 20000, "retrieval holds an N x N similarity matrix"),
    "audit": _between(0, 20000, "the canary rows of a step are up to M x M floats"),
    **{k: _between(2, 1024, "BOS, EOS and up to 1022 words of a caption") for k in ("max_len", "text_len")},
    "vocab": _between(1, 2 ** 20, "word hash buckets: each is a row of the embedding (and of cap's output layer)"),
    "crop": _between(0, 64, "a shift of at most that many pixels"),
    "micro_batch": _between(2, 1e8, "a contrastive loss needs another pair"),
    "seed": ("in [0, 2**32)", lambda v: 0 <= v < 2 ** 32),
}
FLAG_PAIRS = (  # (flag, other, test, what): rules between two flags, checked once both hold a value
    ("micro_batch", "batch_size", lambda m, b: m <= b, "at most --batch-size {other}: K = round(B/m) micro-batches "
                                                       "per step, and one must hold about m pairs"),
    ("tan_batch", "batch_size", lambda t, b: t <= b, "at most --batch-size {other}"),
)
UNUSED_FLAGS = (  # (flags, when this run would not use them, why): typed anyway, they are named in a note
    (("captions",), lambda a: a.data not in EMBEDDED, "it styles the embedded set's captions only"),
    (("init_data_disjoint",), lambda a: getattr(a, "init", "none") in ("none", "syn"), "there is no --init run"),
    (("syn_steps", "syn_batch", "syn_lr"), lambda a: a.init != "syn", "stage 1 (ViP-Syn) runs with --init syn only"),
    (("prior_steps", "prior_batch", "prior_lr", "lp_steps", "lp_lr", "lp_features"), lambda a: a.no_prior,
     "--no-prior skips phases I and II"),
    (("clip",), lambda a: a.eps == math.inf, "--eps inf clips nothing"),
    (("name",), lambda a: a.out is not None, "--out names the folder"),
)


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' argparse: a bad or unknown flag is one `error:` line, exit code 2, instead of the usage block
    (--help still prints it). Under torchrun every rank parses alike, so only rank 0 says why."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n" if os.environ.get("RANK", "0") == "0" else None)

    def parse_known_args(self, args=None, namespace=None):
        self.typed_argv = sys.argv[1:] if args is None else list(args)  # for typed_flags
        return super().parse_known_args(args, namespace)


def typed_flags(parser, dests):
    """The flags (argparse dests, among `dests`) typed on the command line that `parser` last parsed, whatever their
    values: a flag typed at its default value counts too, so that --resume can refuse `--eps 8` over a run at eps 4
    although 8 is the default. argparse fills in a default only where the namespace lacks the attribute, so every
    dest starts as a marker, and a typed flag replaces it."""
    unset = object()
    typed = parser.parse_args(parser.typed_argv, argparse.Namespace(**{k: unset for k in dests}))
    return [k for k, v in vars(typed).items() if v is not unset]


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_flags(args):
    """Every numeric flag of a script's argparse Namespace against FLAG_RULES and FLAG_PAIRS, before any data is
    read: a value that would train on nonsense (--clip nan, --n 0, --log-every 0) or cannot run (--clip 1e308,
    --size 100000) is a ValueError naming the flag and its bound. Flags a script adds must get a rule here
    (tests/test_bad_input.py checks that each one has)."""
    for name, value in vars(args).items():
        if name in FLAG_RULES and value is not None:
            what, ok = FLAG_RULES[name]
            if not _number(value) or not ok(value):
                got = value if _number(value) else repr(value)
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {got}")
    for name, other, ok, what in FLAG_PAIRS:
        a, b = getattr(args, name, None), getattr(args, other, None)
        if a is not None and b is not None and not ok(a, b):
            raise ValueError(f"--{name.replace('_', '-')} {a} must be {what.format(other=b)}")


def check_command(parser, args):
    """The command line before anything runs: --out and --name must name a folder this run may fill (not empty,
    not the filesystem root, a --name that stays inside runs/), and flags typed where this run would not use them
    are named in a note, so that nothing typed is dropped without a word."""
    if args.out is not None:
        if not args.out.strip():
            raise ValueError("--out is empty: give the run's folder (default runs/<name>)")
        where = Path(args.out).expanduser().resolve()
        if where == Path(where.anchor):
            raise ValueError(f"--out {args.out} is the filesystem root: give the run a folder of its own")
    if args.name is not None and (args.name.strip() in ("", ".", "..") or any(c in args.name for c in "/\\\0")):
        raise ValueError(f"--name {args.name!r} must be a plain folder name (no /, not . or ..): the run goes to "
                         f"runs/<name>")
    if args.resume:  # a resumed run's flags are its checkpoint's, already noted when it started
        return
    typed = set(typed_flags(parser, vars(args)))
    for flags, unused, why in UNUSED_FLAGS:
        hit = [f for f in flags if f in typed]
        if hit and unused(args):
            print(f"note: {', '.join('--' + f.replace('_', '-') for f in hit)} not used: {why}")


def pick_device(name):
    """--device -> torch.device: 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'. A device
    this machine lacks is a ValueError, not a traceback from the first tensor moved there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    found = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "mps": int(torch.backends.mps.is_available())}
    if dev.type not in found:
        raise ValueError(f"--device {name}: not a device this project runs on (use auto, cpu, cuda or cuda:N)")
    if (dev.index or 0) >= found[dev.type]:
        raise ValueError(f"--device {name}: not on this machine ({found[dev.type]} {dev.type} device(s); "
                         f"use --device auto)")
    return dev


def memory_available():
    """Bytes of memory this machine can still give (Linux: MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(nbytes, what):
    """A DataError before allocating `nbytes` for `what` when the machine has less available: the process would
    otherwise be killed without a word, or stall swapping."""
    free = memory_available()
    if free is not None and nbytes > free:
        raise DataError(f"{what} need ~{nbytes / 2**30:.1f} GiB of memory; this machine has {free / 2**30:.1f} GiB "
                        f"available")


RUN_FILES = ("checkpoint.pt", "summary.json", "model.pt")  # any of them: a run that got far enough to be kept
OUT_FILES = ("metrics.jsonl", "run.lock", *RUN_FILES, "recon.png", "captions.png", "zero_shot.png", "priors.png")
_LOCKS = []  # lock files this process holds, removed by release_out_dirs at exit
_PID_MAX = 2 ** 22  # Linux's largest pid_max: a lock holding anything else was not written by a run


def _alive(pid):
    """Whether process `pid` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _folder_of_files(out):
    """Refuse --out where a name this run writes is taken by something that is not a file (a folder, a FIFO): found
    only when the file is written, after training advanced."""
    for name in OUT_FILES:
        for p in (out / name, out / f"{name}.tmp"):
            if os.path.lexists(p) and (p.is_dir() or (p.exists() and not p.is_file())):
                raise DataError(f"--out {out}: {p.name} is {'a folder' if p.is_dir() else 'not a plain file'}, where "
                                f"this run writes a file; move it away or pass another --out")


def claim_out_dir(out, *, resume):
    """Make --out ready for this run, or raise one DataError line; nothing in it is changed when it refuses.

    Refuses a path that is a file or lies under one, a place that cannot be written, a name this run writes that
    is not a file (OUT_FILES), and a new run (resume False) into a folder that already holds one (RUN_FILES): it
    would overwrite its checkpoint and release. Then takes <out>/run.lock holding this pid, so a second run on the
    same --out refuses instead of interleaving metrics.jsonl and racing on checkpoint.pt.tmp; a lock whose process
    is gone (or that holds no pid) is taken over. The lock is removed at exit (release_out_dirs).
    A folder with no checkpoint, summary or model is a run that stopped before its first checkpoint (killed, or
    failed on its data): there is nothing in it to resume, so this run takes it over and empties its metrics.jsonl,
    saying so. Under torchrun only rank 0 writes to --out, so only it takes the lock and the folder."""
    out = Path(out)
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise DataError(f"--out {out}: {p} is a file, not a folder")
    if out.is_dir():
        _folder_of_files(out)
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held and not resume:
        raise DataError(f"--out {out} already holds a run ({', '.join(held)}): add --resume to continue it, "
                        f"or pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create the folder ({_why(e)})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: the folder is not writable")
    _RUN["out"] = out
    if os.environ.get("RANK", "0") != "0":
        return
    _take_lock(out)
    log = out / "metrics.jsonl"
    if not (out / "checkpoint.pt").exists() and log.is_file() and log.stat().st_size:
        print(f"note: --out {out}: the run there stopped before its first checkpoint; this run starts it again "
              f"at step 0 (its metrics.jsonl emptied)")
        save_atomic("", log)


def _take_lock(out):
    lock = out / "run.lock"
    for _ in range(2):  # a stale lock is removed once, then taken like a free one
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if lock.is_dir() or not lock.is_file():
                raise DataError(f"--out {out}: {lock} is not a lock file (a folder?); remove it") from None
            try:
                text = lock.read_text().strip()
                pid = int(text) if text.isascii() and text.isdigit() else 0
            except (OSError, ValueError):
                pid = 0
            if 0 < pid <= _PID_MAX and pid != os.getpid() and _alive(pid):
                raise DataError(f"--out {out}: another run (pid {pid}) is writing there; wait for it to end, pass "
                                f"another --out, or delete {lock} if no run is") from None
            try:
                lock.unlink(missing_ok=True)
            except OSError as e:
                raise DataError(f"--out {out}: cannot take over {lock} ({_why(e)})") from None
            continue
        except OSError as e:
            raise DataError(f"--out {out}: cannot write there ({_why(e)})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        _LOCKS.append(lock)
        return
    raise DataError(f"--out {out}: cannot take {lock}")


def release_out_dirs():
    """Remove the lock files this process took with claim_out_dir (run at exit)."""
    while _LOCKS:
        lock = _LOCKS.pop()
        try:
            if int(lock.read_text().strip() or 0) == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass


atexit.register(release_out_dirs)


def resume_point(out):
    """--resume: the checkpoint to continue, or None where --out holds a run that stopped before its first one (it
    is then started again at step 0 with the flags given, saying so). A DataError where there is nothing to resume:
    no such folder, or a finished run whose checkpoint is gone."""
    path = out / "checkpoint.pt"
    if os.path.lexists(path):
        return path
    if not out.is_dir():
        raise DataError(f"--resume: no checkpoint at {path} (no such folder)")
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held:
        raise DataError(f"--resume: no checkpoint at {path}, but {', '.join(held)}: a finished run, nothing to "
                        f"continue")
    print(f"note: --resume: {out} holds no checkpoint (its run stopped before the first): starting at step 0 with "
          f"the flags given")
    return None


def trim_metrics(path, *, step):
    """On resume: drop the lines of metrics.jsonl past the checkpoint's step. A log line is written just before
    its checkpoint, so a run killed between the two leaves a line that the resumed run would write again.
    A last line without its newline (half-written) is dropped too; a whole line that is not UTF-8 JSON was not
    written by a run and is refused, naming its line. The file is rewritten only if needed, and only by rank 0
    under torchrun (the one that writes it)."""
    path = Path(path)
    if not path.is_file() or os.environ.get("RANK", "0") != "0":
        return
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    keep = []
    for i, line in enumerate(lines[:-1]):  # the part after the last newline is a half-written line, or nothing
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, RecursionError, ValueError):
            raise DataError(f"{path}:{i + 1}: not a UTF-8 JSON line of a run; fix or remove it, then --resume") \
                from None
        if isinstance(rec, dict) and _number(rec.get("step")) and rec["step"] <= step:
            keep.append(line + b"\n")
    if b"".join(keep) != raw:
        save_atomic(b"".join(keep).decode("utf-8"), path)


def save_atomic(obj, path, *, step=None, released=False):
    """Write obj to path through path.tmp and a rename, with SIGINT and SIGTERM held meanwhile: a crash or a
    signal never leaves half a file, and an interruption comes after it. A str is written as text, anything
    else with torch.save. step: the checkpoint's step, released: the last file of the release, for the line an
    interruption prints."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with signals_held():
        try:
            tmp.write_text(obj, encoding="utf-8") if isinstance(obj, str) else torch.save(obj, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write {path} ({_why(e)[:160]})") from None
        if step is not None:
            _RUN["step"] = step
        _RUN["released"] = _RUN["released"] or released


def _torch_load(path, where):
    """torch.load(weights_only=True) of a regular file, or one DataError line naming `where`: missing, 0 bytes, a
    folder or a FIFO, truncated, or a pickle that holds anything but tensors and plain containers (refused unread:
    such a file is never loaded, so the message does not offer torch's way round the refusal)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{where}: no such file")
    if path.is_dir():
        raise DataError(f"{where}: a folder, not a checkpoint file")
    if not stat.S_ISREG(path.stat().st_mode):
        raise DataError(f"{where}: not a plain file (a FIFO or a device), not a checkpoint")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: empty file (0 bytes), not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error line says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message offers weights_only=False, which would run the payload
        what = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it would import {what.group(1)}" if what else "not a pickle of tensors and plain containers"
        raise DataError(f"{where}: refused, not loaded ({what}); checkpoints of this project hold only "
                        f"tensors, numbers, strings, lists and dicts") from None
    except Exception as e:  # a truncated zip, a text file: torch's words, unless they mention weights_only
        why = "" if "weights_only" in str(e) else f" ({_why(e).split('. ')[0][:120]})"
        raise DataError(f"{where}: not a readable checkpoint (truncated, or not written by torch.save){why}") from None


CHECKPOINT_KEYS = ("model", "optimizer", "args", "step", "accountant", "rng")  # what --resume reads
_SCRIPT_FLAGS = {"mae_dp": "syn_steps", "cap_dp": "max_len", "clip_dp": "micro_batch", "randp": "lp_steps"}
_SCRIPT_KEYS = {"randp": ("ema",)}  # what one script's --resume reads besides CHECKPOINT_KEYS


def checkpoint_script(ckpt):
    """The stem of the script that wrote a checkpoint dict: its "script" key, or for a checkpoint written before
    that key, the script whose own flag its args hold; None when neither says (a bare state_dict)."""
    if isinstance(ckpt.get("script"), str):
        return ckpt["script"]
    args = ckpt.get("args")
    return next((s for s, flag in _SCRIPT_FLAGS.items() if isinstance(args, dict) and flag in args), None)


def _tensors(x):
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items())


def _checkpoint_fields(ckpt):
    """What is wrong with the types of a --resume checkpoint's fields, or None."""
    opt, rng, init = ckpt["optimizer"], ckpt["rng"], ckpt.get("init")
    for bad, what in (
            (not _tensors(ckpt["model"]), "model is not a dict of tensors"),
            (not isinstance(opt, dict) or not isinstance(opt.get("state"), dict)
             or not isinstance(opt.get("param_groups"), list)
             or not all(isinstance(g, dict) for g in opt["param_groups"]), "optimizer is not an optimizer's state"),
            (not isinstance(ckpt["args"], dict), "args is not a dict"),
            (not isinstance(ckpt["step"], int) or isinstance(ckpt["step"], bool) or ckpt["step"] < 0,
             f"step {ckpt['step']!r} is not a whole number >= 0"),
            (not isinstance(ckpt["accountant"], dict), "accountant is not an accountant's state"),
            (not isinstance(rng, (list, tuple)) or len(rng) not in (3, 4)
             or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in rng),
             "rng is not 3 or 4 generator states"),
            (ckpt.get("audit") is not None and not isinstance(ckpt.get("audit"), dict),
             "audit is not an audit's state"),
            ("init" in ckpt and not (isinstance(init, dict) and set(init) == {"prior", "note", "pipeline"}
                                     and (init["prior"] is None or isinstance(init["prior"], dict))
                                     and (init["note"] is None or isinstance(init["note"], str))
                                     and isinstance(init["pipeline"], list)
                                     and all(isinstance(p, dict) for p in init["pipeline"])),
             "init is not the record of an --init run"),
            ("ema" in ckpt and not _tensors(ckpt.get("ema")), "ema is not a dict of tensors")):
        if bad:
            return what
    return None


def load_checkpoint(path, *, flag, script, keys=CHECKPOINT_KEYS):
    """Read the checkpoint that `flag` (--resume or --init) names, with torch.load(weights_only=True), or raise one
    DataError line naming the flag and the file: anything _torch_load refuses, not a dict (a bare tensor), a dict
    without `keys` (and the writing script's own, _SCRIPT_KEYS), a checkpoint of a script not in `script` (a stem
    or a tuple of stems), or (--resume) a field of the wrong type. keys=() asks only for weights: a dict with a
    "model" state_dict, or a bare state_dict (a dict of tensors, e.g. the ViP-Syn cache)."""
    path = Path(path)
    scripts = (script,) if isinstance(script, str) else tuple(script)
    where = f"{flag} {path}"
    ckpt = _torch_load(path, where)
    if not isinstance(ckpt, dict):
        raise DataError(f"{where}: holds a {type(ckpt).__name__}, not a checkpoint dict of {'/'.join(scripts)}.py")
    wrote = checkpoint_script(ckpt)
    if wrote is not None and wrote not in scripts:
        raise DataError(f"{where}: a checkpoint of {wrote}.py; this flag takes one of {'/'.join(scripts)}.py")
    keys = (*keys, *(_SCRIPT_KEYS.get(scripts[0], ()) if keys else ()))
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise DataError(f"{where}: not a checkpoint of {'/'.join(scripts)}.py (no {', '.join(missing)})")
    if not isinstance(ckpt.get("args", {}), dict) or not isinstance(ckpt.get("step", 0), int):
        raise DataError(f"{where}: not a checkpoint of {'/'.join(scripts)}.py (its args or step have the wrong type)")
    if keys:
        wrong = _checkpoint_fields(ckpt)
        if wrong:
            raise DataError(f"{where}: not a checkpoint this run can continue ({wrong})")
        if flag == "--resume":
            _RUN["step"] = ckpt["step"]
    elif not (_tensors(ckpt) or _tensors(ckpt.get("model"))):
        raise DataError(f"{where}: neither a checkpoint of {'/'.join(scripts)}.py nor a state_dict of tensors")
    return ckpt


def check_run_args(parser, run, *, where):
    """The flags a checkpoint's run recorded (its "args") against the script's argparse: each value of the type its
    flag parses to (a whole number for an int flag, one of its choices, a bool for a switch), so that a hand-edited
    `steps: "two"` is one line here instead of a traceback later. Keys the parser does not know are left alone."""
    for a in parser._actions:
        if a.dest not in run or a.dest == "help":
            continue
        v, name = run[a.dest], f"--{a.dest.replace('_', '-')}"
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            ok = isinstance(v, bool)
        elif a.choices is not None:
            ok = v in a.choices
        elif a.type is int:
            ok = isinstance(v, int) and not isinstance(v, bool) or (v is None and a.default is None)
        elif a.type is float:
            ok = _number(v) or (v is None and a.default is None)
        else:
            ok = isinstance(v, str) or (v is None and a.default is None)
        if not ok:
            raise DataError(f"{where}: its run's {name} is {v!r}, not a value {name} takes")


def load_weights(module, state, *, where, missing_ok=()):
    """module.load_state_dict(state), strictly; a mismatch (another --model, --patch or --size, a foreign file) is
    one DataError line naming `where` (e.g. "--init PATH") instead of torch's many lines. missing_ok: prefixes of
    the module's keys that state may lack (randp's prior holds the body, not the head); nothing else may be missing
    or extra, so weights are never silently left at their random init."""
    if not _tensors(state):
        raise DataError(f"{where}: its weights are not a dict of tensors")
    expected = set(module.state_dict())
    missing = sorted(k for k in expected - set(state) if not k.startswith(tuple(missing_ok)))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise DataError(f"{where}: weights do not fit this model (missing {', '.join(missing[:3]) or 'none'}; "
                        f"unexpected {', '.join(extra[:3]) or 'none'}); pass the --model, --patch, --size (and "
                        f"--width) of the run that wrote them")
    try:
        module.load_state_dict(state, strict=not missing_ok)
    except RuntimeError as e:
        raise DataError(f"{where}: weights do not fit this model; pass the --model, --patch and --size of the run "
                        f"that wrote them ({_why(e)[:200]})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DataError(f"{where}: weight {bad} holds NaN or inf")


_OPTIMIZER_HYPER = ("betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad", "maximize")


def _load_optimizer(opt, state, where):
    """opt.load_state_dict(state) after checking it against opt: the same groups and parameters, this run's
    hyperparameters (the learning rate aside: it is set every step from the schedule), and each parameter's state
    tensors of that parameter's shape."""
    mine = opt.state_dict()["param_groups"]
    groups = state["param_groups"]
    if len(groups) != len(mine) or any(not isinstance(g.get("params"), list) or len(g["params"]) != len(m["params"])
                                       for g, m in zip(groups, mine)):
        raise DataError(f"{where}: its optimizer holds other parameter groups than this model's")
    for g, m in zip(groups, mine):
        for k in _OPTIMIZER_HYPER:
            if k in m and (k not in g or (tuple(g[k]) if isinstance(m[k], tuple) and isinstance(g[k], (list, tuple))
                                          else g[k]) != m[k]):
                raise DataError(f"{where}: its optimizer's {k} is {g.get(k)!r}, this run's {m[k]!r} (hand-edited?)")
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise DataError(f"{where}: its optimizer state does not fit ({_why(e)[:160]})") from None
    for group in opt.param_groups:
        for p in group["params"]:
            for k, t in opt.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and (t.dim() and t.shape != p.shape or not torch.isfinite(t).all()):
                    raise DataError(f"{where}: its optimizer's {k} has shape {tuple(t.shape)} or non-finite values, "
                                    f"for a parameter of shape {tuple(p.shape)}")


def restore_checkpoint(ckpt, *, where, model, opt, accountant, audit, gens, q, sigma):
    """Load a --resume checkpoint (its field types checked by load_checkpoint) into this run's model, optimiser,
    accountant, audit and generators, each checked against what the run expects, or raise one DataError line:
    weights that do not fit, another optimiser, an accountant that is not the earlier runs' (already in
    `accountant`) followed by `step` steps at this run's (q, sigma) (its args' privacy flags were edited, or the
    step), an audit of another size, generator states of another kind, an EMA of other shapes. Then the log is
    trimmed to the checkpoint's step (trim_metrics). Returns the step."""
    step = ckpt["step"]
    load_weights(model, ckpt["model"], where=where)
    _load_optimizer(opt, ckpt["optimizer"], where)
    expected = type(accountant)()
    expected.load_state_dict(accountant.state_dict())
    expected.step(q=q, sigma=sigma, steps=step)
    try:
        accountant.load_state_dict(ckpt["accountant"])
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{where}: its accountant is not an accountant's state ({_why(e)[:120]})") from None
    same = len(accountant.history) == len(expected.history) and all(
        n == m and math.isclose(a, c, rel_tol=1e-9) and math.isclose(b, d, rel_tol=1e-9)
        for (a, b, n), (c, d, m) in zip(accountant.history, expected.history))
    if not same:
        raise DataError(f"{where}: its accountant ran {accountant.history}, not this run's {step} steps at q={q:.6g}, "
                        f"sigma={sigma:.6g} (were its args or step edited?)")
    if audit:
        a = ckpt.get("audit")
        scores = a.get("scores") if isinstance(a, dict) else None
        if not (isinstance(scores, list) and len(scores) == audit.m and all(_number(s) and math.isfinite(s)
                                                                           for s in scores)):
            raise DataError(f"{where}: its audit state is not that of --audit {audit.m}")
        try:
            audit.load_state_dict(a)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: {_why(e)[:160]}") from None
    # [sample, noise, torch] states (a list of four also holds augmentation generators' states, which nothing reads:
    # the augmentations are a function of the step); the same sample stream on every rank
    states = (ckpt["rng"][0], ckpt["rng"][-2], ckpt["rng"][-1])
    for what, g, s in zip(("sampling", "noise", "torch"), (*gens, None), states):
        try:
            g.set_state(s) if g is not None else torch.set_rng_state(s)
        except (RuntimeError, TypeError, ValueError):
            raise DataError(f"{where}: its {what} generator state does not fit this run's (written on another kind "
                            f"of --device?)") from None
    if "ema" in ckpt:
        shapes = {k: v.shape for k, v in model.named_parameters()}
        if {k: v.shape for k, v in ckpt["ema"].items()} != shapes:
            raise DataError(f"{where}: its ema does not hold this model's parameters")
    _RUN["step"] = step
    if _RUN["out"] is not None:  # only now that the checkpoint is known good: a refused one leaves the log as it was
        trim_metrics(_RUN["out"] / "metrics.jsonl", step=step)
    return step


def read_cache(path):
    """A cached public stage (runs/cache/*.pt: a state_dict of tensors, a function of its flags) or None when it is
    not built yet. Read like a checkpoint (weights_only, one DataError line naming the file, which may simply be
    deleted to be rebuilt), and its folder checked before the stage is trained rather than after."""
    path = Path(path)
    for p in [path.parent, *path.parent.parents]:
        if p.exists() and not p.is_dir():
            raise DataError(f"{p} is a file, where the cache folder {path.parent} goes; move it away")
    if not os.path.lexists(path):
        return None
    try:
        state = _torch_load(path, f"cache {path}")
    except DataError as e:
        raise DataError(f"{e}; delete it to rebuild it") from None
    if not _tensors(state):
        raise DataError(f"cache {path}: not a state_dict of tensors; delete it to rebuild it")
    return state


def write_cache(path, state):
    """Keep a public stage's weights for the next run with the same flags; a cache that cannot be written only costs
    the next run the time to build it again (a warning)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(state, path)
    except (OSError, DataError) as e:
        print(f"warning: cache {path} not written ({str(e)[:160]}); the next run builds it again", file=sys.stderr)


def check_labels(ds, *, flag):
    """The number of classes of a labelled set a classifier trains on, or one DataError line naming `flag`: labels
    outside [0, number of classes), or a single class (an accuracy of 1.0 would mean nothing)."""
    k = len(ds.classes) if ds.classes else int(ds.labels.max()) + 1
    if ds.labels.min() < 0 or ds.labels.max() >= k:
        raise DataError(f"{flag}: labels outside the {k} classes 0-{k - 1} (min {int(ds.labels.min())}, "
                        f"max {int(ds.labels.max())})")
    if len(ds.labels.unique()) < 2:
        raise DataError(f"{flag}: every example has the same label: nothing to classify")
    return k


def check_captions(ds, *, flag):
    """Captioned data for a text loss: all captions empty is a DataError (nothing to learn from the text); some
    empty is a warning with their count on stderr (they still train, on BOS and EOS alone)."""
    empty = sum(not c.strip() for c in ds.captions)
    if empty == len(ds.captions):
        raise DataError(f"{flag}: every caption is empty")
    if empty and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it once
        print(f"warning: {flag}: {empty} of {len(ds.captions)} captions are empty", file=sys.stderr)


# -----------------------------------------------------------------------------
# file formats: readers for datasets on disk (nothing here matters for privacy)
# Decoding first, then one reader per format, each returning an ImageDataset; load_dataset picks one.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_SPLIT_DIRS = {"train": ("train", "training"), "test": ("test", "val", "validation")}


def _fit(img, size):
    """PIL image -> uint8 [C, size, size]: resize the short side to size (bicubic), then centre crop."""
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return a[None] if a.dim() == 2 else a.permute(2, 0, 1)


def _decode(source, size, name, mode="RGB"):
    """Decode a path or bytes with Pillow -> uint8 [C, size, size]; any failure is a DataError naming `name`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.format == "JPEG":
                img.draft(mode, (size, size))  # let libjpeg decode big images at 1/2..1/8 scale: much faster
            return _fit(img.convert(mode), size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot read image ({_why(e)})") from None


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def _check_image(source, name):
    """Open an image (a path or bytes) as far as its header, and check that a JPEG or PNG is not cut short: its end
    marker among its last bytes, else a full decode decides. Any failure is a DataError naming `name`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            end = _END_MARKERS.get(img.format)
            if end is not None:
                if isinstance(source, bytes):
                    tail = source[-64:]
                else:
                    with open(source, "rb") as f:
                        f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
                        tail = f.read()
                if end not in tail:
                    img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot read image ({_why(e)})") from None


def _resize_pixels(x, size):
    """uint8 [N, C, h, w] in memory -> [N, C, size, size] (short side, antialiased bilinear, centre crop)."""
    if x.shape[-2:] == (size, size):
        return x
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    out = []
    for c in x.split(4096):
        y = F.interpolate(c.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        t, l = (nh - size) // 2, (nw - size) // 2
        out.append(y[..., t:t + size, l:l + size].round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _split_root(root, split, what):
    """root/<split> when the data has split folders; root itself for train when it has none."""
    if split not in _SPLIT_DIRS:
        raise DataError(f"{root}: unknown split {split!r} (use train or test)")
    for d in _SPLIT_DIRS[split]:
        if (root / d).is_dir():
            return root / d
    if split == "train":
        return root
    raise DataError(f"{root}: no {split} split (put the {what} under {root}/train and {root}/test)")


def _lazy(name, size, files, channels=3, **kw):
    """A dataset that decodes files[i] (a path, or a webdataset (shard, key, offset, length)) on demand."""
    def source(i):
        f = files[i]
        if isinstance(f, tuple):  # webdataset member: one seek and one read in a plain file
            shard, key, offset, length = f
            with open(shard, "rb") as fh:
                fh.seek(offset)
                return fh.read(length), f"{shard}:{key}"
        return f, str(f)
    def decode(i):
        data, where = source(i)
        return _decode(data, size, where)
    return ImageDataset(name, size=size, channels=channels, n=len(files), decode=decode,
                        check=lambda i: _check_image(*source(i)), **kw)


# --- CIFAR-10 / CIFAR-100 python pickles, read with a restricted unpickler

_PICKLE_ALLOWED = {  # everything the CIFAR pickles' numpy arrays need, and nothing that can run code
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in pickle protocol 2: a pure str -> bytes function
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise DataError(f"{self.source}: refused to unpickle {module}.{name} (only numpy arrays are allowed)")
        module = module.replace("numpy.core.", "numpy._core.")  # numpy >= 2 moved numpy.core to numpy._core
        return getattr(importlib.import_module(module), name)


def _unpickle(fileobj, source):
    u = _RestrictedUnpickler(fileobj, encoding="bytes")
    u.source = source
    try:
        d = u.load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{source}: not a readable CIFAR pickle ({_why(e)})") from None
    if not isinstance(d, dict):
        raise DataError(f"{source}: not a CIFAR pickle (expected a dict, got {type(d).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_files(path):
    """{basename: opener} for a CIFAR folder (or a folder holding one) or a CIFAR .tar.gz."""
    names = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta", "train", "test", "meta"}
    if path.is_dir():
        for d in [path] + sorted(p for p in path.iterdir() if p.is_dir()):
            found = {p.name: p for p in d.iterdir() if p.is_file() and p.name in names}
            if "data_batch_1" in found or ("train" in found and "meta" in found):
                return {k: (lambda p=p: open(p, "rb")) for k, p in found.items()}, {k: str(p) for k, p in found.items()}
        return None, None
    if not tarfile.is_tarfile(path):
        return None, None
    tar = tarfile.open(path)
    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
    if "data_batch_1" in members or ("train" in members and "meta" in members):
        return ({k: (lambda m=m: tar.extractfile(m)) for k, m in members.items()},
                {k: f"{path}:{m.name}" for k, m in members.items()})
    return None, None


def _load_cifar(path, split, size, opener, where):
    c10 = "data_batch_1" in opener
    if c10:
        parts = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_name, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        parts, meta_name, label_key, names_key = [split], "meta", "fine_labels", "fine_label_names"
    xs, ys = [], []
    for p in parts:
        if p not in opener:
            raise DataError(f"{path}: CIFAR file {p} is missing")
        with opener[p]() as f:
            d = _unpickle(f, where[p])
        x, y = d.get("data"), d.get(label_key)
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32):
            raise DataError(f"{where[p]}: not a CIFAR batch ('data' must be a uint8 array of rows of 3072 pixels, "
                            f"got {_kind(x)})")
        if isinstance(y, np.ndarray) and y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            y = y.tolist()
        if not (isinstance(y, (list, tuple)) and all(_whole(v) for v in y)):
            raise DataError(f"{where[p]}: not a CIFAR batch ('{label_key}' must be a list of whole numbers, got "
                            f"{_kind(y)})")
        if len(y) != len(x):
            raise DataError(f"{where[p]}: {len(x)} images but {len(y)} labels: they would train misaligned")
        xs.append(torch.from_numpy(x.reshape(-1, 3, 32, 32)))
        ys.append(torch.tensor([int(v) for v in y], dtype=torch.long))
    classes = None
    if meta_name in opener:
        with opener[meta_name]() as f:
            names = _unpickle(f, where[meta_name]).get(names_key)
        if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(c, (bytes, str))
                                                                               for c in names)):
            raise DataError(f"{where[meta_name]}: '{names_key}' must be a list of class names, got {_kind(names)}")
        classes = [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in names] if names else None
    k = len(classes) if classes else (10 if c10 else 100)
    labels = torch.cat(ys)
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{path}: CIFAR labels {int(labels.min())}..{int(labels.max())} outside the {k} classes")
    name = f"{'cifar10' if c10 else 'cifar100'}-{split}"
    return ImageDataset(name, size=size, channels=3, pixels=_resize_pixels(torch.cat(xs), size),
                        labels=labels, classes=classes)


# --- MNIST / Fashion-MNIST IDX files (raw or .gz); grey stays 1-channel

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _read_idx(path):
    """IDX file (raw or gzip) -> uint8 numpy array of the shape its header gives."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # a corrupt .gz body is a zlib.error
        raise DataError(f"{path}: cannot read ({_why(e)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    nd = raw[3]
    if not 1 <= nd <= 3:  # MNIST's formats: labels have 1 dimension, images 3
        raise DataError(f"{path}: IDX header gives {nd} dimensions (expected 1 for labels, 3 for images)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    if len(raw) < 4 + 4 * nd or 0 in dims:
        why = "cut short" if len(raw) < 4 + 4 * nd else "a zero dimension, no examples"
        raise DataError(f"{path}: IDX header gives dimensions {dims}: {why}")
    body = raw[4 + 4 * nd:]
    if len(body) != math.prod(dims):
        raise DataError(f"{path}: corrupt IDX file (header says {dims}, {len(body)} bytes follow)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _load_idx(root, split, size):
    prefix = "train" if split == "train" else "t10k"

    def find(kind):
        for suffix in ("", ".gz"):
            for sep in ("-", "."):
                p = root / f"{prefix}-{kind}{sep}ubyte{suffix}"
                if p.is_file():
                    return p
        raise DataError(f"{root}: missing {prefix}-{kind}-ubyte[.gz] for split {split}")

    if split not in _SPLIT_DIRS:
        raise DataError(f"{root}: unknown split {split!r} (use train or test)")
    x = _read_idx(find("images-idx3"))
    y = _read_idx(find("labels-idx1"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{root}: IDX images {x.shape} and labels {y.shape} do not match")
    fashion = "fashion" in str(root).lower()
    if y.max(initial=0) >= 10:
        raise DataError(f"{find('labels-idx1')}: label {int(y.max())} outside the 10 classes 0-9")
    pixels = _resize_pixels(torch.from_numpy(x.copy())[:, None], size)
    return ImageDataset(f"{'fashion-mnist' if fashion else 'mnist'}-{split}", size=size, channels=1, pixels=pixels,
                        labels=torch.from_numpy(y.astype(np.int64)),
                        classes=FASHION_CLASSES if fashion else [str(i) for i in range(10)])


# --- image folders: root[/train|test]/<class>/*.jpg|png|webp (or images directly under root: unlabelled)


def _images_in(d):
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _load_folder(root, split, size):
    base = _split_root(root, split, "class folders")
    class_dirs, split_names = set(), {s for ss in _SPLIT_DIRS.values() for s in ss}
    for d in [root] + [root / s for ss in _SPLIT_DIRS.values() for s in ss if (root / s).is_dir()]:
        class_dirs |= {p.name for p in d.iterdir() if p.is_dir() and p.name not in split_names}
    classes = sorted(class_dirs)
    files, labels = [], []
    for ci, c in enumerate(classes):
        if (base / c).is_dir():
            got = _images_in(base / c)
            files += got
            labels += [ci] * len(got)
    if files:
        return _lazy(f"{root.name}-{split}", size, files, labels=torch.tensor(labels), classes=classes)
    files = _images_in(base)
    if not files:
        raise DataError(f"{base}: no images found (expected <class>/*.jpg|png|webp)")
    return _lazy(f"{root.name}-{split}", size, files)


# --- COCO captions: annotations/captions_<split>*.json + <split>*/ image folder


def _load_coco(json_path, size):
    try:
        d = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except RecursionError:
        raise DataError(f"{json_path}: JSON nested too deep to be a COCO captions file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path}: not a COCO captions file ({_why(e)})") from None
    if not (isinstance(d, dict) and isinstance(d.get("images"), list) and isinstance(d.get("annotations"), list)):
        raise DataError(f"{json_path}: not a COCO captions file (expected an object with the lists \"images\" and "
                        f"\"annotations\")")
    images = {}
    for k, im in enumerate(d["images"]):
        if not (isinstance(im, dict) and _whole(im.get("id")) and _text(im.get("file_name")) and im["file_name"]):
            raise DataError(f"{json_path}: images[{k}] needs an integer id and a file_name string (valid Unicode), "
                            f"got {ascii(im)[:80]}")
        if im["id"] in images:
            raise DataError(f"{json_path}: images[{k}]: id {im['id']} is given twice")
        images[im["id"]] = im["file_name"]
    for k, a in enumerate(d["annotations"]):
        if not (isinstance(a, dict) and _whole(a.get("image_id")) and _text(a.get("caption"))
                and (a.get("id") is None or _whole(a["id"]))):
            raise DataError(f"{json_path}: annotations[{k}] needs an integer image_id and a caption string (valid "
                            f"Unicode), got {ascii(a)[:80]}")
    anns = sorted(d["annotations"], key=lambda a: a.get("id") or 0)
    stem = json_path.stem.replace("captions_", "")  # captions_train2017 -> train2017
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    img_dir = next((d for d in (root / stem, root / "images" / stem, root / "images", root) if d.is_dir()), root)
    caps = {}
    for a in anns:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    ids = sorted(i for i in images if i in caps)
    if not ids:
        raise DataError(f"{json_path}: no captioned images")
    files = [img_dir / images[i] for i in ids]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise DataError(f"{missing}: image listed in {json_path.name} not found")
    ds = _lazy(f"coco-{stem}", size, files, captions=[caps[i][0] for i in ids])
    ds.all_captions = [caps[i] for i in ids]
    return ds


def _coco_json(root, split):
    d = root / "annotations" if (root / "annotations").is_dir() else root
    cands = sorted(d.glob("captions_*.json"))
    for s in _SPLIT_DIRS.get(split, (split,)):
        hit = [p for p in cands if p.stem[len("captions_"):].startswith(s)]
        if hit:
            return hit[0]
    if cands:
        raise DataError(f"{d}: no captions_{split}*.json (found {', '.join(p.name for p in cands)})")
    return None


# --- webdataset shards (img2dataset: key.jpg|png|webp + key.txt [+ key.cls]), indexed by member offsets

INDEX_VERSION = 1


def _index_path(shard):
    side = shard.with_name(shard.name + ".idx.json")
    if side.exists() or _writable(shard.parent):
        return side
    h = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "dp-repr" / f"{shard.stem}-{h}.idx.json"


def _writable(d):
    return os.access(d, os.W_OK)


def _shard_index(shard):
    """[(key, offset, length, caption|None, cls|None)] for one tar shard; cached as JSON, keyed on size+mtime."""
    st = shard.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    ip = _index_path(shard)
    try:  # a cache, so never trusted: an index that does not describe its shard is rebuilt
        cached = json.loads(ip.read_text(encoding="utf-8"))
        if cached.get("version") == INDEX_VERSION and cached.get("stamp") == stamp and _index_fits(cached["entries"],
                                                                                                st.st_size):
            return [tuple(e) for e in cached["entries"]]
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        pass
    samples = {}
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key, ext = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1].lower()
                s = samples.setdefault(key, {})
                if "." + ext in IMAGE_EXTS:
                    s["img"] = (m.offset_data, m.size)
                elif ext in ("txt", "cls"):
                    s[ext] = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{shard}: not a readable tar shard ({_why(e)})") from None
    entries = []
    for key, s in samples.items():
        if "img" in s:
            cls = s.get("cls")
            if cls is not None and not re.fullmatch(r"-?[0-9]+", cls):
                raise DataError(f"{shard}:{key}.cls: {ascii(cls)[:40]} is not a whole-number class label")
            entries.append((key, s["img"][0], s["img"][1], s.get("txt"), None if cls is None else int(cls)))
    try:
        ip.parent.mkdir(parents=True, exist_ok=True)
        tmp = ip.with_name(ip.name + ".tmp")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "stamp": stamp, "entries": entries}))
        tmp.replace(ip)
    except OSError:
        pass  # an unwritable cache only costs a re-index next time
    return entries


def _index_fits(entries, shard_size):
    """A cached index's entries as _shard_index writes them, each member inside its shard."""
    return isinstance(entries, list) and all(
        isinstance(e, list) and len(e) == 5 and _text(e[0]) and _whole(e[1]) and _whole(e[2]) and e[1] >= 0
        and e[2] > 0 and e[1] + e[2] <= shard_size and (e[3] is None or _text(e[3])) and (e[4] is None or _whole(e[4]))
        for e in entries)


def _load_webdataset(shards, name, size):
    files, captions, labels = [], [], []
    for shard in shards:
        for key, off, length, cap, cls in _shard_index(shard):
            files.append((str(shard), key, off, length))
            captions.append(cap)
            labels.append(cls)
    if not files:
        raise DataError(f"{name}: no image samples in {len(shards)} tar shard(s)")
    has_cap = any(c is not None for c in captions)
    has_cls = all(c is not None for c in labels)
    return _lazy(name, size, files, captions=[c or "" for c in captions] if has_cap else None,
                 labels=torch.tensor(labels) if has_cls else None)


# --- TSV/CSV: image_path<TAB>caption (CSV: comma), paths relative to the file; an optional header row


def _load_table(path, size):
    delim = "," if path.suffix.lower() == ".csv" else "\t"
    try:  # bytes, then utf-8-sig: a spreadsheet's byte-order mark is not part of the first field, and no \r is
        text = path.read_bytes().decode("utf-8-sig")  # turned into a row end (as text mode's newlines would)
        # rows end at \n (a \r\n ending loses its \r); a \r inside a row is a space of its caption, not a row end
        lines = [(line[:-1] if line.endswith("\r") else line).replace("\r", " ") for line in text.split("\n")]
        rows = list(csv.reader(lines, delimiter=delim))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read table ({_why(e)})") from None
    rows = [(i + 1, r) for i, r in enumerate(rows) if r and any(x.strip() for x in r)]
    if rows and rows[0][1][0].strip().lower() in ("image", "image_path", "path", "filepath", "file", "filename", "url"):
        rows = rows[1:]
    files, captions = [], []
    for line, r in rows:
        if len(r) < 2:
            raise DataError(f"{path}:{line}: expected image_path{'<TAB>' if delim != ',' else ','}caption")
        f = Path(r[0].strip())
        f = f if f.is_absolute() else path.parent / f
        if not f.is_file():
            raise DataError(f"{path}:{line}: image {f} {'is not a plain file' if f.exists() else 'not found'}")
        files.append(f)
        captions.append(delim.join(r[1:]).strip())
    if not files:
        raise DataError(f"{path}: no rows (expected image_path<TAB>caption lines)")
    return _lazy(path.stem, size, files, captions=captions)


# --- load_dataset: the one entry point


def _suffix(path):
    """A file's format suffix, lower case; .tar.gz counts as one."""
    return "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".tar.gz") else path.suffix.lower()


def _cifar(path, split):
    """(opener, where) of the CIFAR files in path, or None."""
    opener, where = _cifar_files(path)
    return (opener, where) if opener else None


def _load_shards(path, split, size, hit):
    base = _split_root(path, split, "shards")
    shards = sorted(p for p in base.glob("*.tar") if p.is_file())
    if not shards:
        raise DataError(f"{base}: no .tar shards")
    return _load_webdataset(shards, f"{path.name}-{split}", size)


def _load_tables(path, split, size, tables):
    hit = [p for p in tables if p.stem.lower() in _SPLIT_DIRS.get(split, (split,))]
    if hit:
        return _load_table(hit[0], size)
    if len(tables) == 1 and split == "train":
        return _load_table(tables[0], size)
    raise DataError(f"{path}: no {split}.tsv/.csv among {', '.join(p.name for p in tables)}")


def _not_cifar(path, split, size, hit):
    raise DataError(f"{path}: a .tar.gz that is not CIFAR; extract it first (tar xzf {path.name} -C DIR) "
                    f"and pass DIR")


def _single_image(path, split, size, hit):
    raise DataError(f"{path}: a single image; pass the folder that holds the dataset")


def _unknown_format(path, split, size, hit):
    raise DataError(f"{path}: unknown dataset format (expected a folder, CIFAR .tar.gz, .tar shards, .tsv/.csv "
                    f"or COCO .json)")


def _empty_folder(path, split, size, hit):
    raise DataError(f"{path}: empty folder")


_TARS = (".tar.gz", ".tgz", ".tar")
# (test(path, split), read(path, split, size, hit)), walked in order: the first test that returns a hit (anything
# truthy) wins, and its reader gets the hit, so what a test found (the CIFAR files, the tables) is not looked up
# twice. The last row of each table always matches.
_FILE_READERS = (  # a file, by its suffix
    (lambda p, s: _suffix(p) in (".tsv", ".csv", ".txt"), lambda p, s, size, hit: _load_table(p, size)),
    (lambda p, s: _suffix(p) == ".json", lambda p, s, size, hit: _load_coco(p, size)),
    (lambda p, s: _suffix(p) in _TARS and _cifar(p, s), lambda p, s, size, hit: _load_cifar(p, s, size, *hit)),
    (lambda p, s: _suffix(p) == ".tar", lambda p, s, size, hit: _load_webdataset([p], p.stem, size)),  # shards
    (lambda p, s: _suffix(p) in _TARS, _not_cifar),  # .tar.gz or .tgz
    (lambda p, s: _suffix(p) in IMAGE_EXTS, _single_image),
    (lambda p, s: True, _unknown_format),
)
_FOLDER_READERS = (  # a folder, by what it holds
    (_cifar, lambda p, s, size, hit: _load_cifar(p, s, size, *hit)),
    (lambda p, s: any(p.glob("*idx3-ubyte*")), lambda p, s, size, hit: _load_idx(p, s, size)),
    (_coco_json, lambda p, s, size, hit: _load_coco(hit, size)),  # hit: the captions json for the split
    (lambda p, s: any(p.glob("*.tar")) or any(p.glob("*/*.tar")), _load_shards),
    (lambda p, s: sorted(f for f in p.iterdir() if f.suffix.lower() in (".tsv", ".csv")), _load_tables),
    (lambda p, s: not any(p.iterdir()), _empty_folder),
    (lambda p, s: True, lambda p, s, size, hit: _load_folder(p, s, size)),  # class folders, or images
)


def _detect(path, split, size):
    """Pick the reader for a path (the first row of its table whose test hits); DataError when nothing fits."""
    for test, read in _FILE_READERS if path.is_file() else _FOLDER_READERS:
        hit = test(path, split)
        if hit:
            return read(path, split, size, hit)


EMBEDDED = ("shapes", "shapes3", "shapes-grey")  # the names load_dataset draws instead of reading files


def load_dataset(path_or_name="shapes", *, split="train", size=32, n=None, seed=0):
    """"shapes" (embedded, one object per scene), "shapes3" (one to three objects), "shapes-grey" (shapes in 1
    channel, no captions) or a path to real data (format detected) -> ImageDataset.

    Formats: CIFAR-10/100 pickles (folder or .tar.gz), MNIST/Fashion-MNIST IDX (raw or .gz; 1 channel), image
    folders (root[/train|test]/<class>/*.jpg), COCO (annotations/captions_<split>*.json + images; one example per
    image, caption = its first caption, all of them in ds.all_captions: the privacy unit stays the image),
    webdataset .tar shards (key.jpg + key.txt [+ key.cls]; index cached as <shard>.idx.json), TSV/CSV of
    image_path<TAB>caption. Splits: train / test (test also finds val). n: a seeded random subset of n examples
    (shapes: generate n). seed: the shapes seed, and for real data the seed of that subset. Images are resized
    (short side) and centre-cropped to size x size.
    """
    if path_or_name in ("shapes", "shapes3"):
        return shapes(split, size=size, n=n, seed=seed, objects=1 if path_or_name == "shapes" else 3)
    if path_or_name == "shapes-grey":  # the same scenes as BT.601 luma: a public proxy for grey sets (MNIST-like);
        ds = shapes(split, size=size, n=n, seed=seed)  # labels only, as the captions name colours
        return ImageDataset(f"shapes-grey-{split}", size=size, channels=1, pixels=to_grey(ds.images(range(len(ds)))),
                            labels=ds.labels, classes=ds.classes)
    if size < 1:
        raise DataError(f"size must be positive, got {size}")
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (use 'shapes' or a path to a dataset)")
    try:
        if not (path.is_file() or path.is_dir()):  # reading a FIFO or /dev/zero would wait, or never end
            raise DataError(f"{path}: not a plain file or a folder (a FIFO, device or socket)")
        ds = _detect(path, split, size)
        if n is not None:
            ds = _subset(ds, int(n), seed)
        ds.check_all()
    except OSError as e:  # a folder that cannot be listed or read (permissions, /proc)
        raise DataError(f"{path}: cannot read ({_why(e)})") from None
    return ds


def _subset(ds, n, seed):
    """n examples of ds drawn uniformly without replacement (seeded), kept in dataset order; all of ds when
    n >= len(ds). Not the first n: image-folder trees are sorted by class, so the first n would hold one class.
    The draw depends only on (len(ds), n, seed), never on the data."""
    if n <= 0:
        raise DataError(f"{ds.name}: n must be positive, got {n}")
    if n >= len(ds):
        if n > len(ds):
            print(f"note: {ds.name}: {n} examples asked, it holds {len(ds)}: all of them are used")
        return ds
    g = torch.Generator().manual_seed(_seed_from("subset", seed))
    keep = torch.randperm(len(ds), generator=g)[:n].sort().values
    parent = ds
    out = ImageDataset(ds.name, size=ds.size, channels=ds.channels, n=n,
                       decode=None if ds._pixels is not None else (lambda i: parent.images([int(keep[i])])[0]),
                       check=None if ds._check is None else (lambda i: parent._check(int(keep[i]))),
                       pixels=None if ds._pixels is None else ds._pixels[keep],
                       labels=None if ds.labels is None else ds.labels[keep], classes=ds.classes,
                       captions=None if ds.captions is None else [ds.captions[i] for i in keep.tolist()])
    if hasattr(ds, "all_captions"):
        out.all_captions = [ds.all_captions[i] for i in keep.tolist()]
    return out


if __name__ == "__main__":  # run_main: a Ctrl-C, a closed pipe or a bad environment is one line here too
    sys.exit(run_main(lambda: sys.exit(_grid_main(sys.argv[1:])), torchrun=False))
