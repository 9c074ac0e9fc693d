#!/usr/bin/env bash
# Stage what the GPU serving run needs (issue #21), here, before the device calls:
# onnxruntime-gpu, onnxruntime-genai-cuda 0.18.0 and the server's wheels in parts of 58 MiB (.gpu/c0 ..
# .gpu/cN, ../shared/gpu/stage-wheels), and .gpu/assets (benchmarks/gpu_assets.py). Then, on the
# GPU machine, back to back: `mkdir -p /root/carry && cp .gpu/cK/* /root/carry/` carrying .gpu/cK
# for each part but the last, and in the last command
# `source benchmarks/gpu_setup.sh .gpu/cN && python3 benchmarks/gpu_serving.py --assets .gpu/assets ...`
# carrying .gpu/cN and .gpu/assets.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PART_MIB=58 ../shared/gpu/stage-wheels onnxruntime-genai-cuda==0.18.0 fastapi starlette uvicorn pydantic pydantic-core \
  annotated-types typing-inspection opentelemetry-api importlib-metadata prometheus-client
.venv/bin/python benchmarks/gpu_assets.py .gpu/assets
