"""The engine alone on CUDA: one decode step's time at each batch size, and one grouped prefill's.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_batch_steps.py PACKAGE [--batches 1 64 256]
        [--prompt 128] [--capacity 384] [--group 16]

Static KV + CUDA graphs (the server's path on CUDA, its slot batch: one buffer of the batch's rows,
prefills written into views of it): each batch's rows prefilled with ``--prompt``
random ids (in groups of ``--group`` prompts, each group's forward timed), then 30 greedy decode
steps (ids chosen on the device), median step time and the tok/s it allows. What the server adds on
top (planning, sampling rules, streaming) is the difference to ``gpu_serving.py``'s figures.
"""

import argparse
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import portable_infer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=384)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--provider", default="cuda", help="cpu: a dry run of the script")
    args = ap.parse_args()
    m = portable_infer.load(args.package, args.provider, strict=True, static_kv=True, check="size")
    e = m.engine
    rng = np.random.default_rng(0)
    print(f"variant {e.variant.name} on {e.provider}")
    print("| batch | prefill of a group ms | decode step ms (median) | tok/s the steps allow |")
    print("|---|---|---|---|")
    for b in args.batches:
        g = min(args.group, b)
        ids = rng.integers(1000, 40000, (g, args.prompt))
        mask = np.ones((g, args.prompt), np.int64)
        pre = []
        buffer = e.buffer(b, args.capacity)  # the server's slot batch: one buffer, prefills in place
        lengths = np.zeros(b, np.int64)
        for start in range(0, b, g):
            n = min(g, b - start)
            view = e.view(buffer, start, n)
            t = time.perf_counter()
            e.forward(ids[:n], mask[:n], view, greedy=True)
            pre.append(time.perf_counter() - t)
            lengths[start:start + n] = view.rows
        decode = e.view(buffer, 0, b, decode=True)
        steps = []
        tok = np.full((b, 1), 5, np.int64)
        live = np.ones((b, 1), np.int64)
        for i in range(40):
            decode.rows = lengths.copy()
            t = time.perf_counter()
            e.forward(tok, live, decode, greedy=True)
            steps.append(time.perf_counter() - t)
            lengths = decode.rows
        s = statistics.median(steps[10:])
        print(f"| {b} | {1e3 * statistics.median(pre):.1f} | {1e3 * s:.2f} | {b / s:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
