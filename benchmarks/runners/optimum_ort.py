"""optimum's ORTModelForCausalLM (ONNX Runtime, CPU EP), fp32, on optimum's own ONNX export."""

from __future__ import annotations

import common


def build(args) -> common.Runtime:
    import onnxruntime as ort
    import optimum.onnxruntime
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GenerationConfig

    torch.set_num_threads(args.threads)

    def load():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        model = ORTModelForCausalLM.from_pretrained(
            args.model, provider="CPUExecutionProvider", session_options=so, use_cache=True)
        model.generation_config = GenerationConfig(
            do_sample=False, eos_token_id=None, pad_token_id=2, bos_token_id=1)
        return model

    def generate(model, prompts, n):
        ids = torch.tensor(prompts)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n)
        return out[:, ids.shape[1]:].tolist()

    def teacher_forced(model, prompt, continuation):
        ids = torch.tensor([list(prompt) + list(continuation[:-1])])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return logits[0, len(prompt) - 1:].argmax(-1).tolist()

    def logits(model, ids):
        x = torch.tensor([list(ids)])
        with torch.inference_mode():
            return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float().numpy()

    return common.Runtime(
        load=load, generate=generate, teacher_forced=teacher_forced, logits=logits,
        files=[args.model],
        versions={"optimum-onnx": _version("optimum-onnx"), "onnxruntime": ort.__version__,
                  "transformers": transformers.__version__,
                  "optimum": getattr(optimum.onnxruntime, "__version__", _version("optimum"))},
        notes="ORTModelForCausalLM.generate, IO binding default, CPUExecutionProvider",
    )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    common.main("optimum-ort-fp32", build, common.arg_parser("optimum ORTModelForCausalLM runner"))
