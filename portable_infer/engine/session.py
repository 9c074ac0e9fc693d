"""How ONNX Runtime sessions are made (:class:`SessionConfig`), and the engine for a selected session.

:func:`portable_infer.engine.providers.select_session` makes the session on the provider that really
works, with :meth:`SessionConfig.session_options`; :func:`make_engine` puts the engine the graph
needs around it: the static engine for ``growth: static`` graphs, the growing one otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from portable_infer.engine import host
from portable_infer.engine.growing import GrowingEngine
from portable_infer.engine.paged import PagedEngine
from portable_infer.engine.static import StaticEngine


@dataclass(frozen=True)
class SessionConfig:
    """How ONNX Runtime sessions are made (frozen; passed down, not **kwargs)."""

    intra_op_threads: int = 0  # 0 = host.cpu_budget(): physical cores in the affinity mask, within the cgroup quota
    # MatMulNBits activation accuracy: 1 keeps float activations (exact GGUF imports),
    # 4 quantizes them to int8 (faster on CPUs with int8 dot products); None: the loader decides.
    accuracy_level: int | None = 1
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True
    log_severity: int = 3
    # ORT-format (.ort) graphs: memory-map the file and use the weights in it in place instead of
    # copying them to the heap (recent ONNX Runtime; older versions ignore the keys). No effect on .onnx.
    map_weights: bool = False

    def session_options(self, ort):
        so = ort.SessionOptions()
        # 0 = the real CPU budget (affinity, physical cores, cgroup quota), not the host's cores
        so.intra_op_num_threads = self.intra_op_threads or host.cpu_budget().threads
        so.enable_mem_pattern = self.enable_mem_pattern
        so.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        so.log_severity_level = self.log_severity
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level or 1))
        if self.map_weights:
            so.add_session_config_entry("session.use_memory_mapped_ort_model", "1")
            so.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
        return so


def make_engine(sel, manifest, ort, max_kv_tokens: int | None = None):
    """The engine for a :class:`~portable_infer.engine.providers.Selection`: the static one for
    static-KV graphs (buffers of at most ``max_kv_tokens`` tokens per row), else the growing one."""
    context = manifest.model.max_context
    if sel.variant.kv.growth == "paged":
        return PagedEngine(sel.session, sel.variant, sel.provider.ort_name, ort,
                           max_context=min(context, max_kv_tokens or context), vocab_size=manifest.model.vocab_size,
                           cuda_graph=sel.graph_capture)
    if sel.variant.kv.growth == "static":
        return StaticEngine(sel.session, sel.variant, sel.provider.ort_name, ort,
                            max_context=min(context, max_kv_tokens or context),
                            vocab_size=manifest.model.vocab_size, cuda_graph=sel.graph_capture)
    return GrowingEngine(sel.session, sel.variant, sel.provider.ort_name, ort, max_context=context)
