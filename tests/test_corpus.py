"""Corpus replay on one machine: inputs of every kind, local workers equal to one process, resume, failures."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

import pytest
import torch

from corpus_helpers import API, BUNDLE, LOAD, OPTIONS, RFC_GLOB, TINY, comparable, corpus, needs_shared_data
from vqt._errors import UserError
from vqt.apps.corpus import load_for_replay, report
from vqt.histories.corpus_replay import (ReplayOptions, read_output, replay_corpus, replay_unit, to_records,
                                         unit_path)
from vqt.histories.sources import CorpusInput, expand_inputs, plan_input, read_unit
from vqt.ops import BackendUnavailable


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_inputs_name_every_history():
    needs_shared_data()
    api = expand_inputs([str(API)])
    assert [Path(i.path).name for i in api] == sorted(p.name for p in API.glob("*.json.xz"))
    assert [i.index for i in api] == [0, 1, 2, 3]
    assert [i.path for i in expand_inputs([str(API / "*.json.xz")])] == [i.path for i in api]
    mixed = expand_inputs([str(TINY), str(BUNDLE)], RFC_GLOB)
    rfcs = ("0001-private-fields", "0002-rfc-process", "0003-attribute-usage")
    assert [i.name for i in mixed] == [str(TINY)] + [f"{BUNDLE}:text/{name}.md" for name in rfcs]
    dump_units = plan_input(mixed[0], range_revisions=40)
    pages = {(u.history, u.doc_id, u.title) for u in dump_units}
    assert pages == {(f"{TINY}#10", "10", "AccessibleComputing"), (f"{TINY}#12", "12", "Anarchism")}
    anarchism = [(u.start, u.stop) for u in dump_units if u.doc_id == "12"]
    assert anarchism == [(0, 41), (40, 81), (80, 97)]  # 97 revisions; consecutive ranges share one revision
    revs = list(read_unit(dump_units[-1]))
    assert len(revs) == 17 and {r["doc_id"] for r in revs} == {"12"}


@pytest.mark.parametrize("specs, glob, message", [
    (["/no/such/history.json"], None, "'/no/such/history.json': no such file"),
    ([str(BUNDLE)], None, "pass --path-glob"),
    ([str(TINY)], "text/*.md", "needs a git repository"),
    ([str(BUNDLE)], "nothing/*.md", "matches no file"),
])
def test_bad_inputs_are_named(specs, glob, message):
    needs_shared_data()
    with pytest.raises(UserError, match=message):
        expand_inputs(specs, glob)


@pytest.mark.parametrize("option, value", [("prefix_tokens", 0), ("max_tokens", -1), ("range_revisions", -3),
                                           ("max_edits", 0), ("max_revisions", 2.5)])
def test_bad_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"{option} must be a positive integer, got {value}"):
        ReplayOptions(**{option: value})
    with pytest.raises(UserError, match="a corpus needs --data"):
        expand_inputs([])


def test_git_histories_follow_renames(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    body = "".join(f"line {i} of a text that keeps most of its lines\n" for i in range(10))
    texts = [body + end for end in ("first draft\n", "edited\n", "edited and renamed\n", "after the rename\n")]
    for i, text in enumerate(texts):
        name = "old.md" if i < 2 else "new.md"
        if i == 2:
            git(repo, "mv", "old.md", "new.md")
        (repo / name).write_text(text)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"revision {i}")
    (inp,) = expand_inputs([str(repo)], "*.md")
    assert inp.name == f"{repo}:new.md"
    (unit,) = plan_input(inp, range_revisions=10)
    assert (unit.history, unit.start, unit.stop) == (f"{repo}:new.md", 0, 4)
    assert [r["text"] for r in read_unit(unit)] == texts


def test_workers_equal_one_process_and_a_bad_history_is_recorded(tmp_path):
    inputs = corpus(tmp_path)
    one = replay_corpus(inputs, LOAD, OPTIONS)
    two = replay_corpus(inputs, LOAD, OPTIONS, workers=2)
    assert comparable(two.rows) == comparable(one.rows) and len(one.rows) > 20
    assert two.statuses == [dict(s, seconds=t["seconds"]) for s, t in zip(one.statuses, two.statuses)]
    assert all(r["exact"] for r in one.rows)
    histories = [r["history"] for r in one.rows]
    in_order = [h for h in dict.fromkeys(s["history"] for s in one.statuses) if h in histories]
    assert [h for h, _ in itertools.groupby(histories)] == in_order  # grouped by history, in corpus order
    assert {f"{TINY}#10", f"{TINY}#12", f"{BUNDLE}:text/0002-rfc-process.md"} <= set(histories)
    assert {r["title"] for r in one.rows if r["history"] == f"{TINY}#12"} == {"Anarchism"}
    (failed,) = [s for s in one.statuses if s["error"]]
    assert failed["history"] == f"{tmp_path / 'broken-dump.xml.gz'}#10"
    assert "malformed XML" in failed["error"] and failed["edits"] == 0
    assert len({s["history"] for s in one.statuses}) == 2 + 4 + 3 + 1


def test_workers_that_cannot_load_the_model_fail_the_run_instead_of_hanging(tmp_path):
    needs_shared_data()
    t0 = time.perf_counter()
    with pytest.raises(BrokenProcessPool):
        replay_corpus(expand_inputs([str(API)]), partial(load_for_replay, str(tmp_path / "no-model"), "float32", None),
                      OPTIONS, workers=2)
    assert time.perf_counter() - t0 < 120


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_backend_this_machine_cannot_run_fails_before_any_unit(tmp_path):
    needs_shared_data()
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run"):
        replay_corpus(expand_inputs([str(API)]), LOAD, ReplayOptions(backend="cuda"), workers=2)


def test_resume_replays_only_what_is_missing(tmp_path):
    inputs = corpus(tmp_path)
    out = tmp_path / "out"
    first = replay_corpus(inputs, LOAD, OPTIONS, out=out, settings={"model": "demo"})
    assert len(first.replayed) == len(first.statuses) == len(list((out / "records").glob("*.parquet")))
    victim = next(s for s in first.statuses if s["history"].endswith("0001-private-fields.md") and s["start"] == 3)
    next(p for p in (out / "records").glob("*.parquet") if "0001-private-fields.md@3-" in p.name).unlink()
    again = replay_corpus(inputs, LOAD, OPTIONS, out=out, settings={"model": "demo"})
    assert [(s["history"], s["start"]) for s in again.replayed] == [(victim["history"], 3)]
    assert comparable(again.rows) == comparable(first.rows)
    with pytest.raises(UserError, match="another prefix_tokens \\(128, now 256\\)"):
        replay_corpus(inputs, LOAD, ReplayOptions(**{**OPTIONS.__dict__, "prefix_tokens": 256}), out=out,
                      settings={"model": "demo"})


def test_an_interrupted_run_loses_only_the_units_in_flight(tmp_path):
    needs_shared_data()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vqt", "replay", "--model", "demo", "--data", str(API), str(TINY),
               "--prefix-tokens", "128", "--max-edits", "4", "--max-revisions", "9", "--range-revisions", "2", "--no-baselines",
               "--out", str(out), "--quiet"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("records/*.parquet"))) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.kill()  # as hard as an interruption gets: no cleanup at all
    run.wait()
    written = {p.name for p in out.glob("records/*.parquet")}
    assert 3 <= len(written)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    total = int(re.search(r"\((\d+) work units\)", rerun.stdout).group(1))
    assert total > len(written)  # the run was interrupted, and the rerun did only the rest:
    assert f"this run replayed {total - len(written)} work units" in rerun.stdout
    assert written < {p.name for p in out.glob("records/*.parquet")}


def test_a_malformed_revision_is_skipped_and_counted_or_fails_its_history_with_strict(tmp_path):
    needs_shared_data()
    base = "A paragraph of an article that stays as it is while a few words before it change. " * 8
    revisions = [{"revid": i + 1, "parentid": i, "*": f"Version {i} of the lead. " + base} for i in range(6)]
    revisions[2]["*"] = 5  # text of the wrong type: a malformed revision
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(revisions))
    inputs = expand_inputs([str(bad), str(API / "japan_cup.json.xz")])
    options = ReplayOptions(prefix_tokens=64, max_edits=3, max_revisions=6, baselines=False)
    lenient = replay_corpus(inputs, LOAD, options)
    assert [(s["history"], s["error"], s["skipped"]) for s in lenient.statuses] == [
        (str(bad), None, 1), (str(API / "japan_cup.json.xz"), None, 0)]
    assert "BadRevision" not in lenient.statuses[0]["first_skipped"] and "revision" in lenient.statuses[0]["first_skipped"]
    assert [r["rev_id"] for r in lenient.rows if r["history"] == str(bad)] == [2, 4, 5]
    strict = replay_corpus(inputs, LOAD, ReplayOptions(**{**options.__dict__, "strict": True}))
    assert strict.statuses[0]["error"].startswith("BadRevision") and strict.statuses[0]["edits"] == 0
    assert comparable(strict.rows) == comparable([r for r in lenient.rows if r["history"] != str(bad)])


def test_a_unit_that_fails_keeps_its_records_before_the_failure(tmp_path):
    path = tmp_path / "history.jsonl.gz"
    base = "".join(f"Paragraph {i}: " + "words that stay the same " * 20 + "\n" for i in range(40))
    revisions = [{"doc_id": "h", "rev_id": i, "text": f"Edit number {i}. " + base} for i in range(12)]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in revisions).encode()))
    (unit,) = plan_input(CorpusInput(0, str(path)), range_revisions=20)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # damaged after planning
    model, tokenizer = LOAD()
    result = replay_unit(model, tokenizer, unit, ReplayOptions(prefix_tokens=64, baselines=False))
    assert "truncated or corrupt compressed stream" in result.error
    assert 1 <= len(result.rows) < 11 and [r["rev_id"] for r in result.rows] == list(range(1, len(result.rows) + 1))


def test_documents_over_the_memory_guard_are_counted_in_the_status_and_the_summary(tmp_path, capsys):
    needs_shared_data()
    inputs = expand_inputs([str(API / "nintendo_switch.json.xz")])  # 320 to 1,800 tokens
    run = replay_corpus(inputs, LOAD, ReplayOptions(max_tokens=1000, baselines=False), out=tmp_path / "out")
    (status,) = run.statuses  # read back from the Parquet file's metadata
    assert status["error"] is None and status["edits"] == len(run.rows) > 0 and status["over_guard"] > 0
    assert "exceed the memory guard max_tokens=1000" in status["first_over_guard"]
    assert all(r["n_tokens"] <= 1000 for r in run.rows)
    assert report(run) == 0
    assert f"skipped {status['over_guard']} revision pairs of documents over the memory guard (--max-tokens) in 1 " \
           f"work units" in capsys.readouterr().out


def run_vqt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqt", *args], capture_output=True, text=True, timeout=300)


def test_cli_replays_a_corpus_and_summarizes_saved_records(tmp_path):
    needs_shared_data()
    out, plots = tmp_path / "out", tmp_path / "plots"
    res = run_vqt("replay", "--model", "demo", "--data", str(TINY), str(API / "japan_cup.json.xz"), "--workers", "2",
                  "--prefix-tokens", "128", "--max-edits", "3", "--max-revisions", "8", "--out", str(out), "--jsonl",
                  str(tmp_path / "all.jsonl"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "3 histories (3 work units)" in res.stdout and "histories/s" in res.stdout
    table = res.stdout[res.stdout.index("edits\nmetric"):]
    saved = run_vqt("summarize", str(out), "--plot", str(plots))
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout[saved.stdout.index("edits\nmetric"):].startswith(table)  # same files, same summary
    assert (plots / "ratio_cdf.png").stat().st_size > 1000
    rows, _ = read_output(out)
    jsonl = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert comparable(jsonl) == comparable(rows)
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "all.jsonl").rename(tmp_path / "jsonl" / "all.jsonl")
    from_jsonl = run_vqt("summarize", str(tmp_path / "jsonl"))
    assert from_jsonl.returncode == 0 and f"{len(rows)} edits" in from_jsonl.stdout
    assert to_records(rows)[0].dirty_fraction == rows[0]["dirty_fraction"]
    bad_plot = run_vqt("summarize", str(out), "--plot", str(out / "run.json"))
    assert bad_plot.returncode == 1 and "run.json is a file" in bad_plot.stderr
    missing = run_vqt("summarize", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "nowhere" in missing.stderr
    assert unit_path(out, plan_input(expand_inputs([str(TINY)])[0], 200)[0]).is_file()


def test_ray_without_ray_installed_says_what_to_install(tmp_path):
    needs_shared_data()
    block_ray = "import sys; sys.modules['ray'] = None; from vqt.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", block_ray, "replay", "--model", "demo", "--data", str(API), "--ray",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "pip install 'vqt[ray]'" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
    no_out = run_vqt("replay", "--model", "demo", "--data", str(API), "--ray")
    assert no_out.returncode == 1 and "give --out DIR" in no_out.stderr
