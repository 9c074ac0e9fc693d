"""Greedy decoding through an engine's KV cache, shared by tests (and shipped as source to the
OpenVINO subprocess by tests/test_openvino.py, so it imports what it needs itself)."""


def greedy_steps(model, ids, steps, cache=None):
    """Greedy decoding through the engine's KV cache: (tokens, last-position logits [steps, vocab])."""
    import numpy as np

    engine = model.engine
    cache = engine.new_cache(1) if cache is None else cache
    arr = np.asarray([ids], np.int64)
    logits = [engine.forward(arr, np.ones_like(arr), cache)[0]]
    seq = list(ids)
    for _ in range(steps - 1):
        seq.append(int(np.argmax(logits[-1])))
        logits.append(engine.forward(np.asarray([[seq[-1]]], np.int64), np.ones((1, len(seq)), np.int64), cache)[0])
    seq.append(int(np.argmax(logits[-1])))
    return seq[len(ids):], np.stack(logits)
