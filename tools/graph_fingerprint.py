"""Fingerprint every graph the exporter writes for the tiny test models, to prove a refactor of the
exporter changed no graph.

Usage::

    python tools/graph_fingerprint.py OUT.json [--root DIR] [--only SUBSTRING]
    python tools/graph_fingerprint.py --compare BEFORE.json AFTER.json

It exports (without verification) the tiny random models the tests use: every case of
``tests/test_export_parity.py`` at fp32, fp16, int8, int4 (every variant, -q4 included) and int4 with
fp16 activations; the AWQ/GPTQ checkpoints of ``tests/test_awq_gptq.py``; the GGUF files of every
family of ``tests/_gguf_files.py`` in both mixes of ``tests/test_gguf_families.py``. Weights come
from fixed seeds. Per graph it records the node list (op type, domain, inputs, outputs, attributes,
name), the graph inputs and outputs, the opsets, each initializer's name, type, shape and sha256, and
the manifest's entry of the variant; per package the manifest's file digests (every file byte for
byte) and the source's digest. ``--root`` runs another checkout's exporter (e.g. a
``git archive`` of the commit before a refactor). ``--compare`` prints the first differences and
exits 1 when the fingerprints differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

SEED = 20240617
HF_PRECISIONS = (("fp32", None), ("fp16", None), ("int8", None), ("int4", None), ("int4", "fp16"))


def _export(src, out: Path, **kw):
    """export() with every variant that applies: the defaults, plus the -q4 twins of the -int8 ones."""
    from exporters.export import export
    from exporters.export_plan import plan_export
    from exporters.sources import open_source

    variants = plan_export(open_source(src), **kw).variants
    if "fused-int8" in variants:
        variants += ("fused-q4",) + (("static-q4",) if "static" in variants else ())
    return export(src, out, verify=False, overwrite=True, variants=variants, **kw)


def _hf_cases(root: Path):
    """(case id, maker(tmp) -> source path, export kwargs) for the HF folders."""
    import test_export_parity as tp
    import transformers

    def hf(case, seed):
        def make(tmp: Path) -> Path:
            import torch

            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(case.config()).eval()
            tp.randomize(model, seed)
            model.save_pretrained(tmp / "hf")
            return tmp / "hf"
        return make

    for n, case in enumerate(tp.CASES):
        make = hf(case, SEED + n)
        for precision, act in HF_PRECISIONS:
            yield f"hf/{case.id}/{precision}{'-act16' if act else ''}", make, dict(precision=precision,
                                                                                   activations=act)
    yield "hf/llama-gqa-untied/int4-acc4-head1", hf(tp.CASES[0], SEED), dict(precision="int4", nbits_accuracy=4,
                                                                             head_accuracy=1)


def _awq_cases(root: Path):
    import test_awq_gptq as ta

    for n, (family, method, group, v1) in enumerate(ta.CASES):
        def make(tmp: Path, c=(family, method, group, v1), seed=SEED + 100 + n) -> Path:
            ta.write_checkpoint(tmp / "hf", *c, seed)
            return tmp / "hf"
        for head in (None, 1):
            yield f"awq/{family}-{method}-g{group}{'-v1' if v1 else ''}/head{head}", make, dict(head_accuracy=head)


def _gguf_cases(root: Path):
    import _gguf_files as gf
    import test_gguf_families as tg

    for family in gf.FAMILIES:
        for mix, type_for in tg.MIXES.items():
            def make(tmp: Path, family=family, type_for=type_for) -> Path:
                seed = tg.FILE_SEED[family]
                gf.write_gguf(gf.hf_model(family, seed), family, tmp / "model.gguf", type_for(), seed)
                return tmp / "model.gguf"
            yield f"gguf/{family}/{mix}", make, {}
            yield f"gguf/{family}/{mix}/act16", make, dict(activations="fp16")


def _initializer_hash(init, folder: Path) -> str:
    from onnx import TensorProto

    if init.data_location == TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in init.external_data}
        with open(folder / ext["location"], "rb") as f:
            f.seek(int(ext.get("offset", 0)))
            raw = f.read(int(ext["length"]))
    else:
        raw = init.raw_data or init.SerializeToString()
    return hashlib.sha256(raw).hexdigest()[:16]


def graph_fingerprint(path: Path) -> dict:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph

    def attr(a):
        v = helper.get_attribute_value(a)
        return repr(v.decode() if isinstance(v, bytes) else v)

    return {
        "opsets": sorted(f"{o.domain}:{o.version}" for o in model.opset_import),
        "inputs": [str(v).replace("\n", " ") for v in g.input],
        "outputs": [str(v).replace("\n", " ") for v in g.output],
        "nodes": [[n.op_type, n.domain, list(n.input), list(n.output),
                   sorted((a.name, attr(a)) for a in n.attribute)] for n in g.node],
        "node_names": [n.name for n in g.node],
        "initializers": [[i.name, i.data_type, list(i.dims), _initializer_hash(i, path.parent)]
                         for i in g.initializer],
    }


def package_fingerprint(pkg: Path) -> dict:
    manifest = json.loads((pkg / "manifest.json").read_text())
    # every file byte for byte (the manifest's own digests) and the digest of the source
    out = {"precision": manifest["precision"], "model": manifest["model"], "files": manifest["files"],
           "source_sha256": manifest["source"]["sha256"]}
    for v in manifest["variants"]:
        out[v["name"]] = {"manifest": v, "graph": graph_fingerprint(pkg / v["file"])}
    return out


def run(root: Path, only: str | None) -> dict:
    sys.path[:0] = [str(root), str(root / "tests")]
    import logging

    logging.disable(logging.WARNING)
    result = {}
    for cases in (_hf_cases, _awq_cases, _gguf_cases):
        for case_id, make, kw in cases(root):
            if only and only not in case_id:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                src = make(tmp)
                pkg = _export(src, tmp / "pkg", **{k: v for k, v in kw.items() if v is not None})
                result[case_id] = package_fingerprint(pkg)
            print(case_id, sorted(k for k in result[case_id] if k not in ("precision", "model")), flush=True)
    return result


def compare(a: dict, b: dict, limit: int = 20) -> list[str]:
    diffs = []

    def walk(x, y, where):
        if len(diffs) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    diffs.append(f"{where}/{k}: only in {'after' if k not in x else 'before'}")
                else:
                    walk(x[k], y[k], f"{where}/{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (p, q) in enumerate(zip(x, y)):
                walk(p, q, f"{where}[{i}]")
        elif x != y:
            diffs.append(f"{where}: {str(x)[:300]} != {str(y)[:300]}")

    walk(a, b, "")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--only")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        diffs = compare(before, after)
        print("\n".join(diffs) or f"identical: {len(before)} exports")
        return 1 if diffs else 0
    Path(args.out).write_text(json.dumps(run(Path(args.root).resolve(), args.only), indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
