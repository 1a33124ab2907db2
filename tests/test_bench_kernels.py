"""scripts/bench_kernels.py --dry-run: the whole benchmark flow on a CPU (Pallas interpreter, tiny shapes).

It validates every kernel against its reference first and then times each section (FP8 GEMM, split-KV
attention, MoE, fusions); the JSON must hold every section's rows, all validations passed and no section
error. The model-decode section (2-layer model through LLM.generate, ~80 s in the interpreter) is skipped
here: the same kernels="pallas" vs "xla" paths are checked in tests/test_generate.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.fast
def test_bench_kernels_dry_run(tmp_path):
    out = tmp_path / "bench_kernels.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--dry-run", "--skip", "model",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and not res["errors"] and not res["skipped"], (res["errors"], res["skipped"])
    kinds = {v["kernel"] for v in res["validation"]}
    assert kinds == {"fp8_gemm", "attention", "fusion", "moe"} and all(v["ok"] for v in res["validation"])
    rows = res["rows"]
    for section in ("gemm", "attention", "moe", "fusion"):
        assert rows[section] and all(r.get("pallas_us") for r in rows[section]), section
    assert {r["fusion"] for r in rows["fusion"]} == {"gate/up+SwiGLU", "QKV+RoPE+qk-norm", "add+RMSNorm"}
    assert any(r["mode"] == "fp8_fp8" for r in rows["gemm"]) and all(r.get("xla_bf16_us") for r in rows["gemm"])
    # every decode shape at the core M (1 in the dry run), not only the core shapes: the down shard's too
    assert {r["shape"].rsplit(" ", 1)[0] for r in rows["gemm"] if r["M"] == 1 and r["mode"] == "weight_only"} == {
        "mlp up/2", "q/2", "mlp down/2"}
    assert all(r["err"] < 2e-2 for r in rows["attention"]) and all(r["err"] < 1e-2 for r in rows["moe"])
    for header in ("FP8 GEMM", "split-KV decode attention", "MoE decode", "fusions"):
        assert header in p.stdout


@pytest.mark.fast
def test_bench_kernels_gemm_m(tmp_path):
    """--gemm-m: only those decode GEMM rows (4 tokens, which the dry run's plan does not list), no prefill rows."""
    out = tmp_path / "bench_kernels.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--dry-run", "--skip", "model",
                        "attention", "moe", "fusion", "--gemm-m", "4", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]["gemm"]
    assert rows and {r["M"] for r in rows} == {4} and all(r["mode"] == "weight_only" for r in rows)
