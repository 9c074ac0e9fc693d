"""llama.cpp through llama-cpp-python, on a GGUF (SmolLM2: the Q4_1 GGUF the other runtimes start from).

Batch 1 goes through the high-level ``Llama.generate`` (greedy sampler), as a user would.
``Llama`` serves one sequence per context, so batch 8 uses llama.cpp's own batched decoding
through the low-level bindings: a second context with 8 sequences, one ``llama_decode`` per step
for all 8, argmax on the logits it returns (what llama.cpp's ``batched`` example does).
"""

from __future__ import annotations

import os

import common


def build(args) -> common.Runtime:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    batch_ctx_tokens = len(common.PROMPTS) * (common.PROMPT_LEN + common.NEW_TOKENS)

    class Model:
        def __init__(self):
            self.llm = Llama(model_path=str(args.model), n_ctx=512, n_batch=512,
                             n_threads=args.threads, n_threads_batch=args.threads,
                             n_gpu_layers=0, seed=0, verbose=False)
            self.n_vocab = self.llm.n_vocab()
            self._batch_ctx = None
            self._quality_llm = None

        def quality_llm(self):
            """A second context for --quality that keeps the logits of every position
            (``logits_all``), as llama.cpp's perplexity tool does; made after peak RSS is taken."""
            if self._quality_llm is None:
                self._quality_llm = Llama(
                    model_path=str(args.model), n_ctx=common.QUALITY_TOKENS,
                    n_batch=common.QUALITY_TOKENS, n_threads=args.threads,
                    n_threads_batch=args.threads, n_gpu_layers=0, seed=0, logits_all=True,
                    verbose=False)
            return self._quality_llm

        def last_logits_argmax(self, ctx, i: int) -> int:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i),
                                        shape=(self.n_vocab,))
            return int(row.argmax())

        def batch_ctx(self):
            if self._batch_ctx is None:
                # The same settings as Llama's own context (flash attention off, threads...),
                # so that batch and single sequences differ only in how many run at once.
                p = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
                p.n_ctx = batch_ctx_tokens
                p.n_batch = p.n_ubatch = batch_ctx_tokens
                p.n_seq_max = len(common.PROMPTS)
                # One KV buffer for all sequences: llama.h warns that separate per-sequence
                # buffers (kv_unified = false) can be slow with n_seq_max > 1, and here they are.
                p.kv_unified = True
                p.n_threads = p.n_threads_batch = args.threads
                self._batch_ctx = llama_cpp.llama_init_from_model(self.llm._model.model, p)
                if not self._batch_ctx:
                    raise RuntimeError("llama_init_from_model failed for the batch context")
            return self._batch_ctx

    def decode(ctx, batch, entries):
        """entries: (token, pos, seq, want_logits); returns nothing, raises on failure."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def generate_batched(model: Model, prompts, n):
        ctx = model.batch_ctx()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        rows, length = len(prompts), len(prompts[0])
        batch = llama_cpp.llama_batch_init(rows * length, 0, 1)
        try:
            decode(ctx, batch, [(t, j, s, j == length - 1)
                                for s, p in enumerate(prompts) for j, t in enumerate(p)])
            # With logits requested only on each prompt's last token, output i is sequence i.
            out = [[model.last_logits_argmax(ctx, (s + 1) * length - 1)] for s in range(rows)]
            for step in range(1, n):
                decode(ctx, batch, [(out[s][-1], length + step - 1, s, True) for s in range(rows)])
                for s in range(rows):
                    out[s].append(model.last_logits_argmax(ctx, s))
            return out
        finally:
            llama_cpp.llama_batch_free(batch)

    def generate(model: Model, prompts, n):
        if len(prompts) > 1:
            return generate_batched(model, prompts, n)
        # reset() so that Llama.generate cannot reuse the previous run's KV prefix.
        model.llm.reset()
        out = []
        for tok in model.llm.generate(list(prompts[0]), temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                      repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return [out]

    def teacher_forced(model: Model, prompt, continuation):
        llm = model.llm
        llm.reset()
        llm.eval(list(prompt))
        ctx = llm._ctx.ctx
        argmaxes = [model.last_logits_argmax(ctx, -1)]
        for tok in continuation[:-1]:
            llm.eval([tok])
            argmaxes.append(model.last_logits_argmax(ctx, -1))
        return argmaxes

    def logits(model: Model, ids):
        llm = model.quality_llm()
        llm.reset()
        llm.eval(list(ids))  # one batch: logits for every position (logits_all)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    # ggml's ISA is fixed when it is compiled: under benchmarks/isa_mask.py an AVX-512 build would
    # still run AVX-512 code. Refuse it (setup_competitors builds llamacpp-avx2 for the mask).
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    if os.environ.get("ISA_MASK") == "avx2" and ("AVX512 = 1" in system_info or "AVX_VNNI = 1" in system_info):
        raise RuntimeError(f"this llama.cpp was built for AVX-512 / AVX-VNNI, but the run is masked to "
                           f"AVX2 (ISA_MASK=avx2): {system_info}; run setup_competitors.py under the mask")
    return common.Runtime(
        load=Model, generate=generate, teacher_forced=teacher_forced, files=[args.model], logits=logits,
        versions={"llama-cpp-python": llama_cpp.__version__, "ggml": system_info},
        notes="batch 1: Llama.generate greedy; batch 8: llama_decode over 8 sequences "
              "(low-level bindings); mmap, flash attention off (Llama's default)",
    )


if __name__ == "__main__":
    common.main(lambda a: f"llamacpp-{a.model.stem.rsplit('.', 1)[-1].lower()}", build,
                common.arg_parser("llama-cpp-python runner"))
