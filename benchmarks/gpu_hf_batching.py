"""transformers' own continuous batching (``generate_batch``) over the same request stream as
``gpu_serving.py`` (issue #21, item 4): the HF folder the export read, the same prompts, greedy,
the same KV budget in tokens. Run by ``gpu_serving.py --parts transformers`` in a child process of
its own (its GPU memory goes with it); prints one JSON line a level.

    python3 benchmarks/gpu_hf_batching.py HF_DIR --levels 64 256 --prompt 128 --new 256 \\
        --budget-tokens 98304 [--seed 20261203] [--warm 4] [--rounds 1] [--device cuda]

Per level: generated tok/s (tokens / from the first request's creation to the last token), TTFT
p50/p99 (a request's first token's timestamp less its creation), inter-token p99, the requests
running at once at most (their scheduled-to-finished spans, ``GenerationOutput.lifespan``), and
the KV cache as configured. The transformers API of continuous batching has moved between 5.x
releases; the keyword names are matched to the installed one and what was used is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json

from gpu_requests import SEED, WARM_TOKENS, prompts, summarize


def load(hf: str, device: str):
    """The model in fp16 (fp32 on the CPU) with the first paged attention this transformers takes."""
    import torch
    from transformers import AutoModelForCausalLM

    names = (["paged|flash_attention_2"] if importlib.util.find_spec("flash_attn") else []) + [
        "paged|sdpa", "sdpa_paged", "sdpa"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    errors = []
    for name in names:
        try:
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype, device_map=device, attn_implementation=name)
            return model.eval(), name
        except Exception as exc:  # noqa: BLE001 - the next name
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
    raise RuntimeError("no paged attention implementation loaded: " + " | ".join(errors))


def batching_kwargs(model, budget_tokens: int, page: int) -> tuple[dict, dict, dict]:
    """``generate_batch`` keywords for a KV cache of ``budget_tokens`` in pages of ``page``, in the
    installed API's names: (keywords, fields for the generation config, what was set)."""
    sig = inspect.signature(model.generate_batch).parameters
    want = {"num_blocks": budget_tokens // page}
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:
        ContinuousBatchingConfig = None
    fields = ({f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
              if ContinuousBatchingConfig is not None and dataclasses.is_dataclass(ContinuousBatchingConfig) else set())
    size_key = "page_size" if "page_size" in fields else "block_size"
    want[size_key] = page
    kwargs = {"record_timestamps": True, "progress_bar": False}
    kwargs = {k: v for k, v in kwargs.items() if k in sig}
    if "continuous_batching_config" in sig and fields:
        used = {k: v for k, v in want.items() if k in fields}
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**used)
        return kwargs, {}, {"api": "ContinuousBatchingConfig", **used}
    return kwargs, want, {"api": "GenerationConfig", **want}  # older 5.x: the cache's size on the generation config


def level(model, reqs: list, new: int, kwargs: dict, gen_fields: dict, eos: int, sampling: dict | None = None) -> dict:
    """One level through ``generate_batch``: :func:`gpu_requests.summarize` over its outputs (sent:
    a request's creation; times: its tokens' timestamps), and the most requests running at once
    (their scheduled-to-finished spans, ``GenerationOutput.lifespan``)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, do_sample=bool(sampling), eos_token_id=eos, pad_token_id=0,
                           **(sampling or {}), **gen_fields)
    outs = list(model.generate_batch(inputs=reqs, generation_config=cfg, **kwargs).values())
    if any(getattr(o, "timestamps", None) is None for o in outs if not o.error):
        raise RuntimeError("this transformers gives no token timestamps (record_timestamps): no TTFT to report")
    results = [{"sent": o.created_time, "times": o.timestamps or [], "tokens": len(o.generated_tokens),
                "error": o.error} for o in outs] + [{"sent": 0.0, "times": [], "tokens": 0, "error": "missing"}
                                                     for _ in range(len(reqs) - len(outs))]
    spans = sorted((o.lifespan[0], o.lifespan[1]) for o in outs if o.lifespan[0] > 0 and o.lifespan[1] > 0)
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, d in events:
        running += d
        most = max(most, running)
    return summarize(results) | {"running_max": most if spans else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf")
    ap.add_argument("--levels", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--budget-tokens", type=int, required=True)
    ap.add_argument("--page", type=int, default=256, help="KV page (block) size in tokens")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    import transformers

    model, attn = load(args.hf, args.device)
    vocab = model.config.vocab_size
    kwargs, gen_fields, used = batching_kwargs(model, args.budget_tokens, args.page)
    kv_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (
        getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads) * 2
    setup = {"transformers": transformers.__version__, "attention": attn,
             "kv_gib": used.get("num_blocks", 0) * args.page * kv_token / 2**30,
             "kwargs": sorted(kwargs), **used}
    print(json.dumps({"setup": setup}), flush=True)
    eos = vocab  # an id no step can pick: every request runs its max_new_tokens (ignore_eos)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else None
    if args.warm:
        level(model, prompts(args.warm, args.prompt, vocab, seed=1), WARM_TOKENS, kwargs, gen_fields, eos, sampling)
    for round_ in range(args.rounds):
        for n in args.levels:
            r = level(model, prompts(n, args.prompt, vocab, args.seed + round_), args.new, kwargs, gen_fields, eos,
                      sampling)
            print(json.dumps({"level": n, "round": round_ + 1, **r, "kv_gib": setup["kv_gib"]}), flush=True)


if __name__ == "__main__":
    main()
