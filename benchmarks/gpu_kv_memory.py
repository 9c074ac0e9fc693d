"""Where a GPU's memory goes when the scheduler sizes its KV budget from it (serving.kv_budget):
the device's free memory after loading, what the rule settles, and the device's free memory as
the KV buffers are allocated (every ``--every`` allocations), then after the startup warm-up.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_kv_memory.py PKG [--max-batch 256]
        [--prefill-chunk 512] [--utilization 0.9] [--every 8]

Prints one line per reading: what was asked for so far through ONNX Runtime's Python-side
allocator (``OrtValue.ortvalue_from_shape_and_type``) and how far the device's free memory fell,
so an allocator that takes more than it is asked for shows as the difference. Since the engines
take their KV from a session arena (engine/kv_alloc.py) only the steps' inputs and outputs go
through it: the fall then is the KV plus those. ``--raw GiB`` times the Python-side allocator
alone (session 22: each 1.6772 GiB buffer cost 2 GiB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1 << 30


def raw(ort, dev: int, gib: float, every: int, free0: int) -> None:
    from portable_infer.engine.device_memory import cuda_memory

    values, n = [], int(gib * GIB) // 2
    try:
        while True:
            values.append(ort.OrtValue.ortvalue_from_shape_and_type([n], np.float16, "cuda", dev))
            if len(values) % every == 0:
                free, _ = cuda_memory(dev)
                print(f"  raw: {len(values)} x {gib} GiB asked; free {free / GIB:.2f}, fell {(free0 - free) / GIB:.2f}",
                      flush=True)
    except Exception as exc:  # noqa: BLE001
        free, _ = cuda_memory(dev)
        print(f"  raw: failed at {len(values) + 1} x {gib} GiB; free {free / GIB:.2f} GiB, fell "
              f"{(free0 - free) / GIB:.2f}: {str(exc)[:160]}", flush=True)
    values.clear()
    free, _ = cuda_memory(dev)
    print(f"  raw: freed; free {free / GIB:.2f} GiB (an arena keeps what it took)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--utilization", type=float, default=0.9)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--raw", type=float, default=0,
                    help="instead: allocate buffers of this many GiB through ONNX Runtime until one fails, printing "
                         "the free memory (the allocator alone)")
    args = ap.parse_args()

    import portable_infer
    from portable_infer.engine.device_memory import cuda_memory
    from portable_infer.engine.memory import bytes_per_token
    from portable_infer.serving import kv_budget
    from portable_infer.serving.scheduler import Scheduler
    from portable_infer.serving.scheduler_config import SchedulerConfig

    t = time.perf_counter()
    model = portable_infer.load(args.package, providers="cuda", strict=True)
    engine = model.engine
    dev = 0  # the engines run on device 0 (engine.session.make_engine)
    free0, total = cuda_memory(dev)
    print(f"loaded {engine.variant.name} on {engine.provider} in {time.perf_counter() - t:.0f} s: "
          f"{(total - free0) / GIB:.2f} GiB in use of {total / GIB:.2f}", flush=True)
    if args.raw:
        return raw(engine.ort, dev, args.raw, args.every, free0)
    cfg = SchedulerConfig(max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                          gpu_memory_utilization=args.utilization)
    budget = kv_budget.settle(cfg, model)
    per_token = bytes_per_token(engine.variant.kv)
    print(f"settled: {budget.tokens:,} tokens = {budget.tokens * per_token / GIB:.2f} GiB of KV; "
          f"working {budget.working / GIB:.2f} GiB; {budget.describe()}", flush=True)

    asked = [0, 0]  # bytes, allocations
    real = engine.ort.OrtValue

    def allocate(shape, dtype, device, device_id=0):
        value = real.ortvalue_from_shape_and_type(shape, dtype, device, device_id)
        asked[0] += int(np.prod(shape)) * np.dtype(dtype).itemsize
        asked[1] += 1
        if asked[1] % args.every == 0:
            free, _ = cuda_memory(dev)
            print(f"  {asked[1]} allocations, {asked[0] / GIB:.2f} GiB asked; free {free / GIB:.2f} GiB, "
                  f"fell {(free0 - free) / GIB:.2f}", flush=True)
        return value

    ort_proxy = SimpleNamespace(**{k: getattr(engine.ort, k) for k in dir(engine.ort) if not k.startswith("__")})
    ort_proxy.OrtValue = SimpleNamespace(ortvalue_from_shape_and_type=allocate,
                                         ortvalue_from_numpy=real.ortvalue_from_numpy)
    engine.ort = ort_proxy
    try:
        t = time.perf_counter()
        with Scheduler(model, cfg) as sched:
            free, _ = cuda_memory(dev)
            print(f"scheduler up in {time.perf_counter() - t:.0f} s (warm-up included): {asked[1]} allocations, "
                  f"{asked[0] / GIB:.2f} GiB asked; free {free / GIB:.2f} GiB, fell {(free0 - free) / GIB:.2f}; "
                  f"budget {sched.pool.total * sched.pool.block_size:,} tokens", flush=True)
    except Exception as exc:  # noqa: BLE001 - the reading is the point
        free, _ = cuda_memory(dev)
        print(f"FAILED after {asked[1]} allocations, {asked[0] / GIB:.2f} GiB asked; free {free / GIB:.2f} GiB, "
              f"fell {(free0 - free) / GIB:.2f}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
