"""The continuous-batching scheduler on CUDA: 16 requests at once, growing KV vs static KV + CUDA graphs.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_scheduler.py [PKG]

PKG: an fp16 package with the fused and static variants (default: /tmp/gpubench/pkg-fp16-default,
an fp16 export of gpu_bench.py's SmolLM2-shaped random model with the default variants). Each
line: 16 requests of 32 random tokens, 64 new tokens each, submitted together, wall time from
the first submit to the last token (prefill included); the first run of each engine warms up
(cuDNN / cuBLAS selection, graph capture).
"""

import sys
import time

import numpy as np

sys.path.insert(0, ".")
import portable_infer  # noqa: E402
from portable_infer.scheduler import Scheduler, SchedulerConfig  # noqa: E402


def main() -> None:
    pkg = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpubench/pkg-fp16-default"
    for static in (False, True):
        m = portable_infer.load(pkg, "cuda", strict=True, static_kv=static)
        for run in range(3):
            with Scheduler(m, SchedulerConfig(max_batch=16)) as s:
                t0 = time.perf_counter()
                hs = [s.submit(np.random.default_rng(i).integers(3, 49152, 32).tolist(), max_new_tokens=64,
                               ignore_eos=True) for i in range(16)]
                n = sum(sum(1 for r in h if r.token is not None) for h in hs)
                el = time.perf_counter() - t0
            print(f"{m.variant}{' + CUDA graphs' if getattr(m.engine, 'cuda_graph', False) else ''} run {run}"
                  f"{' (warm-up)' if run == 0 else ''}: {n} tokens in {el:.2f} s = {n / el:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
