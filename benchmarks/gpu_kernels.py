"""GPU time per kernel of a static-KV decode step, with and without CUDA graphs (torch.profiler / CUPTI).

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_kernels.py /tmp/gpubench/pkg-fp16 [batches] [CUDA options JSON]

``batches``: one batch size or several, comma-separated (``1,256``), each profiled on the one loaded model.

Prints, per mode: wall time per step, the GPU kernel time summed per step, kernels per step, and
the kernels taking most time. Kernel time well under the wall time means the step is bound by
launches and gaps between kernels, not by the kernels themselves.
"""

import collections
import json
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
import portable_infer  # noqa: E402


def main() -> None:
    pkg, batches = sys.argv[1], [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1").split(",")]
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    m = portable_infer.load(pkg, "cuda", strict=True, static_kv=True, check="size",
                            provider_options={"cuda": options} if options else None)
    print(f"\n# {pkg} batches {batches} CUDA options {options}")
    for batch in batches:
        profile_batch(m.engine, batch)


def profile_batch(e, batch: int) -> None:
    """Wall and kernel time per decode step at ``batch`` rows, without and with CUDA graphs."""
    for graphs in (False, True):
        e.cuda_graph = graphs
        cache = e.new_cache(batch, capacity=512)
        ids = np.full((batch, 32), 7, np.int64)
        e.forward(ids, np.ones_like(ids), cache)
        width, one = 32, np.full((batch, 1), 5, np.int64)
        for _ in range(10):  # warm-up and capture
            width += 1
            e.forward(one, np.ones((batch, width), np.int64), cache, greedy=True)
        n = 50
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(n):
                width += 1
                e.forward(one, np.ones((batch, width), np.int64), cache, greedy=True)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / n * 1e3
        by, count = collections.Counter(), collections.Counter()
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in ev.name.lower() \
                    and "memset" not in ev.name.lower():
                by[ev.name[:70]] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
                count[ev.name[:70]] += 1
        total = sum(by.values()) / n / 1e3
        print(f"\n## batch {batch}, CUDA graphs {graphs}: wall {wall:.3f} ms/step, kernels {total:.3f} ms/step, "
              f"{sum(count.values()) / n:.0f} kernels/step")
        for k, v in by.most_common(14):
            print(f"{v / n / 1e3:8.4f} ms  x{count[k] / n:5.1f}  {k}")
        del cache


if __name__ == "__main__":
    main()
