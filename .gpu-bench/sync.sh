python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
C=.gpu-bench/Qwen__Qwen3-30B-A3B.json
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
echo === dyn_cb; XLA_FLAGS=$CB timeout 170 python .gpu-bench/sync.py $C dyn_cb 2>&1 | grep -v -i warn | grep -v parts | tail -8
echo === static; MOEJAX_ATTENTION_LOOPS=static timeout 170 python .gpu-bench/sync.py $C static 2>&1 | grep -v -i warn | grep -v parts| tail -8
