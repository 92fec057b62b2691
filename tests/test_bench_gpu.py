"""bench/gpu.sh at its toy shape on CPU: the GPU benchmark keeps running (its figures are measured on a GPU only)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_at_a_toy_shape(tmp_path):
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--toy", "--json", str(tmp_path / "gpu.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())
    for key in ("kd_over_ce_default", "sdpa_dense_over_default", "logits_overhead", "qad_over_distill", "gptq_int4_seconds",
                "distill_kd_default_tokens_per_s", "peak_memory_gib_default", "export_mlx_seconds_device"):
        assert figures[key] > (-1 if key == "logits_overhead" else 0), key
    assert figures["device"] == "cpu" and "kd_over_ce_default" in proc.stdout
    assert figures["export_mlx_identical"] == "True"
