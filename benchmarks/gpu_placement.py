"""Print which nodes of a graph ONNX Runtime places off the CUDA provider (CUDA graphs need none).

    python3 benchmarks/gpu_placement.py PACKAGE/model.static.onnx
"""

import sys

import onnxruntime as ort

so = ort.SessionOptions()
so.log_severity_level = 0  # verbose: ORT logs its node placements
ort.InferenceSession(sys.argv[1], so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
