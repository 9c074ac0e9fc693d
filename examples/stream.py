"""Stream tokens as they are generated, with sampling, a seed and a stop string.

    python examples/stream.py
"""

import portable_infer

model = portable_infer.load()
last = None
for last in model.stream_generate("Once upon a time, in a small village,", max_new_tokens=80,
                                  temperature=0.8, top_p=0.95, seed=7, stop=["\n\n"]):
    print(last.text, end="", flush=True)
print(f"\n[{last.finish_reason}; {last.generation_tokens} tokens; TTFT {last.ttft_s * 1000:.0f} ms; "
      f"{last.decode_tokens_per_s:.1f} tokens/s]")
