"""One chat prompt's first-token logits and greedy reply: each graph of a package, and llama.cpp on the GGUF.

    .venv/bin/python benchmarks/first_token.py PKG [--prompt "What is the capital of France?"]
        [--variants portable static static-int8] [--llamacpp-python .bench/venvs/llamacpp/bin/python]
        [--gguf PATH] [--tokens 24]

The same token ids (the package's chat template) go to every graph (``exporters.verify``'s
decoders, teacher-forced) and to llama-cpp-python (``Llama.eval``, its own CPU kernels: Q8 activations
against the Q4_1 blocks), whose interpreter is given by ``--llamacpp-python`` (a venv with
``llama-cpp-python``; skipped when absent). Prints the four best first tokens with their logits and
the greedy reply of each. A near-tie at the first token decides which reply a less exact runtime gives.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMACPP = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
gguf, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=gguf, n_ctx=2048, n_threads=2, logits_all=True, verbose=False)
llm.eval(ids)
lg = np.array(llm.scores[llm.n_tokens - 1])
top = [[int(t), float(lg[t])] for t in np.argsort(-lg)[:4]]
out = []
for _ in range(n):
    t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    if t == llm.token_eos():
        break
    out.append(t)
    llm.eval([t])
print(json.dumps({"top": top, "reply": out}))
"""


def ours(pkg: Path, name: str, ids: list, n: int) -> tuple:
    from exporters import verify
    from portable_infer.package import manifest as mf

    m = mf.Manifest.load(pkg)
    v = m.variant(name)
    dec = verify.decoder(pkg / v.file, v, m)
    seq = np.asarray([ids], np.int64)
    lg = verify.all_logits(dec, seq)[0, -1]
    top = [(int(t), float(lg[t])) for t in np.argsort(-lg)[:4]]
    out = []
    for _ in range(n):
        t = int(verify.all_logits(dec, seq)[0, -1].argmax())
        if t in m.tokenizer.eos_token_ids:
            break
        out.append(t)
        seq = np.concatenate([seq, [[t]]], axis=1)
    return top, out


def main() -> None:
    import portable_infer
    from exporters.gguf_source import default_gguf_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--variants", nargs="+", default=["portable", "static", "static-int8"])
    ap.add_argument("--llamacpp-python", type=Path, default=Path(".bench/venvs/llamacpp/bin/python"))
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    model = portable_infer.load(args.package, "cpu", accuracy_level=1)
    ids = model.chat_ids([{"role": "user", "content": args.prompt}])
    name = lambda t: model.codec.decode([t], skip_special_tokens=False)  # noqa: E731
    rows = {}
    for v in args.variants:
        rows[v] = ours(args.package, v, ids, args.tokens)
    if args.llamacpp_python.exists():
        gguf = args.gguf or default_gguf_path()
        r = subprocess.run([str(args.llamacpp_python), "-c", LLAMACPP, str(gguf), json.dumps(ids), str(args.tokens)],
                           capture_output=True, text=True, check=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        rows["llama.cpp (Q4_1 GGUF)"] = (got["top"], got["reply"])
    print(f"prompt: {args.prompt!r} ({len(ids)} chat-template ids)")
    print("| runtime | first-token logits (best four) | greedy reply |")
    print("|---|---|---|")
    for k, (top, out) in rows.items():
        tops = ", ".join(f"{name(t)!r} {x:.3f}" for t, x in top)
        print(f"| {k} | {tops} | {model.codec.decode(out)!r} |")


if __name__ == "__main__":
    main()
