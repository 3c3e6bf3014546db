"""benchmarks/gate.py: the ratio regression gate on hand-made pytest-benchmark records."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gate  # noqa: E402


def records(ours_s: float, anchor_s: float, case: str = "op:case") -> dict:
    def record(role, seconds):
        return {"extra_info": {"role": role, "case": case, "flops": 0.0, "bytes": 0.0},
                "stats": {"min": seconds, "median": 2 * seconds}}
    return {"benchmarks": [record("ours", ours_s), record("anchor", anchor_s)]}


@pytest.mark.parametrize("ours_now,anchor_now,fails", [
    (1.0, 4.0, False),   # same ratio
    (2.0, 8.0, False),   # both slower (a busier machine): same ratio
    (1.2, 4.0, False),   # 20% lost against the anchor: within 25%
    (1.3, 4.0, True),    # 30% lost
    (1.0, 2.0, True),    # the anchor got faster, we did not
])
def test_gate_compares_ratios_not_times(tmp_path, ours_now, anchor_now, fails):
    (tmp_path / "base.json").write_text(json.dumps(records(1.0, 4.0)))
    (tmp_path / "now.json").write_text(json.dumps(records(ours_now, anchor_now)))
    assert gate.main([str(tmp_path / "base.json"), str(tmp_path / "now.json")]) == int(fails)


def test_gate_rejects_a_file_that_is_not_benchmark_json(tmp_path, capsys):
    (tmp_path / "base.json").write_text(json.dumps(records(1.0, 4.0)))
    (tmp_path / "now.json").write_text("not json")
    assert gate.main([str(tmp_path / "base.json"), str(tmp_path / "now.json")]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err


def test_gate_compares_with_the_baseline_of_the_runs_capability(tmp_path, capsys):
    # AVX-512 anchors are faster: a ratio fine against the AVX2 baseline fails against its own.
    keyed = {"avx2": records(1.0, 4.0), "avx512": records(1.0, 2.0)}
    (tmp_path / "base.json").write_text(json.dumps(keyed))
    for capability, anchor_now, fails in (("avx2", 4.0, False), ("avx512", 2.0, False), ("avx2", 2.0, True)):
        now = dict(records(1.0, anchor_now), stnpadim_cpu_capability=capability)
        (tmp_path / "now.json").write_text(json.dumps(now))
        assert gate.main([str(tmp_path / "base.json"), str(tmp_path / "now.json")]) == int(fails)
        assert f"the {capability} baseline" in capsys.readouterr().out


def test_gate_infers_the_capability_from_cpu_flags_and_passes_without_a_baseline(tmp_path, capsys):
    (tmp_path / "base.json").write_text(json.dumps({"avx512": records(1.0, 4.0)}))
    now = dict(records(5.0, 4.0), machine_info={"cpu": {"flags": ["sse2", "avx", "avx2", "fma"]}})
    (tmp_path / "now.json").write_text(json.dumps(now))
    assert gate.main([str(tmp_path / "base.json"), str(tmp_path / "now.json")]) == 0
    assert "no baseline for CPU capability avx2" in capsys.readouterr().out
    # --capability overrides: compared with the avx512 baseline, 5x slower fails.
    assert gate.main([str(tmp_path / "base.json"), str(tmp_path / "now.json"), "--capability", "avx512"]) == 1


def test_committed_baseline_is_keyed_by_capability():
    baselines = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "baseline_cpu.json").read_text())
    assert baselines and set(baselines) <= set(gate.CAPABILITIES)
    for capability, run in baselines.items():
        assert gate.run_capability(run) == capability
        assert gate.case_table(run["benchmarks"])

