"""Shared test setup: the repository root on sys.path, and where the optional real data lives."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ../shared/data beside the checkout (see its README); tests that need it skip when it is absent.
SHARED_DATA = Path(os.environ.get("DP_REPR_SHARED_DATA", ROOT.parent / "shared" / "data"))
