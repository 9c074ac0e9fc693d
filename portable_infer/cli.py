"""``portable-infer``: one entry point, subcommands. Results on stdout, logs on stderr."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys

from portable_infer.errors import PortableInferError
from portable_infer.package.variants import gate_text

logger = logging.getLogger("portable_infer.cli")

SAMPLING_FLAGS = (  # flag, SamplingParams field, type
    ("--max-new-tokens", "max_new_tokens", int), ("--temperature", "temperature", float),
    ("--top-k", "top_k", int), ("--top-p", "top_p", float), ("--min-p", "min_p", float),
    ("--repetition-penalty", "repetition_penalty", float), ("--presence-penalty", "presence_penalty", float),
    ("--frequency-penalty", "frequency_penalty", float), ("--seed", "seed", int),
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="model package directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--provider", default="auto", help="auto | cpu | cuda | openvino | ... (or ORT's names)")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to another provider")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    p.add_argument("--trust", metavar="PUBKEY.pem", default=None,
                   help="a .pinf bundle must be signed with this Ed25519 key (see docs/edge.md)")
    p.add_argument("--static-kv", action=argparse.BooleanOptionalAction, default=None,
                   help="the package's static-KV variant (fixed buffers; CUDA graphs on CUDA): "
                        "default when the package has it; --no-static-kv: the growing-KV graphs")
    p.add_argument("--paged-kv", action="store_true",
                   help="the package's paged variant (exported with --variants static,paged; CUDA): the KV in a "
                        "pool of blocks, and serve's prefills riding in its decode steps")
    p.add_argument("--prefer", choices=("speed", "exact"), default="speed",
                   help="speed: the fastest variant measured on this host among those past their quality "
                        "gate (cached); exact: only the exact variants")
    p.add_argument("--accuracy", type=int, choices=(1, 4), default=None,
                   help="MatMulNBits activations: 4 int8 (the package's static-int8/fused-int8 graphs: "
                        "faster on CPU, less exact), 1 float (the exact graphs); default: int8 where its "
                        f"export verification measured {gate_text().replace('%', '%%')} "
                        "(the quality gate), else float")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    for flag, field, typ in SAMPLING_FLAGS:
        p.add_argument(flag, dest=field, type=typ, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(ns) -> dict:
    kw = {f: getattr(ns, f) for _, f, _ in SAMPLING_FLAGS if getattr(ns, f) is not None}
    if ns.stop:
        kw["stop"] = tuple(ns.stop)
    return kw


def _load_kwargs(ns) -> dict:
    """``load()``'s arguments from the model flags (all but the path)."""
    return dict(providers=ns.provider, strict=ns.strict, intra_op_threads=ns.threads, trust=ns.trust,
                static_kv=ns.static_kv, accuracy_level=ns.accuracy, prefer=ns.prefer,
                tune_batch=_tune_batch(ns), paged_kv=ns.paged_kv)


def _tune_batch(ns) -> int:
    """The batch size variants are timed at beside 1: ``--batch``, or the server's ``--max-batch``."""
    batch = getattr(ns, "batch", None) or getattr(ns, "max_batch", None) or 1
    return min(max(int(batch), 1), 4096)


def _load(ns):
    from portable_infer.loader import load

    return load(ns.model, **_load_kwargs(ns))


# --- commands --------------------------------------------------------------------------------------
def cmd_generate(ns) -> int:
    from portable_infer.text.prompts import check_text

    check_text(ns.prompt)  # a non-UTF-8 argument (bytes escaped to U+DC80..U+DCFF): say so before loading
    model = _load(ns)
    kw = _sampling(ns)
    stream = model.stream_chat([{"role": "user", "content": ns.prompt}], **kw) if ns.chat else \
        model.stream_generate(ns.prompt, truncate=ns.truncate, **kw)
    for r in stream:
        sys.stdout.write(r.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(ns) -> int:
    model = _load(ns)
    kw = _sampling(ns)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    print(f"chatting with {model!r}; empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = ""
        for r in model.stream_chat(messages, truncate=True, **kw):
            reply += r.text
            sys.stdout.write(r.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_doctor(ns) -> int:
    from portable_infer.engine.doctor import doctor_report, format_doctor

    report = doctor_report()
    print(json.dumps(report, indent=2, default=str) if ns.json else format_doctor(report))
    return 0


def cmd_inspect(ns) -> int:
    from portable_infer.package.package_info import describe

    print(describe(ns.package, trust=ns.trust))  # a package directory or a .pinf bundle (not unpacked)
    return 0


def cmd_tune(ns) -> int:
    """Measure the package's competing variants on this host now (the cached choice is replaced)."""
    import os

    from portable_infer.engine import tune
    from portable_infer.engine.measure import tune_cache_dir

    os.environ[tune.TUNE_ENV] = tune.FORCE
    model = _load(ns)
    decisions = [d for d in tune.cached_decisions(tune_cache_dir(), model.path)
                 if d["key"]["provider"] == model.provider]
    print(json.dumps({"variant": model.variant, "session_env": model.session_env, "provider": model.provider,
                      "decisions": decisions}, indent=2))
    return 0


def cmd_bench(ns) -> int:
    from portable_infer.engine.bench import run_bench

    print(json.dumps(run_bench(ns, _load), indent=2))
    return 0


def cmd_export(ns) -> int:
    try:
        from exporters.export import export
    except ImportError as exc:
        from portable_infer.errors import DependencyError

        raise DependencyError('the exporter is not installed: pip install "portable-infer[lean]" (add '
                              '[export] for the check against transformers and the torch.onnx fallback)') from exc
    options = {k: getattr(ns, k) for k in ("precision", "max_context", "route", "activations", "revision", "block",
                                           "symmetric")}
    out = export(ns.source, ns.output, verify=not ns.no_verify, overwrite=ns.force, progress=True,
                 variants=tuple(v.strip() for v in ns.variants.split(",") if v.strip()) if ns.variants else None,
                 nbits_accuracy=ns.accuracy, **options)
    print(out)
    return 0


def cmd_verify(ns) -> int:
    try:
        from exporters.verify import verify_existing
    except ImportError as exc:
        from portable_infer.errors import DependencyError

        raise DependencyError('verification needs the exporter: pip install "portable-infer[export]"') from exc
    report = verify_existing(ns.package, ns.reference)
    print(json.dumps({name: r.to_json() for name, r in report.items()}, indent=2))
    return 0


def cmd_pack(ns) -> int:
    from pathlib import Path

    from portable_infer.loader import default_model
    from portable_infer.package.bundle import pack

    package = ns.package if ns.package is not None else default_model(progress=True)
    out = pack(package, ns.output, sign_key=ns.sign, ort=ns.ort, overwrite=ns.force)
    print(f"{out} ({Path(out).stat().st_size / 2**20:.1f} MiB{', signed' if ns.sign else ''})")
    return 0


# ServerConfig field -> (type, help) of `serve`'s flag (--shutdown-timeout for shutdown_timeout_s...)
SERVE_LIMITS = {
    "shutdown_timeout_s": (float, "seconds requests in flight get on SIGTERM; keep it at most the pod's "
                                  "terminationGracePeriodSeconds"),
    "keep_alive_timeout_s": (float, "seconds a connection without a request stays open"),
    "read_timeout_s": (float, "seconds a request's head and body may take to arrive (else 408)"),
    "write_timeout_s": (float, "seconds a client may read nothing of its response before it is dropped"),
    "max_connections": (int, "open connections at most (then 503)"),
    "max_prompt_chars": (int, "prompt or message characters at most, checked before tokenizing "
                              "(default: 32 per --max-prompt-tokens)"),
    "max_messages": (int, "messages per chat request at most"),
    "tokenizer_threads": (int, "threads that tokenize prompts, off the event loop"),
    "max_tokenizing": (int, "requests waiting to be tokenized at most (then 429; default: --max-batch + --max-waiting)"),
}


def _serve_default(name: str):
    from portable_infer.serving.http import ServerConfig

    return ServerConfig.__dataclass_fields__[name].default


def cmd_serve(ns) -> int:
    import os

    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig
    from portable_infer.serving.scheduler_setup import budget_line, max_model_len, slot_rows
    from portable_infer.serving.http import ServerConfig, require_serve, serve

    require_serve()  # fail before loading the model
    sched_cfg = SchedulerConfig(max_batch=ns.max_batch, max_waiting=ns.max_waiting, prefill_chunk=ns.prefill_chunk,
                                kv_budget_tokens=ns.kv_budget_tokens, gpu_memory_utilization=ns.gpu_memory_utilization,
                                max_model_len=max_model_len(ns.max_model_len, ns.max_prompt_tokens, ns.max_new_tokens),
                                prefix_cache_bytes=ns.prefix_cache_mib << 20,
                                prefix_min_tokens=ns.prefix_min_tokens, block_size=ns.kv_block_size,
                                slot_batch={"auto": None, "on": True, "off": False}[ns.slot_batch])
    api_key = ns.api_key or os.environ.get("PORTABLE_INFER_API_KEY") or None
    limits = {name: getattr(ns, name) for name in SERVE_LIMITS if getattr(ns, name) is not None}
    server_cfg = ServerConfig(host=ns.host, port=ns.port, api_key=api_key, model_name=ns.model_name,
                              max_prompt_tokens=ns.max_prompt_tokens, max_new_tokens=ns.max_new_tokens,
                              max_body_bytes=ns.max_body_bytes, tool_parser=ns.tool_parser, **limits)
    from portable_infer.serving.engine_process import ProcessScheduler, splits

    split = splits(ns.engine_process, ns.provider)
    scheduler = ProcessScheduler(ns.model, _load_kwargs(ns), sched_cfg) if split else Scheduler(_load(ns), sched_cfg)
    gc.freeze()  # the model and the server live as long as the process: later collections skip them
    slots = slot_rows(scheduler.model.engine, scheduler.config)
    where = f"\nengine process: threads switch every {1e3 * scheduler.switch_interval_s:g} ms" if split else ""
    print(budget_line(scheduler.stats(), scheduler.max_context, scheduler.row_limit, scheduler.budget_note, slots)
          + where, file=sys.stderr)
    serve(scheduler, server_cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portable-infer", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt (prints the completion only)")
    _model_args(g), _sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat message")
    g.add_argument("--truncate", action="store_true", help="keep the prompt's end if it exceeds the context")
    g.add_argument("prompt")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive streaming chat")
    _model_args(c), _sampling_args(c)
    c.add_argument("--system", default=None)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("doctor", help="ONNX Runtime builds, providers, and what auto picks")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    i = sub.add_parser("inspect", help="the manifest of a package or .pinf bundle in human terms")
    i.add_argument("package", help="a package directory or a .pinf bundle")
    i.add_argument("--trust", metavar="PUBKEY.pem", default=None,
                   help="a bundle must be signed with this Ed25519 key (checked, as load does)")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("tune", help="time the package's competing variants on this host; cache and print the choice")
    _model_args(t)
    t.add_argument("--batch", type=int, default=1, help="the batch size to time beside batch 1")
    t.set_defaults(func=cmd_tune)

    b = sub.add_parser("bench", help="TTFT, decode tokens/s and peak RSS as JSON")
    _model_args(b)
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--runs", type=int, default=3)
    b.set_defaults(func=cmd_bench)

    _serve_parser(sub)
    _package_parsers(sub)
    return p


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or $PORTABLE_INFER_API_KEY)")
    s.add_argument("--model-name", default=None, help="the model id clients send (default: package folder name)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    s.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429")
    s.add_argument("--kv-budget-tokens", type=int, default=None,
                   help="KV tokens reserved at most (default: on a GPU what --gpu-memory-utilization leaves, else 2 GiB)")
    s.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="on a GPU, instead of --kv-budget-tokens: the share of its memory the server may use; the KV "
                        "budget is what the model and the forwards leave of it (default 0.9)")
    s.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens prefilled per step")
    s.add_argument("--kv-block-size", type=int, default=None,
                   help="tokens per KV block: the budget's unit and --paged-kv's pool blocks (default 16; "
                        "paged on CUDA 128)")
    s.add_argument("--prefix-cache-mib", type=int, default=64,
                   help="host memory for the KV of prompt prefixes reused across requests (0: off)")
    s.add_argument("--prefix-min-tokens", type=int, default=None,
                   help="requests prefilled together reuse cached prefixes of at least this many tokens "
                        "(default: --prefill-chunk on GPUs, 0 on the CPU)")
    s.add_argument("--slot-batch", choices=("auto", "on", "off"), default="auto",
                   help="the running batch as fixed slots of one KV buffer: rows join and leave without "
                        "moving the others, one CUDA graph per bucketed batch size (static-KV graphs; "
                        "auto: on GPUs)")
    s.add_argument("--engine-process", choices=("auto", "on", "off"), nargs="?", const="on", default="auto",
                   help="run the model and its scheduler in a process of their own, so HTTP and SSE work "
                        "does not share their Python thread's time (serving/engine_process.py; auto: where "
                        "the provider keeps tensors on a device, e.g. CUDA; bare flag: on)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt tokens a request may have at most")
    s.add_argument("--max-new-tokens", type=int, default=None, help="max_tokens a request may ask for at most")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="KV tokens one request may hold, prompt and max_tokens (as vLLM's; default: "
                        "--max-prompt-tokens + --max-new-tokens where both are given, else the context); bounds "
                        "the slots' length, and so the decode step's cost, and an automatic KV budget")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    from portable_infer.text.tool_calls import FORMATS

    s.add_argument("--tool-parser", default=None, choices=tuple(FORMATS),
                   help="the tool-call format of the model's replies (default: read from its chat template)")
    for name, (kind, help_) in SERVE_LIMITS.items():
        flag = "--" + name.removesuffix("_s").replace("_", "-")
        default = _serve_default(name)
        s.add_argument(flag, dest=name, type=kind, default=None, metavar="S" if kind is float else "N",
                       help=help_ if default is None else f"{help_} (default {default:g})")
    s.set_defaults(func=cmd_serve)


def _package_parsers(sub) -> None:
    """export, pack and verify: the commands that make and check packages."""
    e = sub.add_parser("export", help="HF folder / .gguf / Hub id / default -> model package")
    e.add_argument("source", nargs="?", default="default",
                   help="HF model folder, .gguf file, Hugging Face Hub id (org/name, or org/name:Q4_K_M for "
                        "one GGUF file of a repo; HF_TOKEN and HF_HUB_OFFLINE apply), or default")
    e.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id (default: main)")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default=None)
    e.add_argument("--max-context", type=int, default=None)
    e.add_argument("--variants", default=None, help="graphs to write: portable, fused, static (KV buffers written in "
                   "place; CUDA graphs), fused-int8 and static-int8 (int8 activations: faster on CPU, less exact), "
                   "static-dense (batched CPU forwards in fp32); default: all that apply")
    e.add_argument("--activations", choices=("fp32", "fp16"), help="activation/KV dtype of int4/int8 (fp16: CUDA)")
    e.add_argument("--accuracy", type=int, choices=(1, 4), help="MatMulNBits accuracy of the fused layers: 1 float "
                   "activations (default, exact), 4 int8 activations (faster on CPU, less exact)")
    e.add_argument("--block", type=int, default=None, help="int4/int8 blocks of a float source: 32 (default), "
                   "64, 128 (fewer bytes a weight: faster where memory-bound, less exact)")
    e.add_argument("--symmetric", action="store_true", help="int4 of a float source without zero points (GenAI's "
                   "int4_is_symmetric): less exact; its int8-activation graph faster on AVX2 (export warns if below the gate)")
    e.add_argument("--no-verify", action="store_true")
    e.add_argument("--force", action="store_true", help="replace an existing package")
    e.add_argument("--route", choices=("auto", "direct", "fallback"), default="auto",
                   help="direct graph builder, torch.onnx fallback, or auto (direct when the family is registered)")
    e.set_defaults(func=cmd_export)

    k = sub.add_parser("pack", help="package directory -> one .pinf file (stored zip; optionally signed)")
    k.add_argument("package", nargs="?", default=None, help="package directory (default: the default model)")
    k.add_argument("-o", "--output", required=True, help="the bundle to write, e.g. model.pinf")
    k.add_argument("--sign", metavar="KEY.pem", default=None, help="Ed25519 private key: sign the manifest")
    k.add_argument("--ort", action="store_true",
                   help="also store ORT-format graph(s) + required_operators.config (minimal ORT builds)")
    k.add_argument("--force", action="store_true", help="replace an existing output")
    k.set_defaults(func=cmd_pack)

    v = sub.add_parser("verify", help="check a package against its transformers reference")
    v.add_argument("package")
    v.add_argument("--reference", default=None, help="HF folder (default: the package's recorded source)")
    v.set_defaults(func=cmd_verify)


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(ns.verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except PortableInferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
