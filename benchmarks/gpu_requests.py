"""The request stream of the GPU serving runs (issue #21), one home for ``gpu_serving.py``, its
GenAI Engine driver (``gpu_genai_engine.py``) and transformers' (``gpu_hf_batching.py``): the
prompts every runtime gets, and one level's summary from per-request token times."""

from __future__ import annotations

import json

import numpy as np

WARM_TOKENS = 16  # new tokens of each warm-up request
SEED = 20261203  # the request stream's; round k of a level draws with SEED + k - 1 (fresh prompts each round)


def prompts(n: int, length: int, vocab: int, seed: int = SEED) -> list:
    """``n`` prompts of ``length`` random token ids (below 49,152: in every shape's vocabulary)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, min(vocab, 49152), length).tolist() for _ in range(n)]


def brief(row: dict) -> str:
    """One level's row as a line of JSON, floats to one decimal (the runs' progress lines)."""
    return json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()})


def summarize(results: list) -> dict:
    """One level from its requests' ``{"sent", "times" (each token's), "tokens", "error"}`` (seconds on
    one clock): generated tok/s from the first send to the last token, TTFT p50/p99, the gaps'
    p99, errors (failed or tokenless requests) and the first error."""
    ok = [r for r in results if not r.get("error") and r["times"]]
    ttft = [r["times"][0] - r["sent"] for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    start = min(r["sent"] for r in ok) if ok else 0.0
    end = max(r["times"][-1] for r in ok) if ok else 1.0
    tokens = sum(r["tokens"] for r in ok)
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"tok_s": tokens / max(end - start, 1e-9), "tokens": tokens, "wall_s": end - start,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p99_ms": pct(gaps, 99),
            "errors": len(results) - len(ok), "first_error": next((r["error"] for r in results if r.get("error")), None)}
