"""The continuous-batching scheduler on CUDA: 16 requests at once, growing KV vs static KV + CUDA graphs.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_scheduler.py [PKG] [--provider cuda] [--runs 4]
        [--shared-prefix 16] [--prefix-min-tokens N]

PKG: an fp16 package with the fused and static variants (default: /tmp/gpubench/pkg-fp16, which
``gpu_bench.py`` exports; made here the same way when missing). One scheduler per graph variant
(its thread keeps ONNX Runtime's per-thread CUDA state); each run submits 16 requests together:
32 prompt tokens, the first ``--shared-prefix`` of them common to all (a system prompt: cached
after the first run), the rest drawn fresh per run; 64 new tokens each (``--stagger``: 32, 36, ... 92), greedy. Wall time from
the first submit to the last token (prefill included), and the median time to first token; run
0 warms up (cuDNN / cuBLAS selection, graph capture). After each run, where the scheduler
thread's time went: the forward passes (prefill and decode), new caches, the KV moves as rows
join and leave, the prefix cache, and the rest (sampling, streaming). ``--provider cpu`` runs the
same on the CPU (for a tiny package: a host-overhead check).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import portable_infer  # noqa: E402
from portable_infer.engine.kv_growing import GrowingCache  # noqa: E402
from portable_infer.engine.kv_static import StaticCache  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402

# (owner, attribute, label): the scheduler thread's phases, timed by wrapping them
PHASES = tuple((cache, attr, label) for cache in (GrowingCache, StaticCache)
               for attr, label in (("merge", "KV join"), ("take", "KV leave"), ("prompt_kv", "prefix store"),
                                   ("fill_prefix", "prefix reuse")))


class Breakdown:
    """Seconds spent in each wrapped phase (and in the engine's forward), reset per run."""

    def __init__(self, engine):
        self.t = defaultdict(float)
        for owner, attr, label in PHASES:
            setattr(owner, attr, self._wrap(getattr(owner, attr), label))
        decode, prefill = self._wrap(engine.forward, "decode forward"), self._wrap(engine.forward, "prefill forward")
        engine.forward = lambda ids, *a, **k: (decode if ids.shape[1] == 1 else prefill)(ids, *a, **k)
        engine.new_cache = self._wrap(engine.new_cache, "new cache")

    def _wrap(self, fn, label):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[label] += time.perf_counter() - t0
        return timed

    def line(self, wall: float) -> str:
        named = sum(self.t.values())
        parts = [f"{k} {v * 1e3:.0f} ms" for k, v in sorted(self.t.items(), key=lambda kv: -kv[1])]
        self.t.clear()
        return ", ".join(parts) + f", rest {max(0.0, wall - named) * 1e3:.0f} ms"


def ensure_package(pkg: Path) -> Path:
    """``pkg`` as it is, or gpu_bench.py's fp16 package when the default is missing."""
    if (pkg / "manifest.json").exists():
        return pkg
    if pkg.name != "pkg-fp16":
        raise SystemExit(f"{pkg} is not a package (only gpu_bench.py's pkg-fp16 is made when missing)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_bench import package

    return package(pkg.parent, "fp16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("package", nargs="?", default="/tmp/gpubench/pkg-fp16")
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--shared-prefix", type=int, default=16)
    ap.add_argument("--prefix-min-tokens", type=int, default=None, help="SchedulerConfig's (default: its own)")
    ap.add_argument("--stagger", action="store_true", help="new tokens 32..92 per request (rows leave one by one)")
    args = ap.parse_args()
    pkg = ensure_package(Path(args.package))
    for static in (False, True):
        m = portable_infer.load(pkg, args.provider, strict=True, static_kv=static)
        vocab = m.manifest.model.vocab_size
        shared = np.random.default_rng(99).integers(3, vocab, args.shared_prefix).tolist()
        times = Breakdown(m.engine)
        cfg = SchedulerConfig(max_batch=16, prefix_min_tokens=args.prefix_min_tokens)
        with Scheduler(m, cfg) as s:
            for run in range(args.runs):
                rng = np.random.default_rng(1000 * run)
                prompts = [shared + rng.integers(3, vocab, 32 - len(shared)).tolist() for _ in range(16)]
                t0 = time.perf_counter()
                new = [32 + 4 * i if args.stagger else 64 for i in range(16)]
                hs = [s.submit(p, max_new_tokens=k, ignore_eos=True) for p, k in zip(prompts, new)]
                n = sum(sum(1 for r in h if r.token is not None) for h in hs)
                el = time.perf_counter() - t0
                ttft = np.median([h.stats.ttft_s for h in hs]) * 1e3
                print(f"{m.variant}{' + CUDA graphs' if getattr(m.engine, 'cuda_graph', False) else ''} run {run}"
                      f"{' (warm-up)' if run == 0 else ''}: {n} tokens in {el:.2f} s = {n / el:.0f} tok/s, "
                      f"TTFT median {ttft:.1f} ms; {times.line(el)}", flush=True)
        print(f"prefix cache: {s.stats().prefix_cache_hits} hits, {s.stats().prefix_cache_tokens} tokens", flush=True)


if __name__ == "__main__":
    main()
