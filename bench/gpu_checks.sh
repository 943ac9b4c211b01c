#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see README "Benchmarks"). Needs the diffusers wheel in .wheels/
# when the machine has no diffusers:  pip download --no-deps diffusers==0.42.1 importlib_metadata bitsandbytes -d .wheels
export PYTHONPATH=src
OUT=${OUT:-/tmp}
if ! python3 -c "import diffusers" 2>/dev/null; then python3 -m pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | grep -v WARNING; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
timeout 480 python3 bench/gpu_memory.py --steps 3 ${BENCH_ARGS:---configs none+8bit,fp8+8bit,fp8+swap16+8bit,fp8+swap45+8bit,none,fp8+swap45} --out "$OUT/gpu_memory.json" 2>&1 | grep -v "^INFO"
timeout 300 python3 bench/load.py --blocks 6 --repeats 2 --device cuda 2>&1 | tail -10
timeout 150 python3 -m musubi_tuner.demo --device cuda --steps 30 --output /tmp/demo 2>&1 | grep -v "^INFO\|it/s\]" | tail -9
