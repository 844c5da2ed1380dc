"""experiments/soak.py: a real history through one document, verified at checkpoints, logged, resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import SHARED_DATA
from vqt._memory import proc_status_kb, release_free_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import soak  # noqa: E402  (an experiment)

TINY = SHARED_DATA / "wiki" / "enwiki-20140102-tiny.xml.gz"  # two pages, 106 revisions of up to 3,900 tokens


def needs_data() -> None:
    if not TINY.is_file():
        pytest.skip(f"shared data {TINY} is absent (see ../shared/data/README.md)")


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / soak.LOG).read_text().splitlines()]


def test_soak_applies_a_real_history_verified_and_logs_it(tmp_path, capsys):
    needs_data()
    out = tmp_path / "soak"
    assert soak.main(["--data", str(TINY), "--every", "20", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    records = log(out)
    checkpoints = [r for r in records if r["kind"] == "checkpoint"]
    assert [r["kind"] for r in records[:2]] == ["start", "build"] and records[-1]["kind"] == "end"
    assert records[1]["exact"] and records[1]["revision"] == 0
    assert [c["revision"] for c in checkpoints] == [20, 40, 60, 80, 100, 105]  # every 20, and the last
    assert all(c["exact"] and c["codes_differ"] == 0 and c["max_hidden_diff"] <= 1e-4 for c in checkpoints)
    assert all(c["tokens"] > 0 and c["rss_mb"] > 0 and c["edits_per_s"] > 0 for c in checkpoints)
    end = records[-1]
    # 2 pages: 105 revisions after the first, less the first revision of the second page (a dense pass)
    assert end["revisions_applied"] == 104 and end["failures"] == 0 and end["blankings"] == 1
    assert end["edits"] == sum(c["edits_since"] for c in checkpoints) > end["revisions_applied"]
    assert "revisions applied: 104" in printed and "verification failures: 0 of 6 checkpoints" in printed
    assert "RSS:" in printed and "edits/s: median" in printed
    if (out / soak.PLOT).exists():  # matplotlib installed (the 'plots' extra)
        assert (out / soak.PLOT).stat().st_size > 1000
    # Interrupted after three checkpoints: the rerun resumes from the last one and ends with the same totals.
    (out / soak.LOG).write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    assert soak.main(["--data", str(TINY), "--every", "20", "--out", str(out), "--quiet", "--no-plot"]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed = log(out)
    assert [c["revision"] for c in resumed if c["kind"] == "checkpoint"] == [20, 40, 60, 80, 100, 105]
    assert {k: resumed[-1][k] for k in ("revisions_applied", "edits", "blankings", "failures")} == \
           {k: end[k] for k in ("revisions_applied", "edits", "blankings", "failures")}
    assert soak.main(["--data", str(TINY), "--every", "10", "--out", str(out), "--quiet"]) == 1
    assert "holds a soak run with another every (20, now 10)" in capsys.readouterr().err


def test_a_revision_that_cannot_be_applied_stops_the_soak_and_is_named(tmp_path, capsys):
    history = tmp_path / "history.jsonl"
    texts = ["The lighthouse stood on the rock.", "The lighthouse stood on the big rock.",
             "The lighthouse \ud800 stood on the big rock."]  # a lone surrogate: no tokenizer can take it
    history.write_text("".join(json.dumps({"doc_id": "d", "rev_id": i + 1, "text": t}) + "\n"
                               for i, t in enumerate(texts)))
    out = tmp_path / "soak"
    assert soak.main(["--data", str(history), "--model", "demo", "--backend", "reference", "--out", str(out),
                      "--quiet", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "soak: FAILED to apply revision 2 (rev 3), edit 0 of 1: replace [15, 15) of 37 characters by 2" in err
    assert "not valid Unicode" in err
    assert [r["kind"] for r in log(out)] == ["start", "build", "error", "stopped"]


@pytest.mark.parametrize("argv, message", [
    (["--every", "0"], "--every 0: expected an integer >= 1"),
    (["--limit", "0"], "--limit 0: expected an integer >= 1"),
    (["--data", "/nonexistent.xml"], "--data /nonexistent.xml: no such file"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    assert soak.main(["--out", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), *argv] if "--data" not in argv
                     else ["--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_release_free_memory_hands_freed_heap_pages_back():
    """What the soak calls after each dense check: freed heap chunks (here 128 MB of 64 KB blocks, each
    pinned in the middle of the heap by a small live neighbour, so the allocator cannot shrink the heap
    by itself) go back to the kernel."""
    if not release_free_memory():
        pytest.skip("no glibc malloc_trim on this platform")
    blocks, keep = [], []
    for _ in range(2000):
        blocks.append(bytearray(64 * 1024))
        keep.append(bytearray(1024))
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])  # touch every page
    del blocks
    before = proc_status_kb("VmRSS")
    release_free_memory()
    after = proc_status_kb("VmRSS")
    assert after < before - 64 * 1024, f"RSS {before} kB -> {after} kB"
    assert len(keep) == 2000


def test_rss_trend_separates_a_leak_from_document_size():
    """The soak's size-adjusted drift: RSS that only follows the document's length shows no drift, RSS that
    also grows with time does."""
    sizes = [1000 + 500 * (i % 7) for i in range(30)]
    follows = [{"tokens": t, "rss_mb": 300 + 0.012 * t} for t in sizes]
    leaks = [{"tokens": t, "rss_mb": 300 + 0.012 * t + 4 * i} for i, t in enumerate(sizes)]
    flat = soak.rss_trend(follows)
    assert abs(flat["rss_drift"]) < 1e-9 and flat["rss_fit_kb_per_token"] == pytest.approx(0.012 * 1024)
    assert soak.rss_trend(leaks)["rss_drift"] > 0.2
    assert soak.rss_trend(follows[:5]) == {}
