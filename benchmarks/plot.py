"""Bar charts (plain SVG, no plotting library) of the CPU and GPU benchmark results.

    .venv/bin/python benchmarks/plot.py        # writes docs/img/cpu-decode.svg and docs/img/gpu-decode.svg

Reads benchmarks/results/cpu.json (compare_cpu.py) and benchmarks/results/gpu.json (gpu_bench.py).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "img"
OURS = "#1f77b4"
OTHERS = "#9e9e9e"


def bars(title: str, unit: str, rows: list[tuple[str, float | None]]) -> str:
    """Horizontal bars, one per (label, value); None is drawn as 'fails'."""
    label_w, bar_w, row_h, top = 300, 420, 24, 40
    peak = max((v for _, v in rows if v), default=1.0)
    h = top + row_h * len(rows) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="10" y="22" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, (label, value) in enumerate(rows):
        y = top + i * row_h
        color = OURS if label.startswith("portable_infer") else OTHERS
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(label)}</text>')
        if value:
            w = bar_w * value / peak
            out.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="{color}"/>')
            out.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{value:,.0f}</text>')
        else:
            out.append(f'<text x="{label_w + 4}" y="{y + 15}" fill="#b00">fails</text>')
    out.append(f'<text x="{label_w}" y="{h - 8}" fill="#555">{escape(unit)}</text></svg>')
    return "\n".join(out) + "\n"


def cpu_rows() -> list:
    """SmolLM2's rows (results files before the second model have no "model" key)."""
    data = json.loads((RESULTS / "cpu.json").read_text())
    return [(r["runtime"], r.get("decode_tok_s")) for r in data["results"]
            if r.get("model", "smollm2") == "smollm2"]


def gpu_rows(batch: int) -> list:
    data = json.loads((RESULTS / "gpu.json").read_text())
    return [(k.replace(f" b{batch}", ""), v.get("decode_tok_s")) for k, v in data["rows"].items()
            if k.endswith(f" b{batch}")]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if (RESULTS / "cpu.json").exists():
        (OUT / "cpu-decode.svg").write_text(bars(
            "CPU decode, batch 1 (SmolLM2-135M, 2 threads)", "tokens/s, higher is better", cpu_rows()))
    if (RESULTS / "gpu.json").exists():
        for b in (1, 16):
            (OUT / f"gpu-decode-b{b}.svg").write_text(bars(
                f"H100 decode, batch {b} (SmolLM2-135M shape)", "tokens/s, higher is better", gpu_rows(b)))
    print(f"wrote {sorted(p.name for p in OUT.glob('*.svg'))}")


if __name__ == "__main__":
    main()
