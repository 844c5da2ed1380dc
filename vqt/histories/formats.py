"""Loaders of document revision histories (MediaWiki XML and API JSON, JSONL, git).

Every loader yields `Revision` dicts with the same eight keys, oldest revision
first, so a replay can stream them; `load_history` materialises them as a
`datasets.Dataset` with the columns of `FEATURES`. Compressed files (gzip,
bzip2, xz, lzma) are read transparently and in constant memory.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import lzma
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypedDict
from xml.etree import ElementTree
from xml.parsers import expat

import datasets


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


class HistoryFormatError(ValueError):
    """A history file is malformed, truncated or of an unknown format; the message names file and position."""


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


def _int(value: Any) -> int:
    """Parse an id; absent, empty and 0 (MediaWiki's "no parent") become -1."""
    return int(value) if value not in (None, "", 0, "0") else -1


def _stem(path: Path) -> str:
    """The file name without any extension: `japan_cup.json.xz` -> `japan_cup`."""
    return path.name.split(".")[0]


def _title_from_filename(path: Path) -> str:
    """`japan_cup.json.xz` -> `Japan cup` (MediaWiki titles start upper-case)."""
    title = _stem(path).replace("_", " ")
    return title[:1].upper() + title[1:]


# --------------------------------------------------------------------------- MediaWiki XML


def iter_mediawiki_xml(path: str | Path) -> Iterator[Revision]:
    """Stream the revisions of every page of a MediaWiki XML export (schema 0.3-0.11), in constant memory.

    `doc_id` is the page id; revisions whose text was deleted get text "".
    Raises `HistoryFormatError` with line/column for malformed XML and with the
    byte offset and revision index for a truncated compressed file.
    """
    path = Path(path)
    count = 0
    with _Source.open(path) as source:
        try:
            for page_id, title, revision in _xml_revisions(source, path):
                yield _xml_revision(revision, page_id, title)
                count += 1
        except ElementTree.ParseError as exc:
            line, column = exc.position
            raise HistoryFormatError(
                f"{path}: malformed XML at line {line}, column {column + 1} "
                f"(after {count} revisions): {expat.ErrorString(exc.code)}"
            ) from exc
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


def _xml_revision(elem: ElementTree.Element, page_id: str, title: str) -> Revision:
    ns = elem.tag[: -len("revision")]
    return Revision(
        doc_id=page_id,
        title=title,
        rev_id=_int(elem.findtext(f"{ns}id")),
        parent_id=_int(elem.findtext(f"{ns}parentid")),
        timestamp=elem.findtext(f"{ns}timestamp", ""),
        text=elem.findtext(f"{ns}text", ""),  # <text deleted="deleted"/> has no text
        comment=elem.findtext(f"{ns}comment", ""),
        sha1=elem.findtext(f"{ns}sha1", ""),
    )


# --------------------------------------------------------------------------- MediaWiki API JSON


def iter_mediawiki_json(path: str | Path) -> Iterator[Revision]:
    """Yield the revisions of a MediaWiki API `prop=revisions` JSON file (plain, .gz or .xz).

    Accepts a bare list of revision objects or a full API response
    (`{"query": {"pages": ...}}`, pages as dict or list). The title comes from
    the response, else from the file name; `doc_id` is the page id, else the
    file's stem.
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
            f"{path}: expected a list of revisions or an API response with query.pages"
        )
    for page in pages:
        doc_id = str(page.get("pageid", _stem(path)))
        title = page.get("title") or _title_from_filename(path)
        for index, rev in enumerate(page.get("revisions", [])):
            if not isinstance(rev, dict):
                raise HistoryFormatError(f"{path}: revision {index} of {title!r} is not an object")
            yield Revision(
                doc_id=doc_id,
                title=title,
                rev_id=_int(rev.get("revid")),
                parent_id=_int(rev.get("parentid")),
                timestamp=rev.get("timestamp", ""),
                text=_api_text(rev),
                comment=rev.get("comment", ""),
                sha1=rev.get("sha1", ""),
            )


def _parse_json(raw: str | bytes, path: Path, first_line: int = 1) -> Any:
    """`json.loads` whose errors name the file and the line and column (`raw` starts at `first_line`)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HistoryFormatError(
            f"{path}: malformed JSON at line {first_line + exc.lineno - 1}, column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise HistoryFormatError(f"{path}: invalid UTF-8 at byte {exc.start}") from exc


def _api_text(rev: dict[str, Any]) -> str:
    """Wikitext of an API revision: `"*"` (formatversion 1) or the main slot; hidden text is ""."""
    if "*" in rev:
        return rev["*"]
    main = rev.get("slots", {}).get("main", {})
    return main.get("content", main.get("*", ""))


# --------------------------------------------------------------------------- JSONL


def iter_jsonl(path: str | Path) -> Iterator[Revision]:
    """Yield one revision per line of a JSONL file (optionally compressed) with the `FEATURES` keys.

    `text` is required; missing keys default to the file's stem (doc_id), ""
    (title, timestamp, comment, sha1), the line's record index (rev_id) and -1
    (parent_id).
    """
    path = Path(path)
    with _Source.open(path) as source, io.TextIOWrapper(io.BufferedReader(source), "utf-8") as lines:
        index, lineno = 0, 0
        try:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    yield _jsonl_revision(_parse_json(line.rstrip("\r\n"), path, lineno), index, path, lineno)
                    index += 1
        except UnicodeDecodeError as exc:
            raise HistoryFormatError(f"{path}: invalid UTF-8 after line {lineno}") from exc


def _jsonl_revision(obj: Any, index: int, path: Path, lineno: int) -> Revision:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise HistoryFormatError(f"{path}: line {lineno} is not an object with a string 'text'")
    return Revision(
        doc_id=str(obj.get("doc_id", _stem(path))),
        title=obj.get("title", ""),
        rev_id=int(obj.get("rev_id", index)),
        parent_id=int(obj.get("parent_id", -1)),
        timestamp=obj.get("timestamp", ""),
        text=obj["text"],
        comment=obj.get("comment", ""),
        sha1=obj.get("sha1", ""),
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
        raise ValueError(f"{repo_dir}: git has no history for {file_path!r}")
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
        raise ValueError(f"{repo_dir}: git {args[0]} failed: {result.stderr.decode(errors='replace').strip()}")
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
            raise ValueError(f"{repo_dir}: git cannot read {spec}: {out[pos:end].decode()}")
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
        f"it starts with {head[:32]!r}"
    )


def iter_history(
    path: str | Path, *, file_path: str | None = None, max_revisions: int | None = None
) -> Iterator[Revision]:
    """Stream the revisions of any supported history, stopping after `max_revisions`.

    `path` is a MediaWiki XML export, an API JSON file or a JSONL file (each
    possibly compressed), or a git repository together with `file_path`.
    """
    fmt = detect_format(path)
    if fmt == "git":
        if file_path is None:
            raise ValueError(f"{path} is a directory: pass file_path to read a git history")
        revisions = iter_git_history(path, file_path)
    else:
        revisions = {"xml": iter_mediawiki_xml, "json": iter_mediawiki_json, "jsonl": iter_jsonl}[fmt](path)
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
