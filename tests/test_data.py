"""Loaders of revision histories, on the real files in ../shared/data and on files built here."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import tracemalloc
from pathlib import Path
from xml.etree import ElementTree

import pytest

from vqt.histories.formats import (
    FEATURES,
    BadRevision,
    HistoryFormatError,
    detect_format,
    iter_git_history,
    iter_history,
    iter_jsonl,
    iter_mediawiki_json,
    iter_mediawiki_xml,
    load_history,
)

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wiki"
TINY = WIKI / "enwiki-20140102-tiny.xml.gz"
ANARCHISM = WIKI / "enwiki-anarchism-history.xml.lzma"
API_FILES = sorted((WIKI / "api").glob("*.json.xz"))


@pytest.fixture(autouse=True)
def _shared_data() -> None:
    if not WIKI.is_dir():
        pytest.skip(f"shared data folder {WIKI} is absent (see shared/data/README.md)")


def _reference_xml(raw: bytes) -> list[dict]:
    """Revisions of a small export parsed whole with ElementTree: the oracle for the streaming loader."""
    root = ElementTree.fromstring(raw)
    ns = root.tag[: root.tag.index("}") + 1]
    rows = []
    for page in root.iter(f"{ns}page"):
        for rev in page.iter(f"{ns}revision"):
            rows.append(
                {
                    "doc_id": page.find(f"{ns}id").text,
                    "title": page.find(f"{ns}title").text,
                    "rev_id": int(rev.find(f"{ns}id").text),
                    "parent_id": int(rev.findtext(f"{ns}parentid") or -1),
                    "timestamp": rev.find(f"{ns}timestamp").text,
                    "text": rev.find(f"{ns}text").text or "",
                    "comment": rev.findtext(f"{ns}comment") or "",
                    "sha1": rev.findtext(f"{ns}sha1") or "",
                }
            )
    return rows


# --------------------------------------------------------------------------- MediaWiki XML


def test_xml_matches_whole_document_parse() -> None:
    expected = _reference_xml(gzip.decompress(TINY.read_bytes()))
    revisions = list(iter_mediawiki_xml(TINY))
    assert revisions == expected
    assert len(revisions) == 106  # shared/data/README.md: two pages, 106 revisions
    assert len({r["doc_id"] for r in revisions}) == 2


@pytest.mark.parametrize(
    "compress", [bz2.compress, lzma.compress, gzip.compress, bytes], ids=["bz2", "xz", "gz", "plain"]
)
@pytest.mark.parametrize("name", ["history.xml", "history.dat"])
def test_xml_opener_by_extension_or_magic(tmp_path: Path, compress, name: str) -> None:
    raw = gzip.decompress(TINY.read_bytes())
    path = tmp_path / name
    path.write_bytes(compress(raw))
    assert list(iter_history(path)) == _reference_xml(raw)


def _export(ns: str, pages: str) -> str:
    xmlns = f' xmlns="{ns}"' if ns else ""
    siteinfo = "<siteinfo><sitename>W</sitename></siteinfo>"
    return f'<?xml version="1.0"?>\n<mediawiki{xmlns} version="x">\n{siteinfo}\n{pages}</mediawiki>\n'


PAGES = """<page><title>First</title><ns>0</ns><id>7</id>
  <revision><id>70</id><timestamp>2020-01-01T00:00:00Z</timestamp>
    <contributor><username>U</username><id>99</id></contributor>
    <comment>start</comment><model>wikitext</model>
    <text bytes="11" sha1="abc" xml:space="preserve">hello &amp; é</text><sha1>abc</sha1></revision>
  <revision><id>71</id><parentid>70</parentid><timestamp>2020-01-02T00:00:00Z</timestamp>
    <contributor deleted="deleted"/><comment deleted="deleted"/>
    <text deleted="deleted"/><sha1/></revision>
</page>
<page><title>Second</title><ns>0</ns><id>8</id>
  <revision><id>80</id><timestamp>2021-05-05T10:00:00Z</timestamp><text>x</text></revision>
</page>
"""


@pytest.mark.parametrize(
    "ns",
    ["http://www.mediawiki.org/xml/export-0.3/", "http://www.mediawiki.org/xml/export-0.11/", ""],
)
def test_xml_any_schema_version_multiple_pages_and_deleted_text(tmp_path: Path, ns: str) -> None:
    path = tmp_path / "export.xml"
    path.write_text(_export(ns, PAGES), encoding="utf-8")
    revisions = list(iter_mediawiki_xml(path))
    assert [(r["doc_id"], r["title"], r["rev_id"], r["parent_id"]) for r in revisions] == [
        ("7", "First", 70, -1),
        ("7", "First", 71, 70),
        ("8", "Second", 80, -1),
    ]
    assert [r["text"] for r in revisions] == ["hello & é", "", "x"]
    assert [r["comment"] for r in revisions] == ["start", "", ""]
    assert [r["sha1"] for r in revisions] == ["abc", "", ""]


def test_xml_root_must_be_mediawiki(tmp_path: Path) -> None:
    path = tmp_path / "other.xml"
    path.write_text("<feed><page/></feed>")
    with pytest.raises(HistoryFormatError, match=re.escape(str(path))):
        list(iter_mediawiki_xml(path))


def test_anarchism_streams_in_constant_memory() -> None:
    tracemalloc.start()
    try:
        count, chars, previous = 0, 0, ""
        for rev in iter_history(ANARCHISM, max_revisions=2000):
            assert rev["title"] == "Anarchism" and rev["doc_id"] == "12"
            assert rev["timestamp"] >= previous  # oldest first
            count, chars, previous = count + 1, chars + len(rev["text"]), rev["timestamp"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 2000
    assert peak * 10 < chars, f"peak {peak} bytes while streaming {chars} characters"


def test_malformed_xml_names_file_and_position(tmp_path: Path) -> None:
    lines = gzip.decompress(TINY.read_bytes()).decode().splitlines(keepends=True)
    bad_line = next(i for i, line in enumerate(lines) if "<revision>" in line) + 3
    lines[bad_line - 1] = "      <comment>oops</commentary>\n"
    path = tmp_path / "bad.xml"
    path.write_text("".join(lines))
    with pytest.raises(HistoryFormatError) as info:
        list(iter_mediawiki_xml(path))
    message = str(info.value)
    assert str(path) in message and f"line {bad_line}, column " in message


def test_truncated_xz_names_file_offset_and_revision(tmp_path: Path) -> None:
    path = tmp_path / "cut.xml.lzma"
    path.write_bytes(ANARCHISM.read_bytes()[:150_000])
    got = []
    with pytest.raises(HistoryFormatError) as info:
        for rev in iter_mediawiki_xml(path):
            got.append(rev["rev_id"])
    message = str(info.value)
    assert str(path) in message
    offset = int(re.search(r"after (\d+) decompressed bytes", message).group(1))
    index = int(re.search(r"revision index (\d+)", message).group(1))
    assert offset > 0 and index == len(got) > 0
    assert got == [r["rev_id"] for r in iter_history(ANARCHISM, max_revisions=len(got))]


def test_truncated_gz_raises_value_error(tmp_path: Path) -> None:
    data = TINY.read_bytes()
    path = tmp_path / "cut.xml.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*after \d+ decompressed bytes"):
        list(iter_history(path))


# --------------------------------------------------------------------------- MediaWiki API JSON


def test_api_json_articles() -> None:
    assert len(API_FILES) == 4, "shared/data/wiki/api should hold four articles"
    for path in API_FILES:
        raw = json.loads(lzma.decompress(path.read_bytes()))
        revisions = list(iter_mediawiki_json(path))
        assert [r["rev_id"] for r in revisions] == [r["revid"] for r in raw]
        assert [r["text"] for r in revisions] == [r["*"] for r in raw]
        assert [r["sha1"] for r in revisions] == [r["sha1"] for r in raw]
        assert [r["parent_id"] for r in revisions] == [r["parentid"] or -1 for r in raw]
        title = path.name.split(".")[0].replace("_", " ")
        assert {r["title"].lower() for r in revisions} == {title}
        assert list(iter_history(path)) == revisions


@pytest.mark.parametrize("pages_as", ["dict", "list"])
@pytest.mark.parametrize("slots", [False, True])
def test_api_full_response(tmp_path: Path, pages_as: str, slots: bool) -> None:
    source = API_FILES[0]
    raw = json.loads(lzma.decompress(source.read_bytes()))
    if slots:  # formatversion=2 with rvslots=main
        raw = [{"revid": r["revid"], "slots": {"main": {"content": r["*"]}}} for r in raw]
    page = {"pageid": 4242, "ns": 0, "title": "Some Title", "revisions": raw}
    pages = {"4242": page} if pages_as == "dict" else [page]
    path = tmp_path / "response.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"batchcomplete": True, "query": {"pages": pages}}).encode()))
    revisions = list(iter_history(path))
    assert {(r["doc_id"], r["title"]) for r in revisions} == {("4242", "Some Title")}
    assert [r["text"] for r in revisions] == [r["text"] for r in iter_mediawiki_json(source)]


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    bad = '  {"revid": 2 "*": "b"}'  # the parser stops at the key after the missing comma
    path.write_text(f'[\n  {{"revid": 1, "*": "a"}},\n{bad}\n]\n')
    column = bad.index('"*"') + 1
    with pytest.raises(HistoryFormatError, match=re.escape(str(path)) + f".*line 3, column {column}:"):
        list(iter_mediawiki_json(path))


def test_truncated_json_xz(tmp_path: Path) -> None:
    data = API_FILES[0].read_bytes()
    path = tmp_path / "cut.json.xz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HistoryFormatError, match=re.escape(str(path)) + r".*after \d+ decompressed bytes"):
        list(iter_history(path))


# --------------------------------------------------------------------------- JSONL and dispatch


def test_jsonl_round_trip(tmp_path: Path) -> None:
    revisions = list(iter_mediawiki_json(API_FILES[-1]))
    path = tmp_path / "revisions.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for rev in revisions:
            f.write(json.dumps(rev) + "\n\n")  # blank lines are ignored
    assert detect_format(path) == "jsonl"
    assert list(iter_jsonl(path)) == revisions
    assert list(iter_history(path, max_revisions=3)) == revisions[:3]


def test_jsonl_defaults_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "doc.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two", "rev_id": 9, "parent_id": 0}\n')
    empty = {"doc_id": "doc", "title": "", "timestamp": "", "comment": "", "sha1": ""}
    assert list(iter_jsonl(path)) == [
        {**empty, "rev_id": 0, "parent_id": -1, "text": "one"},
        {**empty, "rev_id": 9, "parent_id": 0, "text": "two"},
    ]
    path.write_text('{"text": "one"}\n{"rev_id": 2}\n')
    with pytest.raises(HistoryFormatError, match=re.escape(str(path)) + r".*line 2"):
        list(iter_jsonl(path))
    bad = '{"text": "two",}'  # the parser stops at the closing brace
    path.write_text(f'{{"text": "one"}}\n\n{bad}\n')
    column = bad.index("}") + 1
    with pytest.raises(HistoryFormatError, match=re.escape(str(path)) + f".*line 3, column {column}:"):
        list(iter_jsonl(path))


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just some text\n")
    with pytest.raises(HistoryFormatError, match=re.escape(str(path)) + ".*unknown history format"):
        list(iter_history(path))
    with pytest.raises(HistoryFormatError, match=r"is a folder \(a git repository\?\): name the file whose history"):
        list(iter_history(tmp_path))


GOOD = {"revid": 1, "*": "first"}, {"revid": 3, "*": "third"}


def _xml_with(revision: str) -> str:
    good = "<revision><id>{}</id><text>t{}</text></revision>"
    return _export("", f"<page><title>P</title><id>5</id>{good.format(1, 1)}{revision}{good.format(3, 3)}</page>\n")


@pytest.mark.parametrize("name, content, match", [
    ("text-int.json", json.dumps([GOOD[0], {"revid": 2, "*": 5}, GOOD[1]]),
     r"revision 1 of 'Text-int' \(revid 2\): the text '\*' must be a string, got 5"),
    ("text-null.json", json.dumps([GOOD[0], {"revid": 2, "*": None}, GOOD[1]]), "must be a string, got None"),
    ("revid.json", json.dumps([GOOD[0], {"revid": "abc", "*": "x"}, GOOD[1]]),
     "revision 1 .* revid must be an integer id, got 'abc'"),
    ("slots.json", json.dumps([GOOD[0], {"revid": 2, "slots": 7}, GOOD[1]]), "slots.main must be an object"),
    ("rev-id.jsonl", '{"text": "a"}\n{"text": "b", "rev_id": "abc"}\n{"text": "c"}\n',
     "line 2: rev_id must be an integer id, got 'abc'"),
    ("broken.jsonl", '{"text": "a"}\n{"text": \n{"text": "c"}\n', "line 2, column 10: Expecting value"),
    ("id.xml", _xml_with("<revision><id>notanumber</id><text>x</text></revision>"),
     r"revision index 1 of page 'P' \(before byte \d+\): <id> must be an integer id, got 'notanumber'"),
    ("no-text.xml", _xml_with("<revision><foo/></revision>"),
     r"revision index 1 of page 'P' .*has no <text> element \(children: <foo>\)"),
])
def test_bad_revisions_are_named_and_can_be_skipped(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BadRevision, match=re.escape(str(path)) + ".*" + match):
        list(iter_history(path))
    skipped: list[BadRevision] = []
    kept = list(iter_history(path, on_bad_revision=skipped.append))
    assert len(kept) == 2 and len(skipped) == 1 and re.search(match, str(skipped[0]))
    assert [r["text"] for r in kept] in (["first", "third"], ["a", "c"], ["t1", "t3"])


@pytest.mark.parametrize("content, match", [
    (json.dumps({"query": {"pages": 5}}), "query.pages must be an object or a list of pages, got int 5"),
    (json.dumps({"query": {"pages": [3]}}), "page 0 must be an object with a list of revisions, got 3"),
    (json.dumps({"query": {"pages": [{"revisions": {"a": 1}}]}}), "page 0 must be an object with a list"),
    (json.dumps({"batchcomplete": ""}), "expected a list of revisions or an API response with query.pages, got dict"),
    ("", "unknown history format .* the file is empty"),
])
def test_files_of_the_wrong_shape_are_named(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "history.json"
    path.write_text(content)
    with pytest.raises(HistoryFormatError, match=re.escape(str(path)) + ".*" + match) as info:
        list(iter_history(path, on_bad_revision=lambda e: None))
    assert not isinstance(info.value, BadRevision)


def test_load_history_dataset(tmp_path: Path) -> None:
    dataset = load_history(TINY, cache_dir=tmp_path / "cache")
    assert dataset.features == FEATURES
    assert dataset.to_list() == list(iter_mediawiki_xml(TINY))
    head = load_history(ANARCHISM, max_revisions=5, cache_dir=tmp_path / "cache")
    assert head.to_list() == list(iter_history(ANARCHISM, max_revisions=5))


def test_load_history_rereads_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "doc.jsonl"
    path.write_text('{"text": "one"}\n')
    assert load_history(path, cache_dir=tmp_path / "cache")["text"] == ["one"]
    path.write_text('{"text": "two"}\n{"text": "three"}\n')
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    assert load_history(path, cache_dir=tmp_path / "cache")["text"] == ["two", "three"]


# --------------------------------------------------------------------------- git


def _commit(repo: Path, message: str, date: str, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "A", "GIT_AUTHOR_EMAIL": "a@example.org", "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": "A", "GIT_COMMITTER_EMAIL": "a@example.org", "GIT_COMMITTER_DATE": date,
    }
    for command in (["add", "-A"], ["commit", "-q", "-m", message, *args]):
        subprocess.run(["git", *command], cwd=repo, env=env, check=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_history_follows_renames(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "notes.txt").write_text("first\n")
    _commit(repo, "add notes", "2020-01-01T10:00:00+00:00")
    (repo / "notes.txt").write_text("first\nsecond ü\n")
    _commit(repo, "extend notes\n\nwith a body", "2020-01-02T10:00:00+00:00")
    (repo / "other.txt").write_text("unrelated\n")
    _commit(repo, "unrelated file", "2020-01-03T10:00:00+00:00")
    (repo / "docs").mkdir()
    subprocess.run(["git", "mv", "notes.txt", "docs/guide.txt"], cwd=repo, check=True)
    _commit(repo, "move to docs", "2020-01-04T10:00:00+00:00")
    (repo / "docs" / "guide.txt").write_text("zeroth\nfirst\nsecond ü\n")
    _commit(repo, "prepend", "2020-01-05T10:00:00+02:00")
    (repo / "docs" / "guide.txt").unlink()
    _commit(repo, "remove", "2020-01-06T10:00:00+00:00")
    (repo / "docs" / "guide.txt").write_text("back\n")
    _commit(repo, "restore", "2020-01-07T10:00:00+00:00")

    revisions = list(iter_git_history(repo, "docs/guide.txt"))
    assert [r["text"] for r in revisions] == [
        "first\n", "first\nsecond ü\n", "first\nsecond ü\n", "zeroth\nfirst\nsecond ü\n", "", "back\n"
    ]
    assert [r["comment"] for r in revisions] == [
        "add notes", "extend notes", "move to docs", "prepend", "remove", "restore"
    ]
    assert [(r["rev_id"], r["parent_id"]) for r in revisions] == [(i, i - 1) for i in range(6)]
    assert [r["timestamp"] for r in revisions] == [
        "2020-01-01T10:00:00+00:00", "2020-01-02T10:00:00+00:00",
        "2020-01-04T10:00:00+00:00", "2020-01-05T10:00:00+02:00",
        "2020-01-06T10:00:00+00:00", "2020-01-07T10:00:00+00:00",
    ]
    head_blob = subprocess.run(
        ["git", "rev-parse", "HEAD:docs/guide.txt"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert revisions[-1]["sha1"] == head_blob
    assert revisions[1]["sha1"] == revisions[2]["sha1"]  # a pure rename keeps the blob
    assert revisions[4]["sha1"] == ""  # the file is deleted in that commit
    assert load_history(repo, file_path="docs/guide.txt", cache_dir=tmp_path / "cache").to_list() == revisions
    with pytest.raises(ValueError, match="no history"):
        list(iter_git_history(repo, "missing.txt"))
