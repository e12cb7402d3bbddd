"""examples/offload_experts.py runs on the embedded model with a device cache of its experts."""

import importlib.util
import os

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "offload_experts.py")


def test_offload_example_runs_with_a_cache(capsys):
    spec = importlib.util.spec_from_file_location("offload_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--cache-experts", "2", "--max-tokens", "24"])
    assert result["tokens"] == 24 and 0 <= result["cache_hit_share"] <= 1
    assert "experts in host memory" in capsys.readouterr().out
