"""GPU: compiled memory of the first step shapes, the largest buffers in the optimized HLO, then run them."""
import os, re, shutil, sys, tempfile, time
import jax, numpy as np
from moejax import LLM
d = tempfile.mkdtemp(); shutil.copy(sys.argv[1], os.path.join(d, "config.json"))
llm = LLM(d, load_format="dummy", dtype="bfloat16", max_model_len=4352, max_num_seqs=64, kv_cache_tokens=200000)
r = llm.runner
dev = jax.devices()[0]
print("pool GiB", r.pool.nbytes / 2**30, "in use GiB", dev.memory_stats()["bytes_in_use"] / 2**30,
      "limit GiB", dev.memory_stats()["bytes_limit"] / 2**30, flush=True)
BYTES = {"bf16": 2, "f32": 4, "s32": 4, "u32": 4, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1}
pat = re.compile(r"(\w+)\[([\d,]*)\]")
for dn, pn in [(0, 128), (1, 0), (32, 0)]:
    shape = r.buckets.shape(dn, pn)
    buf, _ = r._buffer(shape)
    with r._context():
        c = r.step_fn.lower(r.params, r.pool, buf, r._prev, shape).compile()
    ma = c.memory_analysis()
    print(shape, {k: round(getattr(ma, k) / 2**30, 3) for k in dir(ma) if k.endswith("_in_bytes")}, flush=True)
    try:
        print("  input formats differ:", [str(a)[:80] for a in jax.tree.leaves(c.input_formats)][:0])
    except Exception as e:
        print("  no input_formats", e)
    big = []
    comp = None
    for line in c.as_text().splitlines():
        if line and not line.startswith(" ") and "{" in line:
            comp = line.split(" ")[0] if not line.startswith("ENTRY") else "ENTRY"
        m = re.match(r"\s+(?:ROOT )?(\S+) = (\w+)\[([\d,]*)\]", line)
        if m and m.group(2) in BYTES:
            n = int(np.prod([int(x) for x in m.group(3).split(",") if x])) * BYTES[m.group(2)]
            if n > 2**30 and "fused" not in (comp or "") :
                big.append((n / 2**30, comp, line.strip()[:220]))
    for b in sorted(big, reverse=True)[:12]:
        print("   %.2f GiB" % b[0], b[1], b[2], flush=True)
    try:
        jax.block_until_ready(r._run(shape, buf))
        print("  ran; peak GiB", dev.memory_stats()["peak_bytes_in_use"] / 2**30, flush=True)
    except Exception as e:
        print("  FAILED", str(e)[:300], flush=True)
shutil.rmtree(d)
