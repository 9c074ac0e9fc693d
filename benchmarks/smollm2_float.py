"""A float checkpoint of SmolLM2's shape for the CPU comparison: what every HF-folder export runs.

The default model is a Q4_1 GGUF, whose exact graphs are its reference; a float checkpoint's int4
package rounds the weights itself, and its default graph is chosen by the quality gate measured
from that rounding (``portable_infer.package.variants.passes_gate``). There is no model hub here,
so the float checkpoint is a stand-in for SmolLM2's unquantized weights: the GGUF's dequantized
blocks (setup_competitors.py's ``.bench/hf/smollm2``) plus uniform noise of +-d/2 on every Q4_1
block, what rounding to the block's grid removed (``int4_forms.float_standin``, seeded). It is
harsher on int4 than the real checkpoint would be (docs/benchmarks.md, "Float sources").

Files, under ``.bench/smollm2-float/``::

    hf/              the stand-in (fp32 safetensors, the GGUF's tokenizer and configs)
    reference.json   transformers fp32 greedy continuation of ``common.PROMPT_IDS``
    quality.json     transformers fp32 logits over ``exporters/reference/texts`` (top-1 and perplexity)

``compare_cpu.py --models smollm2-float`` runs our package (``.bench/packages/smollm2-float``,
exported with verification, so ``load()`` chooses as it would for a user), its exact graph
(``--accuracy 1``) and GenAI's builder's int4 on the same folder. Steps run in the venv that has
their libraries (``hf`` in the project's ``.venv``, the references in setup_competitors'
``transformers`` venv); ``ensure`` (called by setup_competitors.py) drives them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from setup_steps import BENCH, MARK, PROJECT_PYTHON, REPO, ensure_export, genai_export, run_logged

ROOT = BENCH / "smollm2-float"
HF = ROOT / "hf"
REFERENCE = ROOT / "reference.json"
QUALITY = ROOT / "quality.json"
PACKAGE = BENCH / "packages" / "smollm2-float"  # ours: portable-infer export HF -o PACKAGE --precision int4
GENAI_INT4 = BENCH / "models" / "smollm2-float" / "ortgenai-int4"
PACKAGE_SYM = BENCH / "packages" / "smollm2-float-sym"  # ours with export --symmetric
BASE = BENCH / "hf" / "smollm2"  # setup_competitors.HF_DIR: the GGUF dequantized
DESCRIPTION = "a float stand-in: SmolLM2's Q4_1 blocks dequantized, plus uniform noise of +-d/2"

logger = logging.getLogger("smollm2_float")


def ensure(competitors: list[str], ensure_reference, ensure_quality) -> None:
    """The stand-in, its references (``ensure_reference``/``ensure_quality`` of
    setup_competitors, run on it) and GenAI's int4 export for ortgenai, each when missing."""
    if not (HF / MARK).is_file():
        logger.info("smollm2-float hf: into %s", HF.relative_to(REPO))
        run_logged([str(PROJECT_PYTHON), __file__, "hf"], "smollm2-float-hf", env={"PYTHONPATH": str(REPO)})
        (HF / MARK).write_text("ok\n")
    ensure_reference(HF, REFERENCE)
    ensure_quality(HF, QUALITY)
    if "ortgenai" in competitors:
        ensure_export(genai_export(GENAI_INT4, "int4", "genai-smollm2-float-int4"), HF, "smollm2-float-ortgenai-int4")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["hf"])
    p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import int4_forms  # the project venv's: exporters, safetensors

    int4_forms.float_standin(BASE, HF)


if __name__ == "__main__":
    main()
