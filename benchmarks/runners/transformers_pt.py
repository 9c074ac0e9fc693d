"""transformers + PyTorch, fp32, on the HF folder dequantized from the GGUF (model.generate)."""

from __future__ import annotations

import common


def build(args) -> common.Runtime:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    def load():
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        # Plain greedy: no processors from the saved generation config, no stop at eos.
        model.generation_config = GenerationConfig(
            do_sample=False, eos_token_id=None, pad_token_id=2, bos_token_id=1)
        return model

    def generate(model, prompts, n):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n)
        return out[:, ids.shape[1]:].tolist()

    def teacher_forced(model, prompt, continuation):
        ids = torch.tensor([list(prompt) + list(continuation[:-1])])
        with torch.inference_mode():
            logits = model(ids).logits[0, len(prompt) - 1:]
        return logits.argmax(-1).tolist()

    def logits(model, ids):
        with torch.inference_mode():
            return model(torch.tensor([list(ids)])).logits[0].float().numpy()

    return common.Runtime(
        load=load, generate=generate, teacher_forced=teacher_forced, logits=logits,
        files=[args.model],
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        notes="model.generate (default attention, DynamicCache)",
    )


if __name__ == "__main__":
    common.main("transformers-fp32", build,
                common.arg_parser("transformers + PyTorch fp32 runner"))
