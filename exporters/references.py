"""The reference logits shipped in ``exporters/reference/`` (written by ``python -m
exporters.reference_logits``), read by the lean verifier (``lean_verify.py``) without torch."""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "reference"
FORMAT = 1


def load_all() -> dict[str, dict]:
    """Shipped reference files by the sha256 of the source they were made from."""
    refs = {}
    for path in sorted(REFERENCE_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") == FORMAT:
            refs[data["source"]["sha256"]] = {**data, "file": path.name}
    return refs
