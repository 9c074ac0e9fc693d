"""``portable-infer bench``: load time, TTFT, decode tokens/s and peak RSS of one package."""

from __future__ import annotations

import resource
import statistics
import sys
import time

BENCH_TEXT = ("In a quiet village by the sea, the old lighthouse keeper kept a journal of every ship "
              "that passed, every storm that came, and every letter that never arrived. ")


def prompt_ids(model, n: int) -> list:
    """A fixed prompt of exactly ``n`` tokens (the text repeated, or ids when no tokenizer)."""
    if model.tokenizer is None:
        return [(i * 7 + 3) % model.manifest.model.vocab_size for i in range(n)]
    ids = []
    while len(ids) < n:
        ids += model.encode(BENCH_TEXT, add_special_tokens=False)
    return ids[:n]


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def run_bench(ns, load) -> dict:
    """Time ``load(ns)`` (the CLI's loader, so every model flag applies), then generate."""
    t = time.perf_counter()
    model = load(ns)
    load_s = time.perf_counter() - t
    ids = prompt_ids(model, ns.prompt_tokens)
    model.generate_ids(ids, max_new_tokens=8, ignore_eos=True)  # warm-up
    ttft, tps = [], []
    for _ in range(ns.runs):
        for r in model.stream_generate(ids, max_new_tokens=ns.new_tokens, ignore_eos=True):
            pass
        ttft.append(r.ttft_s * 1000)
        tps.append(r.decode_tokens_per_s)
    return {
        "model": str(model.path), "provider": model.provider, "variant": model.variant,
        "precision": model.manifest.precision, "threads": ns.threads or "default",
        "prompt_tokens": ns.prompt_tokens, "new_tokens": ns.new_tokens, "runs": ns.runs,
        "load_s": round(load_s, 3), "ttft_ms": round(statistics.median(ttft), 2),
        "decode_tokens_per_s": round(statistics.median(tps), 2), "peak_rss_mib": round(peak_rss_mib(), 1),
    }
