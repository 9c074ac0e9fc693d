"""GPU run for issues #19 (constrained decoding and tool calls on CUDA) and #20 (export at 8B).

Runs on the GPU machine, after onnxruntime-gpu, onnxruntime-genai-cuda and llguidance are
installed there (../shared/gpu/README.md; ``--assets`` is a folder with SmolLM2-135M-Instruct's
config.json, tokenizer.json, tokenizer_config.json and chat_template.jinja, carried along):

    python3 benchmarks/gpu_agent_export.py --assets DIR --out $OUT --parts constrained export8b

``constrained``: random weights of SmolLM2-135M's shape with its real tokenizer, exported by us at
fp16 for CUDA (verified against transformers); benchmarks/constrained_overhead.py on CUDA (batch 1
and 16; issue #19's targets: <= 15 % / <= 10 % over the free step); then, on the same CUDA model,
a JSON-schema reply and a forced (named) and a ``required`` tool call through ``Model.chat``,
checked to parse and to carry the schema's keys / the tool's required arguments.

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
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LINES: list[str] = []


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


def make_hf(folder: Path, assets: Path, overrides: dict, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = json.loads((assets / "config.json").read_text())
    cfg.update(overrides)
    cfg.pop("rope_parameters", None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    torch.manual_seed(20261202)
    t = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(getattr(torch, dtype))
        model = AutoModelForCausalLM.from_config(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (assets / name).is_file():
            shutil.copy(assets / name, folder / name)
    del model
    torch.cuda.empty_cache()
    say(f"made {folder} ({dtype}) in {time.perf_counter() - t:.0f} s")


def constrained(assets: Path, work: Path) -> None:
    hf, pkg = work / "smollm2-random", work / "smollm2-fp16"
    make_hf(hf, assets, {}, "float32")
    cli = [sys.executable, "-m", "portable_infer.cli"]
    res = timed([*cli, "export", str(hf), "-o", str(pkg), "--precision", "fp16", "--activations", "fp16", "--force"])
    say(f"export SmolLM2 shape fp16: {res}")
    if "error" in res:
        return
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "constrained_overhead.py"), str(pkg),
                          "--provider", "cuda", "--batches", "1", "16", "--tokens", "64", "--runs", "3"],
                         capture_output=True, text=True)
    say("### constrained_overhead.py on CUDA\n")
    for ln in out.stdout.splitlines():
        say(ln)
    if out.returncode:
        say(f"constrained_overhead failed: {out.stderr[-2000:]}")
    functional(pkg)


def functional(pkg: Path, provider: str = "cuda") -> None:
    import portable_infer

    model = portable_infer.load(str(pkg), provider, strict=True)
    say(f"\n### functional checks on {model.provider} ({model.variant})\n")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "population": {"type": "integer", "maximum": 10**9}},
              "required": ["city", "population"]}
    msgs = [{"role": "user", "content": "Give a city and its population as JSON."}]
    text = model.chat(msgs, max_new_tokens=64, temperature=0.7, seed=7,
                      response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    data = json.loads(text)
    say(f"- json_schema reply parses, keys {sorted(data)}: {set(schema['required']) <= set(data)}")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = model.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[tool], tool_choice=choice,
                           tool_parser="hermes", max_new_tokens=96, temperature=0.7, seed=3)
        msg = reply.to_dict()
        calls = msg.get("tool_calls") or []
        args = json.loads(calls[0]["function"]["arguments"]) if calls else {}
        ok = bool(calls) and calls[0]["function"]["name"] == "get_weather" and {"city", "unit"} <= set(args)
        say(f"- tool_choice={json.dumps(choice)}: finish_reason {msg.get('finish_reason', getattr(reply, 'finish_reason', None))}, call valid: {ok} ({args})")


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
    ap.add_argument("--parts", nargs="+", default=["constrained", "export8b"], choices=["constrained", "functional", "make8b", "export8b"])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    say(f"# GPU run: {subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True, text=True).stdout.strip()}, "
        f"{os.cpu_count()} CPUs, onnxruntime {ort.__version__} {ort.get_available_providers()}\n")
    try:
        for part in args.parts:
            t = time.perf_counter()
            {"constrained": constrained, "functional": functional_part, "make8b": make8b,
             "export8b": export8b}[part](args.assets, args.work)
            say(f"\n({part}: {time.perf_counter() - t:.0f} s)\n")
    finally:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "gpu_agent_export.md", "a") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
