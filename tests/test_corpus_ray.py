"""Corpus replay on a real local Ray cluster (2 CPUs, started and shut down here, bounded in time)."""

from __future__ import annotations

import faulthandler
import time

import pytest
import torch

from corpus_helpers import LOAD, OPTIONS, comparable, corpus
from vqt._errors import UserError
from vqt.histories.corpus_replay import ReplayOptions, replay_corpus

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'vqt[ray]'")
LIMIT_S = 240  # a hung cluster ends the test run with tracebacks instead of stalling CI


@pytest.fixture(scope="module")
def cluster():
    faulthandler.dump_traceback_later(LIMIT_S, exit=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        faulthandler.cancel_dump_traceback_later()


def test_ray_equals_one_process_resumes_and_survives_a_bad_history(cluster, tmp_path):
    inputs = corpus(tmp_path)
    local = replay_corpus(inputs, LOAD, OPTIONS)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    on_ray = replay_corpus(inputs, LOAD, OPTIONS, out=out, ray="")
    assert time.perf_counter() - t0 < LIMIT_S / 2
    assert comparable(on_ray.rows) == comparable(local.rows) and len(local.rows) > 20
    assert [dict(s, seconds=0) for s in on_ray.statuses] == [dict(s, seconds=0) for s in local.statuses]
    assert len(on_ray.replayed) == len(local.statuses)
    (failed,) = [s for s in on_ray.statuses if s["error"]]
    assert failed["history"].endswith("broken-dump.xml.gz#10") and "malformed XML" in failed["error"]

    (victim,) = (out / "records").glob("*enwiki-20140102-tiny.xml.gz_12@0-*.parquet")  # Anarchism, revisions 0-3
    victim.unlink()
    resumed = replay_corpus(inputs, LOAD, OPTIONS, out=out, ray="")
    assert [(s["title"], s["start"]) for s in resumed.replayed] == [("Anarchism", 0)]
    assert comparable(resumed.rows) == comparable(local.rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_actors_on_a_cluster_without_gpus_fail_at_once(cluster, tmp_path):
    inputs = corpus(tmp_path)[:1]
    with pytest.raises(UserError, match="the Ray cluster has no GPU"):
        replay_corpus(inputs, LOAD, ReplayOptions(backend="cuda"), out=tmp_path / "out", ray="")
