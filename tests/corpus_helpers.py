"""A small real corpus for the corpus-replay tests: the tiny dump's pages, the API-JSON histories, three RFC
files from the git bundle and a dump that breaks in its first page; and the options to replay it fast."""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from helpers import SHARED_DATA
from vqt.apps.corpus import load_for_replay
from vqt.histories.corpus_replay import ReplayOptions, without_wall_clock
from vqt.histories.sources import CorpusInput, expand_inputs

TINY = SHARED_DATA / "wiki" / "enwiki-20140102-tiny.xml.gz"
API = SHARED_DATA / "wiki" / "api"
BUNDLE = SHARED_DATA / "git" / "rust-rfcs.bundle"
RFC_GLOB = "text/000[1-3]-*.md"  # three RFCs with 5 to 14 revisions
# Short units (3 revision pairs) so that every history is split; float64 and verify: every edit is checked.
OPTIONS = ReplayOptions(prefix_tokens=128, max_edits=2, baselines=False, verify=True, range_revisions=3,
                        max_revisions=6)
LOAD = partial(load_for_replay, "demo", "float64", None)


def needs_shared_data() -> None:
    for path in (TINY, API, BUNDLE):
        if not path.exists():
            pytest.skip(f"shared data {path} is absent (see ../shared/data/README.md)")


def broken_dump(folder: Path) -> Path:
    """The tiny dump cut inside the second revision of its first page (unclosed XML): a history with a bad revision."""
    path = folder / "broken-dump.xml.gz"
    path.write_bytes(gzip.compress(gzip.decompress(TINY.read_bytes())[:3300]))
    return path


def corpus(folder: Path) -> list[CorpusInput]:
    needs_shared_data()
    return expand_inputs([str(TINY), str(API), str(BUNDLE), str(broken_dump(folder))], RFC_GLOB)


comparable = without_wall_clock
