"""Loaders of document revision histories (MediaWiki XML and API JSON, JSONL, git).

Every loader yields `Revision` dicts with the same eight keys, oldest revision
first, so a replay can stream them; `load_history` materialises them as a
`datasets.Dataset` with the columns of `FEATURES`. Compressed files (gzip,
bzip2, xz, lzma) are read transparently and in constant memory.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import hashlib
import io
import itertools
import json
import lzma
import subprocess
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Optional, TypedDict
from xml.etree import ElementTree
from xml.parsers import expat

import datasets

from vqt._errors import UserError


class Revision(TypedDict):
    """One revision of one document; `parent_id` is -1 when unknown or absent."""

    doc_id: str
    title: str
    rev_id: int
    parent_id: int
    timestamp: str  # ISO 8601
    text: str
    comment: str
    sha1: str  # "" when unknown


FEATURES = datasets.Features(
    {
        "doc_id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "rev_id": datasets.Value("int64"),
        "parent_id": datasets.Value("int64"),
        "timestamp": datasets.Value("string"),
        "text": datasets.Value("string"),
        "comment": datasets.Value("string"),
        "sha1": datasets.Value("string"),
    }
)


class HistoryFormatError(UserError, ValueError):
    """A history file is malformed, truncated or of an unknown format; the message names file and position."""


class BadRevision(HistoryFormatError):
    """One revision is malformed (a field of the wrong type, no text); the message names the file and
    the revision (index, id, line). The revisions after it can still be read: see ``on_bad_revision``."""


OnBadRevision = Optional[Callable[[BadRevision], None]]  # None: raise; else called, and the revision skipped


# Openers by file extension; magic bytes decide when the extension says nothing.
_OPENERS: dict[str, Callable[..., BinaryIO]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".lzma": lzma.open,
}
_MAGIC: list[tuple[bytes, Callable[..., BinaryIO]]] = [
    (b"\x1f\x8b", gzip.open),
    (b"BZh", bz2.open),
    (b"\xfd7zXZ\x00", lzma.open),
    (b"\x5d\x00\x00", lzma.open),  # legacy .lzma ("alone") header with the usual lc/lp/pb byte
]
# What a broken compressed stream raises while being read (BadGzipFile is an OSError).
_STREAM_ERRORS = (EOFError, lzma.LZMAError, zlib.error, OSError)


def open_compressed(path: str | Path) -> BinaryIO:
    """Open `path` for binary reading, decompressing gzip/bzip2/xz/lzma by extension or magic bytes."""
    path = Path(path)
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        with open(path, "rb") as f:
            head = f.read(6)
        opener = next((op for magic, op in _MAGIC if head.startswith(magic)), open)
    return opener(path, "rb")


class _Source(io.RawIOBase):
    """Reader over an open (decompressing) file that counts decompressed bytes and
    turns a broken stream into a `HistoryFormatError` naming the byte offset."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        super().__init__()
        self.path = path
        self.offset = 0
        self._file = file

    @classmethod
    def open(cls, path: Path) -> _Source:
        return cls(path, open_compressed(path))

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            n = self._file.readinto(buffer)
        except _STREAM_ERRORS as exc:
            raise HistoryFormatError(
                f"{self.path}: truncated or corrupt compressed stream after {self.offset} "
                f"decompressed bytes ({exc})"
            ) from exc
        self.offset += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _id(value: Any, name: str, where: str, zero_is_none: bool = True) -> int:
    """Parse a revision id (an int or a string of digits); absent, empty and (for MediaWiki, where
    it means "no parent") 0 become -1. Anything else is a `BadRevision` naming ``where``."""
    if value in ((None, "", 0, "0") if zero_is_none else (None, "")) and not isinstance(value, bool):
        return -1
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise BadRevision(f"{where}: {name} must be an integer id, got {value!r:.60}")


def _text(value: Any, name: str, where: str) -> str:
    """A string field of a revision; anything else is a `BadRevision` naming ``where``."""
    if not isinstance(value, str):
        raise BadRevision(f"{where}: {name} must be a string, got {value!r:.60}")
    return value


def _revisions(builds: Iterable[Callable[[], Revision]], on_bad_revision: OnBadRevision) -> Iterator[Revision]:
    """Build each revision; a `BadRevision` is raised, or reported to ``on_bad_revision`` and skipped."""
    for build in builds:
        try:
            revision = build()
        except BadRevision as exc:
            if on_bad_revision is None:
                raise
            on_bad_revision(exc)
            continue
        yield revision


def _stem(path: Path) -> str:
    """The file name without any extension: `japan_cup.json.xz` -> `japan_cup`."""
    return path.name.split(".")[0]


def _title_from_filename(path: Path) -> str:
    """`japan_cup.json.xz` -> `Japan cup` (MediaWiki titles start upper-case)."""
    title = _stem(path).replace("_", " ")
    return title[:1].upper() + title[1:]


# --------------------------------------------------------------------------- MediaWiki XML


def iter_mediawiki_xml(path: str | Path, on_bad_revision: OnBadRevision = None) -> Iterator[Revision]:
    """Stream the revisions of every page of a MediaWiki XML export (schema 0.3-0.11), in constant memory.

    `doc_id` is the page id; revisions whose text was deleted (`<text deleted="deleted"/>`) get
    text "". Raises `HistoryFormatError` with line/column for malformed XML and with the byte
    offset and revision index for a truncated compressed file; a revision without `<text>` or
    with a non-numeric id is a `BadRevision` (see `on_bad_revision`).
    """
    path = Path(path)
    count = 0
    with _Source.open(path) as source:
        try:
            for page_id, title, revision in _xml_revisions(source, path):
                where = f"{path}: revision index {count} of page {title!r} (before byte {source.offset})"
                count += 1
                yield from _revisions([functools.partial(_xml_revision, revision, page_id, title, where)],
                                      on_bad_revision)
        except ElementTree.ParseError as exc:
            line, column = exc.position
            raise HistoryFormatError(
                f"{path}: malformed XML at line {line}, column {column + 1} "
                f"(after {count} revisions): {expat.ErrorString(exc.code)}"
            ) from exc
        except BadRevision:
            raise
        except HistoryFormatError as exc:
            raise HistoryFormatError(f"{exc}, at revision index {count}") from exc


def _xml_revisions(
    source: BinaryIO, path: Path
) -> Iterator[tuple[str, str, ElementTree.Element]]:
    """Yield (page id, title, <revision> element) and drop each element once used."""
    ns = ""
    root: ElementTree.Element | None = None
    page: ElementTree.Element | None = None
    for event, elem in ElementTree.iterparse(source, events=("start", "end")):
        if root is None:
            root = elem
            ns = elem.tag[: elem.tag.index("}") + 1] if elem.tag.startswith("{") else ""
            if elem.tag != f"{ns}mediawiki":
                raise HistoryFormatError(f"{path}: root element is <{elem.tag}>, not <mediawiki>")
            continue
        if event == "start":
            if elem.tag == f"{ns}page":
                page = elem
            continue
        if elem.tag == f"{ns}revision" and page is not None:
            yield page.findtext(f"{ns}id", ""), page.findtext(f"{ns}title", ""), elem
            page.remove(elem)
        elif elem.tag in (f"{ns}page", f"{ns}siteinfo"):
            root.remove(elem)
            page = None


def _xml_revision(elem: ElementTree.Element, page_id: str, title: str, where: str) -> Revision:
    ns = elem.tag[: -len("revision")]
    if elem.find(f"{ns}text") is None:
        raise BadRevision(f"{where}: the revision has no <text> element "
                          f"(children: {', '.join(f'<{c.tag[len(ns):]}>' for c in elem) or 'none'})")
    rev_id = _id(elem.findtext(f"{ns}id"), "<id>", where)
    return Revision(
        doc_id=page_id,
        title=title,
        rev_id=rev_id,
        parent_id=_id(elem.findtext(f"{ns}parentid"), "<parentid>", f"{where}, id {rev_id}"),
        timestamp=elem.findtext(f"{ns}timestamp", ""),
        text=elem.findtext(f"{ns}text", ""),  # <text deleted="deleted"/> has no text
        comment=elem.findtext(f"{ns}comment", ""),
        sha1=elem.findtext(f"{ns}sha1", ""),
    )


# --------------------------------------------------------------------------- MediaWiki API JSON


def iter_mediawiki_json(path: str | Path, on_bad_revision: OnBadRevision = None) -> Iterator[Revision]:
    """Yield the revisions of a MediaWiki API `prop=revisions` JSON file (plain, .gz or .xz).

    Accepts a bare list of revision objects or a full API response
    (`{"query": {"pages": ...}}`, pages as dict or list). The title comes from
    the response, else from the file name; `doc_id` is the page id, else the
    file's stem. A file of the wrong shape is a `HistoryFormatError`; a revision
    with fields of the wrong type is a `BadRevision` (see `on_bad_revision`).
    """
    path = Path(path)
    with _Source.open(path) as source:
        raw = source.read()
    data = _parse_json(raw, path)
    if isinstance(data, list):
        pages = [{"revisions": data}]
    elif isinstance(data, dict) and isinstance(data.get("query"), dict):
        pages = data["query"].get("pages", [])
        pages = list(pages.values()) if isinstance(pages, dict) else pages
    else:
        raise HistoryFormatError(
            f"{path}: expected a list of revisions or an API response with query.pages, "
            f"got {type(data).__name__} {json.dumps(data)[:60]}"
        )
    if not isinstance(pages, list):
        raise HistoryFormatError(f"{path}: query.pages must be an object or a list of pages, "
                                 f"got {type(pages).__name__} {pages!r:.60}")
    for number, page in enumerate(pages):
        revisions = page.get("revisions", []) if isinstance(page, dict) else None
        if not isinstance(revisions, list):
            raise HistoryFormatError(f"{path}: page {number} must be an object with a list of revisions, "
                                     f"got {page!r:.60}")
        doc_id = str(page.get("pageid", _stem(path)))
        title = page.get("title") or _title_from_filename(path)
        yield from _revisions((functools.partial(_api_revision, rev, doc_id, title, f"{path}: revision {index} of "
                                                 f"{title!r}") for index, rev in enumerate(revisions)),
                              on_bad_revision)


def _api_revision(rev: Any, doc_id: str, title: str, where: str) -> Revision:
    if not isinstance(rev, dict):
        raise BadRevision(f"{where} is not an object: {rev!r:.60}")
    where = f"{where} (revid {rev.get('revid')!r:.20})"
    return Revision(
        doc_id=doc_id,
        title=title,
        rev_id=_id(rev.get("revid"), "revid", where),
        parent_id=_id(rev.get("parentid"), "parentid", where),
        timestamp=_text(rev.get("timestamp", ""), "timestamp", where),
        text=_api_text(rev, where),
        comment=_text(rev.get("comment", ""), "comment", where),
        sha1=_text(rev.get("sha1", ""), "sha1", where),
    )


def _parse_json(raw: str | bytes, path: Path, first_line: int = 1,
                error: type[HistoryFormatError] = HistoryFormatError) -> Any:
    """`json.loads` whose errors (an ``error``) name the file and the line and column (`raw` starts at `first_line`)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}: malformed JSON at line {first_line + exc.lineno - 1}, column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: invalid UTF-8 at byte {exc.start}") from exc


def _api_text(rev: dict[str, Any], where: str) -> str:
    """Wikitext of an API revision: `"*"` (formatversion 1) or the main slot; hidden text is ""."""
    if "*" in rev:
        return _text(rev["*"], "the text '*'", where)
    slots = rev.get("slots", {})
    main = slots.get("main", {}) if isinstance(slots, dict) else None
    if not isinstance(main, dict):
        raise BadRevision(f"{where}: slots.main must be an object, got {main!r:.60}")
    return _text(main.get("content", main.get("*", "")), "slots.main.content", where)


# --------------------------------------------------------------------------- JSONL


def iter_jsonl(path: str | Path, on_bad_revision: OnBadRevision = None) -> Iterator[Revision]:
    """Yield one revision per line of a JSONL file (optionally compressed) with the `FEATURES` keys.

    `text` is required; missing keys default to the file's stem (doc_id), ""
    (title, timestamp, comment, sha1), the line's record index (rev_id) and -1
    (parent_id). A malformed line is a `BadRevision` naming it (see `on_bad_revision`).
    """
    path = Path(path)
    with _Source.open(path) as source, io.TextIOWrapper(io.BufferedReader(source), "utf-8") as lines:
        index, lineno = 0, 0
        try:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    yield from _revisions([functools.partial(_jsonl_revision, line, index, path, lineno)],
                                          on_bad_revision)
                    index += 1
        except UnicodeDecodeError as exc:
            raise HistoryFormatError(f"{path}: invalid UTF-8 after line {lineno}") from exc


def _jsonl_revision(line: str, index: int, path: Path, lineno: int) -> Revision:
    obj = _parse_json(line.rstrip("\r\n"), path, lineno, BadRevision)
    where = f"{path}: line {lineno}"
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise BadRevision(f"{where} is not an object with a string 'text'")
    return Revision(
        doc_id=str(obj.get("doc_id", _stem(path))),
        title=_text(obj.get("title", ""), "title", where),
        rev_id=_id(obj.get("rev_id", index), "rev_id", where, zero_is_none=False),
        parent_id=_id(obj.get("parent_id", -1), "parent_id", where, zero_is_none=False),
        timestamp=_text(obj.get("timestamp", ""), "timestamp", where),
        text=obj["text"],
        comment=_text(obj.get("comment", ""), "comment", where),
        sha1=_text(obj.get("sha1", ""), "sha1", where),
    )


# --------------------------------------------------------------------------- git


def iter_git_history(repo_dir: str | Path, file_path: str) -> Iterator[Revision]:
    """Yield the history of `file_path` in the git repository `repo_dir`, oldest first, following renames.

    rev_id counts commits from 0 and parent_id is the previous one; comment is
    the commit subject, timestamp the author date, sha1 the blob id. A commit
    that deletes the file yields text "".
    """
    log = _git(
        repo_dir, "log", "--follow", "--no-color", "--name-status", "-z",
        "--format=%x1e%H%x1f%aI%x1f%s", "--", file_path,
    )
    commits = []  # (hash, date, subject, path at that commit or None when deleted), newest first
    path = file_path
    for record in log.split(b"\x1e")[1:]:
        header, _, changes = record.partition(b"\0")
        commit, date, subject = header.decode("utf-8", "replace").split("\x1f", 2)
        status, *fields = changes.strip(b"\n").split(b"\0")
        names = [name.decode("utf-8", "surrogateescape") for name in fields if name]
        if names:  # one path, or the old and the new path of a rename; a merge lists none
            path = names[-1]
        commits.append((commit, date, subject, None if status == b"D" else path))
        if names:
            path = names[0]
    if not commits:
        raise HistoryFormatError(f"{repo_dir}: git has no history for {file_path!r}")
    commits.reverse()
    blobs = iter(_git_blobs(repo_dir, [f"{c}:{p}" for c, _, _, p in commits if p is not None]))
    for rev_id, (commit, date, subject, path) in enumerate(commits):
        sha1, text = next(blobs) if path is not None else ("", "")
        yield Revision(
            doc_id=file_path,
            title=file_path,
            rev_id=rev_id,
            parent_id=rev_id - 1,
            timestamp=date,
            text=text,
            comment=subject,
            sha1=sha1,
        )


def _git(repo_dir: str | Path, *args: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(
        ["git", "-c", "log.showSignature=false", *args],
        cwd=repo_dir, input=stdin, capture_output=True, check=False,
    )
    if result.returncode != 0:
        raise HistoryFormatError(f"{repo_dir}: git {args[0]} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def _git_blobs(repo_dir: str | Path, specs: list[str]) -> list[tuple[str, str]]:
    """(blob id, UTF-8 text) of each `commit:path`, all fetched by one `git cat-file --batch`."""
    stdin = "".join(f"{spec}\n" for spec in specs).encode("utf-8", "surrogateescape")
    out = _git(repo_dir, "cat-file", "--batch", stdin=stdin)
    blobs, pos = [], 0
    for spec in specs:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        if len(header) != 3:
            raise HistoryFormatError(f"{repo_dir}: git cannot read {spec}: {out[pos:end].decode()}")
        size = int(header[2])
        blobs.append((header[0].decode(), out[end + 1 : end + 1 + size].decode("utf-8", "replace")))
        pos = end + 1 + size + 1  # content is followed by a newline
    return blobs


# --------------------------------------------------------------------------- dispatch


def detect_format(path: str | Path) -> str:
    """Return "git", "xml", "json" or "jsonl" for a history at `path` by sniffing its content."""
    path = Path(path)
    if path.is_dir():
        return "git"
    with _Source.open(path) as source, io.BufferedReader(source) as reader:
        head = reader.peek(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"<"):
            return "xml"
        if head.startswith(b"["):
            return "json"
        if head.startswith(b"{"):
            try:
                first = json.loads(reader.readline())
            except ValueError:
                return "json"  # a pretty-printed object spans lines
            return "jsonl" if isinstance(first, dict) and "text" in first else "json"
    raise HistoryFormatError(
        f"{path}: unknown history format (expected MediaWiki XML, MediaWiki API JSON or JSONL); "
        + (f"it starts with {head[:32]!r}" if head else "the file is empty")
    )


def iter_history(
    path: str | Path, *, file_path: str | None = None, max_revisions: int | None = None,
    on_bad_revision: OnBadRevision = None,
) -> Iterator[Revision]:
    """Stream the revisions of any supported history, stopping after `max_revisions`.

    `path` is a MediaWiki XML export, an API JSON file or a JSONL file (each
    possibly compressed), or a git repository together with `file_path`. A malformed
    revision raises `BadRevision`, or, with `on_bad_revision`, is passed to it and skipped;
    a malformed file raises `HistoryFormatError`.
    """
    fmt = detect_format(path)
    if fmt == "git":
        if file_path is None:
            raise HistoryFormatError(f"{path} is a folder (a git repository?): name the file whose history "
                                     f"to read (file_path=..., or `vqt replay --file PATH`)")
        revisions = iter_git_history(path, file_path)
    else:
        loader = {"xml": iter_mediawiki_xml, "json": iter_mediawiki_json, "jsonl": iter_jsonl}[fmt]
        revisions = loader(path, on_bad_revision)
    with contextlib.closing(revisions):  # closes the file at once when stopping early
        yield from itertools.islice(revisions, max_revisions)


def load_history(
    path: str | Path,
    *,
    file_path: str | None = None,
    max_revisions: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Load a history (see `iter_history`) into a `datasets.Dataset` with columns `FEATURES`.

    The dataset is written to the `datasets` cache (or `cache_dir`), keyed by
    the file's size and modification time, so large histories are not held in
    memory and a changed file is read again.
    """
    gen_kwargs = {"path": str(path), "file_path": file_path, "max_revisions": max_revisions}
    return datasets.Dataset.from_generator(
        iter_history,
        features=FEATURES,
        gen_kwargs=gen_kwargs,
        cache_dir=None if cache_dir is None else str(cache_dir),
        fingerprint=_fingerprint(Path(path), gen_kwargs),
    )


def _fingerprint(path: Path, gen_kwargs: dict[str, Any]) -> str:
    """Cache key: the arguments plus the file's identity (or the repository's HEAD)."""
    if path.is_dir():
        state = _git(path, "rev-parse", "HEAD").decode().strip()
    else:
        stat = path.stat()
        state = f"{stat.st_size}:{stat.st_mtime_ns}"
    key = json.dumps([str(path.resolve()), state, gen_kwargs], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]
