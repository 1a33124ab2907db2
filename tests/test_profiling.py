"""mavjax.profiling: per-step kernel totals from device events (the trace reading itself needs a GPU)."""

import pytest

from mavjax.profiling import format_profile, summarize


def test_summarize_counts_busy_time_as_the_union_of_kernels():
    # Two steps; "b" overlaps "a" on another stream (the union counts it once), then a 50 ns gap, then "c".
    ev = [("a", 0, 100), ("b", 50, 100), ("c", 200, 20), ("a", 1000, 100), ("c", 1150, 20)]
    p = summarize(ev, steps=2)
    assert p["kernels_per_step"] == 2.5
    assert p["busy_us"] == pytest.approx((150 + 20 + 100 + 20) / 2 / 1e3)
    assert p["span_us"] == pytest.approx(1170 / 2 / 1e3)
    rows = {r["name"]: r for r in p["rows"]}
    assert rows["a"]["per_step"] == 1 and rows["a"]["us_per_step"] == pytest.approx(0.1)
    assert [r["name"] for r in p["rows"]] == ["a", "b", "c"]  # by time
    assert format_profile(p, "x").startswith("x: 2.5 kernels per step")


def test_summarize_without_device_kernels():
    p = summarize([], steps=3)
    assert p["rows"] == [] and p["busy_us"] == 0


def test_families_fold_numeric_suffixes():
    ev = [("loop_add_fusion_1", 0, 10), ("loop_add_fusion.2", 20, 30), ("loop_add_fusion_3_1", 60, 5),
          ("moe_gate_up", 100, 50), ("fusion", 200, 1)]
    p = summarize(ev, steps=1)
    fam = {r["name"]: r for r in p["families"]}
    assert set(fam) == {"loop_add_fusion", "moe_gate_up", "fusion"}
    assert fam["loop_add_fusion"]["per_step"] == 3 and fam["loop_add_fusion"]["us_per_step"] == pytest.approx(0.045)
    assert [r["name"] for r in p["families"]][0] == "moe_gate_up"
    assert "kernel family" in format_profile(p, "x")
