"""scripts/bench_launch.py on a CPU: every kind of do-nothing kernel (XLA fusion, Pallas Triton, Pallas Mosaic GPU
in the interpreters) computes the chain numpy computes, and the script says FAILED and exits 1 when one does not."""

import pytest

from helpers import load_script


@pytest.mark.fast
def test_every_kind_of_kernel_matches_numpy(capsys):
    bl = load_script("bench_launch")
    assert bl.main(["--interpret", "--reps", "1", "--short", "1", "--long", "2"]) == 0
    out = capsys.readouterr().out
    for kind in ("xla fusion", "triton, 32 programs", "triton, 1 program", "mosaic gpu, 32 programs"):
        assert kind in out, out
    assert "FAILED" not in out and "failed" not in out


def test_a_wrong_result_fails_the_run(capsys, monkeypatch):
    bl = load_script("bench_launch")
    monkeypatch.setattr(bl, "expected", lambda x, n: bl.np.zeros(x.shape, bl.np.float32))
    assert bl.main(["--interpret", "--reps", "1", "--short", "1", "--long", "2", "--kinds", "xla"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: xla fusion" in out and "triton" not in out
