"""Sampled rows drawn on the device (``graphs/sample.onnx``) against the host's draw, at Llama-3's
vocabulary (issue #21 item 1): time per step and agreement, in one run.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_sample.py --out $OUT [--rows 64 256] [--vocab 128256]

For each batch size, logit scale (1: flat rows, most of the vocabulary in top-p's set; 4: peaked
rows) and filter setting: the median of ``--repeat`` device draws of every row (the uniform
numbers up, token ids back; the rows' logits stay on the device), and the host's way for the same
rows (the logits [rows, vocab] brought over, then ``make_sampler`` row by row, as host mode does).
``agree``: the device's tokens equal to the host's with the same uniform numbers (they may differ
only where a number lands within float rounding of a boundary). ``reruns``: rows whose kept set
lay past the 1,024 sorted candidates and ran again with the vocabulary sorted.
Random logits (seed printed); values do not change the time but for the reruns.
``--provider cpu`` is a dry run on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

SEED = 20261204
FILTERS = {"temp 0.7": dict(temperature=0.7), "top-k 50": dict(temperature=0.7, top_k=50),
           "top-p 0.9": dict(temperature=0.7, top_p=0.9),
           "k 50 p 0.9 min-p 0.05": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)}


class _Session:
    """What the companion sessions read of a model session."""

    def __init__(self, provider):
        self.provider = provider

    def get_providers(self):
        return [self.provider, "CPUExecutionProvider"]

    def get_provider_options(self):
        return {}


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    import onnxruntime as ort

    from portable_infer.decode.sampling import DrawFilters, SamplingParams, make_sampler
    from portable_infer.engine.device_logits import DeviceLogits
    from portable_infer.engine.device_sample import DeviceSampler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--host-rows", type=int, default=32, help="rows the host draws are timed on (scaled up)")
    ap.add_argument("--provider", default="cuda")
    args = ap.parse_args()
    provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[args.provider]
    device = "cuda" if args.provider == "cuda" else "cpu"
    rng = np.random.default_rng(SEED)
    print(f"seed {SEED}; ONNX Runtime {ort.__version__} on {provider}", flush=True)
    sampler = DeviceSampler(_Session(provider), ort, provider)
    lines = ["| rows | logit scale | filters | device ms / step | host ms / step (est.) | agree | reruns |",
             "|---|---|---|---|---|---|---|"]
    for rows in args.rows:
        for scale in args.scales:
            host_logits = (rng.standard_normal((rows, 1, args.vocab)) * scale).astype(np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(host_logits, device, 0)
            out = DeviceLogits(value, None, sampler=lambda: sampler)
            for name, kw in FILTERS.items():
                params = [SamplingParams(**kw)] * rows
                filters, u = DrawFilters.of(params), rng.random(rows)
                every = np.arange(rows)
                before = sampler.reruns
                tokens = out.sample(every, filters, u)
                reruns = sampler.reruns - before
                device_ms = _median_ms(lambda: out.sample(every, filters, u), args.repeat)
                sampler_fn, n = make_sampler(params[0]), min(args.host_rows, rows)

                class Fixed:
                    def __init__(self, x):
                        self.x = x

                    def random(self):
                        return self.x

                def host():
                    x = value.numpy()  # the logits over, as host mode brings them
                    return [sampler_fn(x[i, 0], Fixed(u[i])) for i in range(n)]

                host_ms = _median_ms(host, max(3, args.repeat // 3))
                fetch_ms = _median_ms(lambda: value.numpy(), 3)
                host_est = fetch_ms + (host_ms - fetch_ms) * rows / n
                want = host()
                agree = int(sum(int(t) == w for t, w in zip(tokens[:n], want)))
                line = f"| {rows} | {scale:g} | {name} | {device_ms:.2f} | {host_est:.1f} | {agree}/{n} | {reruns} |"
                print(line, flush=True)
                lines.append(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_sample.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
