"""The continuous-batching engine alone (no HTTP): N client threads against 1, same requests.

    .venv/bin/python benchmarks/scheduler_scaling.py [PKG] [--clients 16] [--requests 32] [--rounds 2]
        [--static-kv | --no-static-kv]

Each client thread submits requests one after another through ``Scheduler.submit`` (24 random
prompt tokens, 64 new tokens, greedy, ignore_eos) until the level's requests are done. Prints
aggregate generated tokens/s for 1 client (8 requests) and for N, and their ratio, per round.
Compare with ``load_test.py`` (the same through the HTTP server) to see what serving costs.
Also the median gap between a request's tokens at each level (one decode step: at 1 client a
batch-1 step, at N a batch-N step) and the ratio that step times alone allow, N x gap(1) /
gap(N): prefill and the scheduler's own work only take from it. Then where each level's time went
(the scheduler's step clock: decode and prefill forwards, the host's part, planning, idling).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import portable_infer  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from host_overhead import clock_line  # noqa: E402 - the step clock's one line


def level(model, prompts: list, clients: int, requests: int) -> tuple:
    """Aggregate generated tokens/s, and the median gap between a request's tokens (s)."""
    with Scheduler(model, SchedulerConfig(max_batch=16)) as sched:
        todo, lock, tokens, gaps = list(range(requests)), threading.Lock(), [0], []

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                h = sched.submit(prompts[i % len(prompts)], max_new_tokens=64, ignore_eos=True)
                n = sum(1 for r in h if r.token is not None)
                with lock:
                    tokens[0] += n
                    gaps.extend(h.stats.inter_token_s)

        t, clock0 = time.perf_counter(), sched.stats().steps
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        clock = {k: v - clock0[k] for k, v in sched.stats().steps.items()}
        return tokens[0] / wall, float(np.median(gaps)), clock, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("package", nargs="?", default=None, help="default: the default model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--static-kv", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    # the batch declared as `serve --max-batch` declares it (the tuner's second batch size, and where the
    # package has one, the exact graph's batched companion: engine/dense_companion.py)
    model = portable_infer.load(args.package, "cpu", intra_op_threads=args.threads, static_kv=args.static_kv,
                                check="size", tune_batch=args.clients)
    print(f"variant {model.variant}; batched forwards on "
          f"{'its fp32 companion' if getattr(model.engine, 'batched', None) is not None else 'the same graph'}")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.manifest.model.vocab_size, 24).tolist() for _ in range(32)]
    n = args.clients
    print(f"| variant | round | 1 client tok/s | {n} clients tok/s | ratio | step ms at 1 | step ms at {n} "
          f"| ratio the steps allow |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    spans = []
    for r in range(args.rounds):
        (one, g1, c1, w1), (many, gn, cn, wn) = level(model, prompts, 1, 8), level(model, prompts, n, args.requests)
        print(f"| {model.variant} | {r + 1} | {one:.1f} | {many:.1f} | {many / one:.2f}x | {g1 * 1e3:.1f} | "
              f"{gn * 1e3:.1f} | {n * g1 / gn:.2f}x |", flush=True)
        spans += [f"round {r + 1}, 1 client: {clock_line(c1, w1)}", f"round {r + 1}, {n} clients: {clock_line(cn, wn)}"]
    print("\nWhere each level's time went (the scheduler's step clock):\n\n" + "\n".join(f"- {x}" for x in spans))


if __name__ == "__main__":
    main()
