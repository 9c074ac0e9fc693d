"""portable_infer on its own model package, CPU execution provider (runs in the project venv)."""

from __future__ import annotations

import common

# What the runner calls; reported by name when the engine does not have it yet.
LOAD_API = "portable_infer.load(package_dir, providers='cpu', intra_op_threads=N)"
MODEL_API = ("generate_ids", "batch_generate_ids", "forward_logits")


def generate(model, prompts, n):
    """Greedy ids for each prompt (batch 1: generate_ids; more: batch_generate_ids)."""
    kw = dict(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    if len(prompts) == 1:
        return [list(model.generate_ids(list(prompts[0]), **kw))]
    return [list(row) for row in model.batch_generate_ids([list(p) for p in prompts], **kw)]


def teacher_forced(model, prompt, continuation):
    """The model's argmax after each token of prompt + continuation (but the last)."""
    logits = model.forward_logits(list(prompt) + list(continuation[:-1]))
    return logits[len(prompt) - 1:].argmax(-1).tolist()


def logits(model, ids):
    """The next-token logits after every prefix of ``ids``, one forward over the whole text."""
    return model.forward_logits(list(ids))


def build(args) -> common.Runtime:
    import portable_infer

    if not callable(getattr(portable_infer, "load", None)):
        raise RuntimeError(f"portable_infer API not there yet: no {LOAD_API}")
    if not (args.model / "manifest.json").is_file():
        raise RuntimeError(f"no model package at {args.model} (no manifest.json): export one "
                           "from the GGUF and pass it to compare_cpu.py --package DIR")

    def load():
        model = portable_infer.load(str(args.model), providers="cpu",
                                    intra_op_threads=args.threads, accuracy_level=args.accuracy)
        missing = [name for name in MODEL_API if not callable(getattr(model, name, None))]
        if missing:
            raise RuntimeError(f"portable_infer API not there yet: the loaded model has no "
                               f"{', '.join(missing)}")
        return model

    import onnxruntime as ort
    return common.Runtime(
        load=load, generate=generate, teacher_forced=teacher_forced, files=[args.model], logits=logits,
        versions={"portable_infer": portable_infer.__version__, "onnxruntime": ort.__version__},
        notes=f"generate_ids / batch_generate_ids, temperature 0, ignore_eos, accuracy_level={args.accuracy}",
    )


if __name__ == "__main__":
    parser = common.arg_parser("portable_infer runner")
    parser.add_argument("--accuracy", type=int, choices=(1, 4), default=None,
                        help="default: the loader's choice (int8 activations where the package has them); "
                             "1: the exact graphs; 4: int8 activations required")
    common.main("portable_infer", build, parser)
