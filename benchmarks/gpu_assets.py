"""Write the ``--assets`` folder the GPU scripts build their random-weight models from
(``gpu_agent_export.make_hf``, ``gpu_serving.py --assets``): SmolLM2-135M-Instruct's tokenizer
(tokenizer.json, tokenizer_config.json, chat_template.jinja), taken from the default model's GGUF
by the exporter's own reader, and a ``config.json`` of SmolLM2's shape (its token ids; the shapes
measured override the rest). The GPU machine has no hub: this folder travels with the command.

    .venv/bin/python benchmarks/gpu_assets.py .gpu/assets
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.sources import open_source, tokenizer_assets  # noqa: E402

SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
               rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=8192,
               hidden_act="silu", torch_dtype="bfloat16")


def main(out: Path) -> None:
    a = tokenizer_assets(open_source("default"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(a.tokenizer_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(a.tokenizer_config, indent=1), encoding="utf-8")
    if a.chat_template:
        (out / "chat_template.jinja").write_text(a.chat_template, encoding="utf-8")
    eos = list(a.eos_token_ids)
    cfg = dict(SMOLLM2, bos_token_id=a.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos)
    if a.pad_token_id is not None:
        cfg["pad_token_id"] = a.pad_token_id
    (out / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/assets"))
