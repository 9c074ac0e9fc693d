"""Where a decode step's time goes on CUDA (static KV + CUDA graphs vs the fused graph).

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_steptime.py PACKAGE
"""

import sys
import time

import numpy as np

sys.path.insert(0, ".")
import portable_infer  # noqa: E402


def main() -> None:
    pkg = sys.argv[1]
    for static in (False, True):
        m = portable_infer.load(pkg, "cuda", strict=True, static_kv=static, check="size")
        e = m.engine
        p = list(range(3, 35))
        cache = e.new_cache(1, capacity=512)
        e.forward(np.asarray([p]), np.ones((1, 32), np.int64), cache)
        for i in range(20):  # warm-up (and the CUDA graph capture) outside the timing
            e.forward(np.asarray([[5]]), np.ones((1, 33 + i), np.int64), cache)
        masks = [np.ones((1, 53 + i), np.int64) for i in range(150)]
        ids = np.asarray([[5]])
        t0 = time.perf_counter()
        n = 150
        for i in range(n):
            e.forward(ids, masks[i], cache)
        step = (time.perf_counter() - t0) / n * 1e3
        row = {"variant": m.variant, "graphs": getattr(e, "cuda_graph", None), "engine.forward ms": round(step, 3)}
        if static:
            t0 = time.perf_counter()
            for i in range(n):  # greedy on the device: the id comes back, the logits stay
                e.forward(ids, np.ones((1, 203 + i), np.int64), cache, greedy=True)
            row["engine.forward greedy ms"] = round((time.perf_counter() - t0) / n * 1e3, 3)
            slot = cache.slot
            ids, msk = np.asarray([[5]], np.int64), (np.arange(cache.capacity)[None] < 40).astype(np.int64)
            for name, fn in (("update_inplace x2", lambda: (slot.ids.update_inplace(ids), slot.mask.update_inplace(msk))),
                             ("run_with_iobinding", lambda: e.session.run_with_iobinding(slot.binding, slot.run_options)),
                             ("logits.numpy", lambda: slot.logits.numpy()),
                             ("token.numpy", lambda: slot.token.numpy())):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                row[name + " ms"] = round((time.perf_counter() - t0) / n * 1e3, 3)
        print(row, flush=True)


if __name__ == "__main__":
    main()
