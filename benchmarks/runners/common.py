"""What every runner shares: the prompts, the measurement protocol, timing, peak RSS.

Standard library and numpy only: this module is imported in every competitor's virtualenv.

A runner describes its runtime as a ``Runtime`` (load, greedy generate, teacher-forced argmax)
and hands it to ``main``, which measures it the same way for everybody and prints one JSON line:

    load_s          wall time of ``load`` (first and only load)
    ttft_ms         median wall time of generating 1 token from the 32-token prompt
    decode_tok_s    median of 127 / (time to generate 128 tokens - time to generate 1 token)
    batch8_tok_s    median of 8 * 128 / time to generate 128 tokens for 8 prompts of 32 tokens
    peak_rss_mib    this process's ru_maxrss
    size_mib        the model files on disk
    agreement       k of 128 teacher-forced argmaxes equal to the fp32 reference's next token
    greedy_prefix   how many leading tokens of the free-running greedy output equal the reference

TTFT and decode use the same generate call for every runtime (1 token, then 128 tokens, in the
same iteration) so that no runtime is timed through a different path from another.

With ``--quality FILE`` (``.bench/quality.json``: fixed texts of ``exporters/reference/texts``, tokenized,
with the fp32 transformers reference's argmax and next-token NLL at every position), a last phase,
after peak RSS is taken, feeds each text whole and adds ``quality``: top-1 agreement with the
reference's argmax over every position of every text, and the perplexity of the texts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

NEW_TOKENS = 128
PROMPT_LEN = 32
THREADS = 2
# Tokens of each quality text: 4 texts x 159 predicted positions = 636 positions.
QUALITY_TOKENS = 160

# Eight chat prompts of exactly 32 SmolLM2 tokens each, "<|im_start|>user\n{text}<|im_end|>\n
# <|im_start|>assistant\n". PROMPTS[0] is the single-sequence prompt; all 8 form the batch.
PROMPT_TEXTS = (
    "Explain in simple words why the sky looks blue during the day and red at sunset, "
    "for a young school student.",
    "Write a short poem about a cat who likes to sleep in the warm afternoon sun by the old "
    "wooden kitchen window.",
    "What are three good habits for staying healthy while working at a desk all day long in a "
    "very busy city office?",
    "Describe how a bicycle works, from the pedals to the wheels, for a curious child who wants "
    "to learn.",
    "Give me a simple recipe for pancakes that uses eggs, milk, flour, a little sugar and "
    "butter, please.",
    "Why do leaves change color in autumn, and what happens to them in the cold winter months "
    "that follow it later?",
    "Summarize the main idea of the water cycle in a few clear and friendly sentences for school "
    "kids aged ten.",
    "List some fun things a family can do together on a rainy weekend at home with young "
    "children and their two pets.",
)
PROMPTS: tuple[tuple[int, ...], ...] = (
    (1, 4093, 198, 36971, 281, 2232, 1924, 1701, 260, 6376, 5117, 4461, 981, 260, 1194, 284,
     2382, 418, 21822, 28, 327, 253, 1805, 1125, 2222, 30, 2, 198, 1, 520, 9531, 198),
    (1, 4093, 198, 19161, 253, 1890, 8216, 563, 253, 2644, 617, 15044, 288, 2801, 281, 260,
     3091, 11342, 2388, 411, 260, 1573, 10091, 9902, 5700, 30, 2, 198, 1, 520, 9531, 198),
    (1, 4093, 198, 1780, 359, 1296, 1123, 6223, 327, 9286, 2458, 979, 1891, 418, 253, 10917,
     511, 1194, 986, 281, 253, 1035, 10229, 2240, 4608, 47, 2, 198, 1, 520, 9531, 198),
    (1, 4093, 198, 37964, 638, 253, 19018, 1806, 28, 429, 260, 7622, 781, 288, 260, 14296, 28,
     327, 253, 7436, 811, 617, 5988, 288, 835, 30, 2, 198, 1, 520, 9531, 198),
    (1, 4093, 198, 26533, 549, 253, 2232, 11594, 327, 45137, 338, 2925, 5246, 28, 4788, 28,
     7367, 28, 253, 1838, 3982, 284, 7121, 28, 5361, 30, 2, 198, 1, 520, 9531, 198),
    (1, 4093, 198, 4898, 536, 3711, 1363, 2380, 281, 15339, 28, 284, 732, 4283, 288, 601, 281,
     260, 4011, 4339, 2704, 338, 1066, 357, 1916, 47, 2, 198, 1, 520, 9531, 198),
    (1, 4093, 198, 13764, 3298, 836, 260, 1085, 2359, 282, 260, 913, 4834, 281, 253, 1443,
     2437, 284, 7952, 8545, 327, 1125, 3081, 8933, 3772, 30, 2, 198, 1, 520, 9531, 198),
    (1, 4093, 198, 6106, 634, 1037, 1495, 253, 1564, 416, 536, 1592, 335, 253, 24536, 16138,
     418, 1478, 351, 1805, 1122, 284, 480, 827, 9903, 30, 2, 198, 1, 520, 9531, 198),
)
PROMPT_IDS = PROMPTS[0]
assert all(len(p) == PROMPT_LEN for p in PROMPTS)

Model = Any


@dataclass
class Runtime:
    """One runtime as the protocol sees it.

    load: () -> model, everything from disk to ready-to-generate.
    generate: (model, prompts, n) -> n greedy new token ids per prompt, never stopping at eos;
        prompts all have the same length.
    teacher_forced: (model, prompt, continuation) -> for i in range(len(continuation)), the argmax
        of the next-token logits after prompt + continuation[:i].
    files: the model files on disk, for size_mib.
    logits: (model, ids) -> [len(ids), vocab] array, row i = the next-token logits after
        ids[:i + 1] (teacher forcing over a whole text); needed for --quality only.
    """

    load: Callable[[], Model]
    generate: Callable[[Model, Sequence[Sequence[int]], int], list[list[int]]]
    teacher_forced: Callable[[Model, Sequence[int], Sequence[int]], list[int]]
    files: Sequence[Path]
    versions: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    logits: Callable[[Model, Sequence[int]], Any] | None = None


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def size_mib(paths: Sequence[Path]) -> float:
    total = 0
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total / 2**20


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def check_shape(out: list[list[int]], rows: int, n: int, what: str) -> None:
    shape = [len(r) for r in out]
    if shape != [n] * rows:
        raise RuntimeError(f"{what}: expected {rows} rows of {n} tokens, got row lengths {shape}")


def leading_matches(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def next_token_stats(logits, ids: Sequence[int]) -> tuple[list[int], list[float]]:
    """Argmax and negative log-likelihood of the actual next token at positions 0..n-2."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise RuntimeError(f"logits: expected shape ({len(ids)}, vocab), got {x.shape}")
    x = x[:-1]
    top = x.max(axis=-1)
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=-1))
    nll = lse - x[np.arange(len(x)), np.asarray(ids[1:])]
    return x.argmax(axis=-1).tolist(), nll.tolist()


def quality(rt: Runtime, model: Model, ref: dict) -> dict:
    """Top-1 agreement with the reference's argmax and perplexity, over every text position."""
    import math

    if rt.logits is None:
        raise RuntimeError("this runner has no logits() for --quality")
    agree = positions = 0
    nll_sum = ref_nll_sum = 0.0
    per_text = {}
    for text in ref["texts"]:
        argmax, nll = next_token_stats(rt.logits(model, text["ids"]), text["ids"])
        k = sum(a == b for a, b in zip(argmax, text["argmax"]))
        per_text[text["name"]] = f"{k}/{len(argmax)}"
        agree, positions = agree + k, positions + len(argmax)
        nll_sum, ref_nll_sum = nll_sum + sum(nll), ref_nll_sum + sum(text["nll"])
    ppl, ref_ppl = math.exp(nll_sum / positions), math.exp(ref_nll_sum / positions)
    return {"agreement": agree, "positions": positions, "agreement_pct": round(100 * agree / positions, 2),
            "ppl": round(ppl, 4), "ref_ppl": round(ref_ppl, 4),
            "ppl_vs_ref_pct": round(100 * (ppl / ref_ppl - 1), 3), "per_text": per_text}


def measure(rt: Runtime, runs: int, reference: dict, quality_ref: dict | None = None,
            new_tokens: int = NEW_TOKENS) -> dict:
    """The protocol; returns the metrics (see the module docstring). ``new_tokens`` below
    NEW_TOKENS is for smoke runs: the first ``new_tokens`` of the reference are used."""
    prompt = list(reference["prompt_ids"])
    ref = list(reference["continuation"])
    if tuple(prompt) != PROMPT_IDS or len(ref) != NEW_TOKENS:
        raise RuntimeError("reference.json does not match common.PROMPT_IDS / NEW_TOKENS; "
                           "delete .bench/reference.json and rerun setup")
    if not 2 <= new_tokens <= NEW_TOKENS:
        raise ValueError(f"--new-tokens must be in [2, {NEW_TOKENS}], got {new_tokens}")
    n, ref = new_tokens, ref[:new_tokens]
    load_before = os.getloadavg()[0]
    load_s, model = timed(rt.load)

    single = [prompt]
    warm = rt.generate(model, single, n)
    check_shape(warm, 1, n, "generate (batch 1)")
    # All OS threads of the process once generation has run: a check that the thread settings
    # took (an ORT pool of N intra-op threads adds N - 1 to the main thread, torch's OpenMP too).
    os_threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    ttft, decode = [], []
    for _ in range(runs):
        t1, out1 = timed(lambda: rt.generate(model, single, 1))
        tn, outn = timed(lambda: rt.generate(model, single, n))
        check_shape(out1, 1, 1, "generate (1 token)")
        check_shape(outn, 1, n, "generate (batch 1)")
        ttft.append(t1)
        decode.append((n - 1) / (tn - t1))

    batch = [list(p) for p in PROMPTS]
    check_shape(rt.generate(model, batch, n), len(batch), n, "generate (batch 8)")
    batch_rates = []
    for _ in range(runs):
        tb, outb = timed(lambda: rt.generate(model, batch, n))
        check_shape(outb, len(batch), n, "generate (batch 8)")
        batch_rates.append(len(batch) * n / tb)

    forced = [int(t) for t in rt.teacher_forced(model, prompt, ref)]
    if len(forced) != n:
        raise RuntimeError(f"teacher_forced returned {len(forced)} tokens, expected {n}")
    # Taken before the quality phase, whose whole-text logits (and llama.cpp's second context
    # with logits for every position) are not part of serving.
    rss = peak_rss_mib()
    load_after = os.getloadavg()[0]
    extra = {"quality": quality(rt, model, quality_ref)} if quality_ref else {}
    return {
        "load_s": round(load_s, 3),
        "ttft_ms": round(1000 * statistics.median(ttft), 2),
        "decode_tok_s": round(statistics.median(decode), 2),
        "batch8_tok_s": round(statistics.median(batch_rates), 2),
        "peak_rss_mib": round(rss, 1),
        "size_mib": round(size_mib(rt.files), 1),
        "agreement": sum(a == b for a, b in zip(forced, ref)),
        "agreement_of": n,
        "greedy_prefix": leading_matches(warm[0], ref),
        "batch_row0_equals_single": outb[0] == warm[0],
        "runs": runs,
        "os_threads": os_threads,
        # Other work on the machine skews every number: the 1-minute load average before and
        # after, to compare with the core count.
        "loadavg": [round(load_before, 2), round(load_after, 2)],
        "raw": {"ttft_s": ttft, "decode_tok_s": decode, "batch8_tok_s": batch_rates},
        "versions": rt.versions,
        "notes": rt.notes,
        **extra,
    }


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", type=Path, required=True, help="model file or folder")
    p.add_argument("--reference", type=Path, required=True, help=".bench/reference.json")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (median)")
    p.add_argument("--threads", type=int, default=THREADS, help="intra-op threads")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                   help=f"tokens per generation (default {NEW_TOKENS}; fewer for smoke runs)")
    p.add_argument("--quality", type=Path, help=".bench/quality.json: also measure agreement and "
                                                 "perplexity over its texts")
    return p


def main(name: str | Callable[[argparse.Namespace], str],
         build: Callable[[argparse.Namespace], Runtime],
         parser: argparse.ArgumentParser) -> None:
    """Parse args, build the runtime, measure it, print exactly one JSON line on stdout.

    Anything libraries write to stdout (C code included) is sent to stderr, so the JSON line is
    the only thing on stdout. Failures print ``{"runtime": ..., "error": ...}`` and exit 1.
    """
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    args = parser.parse_args()
    label = name(args) if callable(name) else name
    try:
        if args.runs < 1:
            raise ValueError(f"--runs must be >= 1, got {args.runs}")
        reference = json.loads(args.reference.read_text())
        quality_ref = json.loads(args.quality.read_text()) if args.quality else None
        result = {"runtime": label, "threads": args.threads,
                  **measure(build(args), args.runs, reference, quality_ref, args.new_tokens)}
        code = 0
    except Exception as exc:  # reported, not raised: the comparison table goes on without it
        traceback.print_exc()
        result = {"runtime": label, "error": f"{type(exc).__name__}: {exc}",
                  "peak_rss_mib": round(peak_rss_mib(), 1)}
        code = 1
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
    sys.exit(code)
