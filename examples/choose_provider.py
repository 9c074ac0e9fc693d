"""Choose the execution provider: auto (best available, verified), explicit, strict, or by env var.

    python examples/choose_provider.py [auto|cpu|cuda|openvino|amd ...]
    PORTABLE_INFER_PROVIDERS=cpu python examples/choose_provider.py
"""

import sys

import portable_infer
from portable_infer.errors import ProviderError

requested = sys.argv[1] if len(sys.argv) > 1 else "auto"
model = portable_infer.load(providers=requested)  # falls back (with a warning) if it cannot start
print(f"asked for {requested!r}: runs on {model.provider} with the {model.variant} graph")
for key, reason in model.selection.skipped:
    print(f"  skipped {key}: {reason}")

try:
    portable_infer.load(providers="cuda", strict=True)  # strict: raise instead of falling back
except ProviderError as exc:
    print(f"strict cuda: {exc}")
