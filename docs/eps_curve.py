"""A metric against epsilon, from the summary.json files of runs that differ only in --eps, as one PNG (Pillow).

    python docs/eps_curve.py OUT.png KEY RUN_DIR...     # KEY: a summary.json field, dots for nesting

e.g. python docs/eps_curve.py docs/clip_eps.png zero_shot_accuracy_not_private runs/clip_dp_eps{1,2,4,8,inf}_s0
Each run's eps is its summary's target_eps (inf for --eps inf); the x axis is evenly spaced in the order given.
"""
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def read(run, key):
    s = json.loads((Path(run) / "summary.json").read_text())
    v = s
    for k in key.split("."):
        v = v[k]
    return float(s["target_eps"]), float(v), s.get("chance", s.get("zero_shot_chance"))


def main(out, key, runs):
    pts = [read(r, key) for r in runs]
    W, H, L, R, T, B = 480, 320, 60, 20, 30, 50
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    top = max(0.1, max(v for _, v, _ in pts) * 1.15)
    x = lambda i: L + (W - L - R) * (i + 0.5) / len(pts)
    y = lambda v: H - B - (H - T - B) * v / top
    d.line([(L, T), (L, H - B), (W - R, H - B)], fill="black")
    for t in range(0, 101, 10):  # y ticks in percent
        if t / 100 <= top:
            d.line([(L - 4, y(t / 100)), (L, y(t / 100))], fill="black")
            d.text((L - 30, y(t / 100) - 6), f"{t}%", fill="black", font=font)
    chance = pts[0][2]
    if chance:
        d.line([(L, y(chance)), (W - R, y(chance))], fill=(160, 160, 160))
        d.text((W - R - 60, y(chance) - 14), "chance", fill=(120, 120, 120), font=font)
    xy = [(x(i), y(v)) for i, (_, v, _) in enumerate(pts)]
    d.line(xy, fill=(40, 80, 200), width=2)
    for i, ((e, v, _), (px, py)) in enumerate(zip(pts, xy)):
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(40, 80, 200))
        d.text((px - 14, py - 18), f"{100 * v:.1f}", fill="black", font=font)
        d.text((px - 8, H - B + 6), "inf" if e == float("inf") else f"{e:g}", fill="black", font=font)
    d.text((W // 2 - 20, H - 22), "epsilon", fill="black", font=font)
    d.text((L, 8), key, fill="black", font=font)
    img.save(out)
    print(f"wrote {out}: " + ", ".join(f"eps {e:g}: {100 * v:.1f}%" for e, v, _ in pts))


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
