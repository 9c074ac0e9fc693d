"""Resident memory at rest and after one long prompt, with and without giving memory back.

    python benchmarks/rss_long_prompt.py PACKAGE [--tokens 2000]

Each case runs in a fresh process: load on the CPU, a 16-token warm-up, RSS at rest, then one
long prompt (``generate_ids``, or through the continuous-batching scheduler as the server runs
it), RSS afterwards. "old" turns off what issue 16 added (arena shrinkage after large calls, the
trim after a large cache is dropped); "new" is the default. One case alone:
``rss_long_prompt.py PACKAGE --case api,static,new``. Numbers quoted in docs/serving.md.
"""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
import time

TEXT = "The quick brown fox jumps over the lazy dog. "


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def run_case(package: str, mode: str, variant: str, how: str, tokens: int) -> str:
    import portable_infer
    from portable_infer.engine import memory

    if how == "old":
        memory.SHRINK_MIN_TOKENS = memory.TRIM_MIN_BYTES = 1 << 60  # both engines read them at each call
    model = portable_infer.load(package, "cpu", static_kv=variant == "static")
    ids = model.encode(TEXT * (tokens // 8 + 1))[:tokens]
    model.generate_ids(ids[:16], max_new_tokens=4)
    gc.collect()
    rest, extra = rss_mb(), ""
    if mode == "api":
        model.generate_ids(ids, max_new_tokens=4, ignore_eos=True)
    else:
        from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

        with Scheduler(model, SchedulerConfig(max_batch=4)) as sched:
            handle = sched.submit_ids(ids, model.params(max_new_tokens=8, ignore_eos=True))
            for _ in range(3):
                handle.get()
            extra = f", kv_cache_bytes mid-run {sched.stats().kv_bytes / 2**20:.0f} MiB"
            list(handle)
            time.sleep(0.2)  # the loop drops the finished batch
    gc.collect()
    after = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"{mode:5} {variant:6} {how}: prompt {len(ids)} tokens, RSS at rest {rest:.0f} MB, after "
            f"{after:.0f} MB ({after - rest:+.0f}), peak {peak:.0f} MB{extra}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--case", default=None, help="mode,variant,how (e.g. sched,fused,new); default: all")
    args = ap.parse_args()
    if args.case:
        print(run_case(args.package, *args.case.split(","), args.tokens), flush=True)
        return 0
    for mode in ("api", "sched"):
        for variant in ("static", "fused"):
            for how in ("old", "new"):
                case = f"{mode},{variant},{how}"
                subprocess.run([sys.executable, __file__, args.package, "--tokens", str(args.tokens),
                                "--case", case], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
