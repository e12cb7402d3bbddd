"""The attention benchmark runs end to end (interpreted kernel on tiny shapes) and checks what it times."""

import json

from moejax.kernels import attention_bench


def test_attention_bench_prints_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(attention_bench, "MODELS", {
        "tiny sliding": dict(heads=4, kv_heads=2, head_dim=16, window=20, sinks=True),
        "tiny mla": dict(heads=4, kv_heads=1, head_dim=48, value_dim=32)})
    monkeypatch.setattr(attention_bench, "CASES", [(1, 40, False), (3, 70, True)])
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
