"""The paged variant's PagedAttention on CUDA against transformers and against its standard-op
reference twin: one tiny random llama, steps that mix prefills, chunks and decodes over scattered
blocks (the CPU tests run the reference twin only: ONNX Runtime has no CPU PagedAttention).

    python3 benchmarks/gpu_paged_check.py --out DIR [--shape tiny|smollm2] [--block 16]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_hidden_layers=2, max_position_embeddings=256),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, num_hidden_layers=30, max_position_embeddings=2048,
                    rope_theta=100000.0, tie_word_embeddings=True),
}


def build(shape: str, root: Path, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape])).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger than the default init: a clear argmax
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(0.2 * noise) if p.ndim == 1 else p.copy_(0.08 * noise if shape == "tiny" else 0.02 * noise)
    model.save_pretrained(root / "hf")
    return model


def export(root: Path, name: str, attention: str):
    import exporters.lowering.spec as spec
    from exporters.export import export as run

    spec.PAGED_ATTENTION = attention
    shutil.rmtree(root / name, ignore_errors=True)
    return run(root / "hf", root / name, precision="fp16", verify=False, variants=("static", "paged"))


class Driver:
    """Runs a paged graph over steps of (sequence, tokens) chunks; blocks handed out scattered."""

    def __init__(self, path: Path, provider: str, layers: int, kvh: int, d: int, blocks: int, block: int, seed: int):
        import onnxruntime as ort

        self.s = ort.InferenceSession(str(path), providers=[provider])
        self.provider = self.s.get_providers()[0]
        self.block = block
        dev = "cuda" if provider.startswith("CUDA") else "cpu"
        self.ort, self.dev = ort, dev
        self.caches = {f"past_key_values.{i}.{kv}": ort.OrtValue.ortvalue_from_numpy(
            np.zeros((blocks, block, kvh, d), np.float16), dev) for i in range(layers) for kv in ("key", "value")}
        self.free = np.random.default_rng(seed).permutation(blocks).tolist()
        self.tables, self.held = {}, {}

    def step(self, chunks):
        ids, cu, past, idx = [], [0], [], []
        for name, toks in chunks:
            table = self.tables.setdefault(name, [])
            held = self.held.setdefault(name, 0)
            while len(table) * self.block < held + len(toks):
                table.append(self.free.pop())
            ids += toks
            cu.append(len(ids))
            past.append(held)
            idx.append(len(ids) - 1)
        width = max(len(self.tables[n]) for n, _ in chunks)
        bt = np.array([self.tables[n] + [-1] * (width - len(self.tables[n])) for n, _ in chunks], np.int32)
        feeds = dict(input_ids=np.array([ids]), cumulative_sequence_length=np.array(cu, np.int32),
                     past_seqlens=np.array(past, np.int32), block_table=bt, logits_index=np.array(idx),
                     attention_metadata=np.array([max(np.diff(cu)), max(np.diff(cu) + np.array(past))], np.int32))
        b = self.s.io_binding()  # the pool in place: each present.* bound to its past buffer
        for name, value in feeds.items():  # attention_metadata stays on the host
            dev = "cpu" if name == "attention_metadata" else self.dev
            b.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(value, dev))
        b.bind_output("logits", "cpu")  # first: get_outputs()[0]
        for name, value in self.caches.items():
            b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.s.run_with_iobinding(b)
        out = {"logits": b.get_outputs()[0].numpy()}
        for name, toks in chunks:
            self.held[name] += len(toks)
        return out["logits"][:, 0]


def plan(rng, n: int, vocab: int):
    """Prompts and steps: every sequence prefilled in 1-3 chunks, interleaved with the others' decodes."""
    prompts = {f"s{i}": rng.integers(3, vocab, int(rng.integers(3, 40))).tolist() for i in range(n)}
    steps, done = [], {k: 0 for k in prompts}
    while any(done[k] < len(p) + 6 for k, p in prompts.items()):
        chunk = []
        for k, p in prompts.items():
            if done[k] >= len(p) + 6 or rng.random() < 0.2:
                continue
            take = 1 if done[k] >= len(p) else int(rng.integers(1, len(p) - done[k] + 1))
            toks = (p + rng.integers(3, vocab, 6).tolist())[done[k]:done[k] + take] if done[k] < len(p) else \
                rng.integers(3, vocab, 1).tolist()
            chunk.append((k, toks))
            done[k] += take
        if chunk:
            steps.append(chunk)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="tiny", choices=SHAPES)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--seed", type=int, default=20261204)
    args = ap.parse_args()
    import torch

    root = args.out / args.shape
    root.mkdir(parents=True, exist_ok=True)
    model = build(args.shape, root, args.seed)
    cfg = SHAPES[args.shape]
    dims = (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"])
    op = export(root, "op", "paged")
    ref = export(root, "ref", "paged_reference")
    rng = np.random.default_rng(args.seed)
    steps = plan(rng, 6, cfg["vocab_size"])
    print(f"seed {args.seed}; {len(steps)} steps, {sum(len(c) for c in steps)} chunks, block {args.block}")
    runs = {"op": Driver(op / "model.paged.onnx", "CUDAExecutionProvider", *dims, 64, args.block, args.seed),
            "ref": Driver(ref / "model.paged.onnx", "CUDAExecutionProvider", *dims, 64, args.block, args.seed)}
    print({k: d.provider for k, d in runs.items()})
    seqs, worst, agree, total = {}, {"op": 0.0, "ref": 0.0, "op-ref": 0.0}, {"op": 0, "ref": 0}, 0
    for chunk in steps:
        got = {k: d.step(chunk) for k, d in runs.items()}
        for j, (name, toks) in enumerate(chunk):
            seqs[name] = seqs.get(name, []) + toks
            with torch.no_grad():
                want = model(torch.tensor([seqs[name]])).logits[0, -1].float().numpy()
            scale = float(np.abs(want).max())
            for k in runs:
                worst[k] = max(worst[k], float(np.abs(got[k][j] - want).max()) / scale)
                agree[k] += int(got[k][j].argmax() == want.argmax())
            worst["op-ref"] = max(worst["op-ref"], float(np.abs(got["op"][j] - got["ref"][j]).max()) / scale)
            total += 1
    print(f"largest logit difference relative to the reference's largest |logit|: {worst}")
    print(f"argmax agreement with transformers (fp32): op {agree['op']}/{total}, ref {agree['ref']}/{total}")


if __name__ == "__main__":
    main()
