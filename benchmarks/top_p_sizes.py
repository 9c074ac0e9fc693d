"""How many tokens top-p keeps on a real model's rows: whether the device draw's 1,024 sorted
candidates hold them (``engine/device_sample.py``: a row past them sorts the whole vocabulary).

    .venv/bin/python benchmarks/top_p_sizes.py [--model PKG] [--top-p 0.9] [--temperatures 0.7 1.0]

For each chat prompt below: a sampled reply (seeded), then the logits of every position of it
(teacher-forced), and at each position the size of top-p's kept set at each temperature.
Prints the median, p90, p99 and largest size, and the share within 1,024.
"""

from __future__ import annotations

import argparse

import numpy as np

PROMPTS = ["Write a short poem about the sea.", "Explain how a bicycle works.", "What is the capital of France?",
           "Give three tips for learning a new language.", "Tell me a story about a dragon.", "How do vaccines work?",
           "Summarize the plot of Romeo and Juliet.", "What should I cook for dinner tonight?"]


def main() -> None:
    import portable_infer
    from portable_infer.decode.draw import tempered
    from portable_infer.decode.sampling import apply_top_p

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a package (default: the default model)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    m = portable_infer.load(args.model) if args.model else portable_infer.load()
    sizes = {t: [] for t in args.temperatures}
    for seed, prompt in enumerate(PROMPTS):
        ids = m.chat_ids([{"role": "user", "content": prompt}])
        out = m.generate_ids(ids, max_new_tokens=args.new, temperature=args.temperatures[0], top_p=args.top_p, seed=seed)
        for row in m.forward_logits(ids + out[:-1])[len(ids) - 1:]:
            for t in sizes:
                sizes[t].append(int((apply_top_p(tempered(row, t), args.top_p) > -np.inf).sum()))
    print(f"{m.path.name}: vocabulary {m.codec.vocab_size}, top-p {args.top_p}")
    for t, s in sizes.items():
        s = np.array(s)
        print(f"temperature {t}: {s.size} positions; kept median {np.median(s):.0f}, p90 {np.percentile(s, 90):.0f}, "
              f"p99 {np.percentile(s, 99):.0f}, max {s.max()}; within 1,024: {(s <= 1024).mean():.1%}")


if __name__ == "__main__":
    main()
