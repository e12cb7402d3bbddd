"""The kernel benchmark script runs end to end (interpreted kernels on tiny shapes) and checks what it times."""

import json

from moejax.kernels import bench


def test_bench_prints_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", [("tiny decode", 2, 8, 128, 32, 2), ("tiny prefill", 96, 4, 128, 32, 2)])
    monkeypatch.setattr(bench, "ROUTING_TOKENS", 32)
    monkeypatch.setattr(bench, "DENSE_SHAPES", [("tiny linear", 256, 128)])
    monkeypatch.setattr(bench, "DENSE_TOKENS", (1, 16))
    out = tmp_path / "bench.json"
    assert bench.main(["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny decode" in text and "tiny prefill" in text and "routing T=32" in text
    data = json.loads(out.read_text())
    for row in data["results"]:
        for label in ("bf16", "int8", "int4", "fp8", "layer bf16", "layer fp8", "ref layer", "ragged"):
            assert isinstance(row[label], float) and row[label] > 0, (row["name"], label, row[label])
        for label in ("bf16", "int8", "int4"):
            assert row[f"layer {label} err"] < 3e-2
        # fp8: W8A16 at decode (bf16's error), W8A8 at prefill (e4m3 activations: a few percent)
        assert row["layer fp8 err"] < (3e-2 if row["name"] == "tiny decode" else 8e-2)
        assert set(row["roof"]) == {"bf16", "int8", "int4", "fp8"}
    assert set(data["rates"]) == {"hbm", "bf16", "fp8"}
    assert [(r["name"], r["tokens"]) for r in data["dense"]] == [("tiny linear", 1), ("tiny linear", 16)]
    for r in data["dense"]:  # fp8 weights with bf16 activations: bf16's error on the dequantized weights
        assert r["bf16"] > 0 and r["fp8"] > 0 and r["fp8 pallas"] > 0 and r["fp8 err"] < 2e-2
        assert r["fp8 pallas err"] < 2e-2  # (off the GPU kernels.matmul keeps XLA's path)
    assert "dense x @ W" in text
    assert data["routing"]["reference"] > 0 and data["routing"]["(4, 2)"] > 0
