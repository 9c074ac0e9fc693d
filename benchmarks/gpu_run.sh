#!/usr/bin/env bash
# On the GPU machine, after the carried wheel parts are in /root/carry (see ../shared/gpu/README.md:
# `PART_MIB=62 ../shared/gpu/stage-wheels onnxruntime-genai-cuda==0.18.0` here, one call per part):
# install onnxruntime-gpu + onnxruntime-genai-cuda, then run the whole GPU benchmark.
set -euo pipefail
cat /root/carry/part-* | tar -x -C /root/carry
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/carry/wheels/*.whl
export PYTHONPATH=/root/site:$PWD
python3 benchmarks/gpu_bench.py --out "${OUT:-.}" 2>"${OUT:-.}/gpu_log" | tee "${OUT:-.}/gpu_table.md"
