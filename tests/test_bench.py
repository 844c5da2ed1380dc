"""experiments/bench.py: edits spread over every history, the baselines' lines, the length section."""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "bench.py"
API = SHARED_DATA / "wiki" / "api"
FIXTURE = ROOT / "tests" / "fixtures" / "mediawiki" / "marrowby_tide_mill_1.json"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "demo", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_round_robin_takes_one_from_each_stream_in_turn():
    rr = bench_module().round_robin
    streams = lambda: [iter([1, 2, 3]), iter([10]), iter([20, 21])]  # noqa: E731
    assert rr(streams(), 5) == [1, 10, 20, 2, 21]
    assert rr(streams(), 100) == [1, 10, 20, 2, 21, 3]  # exhausted streams leave their turns to the others
    assert rr(streams(), 2) == [1, 10]
    assert rr([], 3) == []


def test_random_edits_are_small_real_edits_inside_the_document():
    random_edit = bench_module().random_edit
    rng, pool = random.Random(0), [5, 6, 7]
    kinds = set()
    for n in [1, 2, 3, 50] * 100:
        start, end, new = random_edit(rng, n, pool)
        assert 0 <= start <= end <= n and end - start <= 3 and len(new) <= 3 and set(new) <= set(pool)
        assert end > start or new  # never empty
        kinds.add("insert" if start == end else "delete" if not new else "replace")
    assert kinds == {"insert", "delete", "replace"}


@pytest.mark.skipif(len(list(API.glob("*.json.xz"))) < 2, reason=f"needs the held-out histories in {API}")
def test_bench_spreads_edits_over_every_heldout_history():
    out = run_bench("--windows", "128", "--max-edits", "8", "--single-token", "0")
    header = next(line for line in out.splitlines() if line.startswith("=== window 128"))
    counts = dict((name, int(k)) for name, k in re.findall(r"(\w+\.json\.xz) (\d+)", header))
    assert len(counts) == len(list(API.glob("*.json.xz"))) and set(counts.values()) == {2}, header
    for label in ("dense forward ms, cpu kernels", "dense forward, cpu kernels vs reference",
                  "prefix reuse ms, cpu kernels", "speedup vs dense (cpu kernels)",
                  "speedup vs prefix reuse (cpu kernels)", "speedup vs cone (cpu, no VQ)"):
        assert re.search(re.escape(label) + r"\s+median\s+\d", out), label


def test_bench_length_section_measures_time_and_memory():
    out = run_bench("--windows", "--data", str(FIXTURE), "--lengths", "256", "8192", "--length-edits", "3")
    rows = {int(line.split()[0]): line.split() for line in out.splitlines() if re.match(r"\s*(256|8192)\s+\d", line)}
    assert set(rows) == {256, 8192}, out
    for n, cols in rows.items():
        build_s, edit_ms, worst, tail, ratio = (float(c.rstrip("x")) for c in (*cols[1:3], *cols[4:7]))
        state, allocated, kv, peak, steady = (float(c) for c in cols[7:12])
        assert build_s > 0 and edit_ms > 0 and ratio > 0 and worst >= edit_ms
        assert abs(tail - worst / edit_ms) <= 0.05 + 0.01 * tail, cols
        assert kv < state <= allocated and peak >= steady, cols
    assert float(rows[256][6].rstrip("x")) == 1.0
    slowest = {int(m[1]): m[2] for m in re.finditer(r"^\s*(\d+): (.*); edits with a sweep of generation 0/1/2: "
                                                   r"\d+/\d+/\d+$", out, re.M)}
    assert set(slowest) == {256, 8192} and all(v.count("(#") == 3 for v in slowest.values()), out
    # the slowest edit listed is the max column
    assert abs(float(slowest[8192].split()[0]) - float(rows[8192][4])) < 0.006, (slowest, rows[8192])
    assert re.match(r"[\d.]+ \(#[0-2], [-012]\)", slowest[256]), slowest
    # 8192 tokens of tables cannot come out of the warm-up's freed memory: the build shows in the RSS
    assert float(rows[8192][10]) > float(rows[8192][7]), rows[8192]


def test_bench_dtype_bf16_runs_the_model_and_its_length_children_in_bf16_products():
    out = run_bench("--windows", "--data", str(FIXTURE), "--lengths", "256", "--length-edits", "2", "--dtype", "bf16")
    assert "(bfloat16 products)" in out.splitlines()[0], out
    assert re.search(r"^\s*256\s+[\d.]+\s+[\d.]+", out, re.M), out


def test_lsp_latency_types_into_each_length_against_both_servers():
    """experiments/lsp_latency.py: one row per (length, server), timed keystrokes as asked."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "lsp_latency.py"), "--model", "demo",
                           "--tokens", "120", "240", "--keystrokes", "3", "--dense-keystrokes", "2", "--warmup", "1",
                           "--in-process"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s*\d+ (incremental|dense) ", line)]
    assert [(r[1], int(r[2])) for r in rows] == [("incremental", 3), ("dense", 2)] * 2, proc.stdout
    # (a document is cut at its n-th token's end; the server's own tokenization of it may differ at the cut: by
    # up to 3 tokens on the built-in revisions, the text used without ../shared/data)
    assert all(abs(int(r[0]) - n) <= 4 for r, n in zip(rows, [120, 120, 240, 240])), proc.stdout
    for r in rows:
        p50, p95, worst = (float(c) for c in r[3:6])
        assert 0 < p50 <= p95 <= worst, r
    assert float(rows[0][-1].rstrip("x")) > 1 and rows[1][-1] == "1.0x", rows
    local = [line for line in proc.stdout.splitlines() if re.match(r"\s*\d+ in-process +3 ", line)]
    assert len(local) == 2 and all("codes identical" in line for line in local), proc.stdout
    assert "spots shared" in proc.stdout  # both lengths typed into at the same spots (the default)


def test_products_compares_weight_formats_and_checks_row_independence():
    """experiments/products.py: a speed-up per format and row count, and the row-independence check that the
    bfloat16 contract relies on (bf16 products of a row do not depend on the rows multiplied with it)."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "products.py"), "--rows", "1", "16",
                           "--repeats", "2", "--shapes", "qkv", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [1, 16] and all(len(r) == 6 and r[2].endswith("x") for r in rows), proc.stdout
    assert "bf16: a row's product does not depend on the rows multiplied with it" in proc.stdout
    assert "int8-dyn: a row's product DEPENDS" in proc.stdout


def test_keystroke_phases_splits_a_keystroke_into_the_layer_steps_phases():
    """experiments/keystroke_phases.py: a line per phase with its milliseconds per keystroke, the attention
    phases timed, and the parts adding up to no more than the keystrokes took."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "keystroke_phases.py"), "--model", "demo",
                           "--dtype", "float32", "--tokens", "200", "--keystrokes", "4", "--warmup", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ms = {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z][a-z ()]*?) +(\d+\.\d+) +\d+\.\d%$", proc.stdout,
                                                                       re.M)}
    assert set(ms) == {"qkv", "rope", "changed keys", "affected rows", "delta rows", "full rows", "requantize",
                       "correction", "mlp", "commit", "between layer steps", "surprisal", "total (mean)"}, proc.stdout
    assert ms["full rows"] > 0 and ms["qkv"] > 0 and ms["surprisal"] > 0, proc.stdout
    parts = sum(v for k, v in ms.items() if k != "total (mean)")
    assert parts <= ms["total (mean)"] * 1.001, proc.stdout
    assert "4 keystrokes" in proc.stdout, proc.stdout
