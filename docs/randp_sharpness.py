"""Why randp's --eps inf needs its own learning rate: the sharpness of the fine-tuning loss after the linear probe.

    python docs/randp_sharpness.py per_feature      # the model's standardisation (feat_std per feature)
    python docs/randp_sharpness.py scalar           # one std for all features (the RMS of the per-feature ones)

Public data only: the embedded shapes set at --seed 1 and its cached seed-1 prior (runs/cache/, built by
`python randp.py --seed 1 --build-prior`). Standardises the features as randp.main does, probes the head for 20
non-private steps at lr 0.5, then on 256 training images prints the per-example gradient norms, the norm of their
mean and of their clipped mean (C = 1), and the top Hessian eigenvalue by power iteration (Hessian-vector products)
over all parameters, the body and the head. Plain SGD is stable below lr 2/eigenvalue; heavy-ball momentum b below
2(1 + b)/eigenvalue. ~1 min at one thread.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import randp as R  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "per_feature"
torch.manual_seed(0)
private = data.load_dataset("shapes", split="train", size=32, n=20000, seed=1)
model = R.WRN(0.5, 10, 3)
prior = Path("runs/cache/randp_prior_v2_wrn16-0.5_c3_s32_200x128_lr0.1_seed1.pt")
model.load_state_dict(torch.load(prior, weights_only=True), strict=False)
public = data.random_process_images(2048, 32, generator=torch.Generator().manual_seed(20_001))
with torch.no_grad():  # as randp.main, seed 1
    f = torch.cat([model.features(data.normalize(x)) for x in public.split(256)])
std = f.std(0)
print(f"per-feature std of the public features: {std.min():.3f} to {std.max():.3f} (median {std.median():.3f}), "
      f"RMS {std.pow(2).mean().sqrt():.3f}")
model.feat_mean.copy_(f.mean(0))
model.feat_std.copy_(std + 1e-3 if mode == "per_feature" else std.pow(2).mean().sqrt().expand_as(std))
with torch.no_grad():
    feats = torch.cat([model.features(data.normalize(private.images(i))) for i in torch.arange(20000).split(1000)])
opt = torch.optim.SGD(model.head.parameters(), lr=0.5)
for _ in range(20):  # a non-private probe, as phase II
    idx = torch.randint(0, 20000, (512,))
    loss = F.cross_entropy(model.head(feats[idx]), private.labels[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"after the probe: loss {loss.item():.3f}")

params = {k: v.detach() for k, v in model.named_parameters()}
buffers = {k: v.detach() for k, v in model.named_buffers()}
idx = torch.randperm(20000)[:256]
x, y = data.normalize(private.images(idx)), private.labels[idx]  # (B, C, H, W), (B,)
g, _ = R.make_per_example_grads(model, R.classify_loss)(params, buffers, (x[:, None], y))
norms = torch.stack([v.flatten(1).norm(dim=1) for v in g.values()]).norm(dim=0)  # (B,)
mean = torch.cat([v.mean(0).flatten() for v in g.values()]).norm()
clipped = torch.cat([(v * (1 / norms).clamp(max=1).view(-1, *[1] * (v.dim() - 1))).mean(0).flatten()
                     for v in g.values()]).norm()
print(f"per-example gradient norm: median {norms.median():.1f} ({norms.min():.1f} to {norms.max():.1f}); "
      f"mean gradient {mean:.3f}, mean clipped gradient {clipped:.3f}")


def loss_of(p):
    return F.cross_entropy(functional_call(model, ({**params, **p}, buffers), (x,)), y)


for part, keys in [("all", list(params)), ("body", [k for k in params if not k.startswith("head.")]),
                   ("head", ["head.weight", "head.bias"])]:
    v = {k: torch.randn_like(params[k]) for k in keys}
    for _ in range(25):  # power iteration: v <- H v / |H v|
        n = torch.cat([t.flatten() for t in v.values()]).norm()
        v = {k: t / n for k, t in v.items()}
        _, hv = jvp(grad(loss_of), ({k: params[k] for k in keys},), (v,))
        top = sum((hv[k] * v[k]).sum() for k in keys).item()
        v = hv
    n = torch.cat([t.flatten() for t in v.values()]).norm()
    where = ", ".join(f"{k} {float(t.norm() / n):.2f}" for k, t in sorted(v.items(), key=lambda kv: -kv[1].norm())[:3])
    print(f"{part}: top Hessian eigenvalue {top:.1f} (SGD stable below lr {2 / top:.3f}; momentum 0.9 below "
          f"{3.8 / top:.3f}); eigenvector mostly {where}")
