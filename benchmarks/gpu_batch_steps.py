"""The engine alone on CUDA: one decode step's time at each batch size, and one grouped prefill's.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_batch_steps.py PACKAGE [--batches 1 64 256]
        [--prompt 128] [--capacity 384] [--group 16] [--mix N] [--probe FILE]

Static KV + CUDA graphs (the server's path on CUDA, its slot batch: one buffer of the batch's rows,
prefills written into views of it): each batch's rows prefilled with ``--prompt``
random ids (in groups of ``--group`` prompts, each group's forward timed), then 30 greedy decode
steps (ids chosen on the device), median step time and the tok/s it allows. ``--mix N``: the
groups' prompts run from ``--prompt`` to ``--prompt + N`` tokens, so that the rows hold the
contexts of a serving level of N new tokens (attention reads every row's KV: at ~150 tokens a
row the step is shorter than a 256-stream level's, whose rows hold 128 to 384). What the server adds on
top (planning, sampling rules, streaming) is the difference to ``gpu_serving.py``'s figures.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
import portable_infer  # noqa: E402

STEPS = 40  # decode steps timed (the first 10 left out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=384)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--provider", default="cuda", help="cpu: a dry run of the script")
    ap.add_argument("--mix", type=int, default=0, metavar="N",
                    help="rows hold --prompt to --prompt + N tokens of context, spread evenly (a serving level "
                         "of N new tokens: ~--prompt + N/2 on average); 0: every row --prompt")
    ap.add_argument("--probe", default=None, metavar="FILE",
                    help="time each decode step in parts (step_probe.py), summaries written to FILE")
    args = ap.parse_args()
    if args.probe:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import step_probe
        step_probe.install(args.probe)
    m = portable_infer.load(args.package, args.provider, strict=True, static_kv=True, check="size")
    e = m.engine
    rng = np.random.default_rng(0)
    print(f"variant {e.variant.name} on {e.provider}")
    print(f"contexts: {args.prompt} tokens" + (f" to {args.prompt + args.mix}, spread over the groups" if args.mix else ""))
    print("| batch | prefill of a group ms | decode step ms (median) | tok/s the steps allow |")
    print("|---|---|---|---|")
    for b in args.batches:
        g = min(args.group, b)
        groups = -(-b // g)
        pre = []
        capacity = max(args.capacity, args.prompt + args.mix + STEPS)  # room for the longest row's steps
        buffer = e.buffer(b, capacity)  # the server's slot batch: one buffer, prefills in place
        lengths = np.zeros(b, np.int64)
        for k, start in enumerate(range(0, b, g)):
            n = min(g, b - start)
            length = args.prompt + (args.mix * k // max(groups - 1, 1) if args.mix else 0)  # each group its own context
            ids, mask = rng.integers(1000, 40000, (n, length)), np.ones((n, length), np.int64)
            view = e.view(buffer, start, n)
            t = time.perf_counter()
            e.forward(ids, mask, view, greedy=True)
            pre.append(time.perf_counter() - t)
            lengths[start:start + n] = view.rows
        decode = e.view(buffer, 0, b, decode=True)
        steps = []
        tok = np.full((b, 1), 5, np.int64)
        live = np.ones((b, 1), np.int64)
        for i in range(STEPS):
            decode.rows = lengths.copy()
            t = time.perf_counter()
            e.forward(tok, live, decode, greedy=True)
            steps.append(time.perf_counter() - t)
            lengths = decode.rows
        s = statistics.median(steps[10:])
        print(f"| {b} | {1e3 * statistics.median(pre):.1f} | {1e3 * s:.2f} | {b / s:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
