"""The MediaWiki fetcher against a real local HTTP server that serves responses recorded by the project.

The server (http.server on 127.0.0.1, a free port, in a thread) serves the
files of tests/fixtures/mediawiki (see make_fixtures.py there: a made-up page
whose wikitext is the project's own prose). It checks every request -- path,
action, prop, titles, rvprop, rvslots, rvdir, formats, rvlimit, the
continuation token and a descriptive User-Agent -- and answers HTTP 400
otherwise, so a wrong client fails these tests. Faults (HTTP errors, dropped
connections, API error objects) are queued per test and served in place of
the next valid requests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from vqt.histories.formats import iter_mediawiki_json, load_history
from vqt.histories.fetch import FetchError, fetch_page, fetch_revisions, user_agent, write_revisions

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mediawiki"
ROOT = Path(__file__).resolve().parents[1]
TITLE = "Marrowby Tide Mill"
MISSING_TITLE = "Marrowby Weir"
# rvcontinue token (None: first request) -> recorded response, for the made-up page
PAGES = {None: "marrowby_tide_mill_1.json", "20190502193055|1003002": "marrowby_tide_mill_2.json",
         "20210730162000|1006730": "marrowby_tide_mill_3.json"}
RVPROP = {"ids", "timestamp", "user", "comment", "sha1", "content"}
UA_RE = re.compile(r"^vqt/\d+\.\d+\S* \(incremental inference research; [^)]+\)")
FAST = {"backoff_base": 0.01, "timeout": 10}


def _recorded(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _expected_revisions() -> list[dict[str, Any]]:
    """All revisions of the made-up page, oldest first, read straight from the recorded responses."""
    revs = []
    for name in PAGES.values():
        revs.extend(_recorded(name)["query"]["pages"][0]["revisions"])
    return revs


class _Handler(BaseHTTPRequestHandler):
    server: "_ApiServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        self.server.requests.append({"path": url.path, "query": query, "headers": dict(self.headers)})
        if url.path != "/w/api.php":
            return self._send(404, b"<html><body>Not Found</body></html>", "text/html")
        problem = self._check(query)
        if problem:
            return self._send(400, f"bad request: {problem}".encode(), "text/plain")
        if self.server.faults:
            kind, *rest = self.server.faults.popleft()
            if kind == "drop":  # close the connection without a response
                self.close_connection = True
                return None
            if kind == "http":
                status, headers = rest
                return self._send(status, f"injected HTTP {status}".encode(), "text/plain", headers)
            name, headers = rest
            return self._send(200, (FIXTURES / name).read_bytes(), "application/json", headers)
        name = PAGES[query.get("rvcontinue")] if query["titles"] == TITLE else "missing.json"
        return self._send(200, (FIXTURES / name).read_bytes(), "application/json")

    def _check(self, q: dict[str, str]) -> str | None:
        """Why the request is not what the fetcher must send, or None."""
        ua = self.headers.get("User-Agent", "")
        if not UA_RE.match(ua):
            return f"User-Agent {ua!r} does not describe the tool and its contact"
        for key, value in [("action", "query"), ("prop", "revisions"), ("format", "json"),
                           ("formatversion", "2"), ("rvslots", "main"), ("rvdir", "newer")]:
            if q.get(key) != value:
                return f"{key}={q.get(key)!r}, expected {value!r}"
        if set(q.get("rvprop", "").split("|")) != RVPROP:
            return f"rvprop={q.get('rvprop')!r}"
        if not q.get("rvlimit", "").isdigit() or not 1 <= int(q["rvlimit"]) <= 50:
            return f"rvlimit={q.get('rvlimit')!r}"
        if q.get("titles") not in (TITLE, MISSING_TITLE):
            return f"titles={q.get('titles')!r}"
        if "rvcontinue" in q and (q["titles"] != TITLE or q["rvcontinue"] not in PAGES or q.get("continue") != "||"):
            return f"unknown continuation rvcontinue={q['rvcontinue']!r} continue={q.get('continue')!r}"
        return None

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        if gzipped:
            body = gzip.compress(body)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.faults: deque[tuple] = deque()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/w/api.php"


@pytest.fixture(scope="module")
def _running_server():
    server = _ApiServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def server(_running_server: _ApiServer) -> _ApiServer:
    _running_server.requests.clear()
    _running_server.faults.clear()
    return _running_server


# --------------------------------------------------------------------------- the server itself


def test_fixtures_are_consistent() -> None:
    revs = _expected_revisions()
    assert len(revs) == 8
    assert [r["parentid"] for r in revs[1:]] == [r["revid"] for r in revs[:-1]]
    for rev in revs:
        assert rev["sha1"] == hashlib.sha1(rev["slots"]["main"]["content"].encode()).hexdigest()


def test_server_rejects_a_wrong_client(server: _ApiServer) -> None:
    good = {"action": "query", "prop": "revisions", "titles": TITLE, "rvprop": "|".join(sorted(RVPROP)),
            "rvslots": "main", "format": "json", "formatversion": "2", "rvlimit": "3", "rvdir": "newer"}

    def status(params: dict[str, str], ua: str | None = user_agent()) -> int:
        req = urllib.request.Request(f"{server.api}?{urllib.parse.urlencode(params)}")
        if ua is not None:
            req.add_header("User-Agent", ua)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(good) == 200
    assert status(good, ua=None) == 400  # urllib's generic "Python-urllib/3.x"
    assert status({**good, "rvcontinue": "20190101000000|1", "continue": "||"}) == 400
    assert status({**good, "rvcontinue": "20190502193055|1003002"}) == 400  # without continue=||
    assert status({**good, "titles": "Marrowby"}) == 400
    assert status({**good, "rvprop": "ids|timestamp"}) == 400
    assert status({k: v for k, v in good.items() if k != "rvdir"}) == 400


# --------------------------------------------------------------------------- fetching


def test_full_fetch_follows_continuation(server: _ApiServer) -> None:
    page = fetch_page(TITLE, None, server.api, **FAST)
    expected = _expected_revisions()
    assert (page.title, page.pageid) == (TITLE, 7340211)
    assert [r["revid"] for r in page.revisions] == [r["revid"] for r in expected]
    for got, want in zip(page.revisions, expected):
        assert got["*"] == want["slots"]["main"]["content"]
        assert {k: got[k] for k in ("parentid", "timestamp", "user", "comment", "sha1")} == {
            k: want[k] for k in ("parentid", "timestamp", "user", "comment", "sha1")}
        assert "slots" not in got and got["contentmodel"] == "wikitext"
    tokens = [r["query"].get("rvcontinue") for r in server.requests]
    assert tokens == list(PAGES)  # None, then each recorded token once, in order
    assert all(r["query"]["rvlimit"] == "50" for r in server.requests)
    assert all(UA_RE.match(r["headers"]["User-Agent"]) for r in server.requests)
    assert fetch_revisions(TITLE, None, server.api, **FAST) == page.revisions


def test_limit_stops_early(server: _ApiServer) -> None:
    revs = fetch_revisions(TITLE, 4, server.api, **FAST)
    assert [r["revid"] for r in revs] == [r["revid"] for r in _expected_revisions()[:4]]
    assert [r["query"]["rvlimit"] for r in server.requests] == ["4", "1"]  # asks only for what is left
    server.requests.clear()
    assert len(fetch_revisions(TITLE, 2, server.api, **FAST)) == 2
    assert len(server.requests) == 1


@pytest.mark.parametrize("suffix", [".json", ".json.xz", ".json.gz", ".json.bz2", ".json.lzma"])
def test_round_trip_through_the_loaders(server: _ApiServer, tmp_path: Path, suffix: str) -> None:
    page = fetch_page(TITLE, None, server.api, batch_size=3, **FAST)
    expected = _expected_revisions()
    path = write_revisions(page.revisions, tmp_path / f"marrowby{suffix}", title=page.title, pageid=page.pageid)
    loaded = list(iter_mediawiki_json(path))
    assert [(r["doc_id"], r["title"]) for r in loaded] == [("7340211", TITLE)] * len(expected)
    assert [r["rev_id"] for r in loaded] == [r["revid"] for r in expected]
    assert [r["parent_id"] for r in loaded] == [-1] + [r["revid"] for r in expected[:-1]]
    assert [r["text"] for r in loaded] == [r["slots"]["main"]["content"] for r in expected]
    assert [(r["timestamp"], r["comment"], r["sha1"]) for r in loaded] == [
        (r["timestamp"], r["comment"], r["sha1"]) for r in expected]
    if suffix == ".json.xz":
        dataset = load_history(path, cache_dir=tmp_path / "cache")
        assert dataset.num_rows == len(expected)
        assert dataset.to_list() == loaded
        # without a title: the bare list of shared/data/wiki/api, the title taken from the file name
        bare = write_revisions(page.revisions, tmp_path / "marrowby_tide_mill.json.xz")
        assert isinstance(json.loads(lzma.decompress(bare.read_bytes())), list)
        again = list(iter_mediawiki_json(bare))
        assert [r["title"] for r in again] == ["Marrowby tide mill"] * len(expected)
        assert [r["text"] for r in again] == [r["text"] for r in loaded]
    assert not list(tmp_path.glob(".*.part"))


# --------------------------------------------------------------------------- retries and errors


def test_503_twice_then_success_is_retried(server: _ApiServer) -> None:
    server.faults.extend([("http", 503, {}), ("http", 503, {})])
    start = time.monotonic()
    revs = fetch_revisions(TITLE, None, server.api, **FAST)
    assert [r["revid"] for r in revs] == [r["revid"] for r in _expected_revisions()]
    assert len(server.requests) == 2 + len(PAGES)
    assert time.monotonic() - start < 2


def test_dropped_connection_and_429_with_retry_after(server: _ApiServer) -> None:
    server.faults.extend([("drop",), ("http", 429, {"Retry-After": "1"})])
    start = time.monotonic()
    revs = fetch_revisions(TITLE, 3, server.api, **FAST)
    assert len(revs) == 3 and len(server.requests) == 3
    assert time.monotonic() - start >= 1.0  # waited as long as Retry-After said, not the 10 ms backoff


def test_maxlag_api_error_is_retried(server: _ApiServer) -> None:
    server.faults.append(("file", "error_maxlag.json", {"Retry-After": "0"}))
    assert len(fetch_revisions(TITLE, 3, server.api, **FAST)) == 3
    assert len(server.requests) == 2
    assert server.requests[0]["query"]["maxlag"] == "5"


def test_retries_run_out(server: _ApiServer) -> None:
    server.faults.extend([("http", 502, {})] * 3)
    with pytest.raises(FetchError, match=r"giving up after 3 attempts; last: HTTP 502") as info:
        fetch_revisions(TITLE, 3, server.api, max_retries=2, **FAST)
    assert info.value.status == 502 and len(server.requests) == 3


def test_http_404_is_a_clear_error_without_retries(server: _ApiServer) -> None:
    wrong = server.api.replace("/w/api.php", "/wiki/api.php")
    with pytest.raises(FetchError, match=r"/wiki/api\.php: HTTP 404 Not Found") as info:
        fetch_revisions(TITLE, 3, wrong, **FAST)
    assert info.value.status == 404 and len(server.requests) == 1


def test_http_400_is_a_clear_error_without_retries(server: _ApiServer) -> None:
    server.faults.append(("http", 400, {}))
    with pytest.raises(FetchError, match=r"HTTP 400 Bad Request: injected HTTP 400") as info:
        fetch_revisions(TITLE, 3, server.api, **FAST)
    assert info.value.status == 400 and len(server.requests) == 1


def test_api_error_object_is_a_clear_error(server: _ApiServer) -> None:
    server.faults.append(("file", "error_dbquery.json", {}))
    message = r"API error 'internal_api_error_DBQueryError': \[c0ffee12\] A database"
    with pytest.raises(FetchError, match=message) as info:
        fetch_revisions(TITLE, 10, server.api, **FAST)
    assert info.value.code == "internal_api_error_DBQueryError" and len(server.requests) == 1


def test_api_error_during_continuation(server: _ApiServer) -> None:
    """The first page arrives, the second request gets an error: no partial result is returned."""
    server.faults.extend([("file", "marrowby_tide_mill_1.json", {}), ("file", "error_dbquery.json", {})])
    with pytest.raises(FetchError, match="internal_api_error_DBQueryError"):
        fetch_revisions(TITLE, None, server.api, **FAST)
    assert [r["query"].get("rvcontinue") for r in server.requests] == list(PAGES)[:2]


def test_missing_page_is_a_clear_error(server: _ApiServer) -> None:
    with pytest.raises(FetchError, match=r"the page 'Marrowby Weir' does not exist") as info:
        fetch_revisions(MISSING_TITLE, 10, server.api, **FAST)
    assert info.value.code == "missingtitle"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one page title"):
        fetch_revisions("A|B", 3, "http://127.0.0.1:9/w/api.php")
    with pytest.raises(ValueError, match="limit"):
        fetch_revisions(TITLE, 0, "http://127.0.0.1:9/w/api.php")
    with pytest.raises(ValueError, match="http"):
        fetch_revisions(TITLE, 3, "ftp://example.org/w/api.php")


# --------------------------------------------------------------------------- CLI


def test_cli_fetch_wiki_writes_a_loadable_file(server: _ApiServer, tmp_path: Path) -> None:
    out = tmp_path / "marrowby.json.xz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VQT_CONTACT": "tests@example.org"}
    res = subprocess.run(
        [sys.executable, "-m", "vqt", "fetch-wiki", TITLE, "--limit", "5", "--out", str(out),
         "--api", server.api, "--batch-size", "2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert res.returncode == 0, res.stderr
    assert f"wrote 5 revisions of '{TITLE}'" in res.stdout
    assert "5/5" in res.stderr  # the tqdm bar reached the limit
    assert all("tests@example.org" in r["headers"]["User-Agent"] for r in server.requests)
    loaded = list(iter_mediawiki_json(out))
    assert [r["rev_id"] for r in loaded] == [r["revid"] for r in _expected_revisions()[:5]]
    assert {r["title"] for r in loaded} == {TITLE}


def test_cli_fetch_wiki_reports_errors(
    server: _ApiServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from vqt.apps.cli import main

    out = tmp_path / "weir.json"
    assert main(["fetch-wiki", MISSING_TITLE, "--out", str(out), "--api", server.api, "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
