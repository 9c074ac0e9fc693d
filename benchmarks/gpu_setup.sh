# Source this on the GPU machine in the command that carries the last part of the staged wheels
# (../shared/gpu/README.md: the earlier commands copied .gpu/c0 .. .gpu/cN-1 into /root/carry):
#
#     source benchmarks/gpu_setup.sh .gpu/c4 && python3 benchmarks/gpu_serving.py --assets .gpu/assets ...
#
# It joins the parts, installs the wheels into /root/site (once per machine start), puts
# /root/site and the working tree on PYTHONPATH and a `portable-infer` on PATH (the load tests
# start the server by that name), and prints what ONNX Runtime offers there. Later commands while
# the machine stays up: `source benchmarks/gpu_setup.sh` (no argument).
if [ -n "$1" ]; then
  mkdir -p /root/carry && cp "$1"/* /root/carry/
  (cd /root/carry && cat part-* | tar -x && python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /root/site wheels/*.whl) 2>&1 | tail -3
fi
[ -d /root/site ] || { echo "gpu_setup: /root/site is missing: the machine is a fresh one; stage the parts again"; return 1; }
export PYTHONPATH=/root/site:$PWD
mkdir -p /root/bin && printf '#!/bin/sh\nexec python3 -m portable_infer.cli "$@"\n' > /root/bin/portable-infer \
  && chmod +x /root/bin/portable-infer
export PATH=/root/bin:$PATH
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
