"""Fetch the revision history of one page from a live MediaWiki API (`vqt fetch-wiki`).

`fetch_revisions` pages through `action=query&prop=revisions` (oldest revision
first, following `continue.rvcontinue`) with a descriptive User-Agent, and
retries with exponential backoff on HTTP 429/5xx, connection errors and the
API's `maxlag`/`ratelimited` errors, honouring `Retry-After`. Everything else
(HTTP 4xx, an API `error` object, a missing or invalid page) raises a
`FetchError` that says what went wrong.

`write_revisions` saves what was fetched in the MediaWiki API JSON format that
`vqt.data.iter_mediawiki_json` reads (wikitext under `"*"`, as in the files of
shared/data/wiki/api), compressed when the file name ends in .gz, .bz2, .xz or
.lzma. Only the standard library is used (urllib.request).
"""

from __future__ import annotations

import argparse
import bz2
import email.utils
import gzip
import http.client
import json
import logging
import lzma
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from vqt._files import atomic_write
from vqt._version import __version__

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://en.wikipedia.org/w/api.php"
# Wikimedia's User-Agent policy asks for a way to reach the operator; override with
# `contact=`/`--contact` or the VQT_CONTACT environment variable.
DEFAULT_CONTACT = "https://example.org/vqt; set VQT_CONTACT to your URL or e-mail"
RVPROP = "ids|timestamp|user|comment|sha1|content"
# API error codes that mean "try again later" rather than "this request is wrong".
RETRYABLE_API_ERRORS = frozenset({"maxlag", "ratelimited", "readonly"})
_MAX_BATCH = 50  # the API's cap on rvlimit when content is requested (non-bot accounts)


class FetchError(RuntimeError):
    """The API could not deliver the revisions; `status` is the HTTP status and `code` the API error code, if any."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def user_agent(contact: str | None = None) -> str:
    """`vqt/<version> (incremental inference research; <contact>) Python-urllib/<x.y>`."""
    contact = contact or os.environ.get("VQT_CONTACT") or DEFAULT_CONTACT
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"vqt/{__version__} (incremental inference research; {contact}) Python-urllib/{python}"


@dataclass
class FetchedPage:
    """One page's fetched revisions, oldest first, in the flat format of `write_revisions`."""

    title: str
    pageid: int | None
    revisions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ApiClient:
    """GET requests against one MediaWiki `api.php` with retries and backoff.

    A request is tried at most `max_retries + 1` times; the n-th retry waits
    `backoff_base * 2**n` seconds (capped at `backoff_max`, with jitter), or
    longer when the server sends `Retry-After`. A `Retry-After` above
    `max_retry_after` seconds is not waited for: the request fails instead.
    """

    api_url: str = DEFAULT_API_URL
    user_agent: str = field(default_factory=user_agent)
    timeout: float = 60.0
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 600.0
    maxlag: int | None = 5

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.api_url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"api_url must be an http(s) URL, got {self.api_url!r}")
        if not self.user_agent.strip():
            raise ValueError("a User-Agent is required by the MediaWiki API etiquette")

    def get(self, params: dict[str, Any]) -> dict[str, Any]:
        """One API call: the decoded JSON response; raises `FetchError` once retries are spent."""
        query = dict(params, format="json", formatversion="2")
        if self.maxlag is not None:
            query["maxlag"] = str(self.maxlag)
        url = f"{self.api_url}?{urllib.parse.urlencode(query)}"
        headers = {"User-Agent": self.user_agent, "Accept": "application/json", "Accept-Encoding": "gzip"}
        for attempt in range(self.max_retries + 1):
            retry_after: str | None = None
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout) as resp:
                    body = _decode_body(resp.read(), resp.headers.get("Content-Encoding"))
                    retry_after = resp.headers.get("Retry-After")
            except urllib.error.HTTPError as exc:
                status, text = exc.code, _error_text(exc)
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                exc.close()
                if status != 429 and not 500 <= status < 600:
                    raise FetchError(
                        f"{self.api_url}: HTTP {status} {exc.reason}{f': {text}' if text else ''}", status=status
                    ) from None
                reason = f"HTTP {status} {exc.reason}"
            except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset, timeout, truncated
                status, reason = None, f"connection error: {getattr(exc, 'reason', None) or exc!r}"
            else:
                data = self._parse(body)
                error = data.get("error")
                if error is None:
                    for module, warning in (data.get("warnings") or {}).items():
                        log.warning("MediaWiki API warning from %s: %s", module, warning)
                    return data
                code = str(error.get("code", "unknown")) if isinstance(error, dict) else "unknown"
                info = error.get("info", "") if isinstance(error, dict) else str(error)
                if code not in RETRYABLE_API_ERRORS:
                    raise FetchError(f"{self.api_url}: API error {code!r}: {info}", code=code)
                status, reason = None, f"API error {code!r}: {info}"
            if attempt == self.max_retries:
                raise FetchError(
                    f"{self.api_url}: giving up after {attempt + 1} attempts; last: {reason}", status=status
                )
            delay = self._delay(attempt, retry_after, reason)
            log.warning("%s: %s; retry %d/%d in %.1f s", self.api_url, reason, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None, reason: str) -> float:
        backoff = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.75, 1.0)
        wait = _parse_retry_after(retry_after)
        if wait is None:
            return backoff
        if wait > self.max_retry_after:
            raise FetchError(f"{self.api_url}: {reason}; the server asks to retry after {wait:.0f} s, "
                             f"more than max_retry_after={self.max_retry_after:.0f} s")
        return max(wait, backoff)

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise FetchError(f"{self.api_url}: the response is not JSON (it starts with {body[:80]!r}); "
                             f"is this a MediaWiki api.php URL?") from None
        if not isinstance(data, dict):
            raise FetchError(f"{self.api_url}: expected a JSON object, got {type(data).__name__}")
        return data


def _decode_body(raw: bytes, encoding: str | None) -> bytes:
    if encoding and encoding.lower() == "gzip":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise FetchError(f"corrupt gzip response body: {exc}") from None
    return raw


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The first line(s) of an HTTP error's body, for the error message."""
    try:
        body = _decode_body(exc.read(), exc.headers.get("Content-Encoding") if exc.headers else None)
    except (OSError, http.client.HTTPException, FetchError):
        return ""
    return " ".join(body.decode("utf-8", "replace").split())[:200]


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _flatten(rev: dict[str, Any]) -> dict[str, Any]:
    """A formatversion=2 revision with `slots.main` -> the flat form with the wikitext under `"*"`."""
    out = {k: v for k, v in rev.items() if k != "slots"}
    main = (rev.get("slots") or {}).get("main") or {}
    for key in ("contentmodel", "contentformat"):
        if key in main:
            out.setdefault(key, main[key])
    if "texthidden" in main:
        out["texthidden"] = main["texthidden"]
    if "content" in main:
        out["*"] = main["content"]
    elif "*" in main:
        out["*"] = main["*"]
    return out


def fetch_page(
    title: str,
    limit: int | None,
    api_url: str = DEFAULT_API_URL,
    *,
    client: ApiClient | None = None,
    batch_size: int = _MAX_BATCH,
    progress: Callable[[int], None] | None = None,
    **session: Any,
) -> FetchedPage:
    """Fetch up to `limit` revisions of `title` (all when None), oldest first.

    `session` are `ApiClient` settings (user_agent, timeout, max_retries,
    backoff_base, backoff_max, max_retry_after, maxlag) used when no `client`
    is given. `progress(n)` is called with the number of revisions each
    response added. Raises `FetchError` for a missing or invalid page and for
    any failure the retries did not cure.
    """
    if "|" in title or not title.strip():
        raise ValueError(f"expected one page title, got {title!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if not 1 <= batch_size <= 500:
        raise ValueError(f"batch_size must be in 1..500, got {batch_size}")
    if client is not None and session:
        raise TypeError(f"pass either client or session settings, not both: {sorted(session)}")
    client = client or ApiClient(api_url=api_url, **session)
    page = FetchedPage(title=title, pageid=None)
    cont: dict[str, Any] = {}
    seen_tokens: set[str] = set()
    while limit is None or len(page.revisions) < limit:
        want = batch_size if limit is None else min(batch_size, limit - len(page.revisions))
        params = {
            "action": "query", "prop": "revisions", "titles": title, "rvprop": RVPROP, "rvslots": "main",
            "rvlimit": str(want), "rvdir": "newer", **cont,
        }
        data = client.get(params)
        info = _one_page(data, title, client.api_url)
        if page.pageid is None:
            page.title, page.pageid = info.get("title", title), info.get("pageid")
        elif info.get("pageid") != page.pageid:
            raise FetchError(f"{client.api_url}: continuation switched from page id {page.pageid} "
                             f"to {info.get('pageid')}")
        batch = [_flatten(rev) for rev in info.get("revisions") or []]
        if limit is not None:
            batch = batch[: limit - len(page.revisions)]
        page.revisions.extend(batch)
        if progress is not None and batch:
            progress(len(batch))
        cont = data.get("continue") or {}
        if "rvcontinue" not in cont:
            break  # the history is complete
        token = str(cont["rvcontinue"])
        if token in seen_tokens:
            raise FetchError(f"{client.api_url}: the continuation token {token!r} repeats; the history "
                             f"of {title!r} would never end")
        seen_tokens.add(token)
        if not batch:
            raise FetchError(f"{client.api_url}: a response with a continuation token had no revisions")
    return page


def fetch_revisions(
    title: str,
    limit: int | None,
    api_url: str = DEFAULT_API_URL,
    **session: Any,
) -> list[dict[str, Any]]:
    """The first `limit` revisions of `title`, oldest first, each a flat dict with `revid`, `parentid`,
    `timestamp`, `user`, `comment`, `sha1` and the wikitext under `"*"`. See `fetch_page` for the options."""
    return fetch_page(title, limit, api_url, **session).revisions


def _one_page(data: dict[str, Any], title: str, api_url: str) -> dict[str, Any]:
    query = data.get("query")
    pages = query.get("pages") if isinstance(query, dict) else None
    if isinstance(pages, dict):  # formatversion=1 shape, should a server ignore formatversion=2
        pages = list(pages.values())
    if not isinstance(pages, list) or len(pages) != 1 or not isinstance(pages[0], dict):
        raise FetchError(f"{api_url}: expected query.pages with one page for {title!r}, got "
                         f"{json.dumps(data)[:200]}")
    page = pages[0]
    name = page.get("title", title)
    if "invalid" in page:
        raise FetchError(f"{api_url}: {name!r} is not a valid title: {page.get('invalidreason', '')}",
                         code="invalidtitle")
    if "missing" in page:
        raise FetchError(f"{api_url}: the page {name!r} does not exist", code="missingtitle")
    return page


# --------------------------------------------------------------------------- writing

_WRITERS: dict[str, Callable[..., BinaryIO]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lambda path, mode: lzma.open(path, mode, format=lzma.FORMAT_XZ),
    ".lzma": lambda path, mode: lzma.open(path, mode, format=lzma.FORMAT_ALONE),
}


def write_revisions(
    revisions: Iterable[dict[str, Any]],
    path: str | Path,
    *,
    title: str | None = None,
    pageid: int | None = None,
) -> Path:
    """Write revisions (flat or formatversion=2) as MediaWiki API JSON that `vqt.data.iter_mediawiki_json` reads.

    Without `title` the file is a JSON list of revision objects (the format of
    shared/data/wiki/api; the loader then takes the title from the file name);
    with it, an API response `{"query": {"pages": [{"pageid", "title",
    "revisions"}]}}` that keeps the title and page id. The file is compressed
    by extension (.gz, .bz2, .xz, .lzma) and replaced atomically.
    """
    path = Path(path)
    revs = [_flatten(rev) for rev in revisions]
    if title is None:
        doc: Any = revs
    else:
        page: dict[str, Any] = {"title": title, "revisions": revs}
        if pageid is not None:
            page = {"pageid": pageid, **page}
        doc = {"query": {"pages": [page]}}
    opener = _WRITERS.get(path.suffix.lower(), open)
    with atomic_write(path, opener) as f:
        f.write(json.dumps(doc, ensure_ascii=False).encode("utf-8"))
    return path


# --------------------------------------------------------------------------- CLI


def fetch_wiki_command(args: argparse.Namespace) -> int:
    """`vqt fetch-wiki TITLE --limit N --out FILE [--api URL]` with a tqdm progress bar."""
    from tqdm import tqdm

    out = Path(args.out)
    try:
        client = ApiClient(api_url=args.api, user_agent=user_agent(args.contact), max_retries=args.retries,
                           backoff_base=args.backoff)
    except ValueError as exc:
        print(f"vqt fetch-wiki: {exc}", file=sys.stderr)
        return 2
    with tqdm(total=args.limit, unit="rev", desc=args.title[:30], disable=args.quiet) as bar:
        try:
            page = fetch_page(args.title, args.limit, client=client, batch_size=args.batch_size,
                              progress=bar.update)
        except (FetchError, ValueError) as exc:
            bar.close()
            print(f"vqt fetch-wiki: {exc}", file=sys.stderr)
            return 1
    try:
        write_revisions(page.revisions, out, title=page.title, pageid=page.pageid)
    except OSError as exc:
        print(f"vqt fetch-wiki: cannot write {out}: {exc}", file=sys.stderr)
        return 1
    span = (f", revisions {page.revisions[0].get('revid')}..{page.revisions[-1].get('revid')} "
            f"({page.revisions[0].get('timestamp', '')} to {page.revisions[-1].get('timestamp', '')})"
            if page.revisions else "")
    print(f"wrote {len(page.revisions)} revisions of {page.title!r}{span} to {out}")
    return 0
