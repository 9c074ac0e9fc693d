"""ONNX Runtime GenAI on a model made by its own builder (fp32 or int4), CPU execution provider."""

from __future__ import annotations

import json

import common


def build(args) -> common.Runtime:
    import numpy as np
    import onnxruntime_genai as og

    def load():
        config = og.Config(str(args.model))
        config.clear_providers()  # the CPU EP
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
        return og.Model(config)

    def new_generator(model, rows: int, max_length: int):
        params = og.GeneratorParams(model)
        # min_length = max_length: never stop at eos, like every other runner here.
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length,
                                  batch_size=rows)
        return og.Generator(model, params)

    def generate(model, prompts, n):
        gen = new_generator(model, len(prompts), len(prompts[0]) + n)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        steps = []
        for _ in range(n):
            gen.generate_next_token()
            steps.append(np.asarray(gen.get_next_tokens()).reshape(-1))
        return np.stack(steps, axis=1).tolist()

    def last_argmax(gen) -> int:
        logits = np.asarray(gen.get_logits())
        return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())

    def teacher_forced(model, prompt, continuation):
        gen = new_generator(model, 1, len(prompt) + len(continuation))
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        argmaxes = [last_argmax(gen)]
        for tok in continuation[:-1]:
            gen.append_tokens(np.asarray([[tok]], dtype=np.int32))
            argmaxes.append(last_argmax(gen))
        return argmaxes

    def logits(model, ids):
        # One token per call: the generator hands back the last position's logits only.
        gen = new_generator(model, 1, len(ids))
        rows = []
        for tok in ids:
            gen.append_tokens(np.asarray([[tok]], dtype=np.int32))
            x = np.asarray(gen.get_logits())
            rows.append(x.reshape(-1, x.shape[-1])[-1].copy())
        return np.stack(rows)

    return common.Runtime(
        load=load, generate=generate, teacher_forced=teacher_forced, files=[args.model], logits=logits,
        versions={"onnxruntime-genai": og.__version__},
        notes=f"model builder -p {args.precision} -e cpu; Generator loop, greedy",
    )


def add_args(parser):
    parser.add_argument("--precision", choices=["fp32", "int4"], required=True,
                        help="which builder output --model is (for the label)")
    return parser


if __name__ == "__main__":
    common.main(lambda a: f"ortgenai-{a.precision}", build,
                add_args(common.arg_parser("ONNX Runtime GenAI runner")))
