"""``vqt lsp``: a language server over stdio that shows what the model computes for each open document.

One incremental ``TextDocument`` per open file follows didOpen, didChange (incremental sync)
and didClose. The server publishes next-token suggestions as completion items at the cursor,
a hover with the five most likely next tokens at the cursor, the surprisal of the token before
it, what the last edit recomputed and the MACs it saved, and diagnostics: tokens whose surprisal
passes ``--surprisal-bits`` (a typo or odd-phrase detector; carried across edits by
``TextDocument.surprisal``, so an edit pays the LM head only where the final hidden states
changed), the pooled classification (for models with a classifier) and any problem (a refused change, a
document longer than the token limit: ``--max-tokens``, or the model's ``max_len`` for a model
without a window). At most ``max_live`` model states stay in memory; the least recently used ones are saved to disk (``vqt.persist``) and restored exactly
on their next use. Malformed messages get JSON-RPC errors; a bad notification gets a
``window/showMessage`` and a diagnostic, and never changes a document's state.

The transport survives broken framing (``FrameReader``): a header without a usable
``Content-Length`` or a length that does not match the body gets a parse error, and the server
resynchronizes on the next valid header. After ``shutdown`` requests get InvalidRequest;
``exit`` ends the process with status 0 after ``shutdown`` and 1 without. Errors the server
answers are logged as one line at INFO; the log level is ``--log-level``, or what the client
asks with ``trace`` (initialize, ``$/setTrace``: messages -> INFO, verbose -> DEBUG).
The backend is resolved (and a fused one compiled) before the first message is read, so no
request ever waits on a build.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
import re
import sys
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, Optional, TypeVar

import cattrs
import numpy as np
import torch
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest, JsonRpcParseError
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

from vqt._version import __version__
from vqt.text.changes import LineIndex, apply_content_changes
from vqt.engine.document import EditStats
from vqt.engine.options import DocumentOptions
from vqt.modeling.model import VQTModel
from vqt.text.persist import state_digest
from vqt.text.document import TextDocument
from vqt.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")


class UnknownDocument(LookupError):
    def __init__(self, uri: str) -> None:
        super().__init__(f"unknown document {uri}: it is not open (send textDocument/didOpen first)")


DEFAULT_SURPRISAL_BITS = 16.0  # a token the model gave p < 1/65536: typos and odd phrases, rarely plain text
HOVER_NEXT = 5  # next tokens a hover lists


def surprisal_text(bits: float) -> str:
    """How hovers and diagnostics state a token's surprisal."""
    return f"{bits:.1f} bits of surprisal (p = {2.0 ** -bits:.2g})"


class Suggestion(NamedTuple):
    token_id: int
    text: str
    logit: float
    probability: float


def next_tokens(logits: torch.Tensor, tokenizer: Tokenizer, k: int) -> list[Suggestion]:
    """The k most likely next tokens that decode to whole characters, most likely first (ties by id)."""
    log_z = torch.logsumexp(logits.double(), -1)
    n = logits.numel()
    width = min(n, 4 * k + 16)
    while True:
        # Candidates: every logit at or above the width-th largest (ties included), ordered by (-logit, id): the
        # prefix of the whole vocabulary's order, without sorting it; all of it when too few decode to text.
        cand = torch.nonzero(logits >= torch.topk(logits, width).values[-1])[:, 0]
        out: list[Suggestion] = []
        for t in cand[torch.argsort(logits[cand], descending=True, stable=True)].tolist():
            text = tokenizer.decode([t])
            if text and "\ufffd" not in text:
                out.append(Suggestion(t, text, float(logits[t]), float(torch.exp(logits[t].double() - log_z))))
                if len(out) == k:
                    return out
        if width == n:
            return out
        width = n


@dataclass
class OpenDocument:
    """What the server holds for one open file."""

    uri: str
    text: str
    version: int
    doc: Optional[TextDocument] = None  # the live model state
    saved: Optional[Path] = None  # the model state on disk while evicted from the LRU
    stats: Optional[EditStats] = None  # what the last incremental update cost
    problem: str = ""  # why the model does not follow the text (too long for it)
    refused: str = ""  # the last refused change, reported until a change applies


class DocumentStore:
    """Open documents by URI, at most ``max_live`` of them with their model state in memory.

    The least recently used states are saved to ``state_dir`` and restored exactly when the
    document is next edited or queried. With ``dense`` every change rebuilds the state with a
    dense forward (the baseline the incremental engine is compared with).
    """

    def __init__(self, model: VQTModel, tokenizer: Tokenizer, max_live: int = 8, state_dir: Optional[str | Path] = None,
                 dense: bool = False, options: Optional[DocumentOptions] = None,
                 surprisal_bits: Optional[float] = DEFAULT_SURPRISAL_BITS, max_surprising: int = 100) -> None:
        if max_live < 1:
            raise ValueError(f"max_live must be at least 1, got {max_live}")
        if max_surprising < 0:
            raise ValueError(f"max_surprising must be >= 0, got {max_surprising}")
        self.surprisal_bits, self.max_surprising = surprisal_bits, max_surprising
        self.model, self.tokenizer, self.options = model, tokenizer, options or DocumentOptions()
        self.max_live, self.dense = max_live, dense
        self._tmp = tempfile.TemporaryDirectory(prefix="vqt-lsp-") if state_dir is None else None
        self.state_dir = Path(self._tmp.name if self._tmp else state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.encoding = "utf-16"  # the position encoding negotiated with the client
        self.docs: dict[str, OpenDocument] = {}
        self._live: OrderedDict[str, OpenDocument] = OrderedDict()
        self.evictions = self.restores = 0

    # ------------------------------------------------------------ lifecycle
    def get(self, uri: str) -> OpenDocument:
        if uri not in self.docs:
            raise UnknownDocument(uri)
        return self.docs[uri]

    def open(self, uri: str, text: str, version: int) -> OpenDocument:
        doc, problem = self._build(text, version)
        if uri in self.docs:  # a second didOpen replaces the first
            self.close(uri)
        entry = self.docs[uri] = OpenDocument(uri, text, version, problem=problem)
        self._attach(entry, doc)
        return entry

    def change(self, uri: str, changes: list[dict[str, Any]], version: int) -> OpenDocument:
        """Apply one didChange. On error (stale version, bad position) the document is unchanged."""
        entry = self.get(uri)
        if version <= entry.version:
            raise ValueError(f"stale version {version}: the document is at version {entry.version} "
                             f"and versions must increase")
        if self.dense or (entry.doc is None and entry.saved is None):
            text = apply_content_changes(entry.text, changes, self.encoding)
            doc, problem = self._build(text, version)
            self._attach(entry, doc)
            entry.stats = None
        else:
            doc = self.live(entry)
            try:
                entry.stats, text, problem = doc.apply_changes(changes, version), doc.text, ""
            except ValueError:
                text = apply_content_changes(entry.text, changes, self.encoding)  # re-raises a bad change's error
                problem = self._too_long(text)
                if not problem:
                    raise
                self._attach(entry, None)
                entry.stats = None
        entry.text, entry.version, entry.problem, entry.refused = text, version, problem, ""
        return entry

    def close(self, uri: str) -> None:
        self._attach(self.get(uri), None)
        del self.docs[uri]

    def _too_long(self, text: str) -> str:
        n, limit = len(self.tokenizer.encode(text)), self.options.token_limit(self.model.config)
        return "" if limit is None or n <= limit else (f"the document has {n} tokens, more than the limit of {limit}: "
                                                       f"VQT results are paused until it is shorter")

    def _build(self, text: str, version: int) -> tuple[Optional[TextDocument], str]:
        """A state computed by a dense forward, or (None, why) when the text is too long for the model."""
        try:
            doc = TextDocument(self.model, self.tokenizer, text, self.options)
        except ValueError:
            problem = self._too_long(text)
            if not problem:
                raise
            return None, problem
        doc.version, doc.position_encoding = version, self.encoding
        return doc, ""

    # ------------------------------------------------------------------ LRU
    def _attach(self, entry: OpenDocument, doc: Optional[TextDocument]) -> None:
        """Make ``doc`` the entry's live state (None: no state), forgetting any saved one."""
        self._live.pop(entry.uri, None)
        if entry.saved is not None:
            entry.saved.unlink(missing_ok=True)
        entry.doc, entry.saved = doc, None
        if doc is not None:
            self._touch(entry)

    def live(self, entry: OpenDocument) -> TextDocument:
        """The entry's model state in memory (restored from disk if it was evicted)."""
        if entry.doc is None:
            if entry.saved is None:
                raise ValueError(entry.problem or f"{entry.uri} has no model state")
            entry.doc = TextDocument.load_state(entry.saved, self.model, self.tokenizer)
            entry.saved.unlink()
            entry.saved = None
            self.restores += 1
        self._touch(entry)
        return entry.doc

    def _touch(self, entry: OpenDocument) -> None:
        self._live[entry.uri] = entry
        self._live.move_to_end(entry.uri)
        while len(self._live) > self.max_live:
            _, old = self._live.popitem(last=False)
            path = self.state_dir / f"{hashlib.sha256(old.uri.encode()).hexdigest()[:32]}.vqts"
            try:
                old.doc.save_state(path)
            except BaseException:
                self._live[old.uri] = old
                self._live.move_to_end(old.uri, last=False)
                raise
            old.doc, old.saved = None, path
            self.evictions += 1

    # -------------------------------------------------------------- queries
    def cursor(self, entry: OpenDocument, line: int, character: int) -> int:
        """Code-point offset of a request's position (a line past the end is an error)."""
        return LineIndex(entry.text).offset(line, character, self.encoding, clamp_lines=False)

    def completions(self, uri: str, line: int, character: int, k: int) -> list[Suggestion]:
        """Next-token suggestions after the last token that ends at or before the cursor."""
        entry = self.get(uri)
        offset = self.cursor(entry, line, character)
        doc = self.live(entry)
        i = doc.last_token_ending_by(offset)
        return [] if i < 0 else next_tokens(doc.doc.logits([i])[0], self.tokenizer, k)

    def classify(self, entry: OpenDocument) -> Optional[list[float]]:
        """Class probabilities of a live document when the model has a classifier."""
        if self.model.classifier is None or entry.doc is None:
            return None
        return torch.softmax(entry.doc.doc.classify().double(), -1).tolist()

    def surprising(self, entry: OpenDocument) -> list[tuple[int, float]]:
        """(token index, bits) of the tokens whose surprisal passes ``surprisal_bits``: the
        ``max_surprising`` highest, in text order (none without a live state or a threshold)."""
        if self.surprisal_bits is None or entry.doc is None or not self.max_surprising:
            return []
        bits = entry.doc.surprisal()
        with np.errstate(invalid="ignore"):
            idx = np.flatnonzero(bits > self.surprisal_bits)  # (token 0 has none: NaN)
        if len(idx) > self.max_surprising:
            idx = np.sort(idx[np.argsort(-bits[idx], kind="stable")[: self.max_surprising]])
        return [(int(i), float(bits[i])) for i in idx]

    def describe(self, uri: str, line: int, character: int) -> str:
        """Hover text: the most likely next tokens at the cursor and the surprisal of the token before
        it, what the last update recomputed and the MACs it saved."""
        entry = self.get(uri)
        offset = self.cursor(entry, line, character)  # validates the position
        out = [f"**VQT** version {entry.version}"] + [m for m in (entry.refused, entry.problem) if m]
        if entry.doc is not None or entry.saved is not None:
            doc = self.live(entry)
            i = doc.last_token_ending_by(offset)
            if i >= 0:
                top = next_tokens(doc.doc.logits([i])[0], self.tokenizer, HOVER_NEXT)
                out.append("Next: " + ", ".join(f"`{s.text!r}` {s.probability:.1%}" for s in top))
            if i >= 1:
                bits = doc.surprisal_of(i)
                s, e = doc.token_span(i)
                out.append(f"`{doc.text[s:e]!r}` before the cursor: {surprisal_text(bits)}")
        st = entry.stats
        if self.dense:
            out.append("Dense mode: every change recomputes the whole document.")
        elif st is not None:
            d = st.dirty_per_layer
            out.append(f"Last edit recomputed {sum(d)} positions across {len(d)} layers "
                       f"(per layer: {', '.join(map(str, d))} of {st.n_tokens} tokens); "
                       f"delta-updated {sum(st.affected_per_layer)}.")
            out.append(f"MACs: {st.macs} spent vs {st.dense_macs} for a dense forward: "
                       f"{st.dense_macs - st.macs} saved ({st.ratio:.1f}x fewer).")
        elif not entry.problem:
            out.append("No incremental update yet: the document was computed densely when opened.")
        return "\n\n".join(out)

    def inspect(self, uri: str, full: bool = False) -> dict[str, Any]:
        """The server's view of a document (for tests and debugging). ``full`` adds tokens, positions,
        codes, pooled features and a digest of every cached tensor, without touching the LRU."""
        entry = self.get(uri)
        info: dict[str, Any] = {"uri": uri, "text": entry.text, "version": entry.version, "live": entry.doc is not None,
                                "saved": entry.saved is not None, "problem": entry.problem, "refused": entry.refused,
                                "n_live": len(self._live), "evictions": self.evictions, "restores": self.restores,
                                "gc_frozen": gc.get_freeze_count()}  # (objects the server froze at start, see main)
        if full and (entry.doc is not None or entry.saved is not None):
            doc = entry.doc
            if doc is None:  # peek at the saved state
                doc = TextDocument.load_state(entry.saved, self.model, self.tokenizer)
            info.update(tokens=doc.doc.token_ids, positions=doc.doc.positions.tolist(), codes=doc.doc.codes.tolist(),
                        pooled=doc.doc.pooled.tolist(), state_sha256=state_digest(doc.doc))
        return info


# ------------------------------------------------------------------ transport
class FrameReader:
    """Splits an LSP byte stream (``Content-Length: N\\r\\n ... \\r\\n\\r\\n`` + N bytes of body) into
    message bodies, and survives broken frames.

    ``feed`` the bytes read; ``frames`` yields each complete body, or a ``str`` saying what was
    wrong with a broken frame: a header block without ``Content-Length``, a length that is not a
    number, a length longer than the message (a new header starts inside the declared body: a
    valid JSON body never holds a raw CR LF, so that is a header) or a stream that ends inside a
    frame. Reading then resumes at the next header; bytes before a valid header (the rest of a
    body whose length was too short) are skipped.
    """

    _LENGTH = re.compile(rb"content-length[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
    _HEADER = re.compile(rb"content-length[ \t]*:[ \t]*\d+[ \t]*\r\n", re.IGNORECASE)

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Add bytes read from the stream (``b""``: the stream ended)."""
        if data:
            self.buffer += data
        else:
            self.eof = True

    def frames(self) -> Iterator[bytes | str]:
        """Every complete message body (bytes) or broken frame (a str saying why) in what was fed so far."""
        while (frame := self._next()) is not None:
            yield frame

    def _next(self) -> Optional[bytes | str]:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if self.eof and buf.strip():
                buf.clear()
                return "the stream ended inside a header"
            return None
        header, start = bytes(buf[:end]), end + 4
        found = list(self._LENGTH.finditer(header))
        if not found:
            del buf[:start]
            return f"a header without Content-Length ({header[-80:]!r}): skipped to the next header"
        value = found[-1].group(1).strip()
        if not value.isdigit():
            del buf[:start]
            return f"Content-Length {value.decode('latin-1')!r} is not a number: skipped to the next header"
        length = int(value)
        inside = self._HEADER.search(buf, start)
        if inside is not None and inside.start() < start + length:
            del buf[:inside.start()]
            return (f"Content-Length {length} is longer than the message (the next header starts after "
                    f"{inside.start() - start} bytes): skipped to it")
        if len(buf) < start + length:
            if self.eof:
                buf.clear()
                return f"the stream ended inside a message of Content-Length {length}"
            return None
        body = bytes(buf[start:start + length])
        del buf[:start + length]
        return body


class _HandledErrors(logging.Filter):
    """pygls logs the errors this server answers (invalid params, unknown methods) with tracebacks at
    ERROR: keep them as one line at INFO; then pass what reaches the level the client chose."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (JsonRpcException, _Answered)) or str(record.msg).startswith("Unable to deserialize"):
            first = record.getMessage().split("\n")[0]
            record.msg, record.args = (f"{first}: {error}" if error else first), ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return record.levelno >= self.level


# ------------------------------------------------------------------- protocol
class _Answered(Exception):
    """A malformed message that has already been answered or reported."""


def _user_handler_only(method: str) -> Callable:
    """A builtin handler that skips pygls' own copy of the document: the store keeps the only one."""
    def handler(self: LanguageServerProtocol, params: Any):
        if (user := self.fm.features.get(method)) is not None:
            yield user, (params,), None
    return lsp_method(method)(handler)


class _Protocol(LanguageServerProtocol):
    """pygls' protocol with JSON-RPC errors that say what was wrong with a malformed message."""

    lsp_text_document__did_open = _user_handler_only(types.TEXT_DOCUMENT_DID_OPEN)
    lsp_text_document__did_change = _user_handler_only(types.TEXT_DOCUMENT_DID_CHANGE)
    lsp_text_document__did_close = _user_handler_only(types.TEXT_DOCUMENT_DID_CLOSE)

    def send_error(self, msg_id: Any, code: int, message: str) -> None:
        """A JSON-RPC error response (``msg_id`` None is sent as null, as for parse errors)."""
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}})

    def _refuse(self, data: Any, code: int, message: str) -> None:
        """Answer a bad request with an error (id null when it has no usable id), report a bad
        notification to the user, and stop handling the message."""
        answerless = isinstance(data, dict) and (("method" in data and "id" not in data)  # a notification
                                                 or ("method" not in data and ("result" in data or "error" in data)))
        if answerless:  # notifications and responses get no response
            self._server.show_error(message)
        else:
            msg_id = data.get("id") if isinstance(data, dict) else None
            self.send_error(msg_id if isinstance(msg_id, (int, str)) else None, code, message)
        raise _Answered(message)

    def structure_message(self, data: dict[str, Any]) -> Any:
        if "jsonrpc" not in data:
            return data  # a nested object (json.loads calls this for every object, innermost first)
        if self._shutdown and data.get("method", types.EXIT) != types.EXIT:
            if "id" not in data:  # a notification after shutdown is dropped
                raise _Answered(f"{data['method']!r} after shutdown ignored")
            self._refuse(data, JsonRpcInvalidRequest.CODE, f"the server is shut down: {data['method']!r} refused "
                                                           f"(only 'exit' is accepted after 'shutdown')")
        if data["jsonrpc"] != "2.0":
            self._refuse(data, JsonRpcInvalidRequest.CODE,
                         f'invalid request: "jsonrpc" must be "2.0", got {data["jsonrpc"]!r}')
        try:
            return super().structure_message(data)
        except JsonRpcException as e:
            cause = e.__cause__
            detail = ("; ".join(cattrs.transform_error(cause)) if isinstance(cause, cattrs.BaseValidationError)
                      else str(cause or e))
            self._refuse(data, JsonRpcInvalidParams.CODE,
                         f"invalid params for {data.get('method', 'a response')!r}: {detail}")

    def handle_message(self, message: Any) -> None:
        if not hasattr(message, "jsonrpc"):
            self._refuse(message, JsonRpcInvalidRequest.CODE,
                         "invalid request: a JSON-RPC message is an object with \"jsonrpc\": \"2.0\" "
                         f"(batches are not supported), got {json.dumps(message)[:200]}")
        super().handle_message(message)


class VQTServer(LanguageServer):
    """The language server: LSP messages in, the store's results out."""

    def __init__(self, store: DocumentStore, n_completions: int = 10, log_level: int = logging.WARNING) -> None:
        super().__init__("vqt-lsp", __version__, protocol_cls=_Protocol)
        self.store, self.n_completions = store, n_completions
        self.log_filter = _HandledErrors(log_level)
        self._default_level = log_level

    def trace(self, value: Any) -> None:
        """Follow the client's trace setting: messages -> INFO, verbose -> DEBUG, off -> ``--log-level``."""
        value = getattr(value, "value", value)
        self.log_filter.level = {"messages": logging.INFO, "verbose": logging.DEBUG}.get(value, self._default_level)

    def start_io(self, stdin: Optional[BinaryIO] = None, stdout: Optional[BinaryIO] = None) -> int:
        """Serve until ``exit`` or the end of input; returns the exit status (0 after ``shutdown``, else 1)."""
        self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        try:
            asyncio.run(self._serve(stdin or sys.stdin.buffer))
        except SystemExit as e:  # the exit notification
            return e.code if isinstance(e.code, int) else 1
        except BrokenPipeError:
            logger.error("the client closed the connection")
        finally:
            self.shutdown()
        return 0 if self.protocol._shutdown else 1

    async def _serve(self, stdin: BinaryIO) -> None:
        """Read frames until the input ends, answering broken ones with a parse error."""
        frames, loop = FrameReader(), asyncio.get_running_loop()
        while not self._stop_event.is_set() and not frames.eof:
            frames.feed(await loop.run_in_executor(self.thread_pool, stdin.read1, 1 << 16))
            for frame in frames.frames():
                if isinstance(frame, str):
                    logger.info("broken frame: %s", frame)
                    self.protocol.send_error(None, JsonRpcParseError.CODE, f"parse error: {frame}")
                    continue
                try:
                    message = json.loads(frame, object_hook=self.protocol.structure_message)
                    self.protocol.handle_message(message)
                except Exception as error:
                    self.report_server_error(error, JsonRpcException)

    def show_error(self, message: str) -> None:
        logger.info("%s", message)
        self.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=message))

    def report_server_error(self, error: Exception, source: Any) -> None:
        if isinstance(error, _Answered):
            return
        if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
            logger.info("parse error: %s", error)
            self.protocol.send_error(None, JsonRpcParseError.CODE,
                                     f"parse error: the message is not valid JSON ({error})")
            return
        if isinstance(error, JsonRpcException):  # answered already (invalid params, unknown method)
            logger.info("%s", error)
            return
        logger.error("internal error", exc_info=error)

    def publish(self, entry: OpenDocument) -> None:
        """Diagnostics for a document: its problems and, with a classifier, its class."""
        here = types.Range(types.Position(0, 0), types.Position(0, 0))
        diags = [types.Diagnostic(here, m, severity=types.DiagnosticSeverity.Error, source="vqt")
                 for m in (entry.problem, entry.refused) if m]
        found = self.store.surprising(entry)
        lines = LineIndex(entry.text) if found else None
        for i, bits in found:
            s, e = entry.doc.token_span(i)
            r = lines.lsp_range(s, e, self.store.encoding)
            rng = types.Range(types.Position(**r["start"]), types.Position(**r["end"]))
            diags.append(types.Diagnostic(rng, f"surprising: `{entry.text[s:e]!r}` has {surprisal_text(bits)}",
                                          severity=types.DiagnosticSeverity.Information,
                                          code="surprisal", source="vqt", data={"token": i, "bits": bits}))
        probs = self.store.classify(entry)
        if probs is not None:
            k = max(range(len(probs)), key=probs.__getitem__)
            diags.append(types.Diagnostic(here, f"VQT class {k} (p={probs[k]:.4f})", source="vqt",
                                          severity=types.DiagnosticSeverity.Information,
                                          data={"class": k, "probabilities": probs}))
        self.text_document_publish_diagnostics(types.PublishDiagnosticsParams(entry.uri, diags, entry.version))

    def notified(self, what: str, uri: str, action: Callable[[], Any]) -> None:
        """Run a notification's action; errors become a message and a diagnostic, and change nothing."""
        try:
            action()
        except (LookupError, ValueError) as e:
            message = f"{what} for {uri} refused: {e}"
            self.show_error(message)
            if uri not in self.store.docs:
                return
            self.store.docs[uri].refused = message
        if uri in self.store.docs:
            self.publish(self.store.docs[uri])

    @staticmethod
    def answered(query: Callable[[], T]) -> T:
        """Run a request's query; errors become JSON-RPC invalid-params errors with the reason."""
        try:
            return query()
        except (LookupError, ValueError) as e:
            raise JsonRpcInvalidParams(message=str(e)) from None


def _change_dict(change: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"text": change.text}
    r = getattr(change, "range", None)
    if r is not None:
        out["range"] = {"start": {"line": r.start.line, "character": r.start.character},
                        "end": {"line": r.end.line, "character": r.end.character}}
    return out


def build_server(store: DocumentStore, n_completions: int = 10, log_level: int = logging.WARNING) -> VQTServer:
    server = VQTServer(store, n_completions, log_level)

    @server.feature(types.INITIALIZE)
    def initialize(ls: VQTServer, params: types.InitializeParams) -> None:
        enc = ls.workspace.position_encoding or "utf-16"
        store.encoding = getattr(enc, "value", enc)
        if params.trace is not None:
            ls.trace(params.trace)

    @server.feature(types.SET_TRACE)
    def set_trace(ls: VQTServer, params: types.SetTraceParams) -> None:
        ls.trace(params.value)

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: VQTServer, params: types.DidOpenTextDocumentParams) -> None:
        td = params.text_document
        ls.notified("didOpen", td.uri, lambda: store.open(td.uri, td.text, td.version))

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: VQTServer, params: types.DidChangeTextDocumentParams) -> None:
        td = params.text_document
        changes = [_change_dict(c) for c in params.content_changes]
        ls.notified("didChange", td.uri, lambda: store.change(td.uri, changes, td.version))

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: VQTServer, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.notified("didClose", uri, lambda: store.close(uri))
        ls.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri, []))

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    def completion(ls: VQTServer, params: types.CompletionParams) -> types.CompletionList:
        pos = params.position
        found = ls.answered(lambda: store.completions(params.text_document.uri, pos.line, pos.character,
                                                      ls.n_completions))
        items = [types.CompletionItem(label=s.text if s.text.strip() else repr(s.text),
                                      kind=types.CompletionItemKind.Text, detail=f"p={s.probability:.4f}", sort_text=f"{rank:04d}",
                                      text_edit=types.TextEdit(types.Range(pos, pos), s.text),
                                      data={"token_id": s.token_id, "logit": s.logit, "probability": s.probability})
                 for rank, s in enumerate(found)]
        return types.CompletionList(is_incomplete=False, items=items)

    @server.feature(types.TEXT_DOCUMENT_HOVER)
    def hover(ls: VQTServer, params: types.HoverParams) -> types.Hover:
        pos = params.position
        text = ls.answered(lambda: store.describe(params.text_document.uri, pos.line, pos.character))
        return types.Hover(types.MarkupContent(types.MarkupKind.Markdown, text))

    @server.command("vqt.inspect")
    def inspect(ls: VQTServer, *args: Any) -> dict[str, Any]:
        if not args or not isinstance(args[0], str) or len(args) > 2:
            raise JsonRpcInvalidParams(message="vqt.inspect takes [uri] or [uri, full]")
        return ls.answered(lambda: store.inspect(args[0], bool(args[1]) if len(args) == 2 else False))

    return server


def main(args: argparse.Namespace) -> int:
    """Serve over stdio until the client says exit (``vqt lsp``); returns the exit status."""
    from vqt.apps.loading import document_options, load_model

    level = getattr(logging, args.log_level.upper())
    handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG, handlers=[handler], force=True)
    model, name, tok = load_model(args.model, args.dtype, args.tokenizer)
    options = document_options(args, model)  # resolves (compiles) the backend before any request can wait on it
    store = DocumentStore(model, tok, max_live=args.max_live, state_dir=args.state_dir, dense=args.dense,
                          options=options, surprisal_bits=args.surprisal_bits, max_surprising=args.max_surprising)
    server = build_server(store, args.completions, level)
    handler.addFilter(server.log_filter)
    # What is loaded by now (torch, the model, the tokenizer: ~180k Python objects) lives as long as the
    # server. A full collection walks all of them (~110 ms here), a stall for whichever keystroke it falls
    # in (rare: they come once enough new objects have survived); frozen, they are out of the collector's
    # reach and a full collection walks only the newer ones.
    gc.collect()
    gc.freeze()
    logger.info("vqt lsp: model %s: %s; backend %s", name, model.describe(), options.backend)
    return server.start_io()
