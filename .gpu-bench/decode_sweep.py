"""GPU experiment: where the decode kernel's time goes (profile by kernel) and a sweep of its tiles."""
import collections, glob, os, sys, tempfile, itertools, time
import jax, jax.numpy as jnp, numpy as np
from moejax.kernels import attention_bench as ab
from moejax.kernels.pallas_paged_attention import DecodeTiles

def profile(fn, args):
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn(*args))
        f = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        prof = jax.profiler.ProfileData.from_file(f)
    per = collections.Counter()
    for plane in prof.planes:
        if not plane.name.startswith("/device:") or "CPU" in plane.name:
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                for ev in line.events:
                    per[ev.name[:60]] += ev.duration_ns / 1e3
    return per

rng = np.random.default_rng(0)
ab.ROUNDS = 3
cases = [("qwen3-30b-a3b", 1, 32768, False), ("qwen3-30b-a3b", 64, 8192, False), ("mixtral", 64, 2048, False)]
for name, b, c, mixed in cases:
    p = ab.Problem(rng, ab.MODELS[name], b, c, mixed)
    fn, args = p.moejax()
    print(f"== {name} b{b} ctx{c} reps {p.reps} roof {p.kv_bytes / 3.1e12 * 1e6:.1f} us/call")
    for k, v in profile(fn, args).most_common(8):
        print(f"   {v / p.reps:9.1f} us/call  {k}")
    sys.stdout.flush()
    best = []
    grid = list(itertools.product((64, 128, 256), (16,), (4, 8), (1, 2), (None, 8)))
    for bt, bh, nw, ns, sm in grid:
        splits = None
        if sm is not None:
            base = max(1, -(-4 * 132 // (b * p.kvh)))
            splits = max(1, base * sm // 4) if sm else None
        t = DecodeTiles(block_tokens=bt, block_h=bh, splits=splits, num_warps=nw, num_stages=ns)
        try:
            us = ab._median_us(*p.moejax(t), p.reps)
        except Exception as e:
            print("  fail", t, type(e).__name__, str(e)[:100]); continue
        best.append((us, t))
    best.sort(key=lambda x: x[0])
    for us, t in best[:6]:
        print(f"   {us:8.1f} us  {p.kv_bytes / us / 1e6:6.2f} TB/s  {t}")
    print(f"   worst {best[-1][0]:.1f}", flush=True)
    del p
