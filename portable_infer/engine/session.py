"""How ONNX Runtime sessions are made (:class:`SessionConfig`), and the engine for a selected session.

:func:`portable_infer.engine.providers.select_session` makes the session on the provider that really
works, with :meth:`SessionConfig.session_options`; :func:`make_engine` puts the engine the graph
needs around it: the static engine for ``growth: static`` graphs, the growing one otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from portable_infer.engine import host
from portable_infer.engine.device_memory import session_device_id
from portable_infer.engine.devices import device_of
from portable_infer.engine.growing import GrowingEngine
from portable_infer.engine.paged import PagedEngine
from portable_infer.engine.static import StaticEngine
from portable_infer.errors import InvalidArgumentError


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
    # False: the intra-op threads stop spinning when a run ends (they still spin between a run's
    # ops), for two sessions of one engine that take turns on the same cores (dense_companion)
    spin_between_runs: bool = True

    def session_options(self, ort):
        so = ort.SessionOptions()
        # 0 = the real CPU budget (affinity, physical cores, cgroup quota), not the host's cores
        so.intra_op_num_threads = self.intra_op_threads or host.cpu_budget().threads
        so.enable_mem_pattern = self.enable_mem_pattern
        so.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        so.log_severity_level = self.log_severity
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level or 1))
        if not self.spin_between_runs:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        if self.map_weights:
            so.add_session_config_entry("session.use_memory_mapped_ort_model", "1")
            so.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
        return so


def make_engine(sel, manifest, ort, max_kv_tokens: int | None = None):
    """The engine for a :class:`~portable_infer.engine.providers.Selection`: the static one for
    static-KV graphs (buffers of at most ``max_kv_tokens`` tokens per row), else the growing one.

    The engines make their buffers and bind their companions' on device 0 of the provider: a
    session on another device (``provider_options`` ``device_id``) is refused here rather than
    failing in a forward. One process per GPU, each seeing its own (``CUDA_VISIBLE_DEVICES``, as
    vLLM's servers are run), is the way to use another device."""
    device_id = session_device_id(sel.session, sel.provider.ort_name)
    if device_of(sel.provider.ort_name) != "cpu" and device_id != 0:
        raise InvalidArgumentError(
            f"device_id={device_id} for {sel.provider.ort_name}: the engines run on device 0 of a provider only; "
            f"leave device_id at 0 and choose the GPU with CUDA_VISIBLE_DEVICES={device_id} (one process per GPU)",
            param="provider_options")
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
