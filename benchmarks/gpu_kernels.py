"""GPU time per kernel of a static-KV decode step, with and without CUDA graphs (torch.profiler / CUPTI).

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_kernels.py PKG [--batches 1,64,256] [--context 32]
        [--options CUDA_OPTIONS_JSON] [--graphs both|on|off]

Prints, per batch size (each profiled on the one loaded model) and mode: wall time per step, the
GPU kernel time summed per step, kernels per step, copies and memsets per step, and the kernels
taking most time. Kernel time well under the wall time means the step is bound by launches and
gaps between kernels, not by the kernels themselves. ``--context``: the prompt each row
prefills before the timed steps (attention's share grows with it; the steps add 60 more).
ONNX Runtime's attention switches are environment variables read when the session is made
(``ORT_ENABLE_XQA=0`` turns its XQA decode kernel off): set them on the command.
"""

import argparse
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
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--options", default="{}", help="CUDA provider options, JSON")
    ap.add_argument("--graphs", choices=("both", "on", "off"), default="both")
    ap.add_argument("--provider", default="cuda", help="cpu: a dry run of the script")
    args = ap.parse_args()
    options = json.loads(args.options)
    m = portable_infer.load(args.package, args.provider, strict=True, static_kv=True, check="size",
                            provider_options={"cuda": options} if options else None)
    print(f"\n# {args.package} batches {args.batches}, context {args.context}, CUDA options {options}")
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.graphs] if args.provider == "cuda" else (False,)
    for batch in map(int, args.batches.split(",")):
        for graphs in modes:
            profile_batch(m.engine, batch, args.context, graphs)


def profile_batch(e, batch: int, context: int, graphs: bool, steps: int = 50) -> None:
    """Wall and kernel time per decode step at ``batch`` rows after ``context`` tokens each."""
    e.cuda_graph = graphs
    cache = e.new_cache(batch, capacity=context + steps + 16)
    ids = np.random.default_rng(0).integers(1000, 30000, (batch, context))
    e.forward(ids, np.ones_like(ids), cache)
    width, one = context, np.full((batch, 1), 5, np.int64)
    for _ in range(10):  # warm-up and capture
        width += 1
        e.forward(one, np.ones((batch, width), np.int64), cache, greedy=True)
    with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            width += 1
            e.forward(one, np.ones((batch, width), np.int64), cache, greedy=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps * 1e3
    by, count, moves = collections.Counter(), collections.Counter(), collections.Counter()
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        name = ev.name.lower()
        if "memcpy" in name or "memset" in name:
            moves["memset" if "memset" in name else "memcpy"] += us
            continue
        by[ev.name[:70]] += us
        count[ev.name[:70]] += 1
    total = sum(by.values()) / steps / 1e3
    print(f"\n## batch {batch}, context {context}+, CUDA graphs {graphs}: wall {wall:.3f} ms/step, kernels "
          f"{total:.3f} ms/step, {sum(count.values()) / steps:.0f} kernels/step; "
          + ", ".join(f"{k} {v / steps / 1e3:.3f} ms/step" for k, v in sorted(moves.items())))
    for k, v in by.most_common(14):
        print(f"{v / steps / 1e3:8.4f} ms  x{count[k] / steps:5.1f}  {k}")
    del cache


if __name__ == "__main__":
    main()
