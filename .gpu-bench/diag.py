"""GPU diagnosis: construction time, compiled step memory (temp/alias/output), and whether donation holds."""
import json, sys, time
import jax, numpy as np
from moejax import LLM
cfg = sys.argv[1]
import os, tempfile, shutil
d = tempfile.mkdtemp()
shutil.copy(cfg, os.path.join(d, "config.json"))
t0 = time.perf_counter()
llm = LLM(d, load_format="dummy", dtype="bfloat16", max_model_len=4352, max_num_seqs=256, kv_cache_tokens=int(sys.argv[2]))
print("construct_s", round(time.perf_counter() - t0, 1), "pool GiB", llm.runner.pool.nbytes / 2**30, flush=True)
r = llm.runner
dev = jax.devices()[0]
for dn, pn in [(1, 0), (128, 0), (0, 4096), (16, 1024)]:
    shape = r.buckets.shape(dn, pn)
    buf, _ = r._buffer(shape)
    t0 = time.perf_counter()
    with r._context():
        c = r.step_fn.lower(r.params, r.pool, buf, r._prev, shape).compile()
    ma = c.memory_analysis()
    print(shape, "compile_s", round(time.perf_counter() - t0, 1), "temp GiB", ma.temp_size_in_bytes / 2**30,
          "alias GiB", ma.alias_size_in_bytes / 2**30, "out GiB", ma.output_size_in_bytes / 2**30, flush=True)
    old = r.pool.k
    before = dev.memory_stats()["bytes_in_use"]
    t0 = time.perf_counter()
    jax.block_until_ready(r._run(shape, buf))
    st = dev.memory_stats()
    print("  run_s", round(time.perf_counter() - t0, 2), "old deleted", old.is_deleted(), "in use GiB", before / 2**30,
          "->", st["bytes_in_use"] / 2**30, "peak", st["peak_bytes_in_use"] / 2**30, flush=True)
shutil.rmtree(d)
