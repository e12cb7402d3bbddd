"""`moejax bench serve` end to end on the embedded model: it starts the server, streams from concurrent clients,
runs offline generate on the same requests and prints one table."""

import json

import pytest

from moejax.cli import main as cli
from moejax.engine.llm import default_model_path

for module in ("fastapi", "uvicorn", "httpx"):  # the serve extra (the GPU machine has none of it)
    pytest.importorskip(module)


def test_bench_serve_prints_levels_and_offline(tmp_path, capsys):
    out = tmp_path / "serve.json"
    # few step shapes to warm up: a small batch and step budget
    rc = cli(["bench", "serve", default_model_path(), "--concurrency", "1", "4", "--serve-requests", "8",
              "--prompt-lens", "4", "16", "--output-lens", "2", "6", "--max-num-seqs", "4",
              "--max-num-batched-tokens", "32", "--max-model-len", "128", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    for lv in data["levels"]:
        assert lv["requests"] == 8 and lv["wrong_length"] == 0 and lv["output_tokens_per_s"] > 0
        assert lv["ttft_p50_ms"] > 0 and lv["itl_p50_ms"] is not None
    assert data["offline"]["output_tokens_per_s"] > 0 and data["offline"]["wrong_length"] == 0
    text = capsys.readouterr().out
    assert "| clients |" in text and "offline generate on the same requests" in text
