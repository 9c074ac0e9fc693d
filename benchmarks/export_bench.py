"""fp32 export of SmolLM2-135M (the default GGUF): wall time and peak RSS against the fp32 weights.

    .venv/bin/python benchmarks/export_bench.py [--runs 3] [--variants portable,fused]

Each run is a fresh process (peak RSS = its ru_maxrss), exporting without verification so the
number is the exporter's own (verification loads a transformers reference on top). Goal: peak
RSS at most 2x the fp32 weight bytes. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from exporters.export import export
from portable_infer.manifest import Manifest
out = sys.argv[1]
t = time.perf_counter()
export("default", out, precision="fp32", verify=False, variants=tuple(sys.argv[2].split(",")))
wall = time.perf_counter() - t
m = Manifest.load(out)
d = m.model
params = (d.vocab_size * d.hidden_size + d.num_layers * (
    d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * d.head_dim + d.num_heads * d.head_dim * d.hidden_size
    + 3 * d.hidden_size * d.intermediate_size + 2 * d.hidden_size) + d.hidden_size)
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "weights_fp32_mib": params * 4 / 2**20,
                  "package_mib": sum(f.size for f in m.files) / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="portable,fused")
    args = ap.parse_args()
    rows = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "pkg"), args.variants],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio = med["peak_rss_mib"] / med["weights_fp32_mib"]
    print(f"fp32 export of SmolLM2-135M (default GGUF), variants {args.variants}, median of {args.runs} runs")
    print("| wall s | peak RSS MiB | fp32 weights MiB | RSS / weights | package MiB | goal |")
    print("|---|---|---|---|---|---|")
    print(f"| {med['wall_s']:.1f} | {med['peak_rss_mib']:.0f} | {med['weights_fp32_mib']:.0f} | {ratio:.2f}x | "
          f"{med['package_mib']:.0f} | <= 2.0x: {'met' if ratio <= 2 else 'NOT met'} |")


if __name__ == "__main__":
    main()
