"""The attention benchmark runs end to end (interpreted kernel on tiny shapes) and checks what it times."""

import json

from moejax.kernels import attention_bench, prefill_bench


def test_attention_bench_prints_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(attention_bench, "MODELS", {
        "tiny sliding": dict(heads=4, kv_heads=2, head_dim=16, window=20, sinks=True),
        "tiny mla": dict(heads=4, kv_heads=1, head_dim=48, value_dim=32)})
    monkeypatch.setattr(attention_bench, "CASES", [(1, 40, False), (3, 70, True)])
    monkeypatch.setattr(prefill_bench, "CASES", [(1, 70, 0), (2, 30, 40)])  # fresh; chunks after a prefix
    monkeypatch.setattr(attention_bench, "L2_BYTES", 1 << 12)
    monkeypatch.setattr(attention_bench, "ROUNDS", 1)
    monkeypatch.setattr(attention_bench, "hbm_bandwidth", lambda n: {"hbm_bytes_per_s": 1e11})
    monkeypatch.setattr(attention_bench, "read_bandwidth", lambda n: 1.2e11)
    out = tmp_path / "attention.json"
    assert attention_bench.main(["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny sliding" in text and "tiny mla" in text and "error" not in text
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4
    for row in rows:
        assert row["moejax"] > 0 and row["reference"] > 0 and row["roofline"] > 0, row
        assert row["err"] < 1e-2, row
    assert any(row["reps"] > 1 for row in rows)  # small caches run on several copies (outgrowing the L2)
    prefill = json.loads(out.read_text())["prefill_rows"]
    assert len(prefill) == 4
    for row in prefill:
        assert row["moejax"] > 0 and row["reference"] > 0 and row["roofline"] > 0 and row["err"] < 1e-2, row
    # causal FLOPs: a fresh 70-token prompt's queries see 1..70 keys (the sliding shape: at most 20)
    fresh = {r["model"]: r["flops"] for r in prefill if r["cached"] == 0}
    assert fresh["tiny mla"] == 2 * sum(range(1, 71)) * 4 * (48 + 32)
    assert fresh["tiny sliding"] == 2 * sum(min(n, 20) for n in range(1, 71)) * 4 * 32
