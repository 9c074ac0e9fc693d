"""The engine process's own Python work per step, over an engine that costs only its device time.

    .venv/bin/python benchmarks/engine_process_host.py [PKG] [--streams 64 256] [--prompt 128]
        [--new 256] [--step-ms 11.8] [--prefill-us US] [--metrics] [--profile FILE] [--seed N]

``portable-infer serve --engine-process`` runs the step loop in a process of its own (the API
process makes the text). On the H200 at the 8B shape, 256 streams, its decode step took ~15.5-18
ms where the engine alone needs 11.8 (``gpu_batch_steps.py``), whatever the GIL's switch interval:
the engine process's threads (the step loop, the overlapped forward, the emitter, the outbox, the
pipe's reader) together did more Python work a step than the device did. This measures that work
on any machine: the real :class:`~portable_infer.serving.engine_process.ProcessScheduler` and
engine process, whose engine is ``host_overhead.NullEngine`` (decode forwards sleep ``--step-ms``
with the GIL released, as a GPU step does; token ids drawn at random, no KV), ``--streams``
requests of ``--prompt`` random ids and ``--new`` tokens each, read here by coroutines as the
server's handlers read them (``--metrics``: with the server's metrics observing every token, as
``serve`` runs). Printed per level: the step loop's clock (decode ms a step waiting on
the forward and on the host; the step is bound by the host where it exceeds ``--step-ms``), and
the tokens/s. ``--profile FILE``: yappi (pip install yappi) profiles every thread of the engine
process in the largest level by CPU time; FILE gets the functions with the most own time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import portable_infer  # noqa: E402
from portable_infer.serving import engine_core, engine_process  # noqa: E402
from portable_infer.serving.scheduler import SchedulerConfig  # noqa: E402
from gpu_serving import tree_cpu_s  # noqa: E402 - the process's CPU seconds, from /proc


def null_engine_main(conn, path, load_kwargs, config, *, step_s: float, seed: int, profile: str | None,
                     token_s: float = 0.0) -> None:
    """``engine_core.engine_main`` whose scheduler runs ``host_overhead.NullEngine`` (``profile``:
    every thread's CPU time, by yappi, written there when the process ends)."""
    from host_overhead import NullEngine, null_moves

    from portable_infer.serving import scheduler

    null_moves()
    real = scheduler.Scheduler.__init__

    def init(self, model, *a, **k):
        real(self, model, *a, **k)
        self.engine = NullEngine(model.engine, model.codec.vocab_size, "cuda", seed, step_s, token_s)

    scheduler.Scheduler.__init__ = init
    real_interval = engine_core.switch_interval
    engine_core.switch_interval = lambda device: real_interval("cuda")  # the null engine stands for a device's
    if profile is None:
        engine_core.engine_main(conn, path, load_kwargs, config)
        return
    import yappi

    yappi.set_clock_type("cpu")
    yappi.start()
    try:
        engine_core.engine_main(conn, path, load_kwargs, config)
    finally:
        yappi.stop()
        stats = sorted(yappi.get_func_stats(), key=lambda f: -f.tsub)
        total = sum(f.tsub for f in stats)
        lines = [f"engine process CPU seconds (own time, all threads): {total:.2f}", ""]
        lines += [f"{f.tsub:8.3f} s {100 * f.tsub / total:5.1f} %  {f.ncall:8d} calls  {f.name} "
                  f"({Path(f.module).name}:{f.lineno})" for f in stats[:45]]
        threads = sorted(yappi.get_thread_stats(), key=lambda t: -t.ttot)
        lines += ["", "by thread:"] + [f"{t.ttot:8.3f} s  {t.name}" for t in threads]
        Path(profile).write_text("\n".join(lines) + "\n")


def level(pkg, streams: int, args) -> dict:
    config = SchedulerConfig(max_batch=streams, max_waiting=streams, kv_budget_tokens=streams * (args.prompt + args.new),
                             prefill_chunk=512, slot_batch=True)
    profile = args.profile if args.profile and streams == max(args.streams) else None
    engine_process.engine_main = functools.partial(null_engine_main, step_s=args.step_ms / 1e3, seed=args.seed,
                                                   profile=profile, token_s=args.prefill_us / 1e6)
    sched = engine_process.ProcessScheduler(pkg, {"providers": "cpu"}, config)
    try:
        model = sched.model
        if args.metrics:  # the server's Prometheus metrics observe every token, as `serve` does
            from portable_infer.serving.http.metrics import Metrics

            Metrics(sched)
        rng = np.random.default_rng(args.seed + streams)
        params = model.params(max_new_tokens=args.new, ignore_eos=True, temperature=0.0)
        clock0, cpu0 = sched.stats().steps, tree_cpu_s(sched._proc.pid)
        t0 = time.perf_counter()
        handles = [sched.submit_ids(rng.integers(100, model.codec.vocab_size, args.prompt).tolist(), params)
                   for _ in range(streams)]
        counts, firsts = [0] * streams, [0.0] * streams

        async def read(i):
            async for _ in handles[i]:
                if not counts[i]:
                    firsts[i] = time.perf_counter() - t0
                counts[i] += 1

        async def read_all():
            await asyncio.gather(*(read(i) for i in range(streams)))

        asyncio.run(read_all())
        wall = time.perf_counter() - t0
        clock = {k: v - clock0[k] for k, v in sched.stats().steps.items()}
        cores = (tree_cpu_s(sched._proc.pid) - cpu0) / wall
    finally:
        sched.close()
    n = max(clock["decode_steps"], 1)
    return {"wall_s": wall, "tok_s": sum(counts) / wall, "decode_steps": clock["decode_steps"],
            "rows": clock["decode_rows"] / n, "forward_ms": 1e3 * clock["decode_forward"] / n,
            "host_ms": 1e3 * clock["decode_host"] / n, "plan_s": clock["plan"],
            "prefill_s": clock["prefill_forward"] + clock["prefill_host"], "cores": cores,
            "prefill_steps": clock["prefill_steps"], "idle_s": clock["idle"],
            "ttft_p50_ms": 1e3 * float(np.percentile(firsts, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(firsts, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", nargs="?", default=None)
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=11.8, help="a decode forward's device time (H200, 8B, batch 256)")
    ap.add_argument("--profile", default=None, metavar="FILE")
    ap.add_argument("--prefill-us", type=float, default=0.0,
                    help="a prefill forward's device time a prompt token, us (H100, 8B fp16: ~29, groups of 16 x 128)")
    ap.add_argument("--metrics", action="store_true", help="attach the server's metrics (its observer), as serve does")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    args.seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    pkg = args.package or portable_infer.load(None, providers="cpu").path
    print(f"seed {args.seed}; decode forwards sleep {args.step_ms} ms (GIL released)")
    print(f"prefill forwards sleep {args.prefill_us} us a prompt token")
    print("| streams | tok/s | decode steps | rows a step | decode ms: forward + host | prefill steps, s | TTFT p50 / p99 ms "
          "| plan s | idle s | engine process cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.streams:
        r = level(pkg, n, args)
        print(f"| {n} | {r['tok_s']:,.0f} | {r['decode_steps']} | {r['rows']:.1f} | {r['forward_ms']:.2f} + "
              f"{r['host_ms']:.2f} | {r['prefill_steps']}, {r['prefill_s']:.2f} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['plan_s']:.2f} | {r['idle_s']:.2f} | {r['cores']:.2f} |", flush=True)
    if args.profile and Path(args.profile).is_file():
        print(Path(args.profile).read_text())


if __name__ == "__main__":
    main()
