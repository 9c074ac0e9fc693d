"""Quality of the int4 forms: top-1 agreement with the float reference over >= 512 positions.

    .venv/bin/python benchmarks/int4_forms.py [SOURCE] [--variants static,static-int8,static-q4]
        [--heads int8-top16,int4,fp32] [--int8-heads int4-top256,int8] [--mean-weights 0,4] [--no-clip]
        [--rtn] [--float-fit]
        [--q4-1-bits 4|8]
        [--out DIR] [--json FILE] [--continuations 4]
    .venv/bin/python benchmarks/int4_forms.py --make-float-standin .bench/hf/smollm2 OUT

SOURCE (default: the default SmolLM2 Q4_1 GGUF; for a float source, ``--make-float-standin``) is
exported once with ``--variants`` (int4, no verification), once more with the ``static-int8``
graph alone per ``--int8-heads`` form, and with the ``static-q4`` graph alone per alternative asked
for (lm_head form, fit weight, no clipping, round-to-nearest
instead of the fit, the fit for float weights too); each graph then runs two teacher-forced checks against
transformers' float32 model (the GGUF dequantized, or the HF folder), with ONNX Runtime on the CPU:

- ``text``: compare_cpu.py's quality measure: the first 160 tokens of each of ``exporters/reference/texts``
  (4 x 159 predicted positions); our argmax equals the reference's argmax at each position, and
  perplexity against the reference's;
- ``cont``: the export gate's metric (``verify.quality``) on more prompts: the first 16 tokens of
  each of the first ``--continuations`` texts, continued greedily by the reference for 128
  tokens; our argmax equals the reference's next token at each step.

It also prints the fitted weights' error against the source's exact block values (``fit_error``),
for the fit weights asked, and round-to-nearest of the dequantized blocks beside it. Quality only:
no timings (the machine is shared; use ``portable-infer bench``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters import export as ex  # noqa: E402
from exporters import int4_fit, weights  # noqa: E402
from exporters.lowering import spec  # noqa: E402
from exporters.quant import quantize  # noqa: E402
from exporters.references import TEXT_TOKENS, quality_texts  # noqa: E402
from exporters.sources import open_source  # noqa: E402
from exporters.verify import all_logits, decoder, load_reference, log_softmax, torch_logits  # noqa: E402
from portable_infer.package import manifest as mf  # noqa: E402

PROMPT_TOKENS = 16
CONT_STEPS = 128


def tokenizer(package: Path, manifest: mf.Manifest):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(package / manifest.tokenizer.file))


def reference(model, texts: list, n_cont: int, cache: Path) -> dict:
    """The reference's logits argmax on each text and its greedy continuations of the prompts
    (cached in ``cache``: the reference is the slow part on a small machine)."""
    import torch

    if cache.is_file():
        z = np.load(cache)
        n = len(texts)
        return {"text": [z[f"text{i}"] for i in range(n)], "text_nll": list(z["text_nll"]),
                "cont": [z[f"cont{i}"] for i in range(min(n_cont, int(z["n_cont"])))]}
    ref = {"text": [], "text_nll": [], "cont": []}
    for ids in texts:
        seq = np.asarray([ids], np.int64)
        logits = torch_logits(model, seq, np.ones_like(seq))[0][:-1]
        ref["text"].append(logits.argmax(-1))
        ref["text_nll"].append(float(-np.take_along_axis(log_softmax(logits), seq[0, 1:, None], -1).mean()))
    for ids in texts[:n_cont]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids[:PROMPT_TOKENS]]), max_new_tokens=CONT_STEPS, do_sample=False,
                                 min_new_tokens=CONT_STEPS, pad_token_id=0)
        ref["cont"].append(out[0].numpy().astype(np.int64))
    np.savez(cache, text_nll=np.asarray(ref["text_nll"]), n_cont=n_cont,
             **{f"text{i}": a for i, a in enumerate(ref["text"])}, **{f"cont{i}": a for i, a in enumerate(ref["cont"])})
    return ref


def measure(package: Path, name: str, texts: list, ref: dict) -> dict:
    manifest = mf.Manifest.load(package)
    dec = decoder(package / manifest.variant(name).file, manifest.variant(name), manifest)
    agree = total = 0
    nll = []
    for ids, ref_top in zip(texts, ref["text"]):
        seq = np.asarray([ids], np.int64)
        logits = all_logits(dec, seq)[0][:-1]
        agree += int((logits.argmax(-1) == ref_top).sum())
        total += len(ref_top)
        nll.append(float(-np.take_along_axis(log_softmax(logits), seq[0, 1:, None], -1).mean()))
    c_agree = c_total = 0
    for seq in ref["cont"]:
        logits = all_logits(dec, seq[None])[0]
        n = PROMPT_TOKENS
        c_agree += int((logits[n - 1:-1].argmax(-1) == seq[n:]).sum())
        c_total += len(seq) - n
    ppl, ppl_ref = float(np.exp(np.mean(nll))), float(np.exp(np.mean(ref["text_nll"])))
    return {"text": f"{agree}/{total}", "text_pct": 100 * agree / total, "cont": f"{c_agree}/{c_total}",
            "cont_pct": 100 * c_agree / max(c_total, 1), "ppl": ppl, "ppl_delta_pct": 100 * (ppl / ppl_ref - 1)}


def weight_errors(src, mean_weights: list, layers=(0, 15, 29)) -> None:
    """fit_error of a few layers' matrices: the fit at each weight, and RTN of the dequantized copy."""
    n = src.config["num_hidden_layers"]
    for i in sorted({min(x, n - 1) for x in layers}):
        for role in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{role}.weight"
            w = src.get(name)
            rows = {f"fit mw={mw}": int4_fit.fit_int4(w, mean_weight=mw) for mw in mean_weights}
            dense = w.dequantize() if hasattr(w, "dequantize") else w
            rows["rtn"] = quantize(dense, 4)
            for k, b in rows.items():
                e = int4_fit.fit_error(w, b)
                print(f"  {name:45s} {k:12s} max {e['max_abs']:.4f} mean {e['mean_abs']:.5f} "
                      f"mean block shift {e['mean_block_shift']:.5f} (rel mean {e['mean_abs_rel']:.3f})")


def float_standin(hf_dir: Path, out: Path, seed: int = 20251202) -> None:
    """A float stand-in for SmolLM2's unquantized weights: the fp32 HF folder dequantized from the
    default GGUF (``setup_competitors.py`` writes it to .bench/hf/smollm2) with uniform noise of
    +-d/2 added to every Q4_1 block (what rounding to the block's grid removed)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    gguf = open_source("default")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    rng = np.random.default_rng(seed)
    for name, w in tensors.items():
        b = gguf.get(name) if gguf.has(name) else None
        if getattr(b, "kind", None) == "q4_1" and w.ndim == 2:
            step = np.repeat(b.scale, b.block, axis=1)
            tensors[name] = (w + (rng.random(w.shape, dtype=np.float32) - 0.5) * step).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    for f in hf_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)


@dataclass(frozen=True)
class Run:
    """One export: which graphs, and the exporter settings it runs with (module globals)."""

    variants: tuple
    head: str = spec.Q4_HEAD
    int8_head: str = spec.INT8_HEAD
    mean_weight: float = int4_fit.MEAN_WEIGHT
    scales: tuple = int4_fit.FIT_SCALES
    fit: object = int4_fit.fit_int4
    q4_1_bits: int = weights.Q4_1_FIT_BITS
    float_fit: bool = weights.FLOAT_FIT
    block: int | None = None  # export(block=): a float source's blocks (None: the exporter's default)

    def apply(self) -> None:
        spec.Q4_HEAD, int4_fit.MEAN_WEIGHT, int4_fit.FIT_SCALES = self.head, self.mean_weight, self.scales
        spec.INT8_HEAD = self.int8_head
        weights.fit_int4, weights.Q4_1_FIT_BITS, weights.FLOAT_FIT = self.fit, self.q4_1_bits, self.float_fit


def plan(args) -> dict:
    """The exports asked for: the base one, then one static-q4 export per alternative."""
    q4 = ("static-q4",)
    bits = args.q4_1_bits or weights.Q4_1_FIT_BITS
    runs = {"base": Run(tuple(args.variants.split(",")), q4_1_bits=bits)}
    for head in [h for h in args.heads.split(",") if h]:
        runs[f"q4 head={head}"] = Run(q4, head=head, q4_1_bits=bits)
    for head in [h for h in args.int8_heads.split(",") if h]:
        runs[f"int8 head={head}"] = Run(("static-int8",), int8_head=head, q4_1_bits=bits)
    for mw in [float(x) for x in args.mean_weights.split(",") if x]:
        runs[f"q4 mw={mw}"] = Run(q4, mean_weight=mw, q4_1_bits=bits)
    if args.no_clip:
        runs["q4 no-clip"] = Run(q4, scales=tuple(f for f in int4_fit.FIT_SCALES if f >= 1), q4_1_bits=bits)
    if args.rtn:
        rtn = lambda w, bits=4: quantize(w.dequantize() if hasattr(w, "dequantize") else w, 4)  # noqa: E731
        runs["q4 rtn"] = Run(q4, fit=rtn, q4_1_bits=bits)
    if args.float_fit:
        runs["q4 float-fit"] = Run(q4, float_fit=True, q4_1_bits=bits)
    for block in [int(b) for b in args.blocks.split(",") if b]:
        runs[f"block={block}"] = Run(("static", "static-int8"), block=block, q4_1_bits=bits)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default="default")
    ap.add_argument("--variants", default="static,static-int8,static-q4")
    ap.add_argument("--heads", default="", help="extra static-q4 exports, one per lm_head form")
    ap.add_argument("--int8-heads", default="", help="extra static-int8 exports, one per lm_head form")
    ap.add_argument("--mean-weights", default="", help="extra static-q4 exports, one per fit weight")
    ap.add_argument("--rtn", action="store_true",
                    help="one more static-q4 export whose layers are round-to-nearest of the dequantized "
                         "blocks (what re-quantizing a dequantized copy gives) instead of the fit")
    ap.add_argument("--no-clip", action="store_true",
                    help="one more static-q4 export fitted without the scale candidates below 1")
    ap.add_argument("--float-fit", action="store_true",
                    help="one more static-q4 export whose float layers are fitted (weights.FLOAT_FIT)")
    ap.add_argument("--blocks", default="",
                    help="extra static + static-int8 exports of a float source, one per block size "
                         "(export(block=): 64, 128)")
    ap.add_argument("--q4-1-bits", type=int, choices=(4, 8), default=None,
                    help="width of the static-q4 graphs' Q4_1 layers (default: weights.Q4_1_FIT_BITS)")
    ap.add_argument("--continuations", type=int, default=4)
    ap.add_argument("--out", default=None, help="keep the packages here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--make-float-standin", nargs=2, metavar=("HF_DIR", "OUT"), default=None,
                    help="write float_standin(HF_DIR) to OUT (then pass OUT as SOURCE) and exit")
    args = ap.parse_args()
    if args.make_float_standin:
        float_standin(*(Path(p) for p in args.make_float_standin))
        return
    work = Path(args.out or tempfile.mkdtemp(prefix="int4_forms_"))
    src = open_source(args.source)
    print("fit error against the source's exact blocks:")
    weight_errors(src, [float(x) for x in args.mean_weights.split(",") if x] or [int4_fit.MEAN_WEIGHT])
    results = {}
    for key, run in plan(args).items():
        pkg = work / key.replace(" ", "_").replace("=", "-")
        if not (pkg / mf.MANIFEST_NAME).is_file():
            run.apply()
            ex.export(args.source, pkg, precision="int4", variants=run.variants, verify=False, overwrite=True,
                      block=run.block)
        results.update(measure_package(pkg, "" if key == "base" else f" ({key})", src, work, args.continuations))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def measure_package(pkg: Path, suffix: str, src, work: Path, continuations: int) -> dict:
    """Every graph of ``pkg`` against the reference (computed once per work folder), printed."""
    manifest = mf.Manifest.load(pkg)
    tok = tokenizer(pkg, manifest)
    texts = [tok.encode(f.read_text(encoding="utf-8"), add_special_tokens=False).ids[:TEXT_TOKENS]
             for f in quality_texts()]
    cache = work / "reference.npz"
    ref = reference(None if cache.is_file() else load_reference(src), texts, continuations, cache)
    results = {}
    for v in manifest.variants:
        done = pkg / f"quality-{v.name}.json"  # measured before: the slow part, kept
        if not done.is_file():
            done.write_text(json.dumps(measure(pkg, v.name, texts, ref)))
        results[v.name + suffix] = r = json.loads(done.read_text())
        print(f"| {v.name}{suffix} | {r['text']} ({r['text_pct']:.1f} %) | {r['cont']} ({r['cont_pct']:.1f} %) | "
              f"{r['ppl']:.3f} ({r['ppl_delta_pct']:+.2f} %) |", flush=True)
    return results


if __name__ == "__main__":
    main()
