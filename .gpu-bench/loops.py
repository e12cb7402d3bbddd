"""GPU timing: decode ms per step with the paged-attention loops static vs dynamic (MOEJAX_ATTENTION_LOOPS)."""
import os, sys, time, shutil, tempfile, jax, numpy as np
from moejax import LLM, SamplingParams
d = tempfile.mkdtemp(); shutil.copy(sys.argv[1], os.path.join(d, "config.json"))
llm = LLM(d, load_format="dummy", dtype="bfloat16", max_model_len=4352, max_num_seqs=64, kv_cache_tokens=200000)
rng = np.random.default_rng(0)
def run(b, n):
    ps = [rng.integers(10, 1000, 128).tolist() for _ in range(b)]
    t0 = time.perf_counter()
    llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - t0
for mode in ["static", "dynamic"]:
    os.environ["MOEJAX_ATTENTION_LOOPS"] = mode
    jax.clear_caches()
    for b in (1, 64):
        run(b, 2); run(b, 34)
        t = (run(b, 34) - run(b, 2)) / 32
        print(mode, "batch", b, "ms/step", round(t * 1e3, 2), flush=True)
shutil.rmtree(d)
