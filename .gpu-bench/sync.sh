python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
C=.gpu-bench/Qwen__Qwen3-30B-A3B.json
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
echo === layerweight; timeout 200 python .gpu-bench/sync.py $C lw 2>&1 | grep -v -i warn | tail -12
echo === layerweight+dsfusion; XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true timeout 200 python .gpu-bench/sync.py $C lw_ds 2>&1 | grep -v -i warn | tail -12
echo === gpu tests; timeout 180 python -m pytest -q -m gpu tests 2>&1 | tail -4
