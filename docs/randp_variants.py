"""randp.py with one model-structure choice undone, for re-checking that choice on the public proxy.

    python docs/randp_variants.py VARIANT --seed 1 --eps 3 --data shapes-grey --out OUT   # any randp.py flags

VARIANT: current (randp.py as it is), two_per_group (2 channels per GroupNorm group), layernorm (a per-example
LayerNorm on the pooled features, which randp.py once had), default_init (PyTorch's conv init in the place of He's).
Run each variant from its own folder: the phase I cache is named by the flags, not by the structure.
"""
import sys
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import randp as R  # noqa: E402

variant, flags = sys.argv[1], sys.argv[2:]
if variant == "two_per_group":
    R.norm = lambda c: nn.GroupNorm(max(1, c // 2), c)
elif variant == "layernorm":
    def features(self, x):
        f = F.relu(self.norm(self.blocks(self.stem(x)))).mean((2, 3))
        return (F.layer_norm(f, f.shape[-1:]) - self.feat_mean) / self.feat_std
    R.WRN.features = features
elif variant == "default_init":
    nn.init.kaiming_normal_ = lambda w, **kw: w
elif variant != "current":
    sys.exit(f"error: unknown variant {variant!r}")
R.main(flags)
