"""The fallback route: ``torch.onnx`` export of the transformers model, for architectures the
direct builder does not cover.

The traced graph is renamed to our contract (``portable_infer.package.manifest`` input/output names,
BHSD concat KV, logits at every position) so the runtime loads it like a direct export:

    input_ids [B,S] ─┐
    attention_mask [B,T] ─┼─> Wrapper ─> transformers model(DynamicCache from past) ─> logits [B,S,V]
    position_ids [B,S] ─┤                                                          └─> present.{i} [B,KVH,T,D]
    past_key_values.{i}.key/value [B,KVH,P,D] ─┘

Only HF folders and fp32 are supported: the weights are the traced model's parameters.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import onnx

from portable_infer.package import manifest as mf
from portable_infer.errors import (
    ExportError, InvalidArgumentError, SourceError, UnsupportedArchitectureError, require,
)

from .architectures import MODEL_TYPES
from .architectures.common import model_dims

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32",)
OPSET = 18
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 2  # a past of length >= 1 keeps its axis symbolic
# config attributes model_dims reads, fetched through the config object so that each model's
# attribute_map (n_layer -> num_hidden_layers ...) applies
_DIM_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
             "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def load_model(folder: Path):
    """The transformers model in float32 with eager attention (traceable, mask added to scores)."""
    torch = require("torch")
    transformers = require("transformers")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager")
    except ValueError as exc:  # transformers does not know the model_type (or its config)
        raise _unsupported(_model_type(folder), exc) from exc
    except OSError as exc:
        raise SourceError(f"the fallback route could not load {folder} with transformers: {exc}") from exc
    return model.eval()


def dims_of(config) -> mf.ModelDims:
    cfg = config.to_dict()
    for key in _DIM_KEYS:
        if cfg.get(key) is None and getattr(config, key, None) is not None:
            cfg[key] = getattr(config, key)
    if getattr(config, "sliding_window", None):
        raise ExportError(f"model_type {config.model_type!r} uses a sliding window, which the fallback "
                          f"route does not export (its concat KV cache would outgrow the window)")
    try:
        return model_dims(cfg, f"fallback:{config.model_type}")
    except SourceError as exc:  # no attention heads / layers: not a decoder this route can describe
        raise _unsupported(config.model_type, exc) from exc


def _wrapper(model, num_layers: int):
    torch = require("torch")
    from transformers import DynamicCache

    class Decoder(torch.nn.Module):
        """Flat tensors in and out around the transformers model and its DynamicCache."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers[:num_layers]:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return Decoder().eval()


def write_portable(tmp: Path, file: str, model, dims: mf.ModelDims, precision: str) -> onnx.ModelProto:
    """Trace ``model`` into ``tmp/file`` (+ ``file.data``); returns the graph (weights external)."""
    if precision not in PRECISIONS:
        raise InvalidArgumentError(
            f"the fallback route (torch.onnx export for model_type {dims.model_type!r}) supports precision "
            f"{', '.join(PRECISIONS)} only, got {precision!r}")
    torch = require("torch")
    n = dims.num_layers
    past_names = [name for i in range(n) for name in mf.past_names(i)]
    present_names = [name for i in range(n) for name in mf.present_names(i)]
    gen = torch.Generator().manual_seed(0)
    b, s, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    ids = torch.randint(0, dims.vocab_size, (b, s), generator=gen)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    mask[1, 0] = 0  # a padded row keeps the padding path in the trace
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, -s:]
    past = [torch.randn(b, dims.num_kv_heads, p, dims.head_dim, generator=gen) for _ in past_names]

    axes = {mf.INPUT_IDS: {0: "batch", 1: "sequence"}, mf.ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
            mf.POSITION_IDS: {0: "batch", 1: "sequence"}, mf.LOGITS: {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present_names})
    wrapper = _wrapper(model, n)
    trace_dir = tmp / ".trace"  # torch may write weights as one file per tensor; collected below
    trace_dir.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            _check_presents(wrapper(ids, mask, pos, *past)[1:], dims, p + s)
        except Exception as exc:  # the model is not a KV-cache decoder this route can wrap
            raise _unsupported(dims.model_type, exc) from exc
        torch.onnx.export(wrapper, (ids, mask, pos, *past), str(trace_dir / file), dynamo=False, opset_version=OPSET,
                          input_names=[mf.INPUT_IDS, mf.ATTENTION_MASK, mf.POSITION_IDS, *past_names],
                          output_names=[mf.LOGITS, *present_names], dynamic_axes=axes)
    # re-save with every weight in one external file, beside the graph
    proto = onnx.load(str(trace_dir / file))
    shutil.rmtree(trace_dir)
    onnx.save(proto, str(tmp / file), save_as_external_data=True, all_tensors_to_one_file=True,
              location=file + ".data", size_threshold=0)
    return proto


def _check_presents(presents, dims: mf.ModelDims, total: int) -> None:
    expected = (TRACE_BATCH, dims.num_kv_heads, total, dims.head_dim)
    shapes = [tuple(t.shape) for t in presents]
    if len(shapes) != 2 * dims.num_layers or any(sh != expected for sh in shapes):
        raise ExportError(f"expected {dims.num_layers} layers of [batch, kv_heads, seq, head_dim] = {expected} "
                          f"keys and values in the cache, got {shapes}")


def _model_type(folder: Path) -> str | None:
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _unsupported(model_type: str, cause: Exception) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported by the direct exporter (supported: "
        f"{', '.join(sorted(MODEL_TYPES))}), and the fallback route (torch.onnx export of the transformers "
        f"model) cannot wrap it: {type(cause).__name__}: {cause}")
