"""Where an engine's tensors live, by execution provider: the one provider -> device map.

ONNX Runtime names the device of an OrtValue (``"cpu"``, ``"cuda"``); an engine binds its KV and
outputs there so they stay on the device between steps. TensorRT runs in a CUDA process and takes
CUDA memory, so its tensors live on ``"cuda"`` too. Every other provider gets host memory
(``"cpu"``): ONNX Runtime copies what its nodes need.
"""

from __future__ import annotations

from types import MappingProxyType

DEVICES = MappingProxyType({
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
})


def device_of(provider: str) -> str:
    """The OrtValue device name for tensors of a session on ``provider`` (ONNX Runtime's name)."""
    return DEVICES.get(provider, "cpu")
