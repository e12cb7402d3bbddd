"""Two processes on localhost run one model with its experts, or its pipeline stages, split across both, as a
multi-host launch would."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from moejax import LLM, SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["ep8", "pp2_ep4", "dpa_ep8"])
def test_two_processes_reproduce_one(hf_model_dir, tmp_path, layout):
    model = hf_model_dir("qwen2_moe")
    port = free_port()
    out = tmp_path / "out.json"
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    procs = []
    for rank in range(2):
        env = dict(os.environ, MOEJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MOEJAX_NUM_PROCESSES="2",
                   MOEJAX_PROCESS_ID=str(rank), PYTHONPATH=os.getcwd())
        procs.append(subprocess.Popen([sys.executable, worker, model, str(out), layout], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    got = json.loads(out.read_text())

    llm = LLM(model)
    prompts = [[5, 9, 11, 40, 3], [7, 7, 8]]
    ref = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert got["tokens"] == [o.outputs[0].token_ids for o in ref]
    ref_logits = llm.logits(prompts[0])
    assert np.abs(np.asarray(got["logits"]) - ref_logits).max() / np.abs(ref_logits).max() < 1e-5
