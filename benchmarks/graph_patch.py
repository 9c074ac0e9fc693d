"""Rewrite a copy of one of our exported decode graphs, to time what an exporter change would do
before anyone changes the exporter.

    .venv/bin/python benchmarks/graph_patch.py PKG VARIANT OUT --patch NAME [--patch NAME ...]
    .venv/bin/python benchmarks/graph_patch.py --list

``OUT`` (a new folder, never inside the package) gets a copy of ``manifest.json`` and the patched
``model.<variant>.onnx`` with its weights in one new ``.data`` file, so ``graph_profile.py`` runs
it as ``--graph LABEL=OUT:VARIANT`` beside the original and GenAI's graph. The package itself is
only read. The patches (``--list``) are listed in ``PATCHES``; they change speed, and some change
values (requantized weights: round-to-nearest from the dequantized ones), so a patched graph is
for timing, not for quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

BLOCK = 32


# --- MatMulNBits weights: B [N, blocks, block*bits/8] uint8, scales [N, blocks], zero points ----
def _init(model, name):
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _set_init(model, name, array) -> str:
    from onnx import numpy_helper

    g = model.graph
    old = [t for t in g.initializer if t.name == name]
    for t in old:
        g.initializer.remove(t)
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def _attr(node, name, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def dequantize(model, node) -> np.ndarray:
    """The float weight [N, K] a MatMulNBits node (4 or 8 bits) multiplies by."""
    K, N, bits, size = _attr(node, "K"), _attr(node, "N"), _attr(node, "bits", 4), _attr(node, "block_size", BLOCK)
    blocks = -(-K // size)
    B = _init(model, node.input[1]).reshape(N, blocks, -1)
    if bits == 4:
        q = np.stack([B & 0x0F, B >> 4], axis=-1).reshape(N, blocks, size)
    else:
        q = B.reshape(N, blocks, size)
    scale = _init(model, node.input[2]).reshape(N, blocks, 1).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = _init(model, node.input[3]).reshape(N, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(N, -1)
        zp = zp[:, :blocks, None].astype(np.float32)
    else:
        zp = np.float32(2 ** (bits - 1))
    return ((q.astype(np.float32) - zp) * scale).reshape(N, blocks * size)[:, :K]


def quantize(w: np.ndarray, bits: int, zero_points: bool, block: int = BLOCK) -> tuple:
    """Round-to-nearest MatMulNBits blocks of ``w`` [N, K]: (B, scales, zero points or None)."""
    N, K = w.shape
    blocks = -(-K // block)
    wb = np.zeros((N, blocks * block), np.float32)
    wb[:, :K] = w
    wb = wb.reshape(N, blocks, block)
    top = 2 ** bits - 1
    if zero_points:
        lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
        zp = np.clip(np.round(-lo / scale), 0, top).astype(np.uint8)
    else:
        scale = (np.abs(wb).max(-1) / (2 ** (bits - 1) - 1)).astype(np.float32)
        scale[scale == 0] = 1.0
        zp = np.full(scale.shape, 2 ** (bits - 1), np.uint8)
    q = np.clip(np.round(wb / scale[..., None]) + zp[..., None], 0, top).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
        zp_packed = np.zeros((N, -(-blocks // 2) * 2), np.uint8)
        zp_packed[:, :blocks] = zp
        zp = zp_packed[:, 0::2] | (zp_packed[:, 1::2] << 4)
    return q, scale, (zp if zero_points else None)


def requantize(model, node, bits: int, zero_points: bool = True, block: int = BLOCK) -> None:
    """Replace a MatMulNBits node's weights by ``bits``-bit round-to-nearest blocks of ``block``."""
    w = dequantize(model, node)
    B, scale, zp = quantize(w, bits, zero_points, block)
    stem = node.name + f".q{bits}b{block}"
    inputs = [node.input[0], _set_init(model, stem + ".B", B), _set_init(model, stem + ".scale", scale)]
    if zp is not None:
        inputs.append(_set_init(model, stem + ".zp", zp))
    del node.input[:]
    node.input.extend(inputs)
    _set_attr(node, "bits", bits)
    _set_attr(node, "block_size", block)


# --- the patches: each takes the loaded model (weights included) and rewrites it in place --------
def _nbits(model) -> list:
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


def _head(model):
    """The lm_head: the MatMulNBits with the most outputs (the vocabulary), the last such node
    where a packed layer is as wide (a tiny model's gate/up can be)."""
    return max(reversed(_nbits(model)), key=lambda n: _attr(n, "N"))


def _layers(model) -> list:
    head = _head(model)
    return [n for n in _nbits(model) if n is not head]


def accuracy(level: int):
    def patch(model) -> None:
        for n in _nbits(model):
            _set_attr(n, "accuracy_level", level)
    return patch


def layers_bits(bits: int, zero_points: bool = True, block: int = BLOCK):
    def patch(model) -> None:
        done = {}
        for n in _layers(model):  # a table shared by two nodes is requantized once
            key = n.input[1]
            if key in done:
                del n.input[1:]
                n.input.extend(done[key])
                _set_attr(n, "bits", bits)
                _set_attr(n, "block_size", block)
                continue
            requantize(model, n, bits, zero_points, block)
            done[key] = list(n.input[1:])
    return patch


def head_bits(bits: int, zero_points: bool = True):
    def patch(model) -> None:
        requantize(model, _head(model), bits, zero_points)
    return patch


def _rows(model, name, start, stop, rows_total):
    """Rows [start, stop) of a per-output-row initializer of a MatMulNBits with ``rows_total`` rows."""
    a = _init(model, name)
    part = a.reshape(rows_total, -1)[start:stop]
    return part.reshape((stop - start, *a.shape[1:])) if a.shape[0] == rows_total else part.reshape(-1)


def split_gate_up(model) -> None:
    """A packed gate/up MatMulNBits followed by a two-way Split on the last axis becomes two
    MatMulNBits (the rows of B, scales and zero points cut exactly; no requantization)."""
    g = model.graph
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in _layers(model):
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or not _halves(model, users[0], _attr(node, "N")):
            continue
        split, N = users[0], _attr(node, "N")
        halves = []
        for k, (lo, hi) in enumerate(((0, N // 2), (N // 2, N))):
            ins = [node.input[0]] + [_set_init(model, f"{name}.part{k}", _rows(model, name, lo, hi, N))
                                     for name in node.input[1:] if name]
            half = copy_node(node, f"{node.name}.part{k}", ins, [split.output[k]])
            _set_attr(half, "N", N // 2)
            halves.append(half)
        at = list(g.node).index(node)
        g.node.remove(node)
        g.node.remove(split)
        for k, half in enumerate(halves):
            g.node.insert(at + k, half)


def _halves(model, split, n: int) -> bool:
    """Whether ``split`` cuts the last axis of an [..., n] tensor into two equal halves."""
    if split.op_type != "Split" or len(split.output) != 2 or _attr(split, "axis", 0) not in (-1, 2):
        return False
    sizes = _init(model, split.input[1]).tolist() if len(split.input) > 1 and split.input[1] else None
    return sizes is None or sizes == [n // 2, n // 2]


def gbq_rows(model) -> None:
    """Rows of an 8-bit MatMulNBits table gathered and dequantized by one com.microsoft
    GatherBlockQuantized (ONNX Runtime >= 1.23 for uint8 8-bit data) instead of
    ``Reshape(Mul(Sub(Cast(Gather(B, ids)), 128), Unsqueeze(Gather(scale, ids))))``: the
    embedding row and the refined head rows (exact: the same arithmetic). The table is given a
    second, [N, K] initializer (the copy is only for the timing)."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}
    views = {}
    for gather in [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits
                   and len(inits[n.input[0]].dims) == 3]:
        chain = [gather]
        for op in ("Cast", "Sub", "Mul", "Reshape"):
            users = consumers.get(chain[-1].output[0], [])
            if len(users) != 1 or users[0].op_type != op:
                break
            chain.append(users[0])
        if len(chain) != 5 or float(_init(model, chain[2].input[1])) != 128.0:
            continue
        mul = chain[3]
        unsq = producer[mul.input[1]]
        scale_gather = producer[unsq.input[0]]
        table = gather.input[0]
        if table not in views:
            n_rows, blocks, block = inits[table].dims
            views[table] = (_set_init(model, table + ".rows", _init(model, table).reshape(n_rows, blocks * block)), block)
        view, block = views[table]
        node = helper.make_node("GatherBlockQuantized", [view, gather.input[1], scale_gather.input[0]],
                                [chain[4].output[0]], name=gather.name + ".gbq", domain="com.microsoft",
                                gather_axis=0, quantize_axis=1, block_size=block, bits=8)
        at = list(g.node).index(gather)
        for n in [*chain, unsq, scale_gather]:
            g.node.remove(n)
        g.node.insert(at, node)


def block16(model) -> None:
    """The decoder layers' 4-bit MatMulNBits (block 32) at block 16: the same codes, each block's
    scale and zero point twice, so the same weights (exact), with int8 activations quantized in
    blocks of 16 instead of 32 where the layer runs at accuracy 4."""
    done = set()
    for node in _layers(model):
        if _attr(node, "bits", 4) != 4 or _attr(node, "block_size") != BLOCK:
            continue
        names = list(node.input[1:4])
        if names[0] not in done:
            B = _init(model, names[0])
            n, blocks, size = B.shape
            _set_init(model, names[0], B.reshape(n, 2 * blocks, size // 2))
            _set_init(model, names[1], np.repeat(_init(model, names[1]).reshape(n, blocks), 2, axis=1))
            if len(names) > 2 and names[2]:  # uint8 zero points, two 4-bit ones a byte
                packed = _init(model, names[2]).reshape(n, -1)
                zp = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :blocks]
                zp = np.repeat(zp, 2, axis=1)  # 2 * blocks: an even count
                _set_init(model, names[2], (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8))
            done.add(names[0])
        _set_attr(node, "block_size", BLOCK // 2)


def head_lean(model) -> None:
    """The refined head's TopK unsorted, and next_token the best refined candidate (ArgMax over
    the refined rows, their vocabulary ids gathered from TopK's) instead of ArgMax over every
    logit after ScatterElements: the same token wherever a refined logit is the largest."""
    from onnx import helper

    g = model.graph
    topk = next(n for n in g.node if n.op_type == "TopK")
    _set_attr(topk, "sorted", 0)
    arg = next(n for n in g.node if n.op_type == "ArgMax")
    scatter = next(n for n in g.node if n.op_type == "ScatterElements")
    ids, refined = scatter.input[1], scatter.input[2]
    axes = _set_init(model, "head_lean.axes", np.array([-1], np.int64))
    at = list(g.node).index(arg)
    g.node.remove(arg)
    for k, node in enumerate([
            helper.make_node("ArgMax", [refined], ["head_lean.best"], axis=-1, keepdims=1, name="head_lean.argmax"),
            helper.make_node("GatherElements", [ids, "head_lean.best"], ["head_lean.id"], axis=-1, name="head_lean.id"),
            helper.make_node("Squeeze", ["head_lean.id", axes], [arg.output[0]], name="head_lean.squeeze")]):
        g.node.insert(at + k, node)


def copy_node(node, name, inputs, outputs):
    from onnx import helper

    out = helper.make_node(node.op_type, inputs, outputs, name=name, domain=node.domain)
    out.attribute.extend(node.attribute)
    return out


def offset_chains(model) -> list:
    """Each 4-bit linear's Q4_1 offset term, ``Add(MatMulNBits(x), MatMul(ReduceSum(Reshape(x)),
    offset))``: (the Add, the MatMulNBits, the offset MatMul, the nodes that only the term uses)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    uses = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    chains = []
    for add in (n for n in g.node if n.op_type == "Add" and len(n.input) == 2):
        pair = {getattr(producer.get(i), "op_type", None): producer.get(i) for i in add.input}
        if set(pair) != {"MatMulNBits", "MatMul"}:
            continue
        total = producer.get(pair["MatMul"].input[0])
        if total is None or total.op_type != "ReduceSum":
            continue
        view = producer.get(total.input[0])
        alone = view is not None and view.op_type == "Reshape" and uses[view.output[0]] == 1  # x's block view, only here
        term = {pair["MatMul"].name, total.name} | ({view.name} if alone else set())
        chains.append((add, pair["MatMulNBits"], pair["MatMul"], term))
    return chains


def _rewire(model, drop: set, rename: dict | None = None, replace: dict | None = None) -> None:
    """The graph without the nodes ``drop``; inputs renamed by ``rename``; each node named in
    ``replace`` becomes ``MatMul(x, w)`` for its ``(x, w)``, with the same outputs."""
    keep = []
    for n in model.graph.node:
        if n.name in drop:
            continue
        if replace and n.name in replace:
            n = copy_node(n, n.name, list(replace[n.name]), list(n.output))
            n.op_type, n.domain = "MatMul", ""
            del n.attribute[:]
        n.input[:] = [(rename or {}).get(i, i) for i in n.input]
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def no_offsets(model) -> None:
    """Timing only (values change): each 4-bit linear's Q4_1 offset term dropped (:func:`offset_chains`);
    what an exact form of the offsets could save at most."""
    chains = offset_chains(model)
    _rewire(model, set().union(*(term | {add.name} for add, _, _, term in chains)),
            rename={add.output[0]: nbits.output[0] for add, nbits, _, _ in chains})


def dense(model) -> None:
    """Exact (the same weights, in fp32): each float-activation 4-bit linear of the exact graphs,
    with its Q4_1 offset term (:func:`offset_chains`) or a lone ``MatMulNBits(x)``, as one MatMul
    over its dequantized weight with the offsets added in (``w[k, n] + offset[k // block, n]``):
    what a dense fp32 copy of the weights would do to a step (4 bytes a weight in memory)."""
    drop, replace = set(), {}
    for add, nbits, offset, term in offset_chains(model):
        if _attr(nbits, "accuracy_level", 0) != 1:
            continue
        w = dequantize(model, nbits).T  # [K, N]
        size = _attr(nbits, "block_size", BLOCK)
        w = w + np.repeat(_init(model, offset.input[1]).astype(np.float32), size, axis=0)[:w.shape[0]]
        drop |= term | {nbits.name}
        replace[add.name] = (nbits.input[0], _set_init(model, nbits.input[1] + ".dense", w.astype(np.float32)))
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" and _attr(n, "accuracy_level", 0) == 1 and n.name not in drop:
            replace[n.name] = (n.input[0], _set_init(model, n.input[1] + ".dense", dequantize(model, n).T.copy()))
    _rewire(model, drop, replace=replace)


PATCHES = {
    "acc1": (accuracy(1), "every MatMulNBits at accuracy level 1 (float activations)"),
    "acc4": (accuracy(4), "every MatMulNBits at accuracy level 4 (int8 activations)"),
    "layers4": (layers_bits(4), "decoder-layer MatMulNBits requantized to 4 bits, uint8 zero points"),
    "layers4-sym": (layers_bits(4, False), "decoder-layer MatMulNBits at 4 bits, no zero points"),
    "layers8": (layers_bits(8), "decoder-layer MatMulNBits requantized to 8 bits, uint8 zero points"),
    "layers4-b64": (layers_bits(4, block=64), "decoder-layer MatMulNBits at 4 bits in blocks of 64 (int8 activations too, at accuracy 4)"),
    "layers4-b128": (layers_bits(4, block=128), "decoder-layer MatMulNBits at 4 bits in blocks of 128 (int8 activations too, at accuracy 4)"),
    "head4": (head_bits(4), "lm_head MatMulNBits at 4 bits, uint8 zero points"),
    "head4-sym": (head_bits(4, False), "lm_head MatMulNBits at 4 bits, no zero points"),
    "head8": (head_bits(8), "lm_head MatMulNBits at 8 bits, uint8 zero points"),
    "split-gate-up": (split_gate_up, "the packed gate/up MatMulNBits + Split as two MatMulNBits (exact)"),
    "gbq-rows": (gbq_rows, "the 8-bit table's row gathers as GatherBlockQuantized (exact; ORT >= 1.23)"),
    "block16": (block16, "decoder-layer 4-bit MatMulNBits at block 16: same weights, int8 activations in blocks of 16"),
    "no-offsets": (no_offsets, "timing only: the Q4_1 offset terms (Reshape, ReduceSum, MatMul, Add) dropped"),
    "dense": (dense, "exact: every float-activation 4-bit linear as a fp32 MatMul, Q4_1 offsets added in"),
    "head-lean": (head_lean, "the refined head: TopK unsorted, next_token the best refined candidate (no full ArgMax)"),
}


def patch_package(package: Path, variant: str, out: Path, names: list) -> Path:
    """Write ``out``: the manifest and the patched graph of ``variant``; returns the graph's path."""
    import onnx

    manifest = json.loads((package / "manifest.json").read_text())
    entry = next((v for v in manifest["variants"] if v["name"] == variant), None)
    if entry is None:
        raise SystemExit(f"{package} has no variant {variant!r}")
    if out.resolve() == package.resolve() or package.resolve() in out.resolve().parents:
        raise SystemExit(f"{out} is inside the package; write patched copies elsewhere")
    out.mkdir(parents=True, exist_ok=False)
    shutil.copy(package / "manifest.json", out / "manifest.json")
    model = onnx.load(str(package / entry["file"]))
    for name in names:
        PATCHES[name][0](model)
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    target = out / entry["file"]
    onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location=target.name + ".data", size_threshold=1024)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path, nargs="?")
    ap.add_argument("variant", nargs="?")
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--patch", action="append", default=[], choices=sorted(PATCHES))
    ap.add_argument("--list", action="store_true", help="list the patches")
    args = ap.parse_args()
    if args.list or not args.package:
        for name, (_, text) in PATCHES.items():
            print(f"{name:14s} {text}")
        return
    if not (args.variant and args.out and args.patch):
        ap.error("give PKG VARIANT OUT and at least one --patch")
    print(patch_package(args.package, args.variant, args.out, args.patch))


if __name__ == "__main__":
    main()
