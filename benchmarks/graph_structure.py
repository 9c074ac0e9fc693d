"""What a decoder graph is made of, as text to put beside another's (used by graph_profile.py).

    .venv/bin/python benchmarks/graph_structure.py GRAPH.onnx [GRAPH.onnx ...] [--layer 0]

For each graph: its inputs (dtype, shape), op counts (whole graph and per decoder layer), every
distinct MatMulNBits form (K, N, bits, block size, accuracy level, zero points and their dtype,
g_idx, bias) with how many nodes use it, the attention / rotary / norm nodes' attributes, the
casts (from -> to), and the nodes of one decoder layer in order. Weights are not loaded
(``load_external_data=False``): initializer dtypes and shapes are in the graph itself.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

ATTRIBUTE_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding",
                 "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "GatherBlockQuantized")
MATMULNBITS_INPUTS = ("A", "B", "scales", "zero_points", "g_idx", "bias")


def load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "value"}


def dtype_name(elem_type: int) -> str:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "?"


LAYER_NAME = re.compile(r"(?:layers[./_]|past_key_values\.|present\.)(\d+)[./_]")
HEAD_NAME = re.compile(r"lm_head|model\.norm|final_norm")


def layers(nodes) -> list:
    """The decoder layer of each node (None: before the first layer or in the head): from a
    layer index in its name or inputs (weights, past KV), else the previous node's."""
    out, current = [], None
    for n in nodes:
        texts = (n.name, *n.input, *n.output)
        found = next((int(m.group(1)) for t in texts for m in [LAYER_NAME.search(t)] if m), None)
        if any(HEAD_NAME.search(t) for t in texts):
            current = None
        elif found is not None:
            current = found
        out.append(current)
    return out


def value_dtypes(model) -> dict:
    """{tensor name: dtype} for initializers, graph inputs/outputs and inferred values."""
    from onnx import shape_inference

    g = shape_inference.infer_shapes(model).graph
    out = {t.name: dtype_name(t.data_type) for t in g.initializer}
    for v in (*g.input, *g.output, *g.value_info):
        out[v.name] = dtype_name(v.type.tensor_type.elem_type)
    return out


def nbits_forms(model) -> Counter:
    """Counter of MatMulNBits forms: (K, N, bits, block, accuracy, zero points, g_idx, bias)."""
    dtypes = value_dtypes(model)
    forms = Counter()
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = attrs(n)
        given = dict(zip(MATMULNBITS_INPUTS, n.input))
        zp = given.get("zero_points") or ""
        forms[(a["K"], a["N"], a.get("bits", 4), a.get("block_size"), a.get("accuracy_level", 0),
               dtypes.get(zp, "?") if zp else "none", bool(given.get("g_idx")),
               bool(given.get("bias")))] += 1
    return forms


def describe(label: str, path: Path, layer: int = 0) -> str:
    """The graph's make-up as markdown."""
    m = load(path)
    g = m.graph
    nodes = list(g.node)
    where = layers(nodes)
    out = [f"\n## Structure of {label} ({path}): {len(nodes)} nodes, {len(set(where) - {None})} layers, "
           f"opsets {[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}\n",
           "inputs: " + ", ".join(f"{i.name} {dtype_name(i.type.tensor_type.elem_type)}"
                                  f"{[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]}"
                                  for i in g.input if "past" not in i.name),
           f"KV inputs: {sum('past' in i.name for i in g.input)}; outputs: "
           + ", ".join(o.name for o in g.output if "present" not in o.name)]
    counts = Counter(n.op_type for n in nodes)
    in_layer = Counter(n.op_type for n, w in zip(nodes, where) if w == layer)
    out.append("\n| op type | whole graph | in layer %d |\n|---|---:|---:|" % layer)
    out += [f"| {op} | {c} | {in_layer.get(op, 0)} |" for op, c in counts.most_common()]
    out.append("\n| MatMulNBits K x N | bits | block | accuracy | zero points | g_idx | bias | nodes |"
               "\n|---|---:|---:|---:|---|---|---|---:|")
    out += [f"| {k} x {nn} | {b} | {bs} | {acc} | {zp} | {gi} | {bias} | {c} |"
            for (k, nn, b, bs, acc, zp, gi, bias), c in sorted(nbits_forms(m).items())]
    seen = set()
    for n in nodes:
        if n.op_type in ATTRIBUTE_OPS and n.op_type not in seen:
            seen.add(n.op_type)
            out.append(f"- {n.op_type} (first of {counts[n.op_type]}): {attrs(n)}; "
                       f"inputs {[i or '-' for i in n.input]}")
    dtypes = value_dtypes(m)
    casts = Counter(f"{dtypes.get(n.input[0], '?')} -> {dtype_name(attrs(n)['to'])}"
                    for n in nodes if n.op_type == "Cast")
    out.append(f"- casts: {dict(casts) or 'none'}")
    out.append(f"\nlayer {layer}, in order:")
    out += [f"  {n.op_type:34s} {n.name}  {attrs(n) if n.op_type in ('MatMulNBits', 'Cast') else ''}"
            for n, w in zip(nodes, where) if w == layer]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", type=Path)
    ap.add_argument("--layer", type=int, default=0)
    args = ap.parse_args()
    for path in args.graphs:
        print(describe(path.name, path, args.layer))


if __name__ == "__main__":
    main()
