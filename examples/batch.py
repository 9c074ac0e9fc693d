"""Decode several prompts together (left-padded batch); greedy output equals one-by-one output.

    python examples/batch.py
"""

import portable_infer

model = portable_infer.load()
prompts = ["The capital of France is", "The three primary colors are", "def fibonacci(n):"]
for prompt, text in zip(prompts, model.batch_generate(prompts, max_new_tokens=24)):
    print(f"{prompt!r} -> {text!r}")
