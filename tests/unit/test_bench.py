"""The benchmark still runs and keeps its contract: a JSON last line, like-for-like first losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


def test_train_step_bench_prints_its_figures_as_a_json_last_line() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "1", "--steps", "2", "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "train_step"
    assert figures["ratio_ort_over_eager"] > 0 and figures["ort_ms_median"] > 0 and figures["eager_ms_median"] > 0
    assert figures["first_loss_abs_diff"] < 1e-4  # both runtimes start from the same weights and batch
