"""Growing KV (fused graph) against fixed KV buffers (static graph) on CPU, by context length.

    .venv/bin/python benchmarks/kv_growth.py [PKG] [--threads 2] [--cases 1x32 1x1500 16x100 4x800]

The fused graph returns ``present = past + new`` in new memory, so every decode step copies the
whole cache; the static graph's GroupQueryAttention writes the new token into the buffer it reads
(past and present are one binding). Each case is BATCHxPROMPT random tokens, then 32 (or 48)
greedy tokens through the runtime's BatchDecoder; the two graphs of the same package take turns,
median of 3 runs each. The package must have both variants (exports of rotary models do).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import portable_infer  # noqa: E402
from portable_infer.decode.generate import BatchDecoder  # noqa: E402


def rate(model, prompts: list, new: int) -> float:
    dec = BatchDecoder(model.engine, prompts, [model.params(max_new_tokens=new, ignore_eos=True)] * len(prompts),
                       max_context=model.max_context)
    t = time.perf_counter()
    dec.run()
    return len(prompts) * dec.timings["decode_steps"] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("package", nargs="?", default=None, help="default: the default model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=["1x32", "1x1500", "16x100", "4x800"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    models = {static: portable_infer.load(args.package, "cpu", intra_op_threads=args.threads, static_kv=static,
                                          check="size") for static in (False, True)}
    rng = np.random.default_rng(0)
    vocab = models[False].manifest.model.vocab_size
    print("| batch | prompt tokens | new tokens | growing KV (fused) tok/s | fixed KV (static) tok/s | static / fused |")
    print("|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        batch, length = (int(x) for x in case.split("x"))
        new = 48 if length <= 128 else 32
        prompts = rng.integers(3, vocab, (batch, length)).tolist()
        rates = {False: [], True: []}
        for _ in range(args.runs + 1):  # the first round warms up
            for static, m in models.items():
                rates[static].append(rate(m, prompts, new))
        fused, static = statistics.median(rates[False][1:]), statistics.median(rates[True][1:])
        print(f"| {batch} | {length} | {new} | {fused:.1f} | {static:.1f} | {static / fused:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
