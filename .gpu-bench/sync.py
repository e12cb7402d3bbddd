"""GPU: decode ms/step at batch 1/32 under the current env (loop mode, XLA flags); device-busy share; kernel table."""
import glob, json, os, shutil, sys, tempfile, time, collections
import jax, numpy as np
from moejax import LLM, SamplingParams
from moejax.bench.device_time import busy_ns, breakdown_ns
tag = sys.argv[2]
d = tempfile.mkdtemp(); shutil.copy(sys.argv[1], os.path.join(d, "config.json"))
t0 = time.perf_counter()
llm = LLM(d, load_format="dummy", dtype="bfloat16", max_model_len=4352, max_num_seqs=128, kv_cache_tokens=200000)
print(tag, "construct", round(time.perf_counter() - t0, 1), flush=True)
rng = np.random.default_rng(0)
def run(b, n):
    ps = [rng.integers(10, 1000, 128).tolist() for _ in range(b)]
    t0 = time.perf_counter()
    llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - t0
res = {"tag": tag}
for b in (1, 32, 128):
    run(b, 2); run(b, 34)
    t = (run(b, 34) - run(b, 2)) / 32
    res[f"b{b}_ms"] = round(t * 1e3, 2)
    print(tag, "batch", b, "ms/step", res[f"b{b}_ms"], flush=True)
    if time.perf_counter() - t0 > 100:
        break
    # profile 34-token generate: device busy vs wall, kernel table
    with tempfile.TemporaryDirectory() as td:
        with jax.profiler.trace(td):
            w0 = time.perf_counter(); run(b, 34); wall = time.perf_counter() - w0
        f = glob.glob(os.path.join(td, "**", "*.xplane.pb"), recursive=True)[0]
        prof = jax.profiler.ProfileData.from_file(f)
        busy = busy_ns(prof) * 1e-9
        res[f"b{b}_busy_frac"] = round(busy / wall, 3)
        res[f"b{b}_parts_ms_per_step"] = {k: round(v * 1e-6 / 35, 3) for k, v in breakdown_ns(prof).items()}
        print(tag, "parts", res[f"b{b}_parts_ms_per_step"], flush=True)
        per = collections.defaultdict(lambda: [0, 0.0])
        sample = []
        for plane in prof.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if len(sample) < 6 and line.events:
                    for ev in list(line.events)[:2]:
                        try:
                            st = {k: str(v)[:120] for k, v in ev.stats}
                        except Exception as e:
                            st = repr(e)
                        sample.append((line.name, ev.name[:100], st))
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    p = per[ev.name[:90]]; p[0] += 1; p[1] += ev.duration_ns * 1e-6
        top = sorted(per.items(), key=lambda kv: -kv[1][1])[:30]
        res[f"b{b}_top"] = [(k, c, round(ms, 2)) for k, (c, ms) in top]
        res[f"b{b}_kernels"] = sum(c for c, _ in per.values())
        res[f"b{b}_sample"] = sample
        print(tag, "busy", res[f"b{b}_busy_frac"], "kernels", res[f"b{b}_kernels"], flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), f"sync_{tag}.json"), "w"), indent=1)
shutil.rmtree(d)
