"""The ONNX Runtime side: engines that run a decoder graph on token ids, and their KV caches.

The engine knows token ids, not text. Callers use the two protocols of
:mod:`~portable_infer.engine.protocols` and nothing else::

    protocols    Engine, KVCache: what callers may use
    session      SessionConfig (how sessions are made), make_engine (which engine a graph needs)
    growing      GrowingEngine: growth: concat graphs (the graph appends the KV)
    kv_growing   GrowingCache: its cache (ONNX Runtime's presents, right-aligned rows)
    static       StaticEngine: growth: static graphs (fixed buffers; CUDA graphs on CUDA)
    kv_static    StaticCache: its cache (rows from index 0 of pooled buffers)
    rows         RowMover: static caches' rows moved on their device (GPUs)
    padding      the callers' left-padded masks when rows join or leave
    checks       what every engine refuses (capacity, greedy, all_logits)
    memory       arena shrinkage, heap release, KV bytes per token
    devices      provider -> device
"""

from portable_infer.engine.protocols import Engine, KVCache

__all__ = ["Engine", "KVCache"]
