"""The reference logits shipped in ``exporters/reference/`` (written by ``python -m
exporters.reference_logits``), read by the lean verifier (``lean_verify.py``) without torch."""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "reference"
FORMAT = 1
# The fixed texts of every quality measure: export verification's (verify.verification_ids) and
# the benchmarks' (benchmarks/setup_competitors.py); public-domain prose (texts/README.md)
TEXTS_DIR = REFERENCE_DIR / "texts"
TEXT_TOKENS = 160  # each text's first tokens a measure reads


def quality_texts() -> list[Path]:
    """The fixed texts' files, in their order."""
    return sorted(TEXTS_DIR.glob("*.txt"))


def load_all() -> dict[str, dict]:
    """Shipped reference files by the sha256 of the source they were made from."""
    refs = {}
    for path in sorted(REFERENCE_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") == FORMAT:
            refs[data["source"]["sha256"]] = {**data, "file": path.name}
    return refs
