"""Corpora of histories: what `vqt replay --data` names, expanded into histories and work units.

A corpus is given as files, directories or globs of history files (each MediaWiki XML,
API JSON or JSONL file may hold several pages; each page is one history), or as a git
repository or bundle with a path glob (each matching file is one history, renames
followed). Listing happens in two steps so that the slow one can run in parallel:
`expand_inputs` (cheap, in the driver) names the inputs, `plan_input` (reads the input
once, on any worker) counts each history's revisions and splits long histories into
revision ranges, the work units. `read_unit` reads one unit's revisions where it runs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import itertools
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vqt._errors import UserError
from vqt.histories.corpus import CACHE
from vqt.histories.formats import OnBadRevision, Revision, _git, iter_git_history, iter_history

# File names taken from a directory: a history format, optionally compressed.
_HISTORY_FILE = re.compile(r"\.(xml|json|jsonl)(\.(gz|bz2|xz|lzma))?$", re.IGNORECASE)


@dataclass(frozen=True)
class CorpusInput:
    """One history file, or one file of a git repository (`repo` is the repository or bundle path)."""

    index: int  # position in the corpus: orders the records
    path: str  # the history file, or the file's path inside the repository
    repo: str = ""

    @property
    def name(self) -> str:
        return f"{self.repo}:{self.path}" if self.repo else self.path


@dataclass(frozen=True)
class WorkUnit:
    """Revisions [start, stop) of one history: the unit a worker replays, one output file.

    Consecutive units of a history overlap by one revision, so each pair of revisions is
    replayed by exactly one unit; each unit starts with a dense pass of its first revision.
    `error` is set when the input could not be read while planning (the unit replays nothing).
    """

    input: CorpusInput
    page: int  # ordinal of the history within its input
    history: str  # the name records carry: file path, `path#page-id` in a multi-page file, or `repo:path`
    doc_id: str
    title: str
    start: int
    stop: int
    error: Optional[str] = None

    @property
    def key(self) -> tuple[int, int, int]:
        """Corpus order: input, page, range start."""
        return self.input.index, self.page, self.start

    @property
    def name(self) -> str:
        return f"{self.history}@{self.start}"


def expand_inputs(specs: Sequence[str], path_glob: Optional[str] = None) -> list[CorpusInput]:
    """Name every history input in `specs` (files, directories, globs, git repositories or bundles), in order.

    A directory that is not a git repository contributes its history files (by extension,
    recursively, sorted); a git repository or a `.bundle` file contributes the files of its
    HEAD that match `path_glob` (fnmatch, `*` crosses `/`).
    """
    if not specs:
        raise UserError("a corpus needs --data: history files, folders, globs or git repositories")
    inputs: list[CorpusInput] = []
    used_glob = False
    for spec in specs:
        if _is_git(spec):
            if not path_glob:
                raise UserError(f"--data {spec!r} is a git repository: pass --path-glob, e.g. 'text/*.md'")
            files = [f for f in git_files(spec) if fnmatch.fnmatchcase(f, path_glob)]
            if not files:
                raise UserError(f"--path-glob {path_glob!r} matches no file of {spec}")
            inputs += [CorpusInput(len(inputs) + i, f, repo=spec) for i, f in enumerate(files)]
            used_glob = True
            continue
        if os.path.isdir(spec):
            files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and _HISTORY_FILE.search(p.name))
            if not files:
                raise UserError(f"--data {spec!r}: the directory holds no .xml, .json or .jsonl history file")
        elif os.path.isfile(spec):
            files = [spec]
        else:
            files = sorted(glob.glob(spec, recursive=True))
            if not files:
                raise UserError(f"--data {spec!r}: no such file or directory, and no file matches it as a glob")
        inputs += [CorpusInput(len(inputs) + i, f) for i, f in enumerate(files)]
    if path_glob and not used_glob:
        raise UserError(f"--path-glob {path_glob!r} needs a git repository or bundle in --data")
    return inputs


def _is_git(spec: str) -> bool:
    """A git bundle file, a working tree (has .git) or a bare repository (HEAD and objects/)."""
    p = Path(spec)
    if p.is_file():
        return p.suffix == ".bundle"
    return (p / ".git").exists() or ((p / "HEAD").is_file() and (p / "objects").is_dir())


def repository(spec: str) -> str:
    """A repository path git can read for `spec`; a bundle is cloned (bare) once into $VQT_CACHE/git."""
    if not spec.endswith(".bundle"):
        return spec
    st = os.stat(spec)
    digest = hashlib.sha256(f"{os.path.abspath(spec)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = CACHE / "git" / f"{Path(spec).stem}-{digest}.git"
    if not dest.is_dir():
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _git(dest.parent, "clone", "--bare", "-q", os.path.abspath(spec), str(tmp))
        try:
            os.rename(tmp, dest)
        except OSError:  # another process cloned it first: its clone is as good
            shutil.rmtree(tmp)
    return str(dest)


def git_files(spec: str) -> list[str]:
    """Paths of the files of HEAD in the repository or bundle `spec`."""
    out = _git(repository(spec), "ls-tree", "-r", "-z", "--name-only", "HEAD")
    return [name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def _revisions(inp: CorpusInput, on_bad_revision: OnBadRevision) -> Iterator[Revision]:
    if inp.repo:  # git revisions are blobs: none is malformed
        return iter_git_history(repository(inp.repo), inp.path)
    return iter_history(inp.path, on_bad_revision=on_bad_revision)


def _pages(revisions: Iterator[Revision]) -> Iterator[tuple[int, Iterator[Revision]]]:
    """(ordinal, revisions) of each history in a stream: consecutive revisions with one doc_id."""
    return enumerate(group for _, group in itertools.groupby(revisions, key=lambda r: r["doc_id"]))


def plan_input(inp: CorpusInput, range_revisions: int, max_revisions: Optional[int] = None,
               strict: bool = False) -> list[WorkUnit]:
    """Read `inp` once and return its work units, in corpus order.

    Each history (at most `max_revisions` revisions of it, malformed ones skipped unless
    `strict`) becomes ranges of `range_revisions` revision pairs. If the input cannot be read,
    the histories read before the failure are planned and one unit carrying the error stands
    for the rest.
    """
    histories: list[tuple[str, str, int]] = []  # (doc_id, title, revisions)
    current = ("", "")  # doc_id and title of the history being read
    error = None
    with contextlib.closing(_revisions(inp, None if strict else lambda bad: None)) as revisions:
        try:
            for _, revs in _pages(revisions):
                first = next(revs)
                current = first["doc_id"], first["title"]
                rest = itertools.islice(revs, None if max_revisions is None else max_revisions - 1)
                histories.append((*current, 1 + sum(1 for _ in rest)))
                current = ("", "")
        except Exception as e:  # noqa: BLE001  (a bad input must not stop the corpus; its error is recorded)
            error = f"{type(e).__name__}: {e}"
    single = len(histories) == 1 and error is None
    units = []
    for page, (doc_id, title, n) in enumerate(histories):
        history = inp.name if single or inp.repo else f"{inp.name}#{doc_id}"
        for start in range(0, max(1, n - 1), range_revisions):
            units.append(WorkUnit(inp, page, history, doc_id, title, start, min(n, start + range_revisions + 1)))
    if error is not None:
        doc_id, title = current
        history = inp.name if inp.repo or not (histories or doc_id) else f"{inp.name}#{doc_id or len(histories)}"
        units.append(WorkUnit(inp, len(histories), history, doc_id, title, 0, 0, error))
    return units


def read_unit(unit: WorkUnit, on_bad_revision: OnBadRevision = None) -> Iterator[Revision]:
    """Stream the revisions of `unit`; a malformed revision raises `BadRevision`, or is passed to
    `on_bad_revision` and skipped (as when the unit was planned).

    The input is read from its start, so a page deep inside a large multi-page dump costs a parse
    of the pages before it: give such dumps as the many files Wikimedia splits them into.
    """
    with contextlib.closing(_revisions(unit.input, on_bad_revision)) as revisions:
        for page, revs in _pages(revisions):
            if page == unit.page:
                yield from itertools.islice(revs, unit.start, unit.stop)
                return
