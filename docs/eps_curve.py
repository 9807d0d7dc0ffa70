"""A metric against the epsilon each run spent, from the summary.json files of runs that differ in --eps, as one PNG.

    python docs/eps_curve.py OUT.png KEY RUN_DIR...     # KEY: a summary.json field, dots for nesting

e.g. python docs/eps_curve.py docs/clip_eps.png zero_shot_accuracy_not_private runs/clip_dp_eps{1,2,4,8,inf}_s0
A DP run is a point at the eps its summary says it spent ("eps": the accountant's, composed over --init, that of
the B' run for a TAN simulation), not at its --eps target; the points are joined in the order of that eps, evenly
spaced on the x axis, which is labelled with it. A run without DP (--eps inf: eps null, "private": false) is no
point of the curve: it is drawn apart, as a dashed horizontal line labelled as the ceiling. A run labelled not
private for another reason (--debug-no-noise, --insecure-seed) has no place on the figure and is refused.
"""
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def read(run, key):
    """(eps spent or None, the metric, chance or None) of one run."""
    s = json.loads((Path(run) / "summary.json").read_text())
    v = s
    for k in key.split("."):
        v = v[k]
    if not s["private"] and s["eps"] is not None:
        sys.exit(f"error: {run}: not private ({s.get('not_private_reason')}), yet it has an eps: not on a privacy "
                 f"curve")
    return s["eps"], float(v), s.get("chance", s.get("zero_shot_chance"))


def main(out, key, runs):
    read_runs = [read(r, key) for r in runs]
    pts = sorted((p for p in read_runs if p[0] is not None), key=lambda p: p[0])
    ceilings = [v for e, v, _ in read_runs if e is None]
    if not pts:
        sys.exit("error: no DP run among the RUN_DIRs (a curve needs at least one finite eps)")
    W, H, L, R, T, B = 480, 320, 60, 20, 30, 50
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    top = max(0.1, max(v for _, v, _ in read_runs) * 1.15)
    x = lambda i: L + (W - L - R) * (i + 0.5) / len(pts)
    y = lambda v: H - B - (H - T - B) * v / top
    d.line([(L, T), (L, H - B), (W - R, H - B)], fill="black")
    for t in range(0, 101, 10):  # y ticks in percent
        if t / 100 <= top:
            d.line([(L - 4, y(t / 100)), (L, y(t / 100))], fill="black")
            d.text((L - 30, y(t / 100) - 6), f"{t}%", fill="black", font=font)
    chance = read_runs[0][2]
    if chance:
        d.line([(L, y(chance)), (W - R, y(chance))], fill=(160, 160, 160))
        d.text((W - R - 60, y(chance) - 14), "chance", fill=(120, 120, 120), font=font)
    for v in ceilings:  # the same run without DP: a dashed line across, not a point at some eps
        for x0 in range(L, W - R, 12):
            d.line([(x0, y(v)), (min(x0 + 6, W - R), y(v))], fill=(200, 60, 40), width=2)
        d.text((L + 6, y(v) - 14), f"--eps inf (not private): {100 * v:.1f}", fill=(200, 60, 40), font=font)
    xy = [(x(i), y(v)) for i, (_, v, _) in enumerate(pts)]
    if len(xy) > 1:
        d.line(xy, fill=(40, 80, 200), width=2)
    for (e, v, _), (px, py) in zip(pts, xy):
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(40, 80, 200))
        d.text((px - 14, py - 18), f"{100 * v:.1f}", fill="black", font=font)
        d.text((px - 12, H - B + 6), f"{e:.2f}", fill="black", font=font)
    d.text((W // 2 - 50, H - 22), "epsilon spent", fill="black", font=font)
    d.text((L, 8), key, fill="black", font=font)
    img.save(out)
    print(f"wrote {out}: " + ", ".join(f"eps {e:.3f}: {100 * v:.1f}%" for e, v, _ in pts) +
          "".join(f"; ceiling (--eps inf, not private): {100 * v:.1f}%" for v in ceilings))


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
