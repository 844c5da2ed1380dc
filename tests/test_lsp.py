"""`vqt lsp` driven over stdio by real clients (pygls' LanguageClient, and a raw JSON-RPC client for
malformed traffic), its results checked against a dense recomputation done in this process."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.client import LanguageClient

from helpers import dense_surprisal, tiny_model
from lsp_helpers import RawClient, lsp_position, lsp_range
from vqt import TextDocument, VQTModel
from vqt.apps.lsp import DocumentStore, FrameReader, next_tokens
from vqt.engine.macs import dense_macs
from vqt.text.persist import state_digest
from vqt.text.tokenizer import Tokenizer

TOK = Tokenizer.default()
K = 10  # completion items per request (the server's default)
MAX_LEN = 160


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model(vocab_size=TOK.vocab_size, max_len=MAX_LEN, window=16.0, n_classes=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return VQTModel.from_pretrained(model_dir)  # bitwise the server's model


def check_dense(model: VQTModel, info: dict, text: str):
    """The server's state of ``text`` (from vqt.inspect) against a dense forward on the same tokens and positions."""
    assert info["text"] == text
    assert info["tokens"] == TOK.encode(text)
    out = model.forward_dense(info["tokens"], info["positions"])
    assert out.codes.tolist() == info["codes"]
    pooled = out.hidden.mean(0) if info["tokens"] else torch.zeros(model.config.d_model, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(info["pooled"], dtype=torch.float64), pooled, atol=1e-9, rtol=0)
    return out


def dense_completions(model: VQTModel, text: str, cursor: int, out) -> list:
    """What the completion at code-point ``cursor`` must be: the dense logits of the last token ending there."""
    ends = [e for _, e in TOK.encode_with_offsets(text)[1]]
    before = [i for i, e in enumerate(ends) if e <= cursor]
    with torch.no_grad():
        return next_tokens(model.logits(out.hidden[before[-1]]), TOK, K) if before else []


HOVER = re.compile(r"per layer: ([\d, ]+) of (\d+) tokens.*MACs: (\d+) spent vs (\d+) for a dense forward: (\d+) saved",
                   re.S)


# --------------------------------------------------------------- pygls client
class Editor:
    """pygls' LanguageClient with this test's own copy of each document and a mirror TextDocument."""

    def __init__(self, model: VQTModel, client: LanguageClient) -> None:
        self.model, self.client = model, client
        self.texts: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        self.mirrors: dict[str, TextDocument] = {}
        self.diagnostics: dict[str, types.PublishDiagnosticsParams] = {}

        @client.feature(types.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        def on_diagnostics(ls: LanguageClient, params: types.PublishDiagnosticsParams) -> None:
            self.diagnostics[params.uri] = params

    @classmethod
    async def start(cls, model: VQTModel, args: list[str], log) -> "Editor":
        client = LanguageClient("vqt-test", "1")
        editor = cls(model, client)
        await client.start_io(sys.executable, "-m", "vqt", "lsp", *args, "--log", str(log))
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities()))
        client.initialized(types.InitializedParams())
        return editor

    async def stop(self) -> None:
        await self.client.shutdown_async(None)
        self.client.exit(None)
        await self.client.stop()

    def open(self, uri: str, text: str) -> None:
        self.texts[uri], self.versions[uri] = text, 1
        self.mirrors[uri] = TextDocument(self.model, TOK, text, backend="auto")  # as the server resolves it
        item = types.TextDocumentItem(uri, "plaintext", 1, text)
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(item))

    def change(self, uri: str, edits: list[tuple[int, int, str]]) -> int:
        """One didChange made of code-point edits applied in order; returns the cursor after the last one."""
        text, changes = self.texts[uri], []
        for s, e, new in edits:
            changes.append({"range": lsp_range(text, s, e), "text": new})
            text = text[:s] + new + text[e:]
        self.texts[uri] = text
        self.versions[uri] += 1
        self.mirrors[uri].apply_changes(changes, self.versions[uri])
        events = [types.TextDocumentContentChangePartial(
            types.Range(types.Position(**c["range"]["start"]), types.Position(**c["range"]["end"])), c["text"])
            for c in changes]
        self.client.text_document_did_change(types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(self.versions[uri], uri), events))
        return edits[-1][0] + len(edits[-1][2])

    async def inspect(self, uri: str) -> dict:
        return await self.client.workspace_execute_command_async(types.ExecuteCommandParams("vqt.inspect", [uri, True]))

    async def check(self, uri: str, cursor: int) -> None:
        """Completion, hover, diagnostics and the whole state against the mirror and a dense forward."""
        text, mirror = self.texts[uri], self.mirrors[uri]
        pos = types.Position(**lsp_position(text, cursor))
        doc_id = types.TextDocumentIdentifier(uri)
        items = (await self.client.text_document_completion_async(types.CompletionParams(doc_id, pos))).items
        hover = (await self.client.text_document_hover_async(types.HoverParams(doc_id, pos))).contents.value
        info = await self.inspect(uri)
        out = check_dense(self.model, info, text)
        assert info["state_sha256"] == state_digest(mirror.doc) and info["version"] == self.versions[uri]

        expected = dense_completions(self.model, text, cursor, out)
        assert [it.data["token_id"] for it in items] == [s.token_id for s in expected]
        assert all(abs(it.data["logit"] - s.logit) < 1e-9 and it.text_edit.new_text == s.text
                   and it.text_edit.range.start == pos for it, s in zip(items, expected))

        st_ = mirror.last_stats
        dirty, n, macs, dense, saved = HOVER.search(hover).groups()
        assert [int(x) for x in dirty.split(",")] == st_.dirty_per_layer and int(n) == len(info["tokens"])
        assert int(macs) == st_.macs and int(dense) == dense_macs(self.model.config, torch.tensor(info["positions"]))
        assert int(saved) == int(dense) - int(macs)

        diag = self.diagnostics[uri]
        assert diag.version == self.versions[uri]
        with torch.no_grad():
            probs = torch.softmax(self.model.classify(out.hidden.mean(0)), -1)
        (cls_diag,) = [d for d in diag.diagnostics if d.data is not None]
        torch.testing.assert_close(torch.tensor(cls_diag.data["probabilities"], dtype=torch.float64), probs,
                                   atol=1e-9, rtol=0)
        assert cls_diag.message.startswith(f"VQT class {int(probs.argmax())} ")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


TEXT = "Café owners in Zürich met 東京 people.\nThe 😀 emoji and the 🦀 crab walked.\r\nLast line"


def test_next_tokens_follow_the_whole_vocabulary_order_with_ties_and_undecodable_tokens():
    """next_tokens sorts only the top candidates: the same tokens, in the same order (ties by id), as the whole
    vocabulary's stable order filtered to tokens that decode to text, also when the likeliest tokens do not
    decode and the candidates must widen; probabilities as a float64 softmax."""
    decodes = [bool(TOK.decode([t])) and "\ufffd" not in TOK.decode([t]) for t in range(TOK.vocab_size)]
    bad = torch.tensor([t for t, ok in enumerate(decodes) if not ok])
    assert len(bad) > 100  # (byte tokens of multi-byte characters)
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        logits = torch.randn(TOK.vocab_size, generator=gen).round(decimals=1)  # many ties
        if trial % 2:
            logits[bad] += 10.0  # the likeliest tokens do not decode: more than the first candidates are needed
        probs = torch.softmax(logits.double(), -1)
        order = [t for t in torch.argsort(logits, descending=True, stable=True).tolist() if decodes[t]]
        for k in (1, 5, 60):
            got = next_tokens(logits, TOK, k)
            assert [s.token_id for s in got] == order[:k], (trial, k)
            assert all(abs(s.probability - float(probs[s.token_id])) < 1e-12 for s in got)


def test_typing_session_matches_dense(model, model_dir, tmp_path):
    async def session():
        ed = await Editor.start(model, ["--model", str(model_dir), "--dtype", "float64"], tmp_path / "log")
        try:
            uri = "file:///typing.txt"
            ed.open(uri, TEXT)
            cur = TEXT.index("people.") + len("people.")
            for ch in " Hi 🦀!":  # typing, one character (one or two UTF-16 units) per change
                cur = ed.change(uri, [(cur, cur, ch)])
                await ed.check(uri, cur)
            for _ in range(2):  # backspace over "!" then over the crab's surrogate pair
                cur = ed.change(uri, [(cur - 1, cur, "")])
                await ed.check(uri, cur)
            smile = ed.texts[uri].index("😀")
            await ed.check(uri, ed.change(uri, [(smile, smile + 1, "🙂🙂")]))
            zurich = ed.texts[uri].index("Zürich") + len("Zürich")
            two_in_one = [(0, 4, "Tea"), (zurich - 1, zurich - 1, " 東")]  # two changes, one didChange
            await ed.check(uri, ed.change(uri, two_in_one))
            nl = ed.texts[uri].index("crab")
            await ed.check(uri, ed.change(uri, [(nl, nl, "\n")]))
            await ed.check(uri, ed.change(uri, [(len(ed.texts[uri]), len(ed.texts[uri]), " ✓")]))
            # The server froze what it had loaded (a full collection would walk it inside some keystroke).
            assert (await ed.inspect(uri))["gc_frozen"] > 10_000
        finally:
            await ed.stop()

    run(session())


def test_lru_eviction_restores_exactly(model, model_dir, tmp_path):
    states = tmp_path / "states"

    async def session():
        ed = await Editor.start(model, ["--model", str(model_dir), "--dtype", "float64", "--max-live", "1",
                                        "--state-dir", str(states)], tmp_path / "log")
        try:
            a, b = "file:///a.txt", "file:///b.txt"

            async def expect(live: str, evictions: int, restores: int) -> None:
                for uri in (a, b):
                    info = await ed.inspect(uri)  # peeks at a saved state without restoring it
                    assert (info["live"], info["saved"]) == (uri == live, uri != live)
                    assert (info["evictions"], info["restores"], info["n_live"]) == (evictions, restores, 1)
                    assert info["state_sha256"] == state_digest(ed.mirrors[uri].doc)
                    check_dense(model, info, ed.texts[uri])
                assert len(list(states.glob("*.vqts"))) == 1

            ed.open(a, TEXT)
            ed.open(b, "Another 文書 with 😀 in it.\nSecond line.")
            await expect(live=b, evictions=1, restores=0)
            await ed.check(a, ed.change(a, [(5, 5, "ñ")]))  # restores a, evicts b
            await expect(live=a, evictions=2, restores=1)
            cur = ed.change(b, [(8, 10, "document")])
            await expect(live=b, evictions=3, restores=2)
            await ed.check(b, cur)
            await ed.check(a, ed.change(a, [(0, 0, "🦀 ")]))
            await expect(live=a, evictions=4, restores=3)
            ed.client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(b)))
            info = await ed.inspect(a)
            assert info["n_live"] == 1 and not list(states.glob("*.vqts"))
            with pytest.raises(JsonRpcInvalidParams, match="unknown document file:///b.txt"):
                await ed.inspect(b)
        finally:
            await ed.stop()

    run(session())


# ------------------------------------------------------------ raw JSON-RPC
@pytest.fixture(scope="module")
def raw(model_dir, tmp_path_factory):
    client = RawClient(["--model", str(model_dir), "--dtype", "float64", "--max-live", "1", "--max-tokens", str(MAX_LEN)],
                       tmp_path_factory.mktemp("raw") / "log")
    client.start()
    yield client
    assert client.close() == 0


def error_of(resp: dict, code: int, match: str) -> None:
    assert "error" in resp, resp
    assert resp["error"]["code"] == code and re.search(match, resp["error"]["message"]), resp


def last_message(client: RawClient) -> str:
    return [m for m in client.received if m.get("method") == "window/showMessage"][-1]["params"]["message"]


def open_doc(client: RawClient, uri: str, text: str, version: int = 1) -> None:
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "plaintext", "version": version,
                                                            "text": text}})


def change(client: RawClient, uri: str, version: int, changes: list) -> None:
    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version},
                                             "contentChanges": changes})


def at(uri: str, line: int, character: int) -> dict:
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}}


def test_malformed_traffic_gets_clear_errors(raw, model):
    id_null = lambda m: "error" in m and m.get("id") is None  # noqa: E731
    raw.send_body(b"{not json")
    error_of(raw.wait(id_null), -32700, "parse error: the message is not valid JSON")
    raw.send_body(b"[1, 2]")
    error_of(raw.wait(id_null), -32600, "batches are not supported")
    raw.send({"jsonrpc": "1.0", "id": 71, "method": "textDocument/hover", "params": {}})
    error_of(raw.wait(lambda m: m.get("id") == 71), -32600, '"jsonrpc" must be "2.0"')
    error_of(raw.request("vqt/noSuchMethod", {}), -32601, "noSuchMethod")
    error_of(raw.request("textDocument/completion", {"textDocument": {"uri": "file:///x"}}), -32602,
             r"required field missing @ \$.params.position")
    error_of(raw.request("textDocument/hover", at("file:///x", -1, 0)), -32602, "invalid params")
    error_of(raw.request("textDocument/completion", at("file:///nope.txt", 0, 0)), -32602,
             "unknown document file:///nope.txt: it is not open")

    uri, text = "file:///robust.txt", "Zürich 😀 party\nline two"
    open_doc(raw, uri, text)
    error_of(raw.request("textDocument/completion", at(uri, 9, 0)), -32602, "line 9 is past the end of the document")
    error_of(raw.request("textDocument/hover", at(uri, 0, 8)), -32602, "inside the surrogate pair of '😀'")
    assert raw.request("textDocument/completion", at(uri, 0, 99))["result"]["items"]  # a character past the end clamps

    inside_pair = {"line": 0, "character": 8}
    refused = [([{"range": {"start": inside_pair, "end": inside_pair}, "text": "x"}], 2,
                "didChange for file:///robust.txt refused: content change 0: position 0:8 is inside the surrogate"),
               ([{"range": lsp_range(text, 0, 1), "text": "x"}], 1, "stale version 1: the document is at version 1"),
               ([{"range": lsp_range(text, 0, 1), "text": "bad \ud800"}], 2, "lone surrogate"),
               ([{"range": {"start": {"line": -3, "character": 0}, "end": {"line": 0, "character": 0}}, "text": ""}], 2,
                "invalid params for 'textDocument/didChange'")]
    for changes, version, match in refused:
        change(raw, uri, version, changes)
        info = raw.inspect(uri, full=True)
        assert re.search(match, last_message(raw)), last_message(raw)
        assert info["version"] == 1
        check_dense(model, info, text)
    change(raw, "file:///unknown.txt", 2, [{"text": "x"}])
    raw.inspect(uri)
    assert "unknown document file:///unknown.txt" in last_message(raw)

    # A document longer than the server's --max-tokens is followed as text, without a model state, until it fits.
    long_text = "word " * (MAX_LEN + 20)
    change(raw, uri, 2, [{"range": lsp_range(text, len(text), len(text)), "text": long_text}])
    diag = raw.wait(lambda m: m.get("method") == "textDocument/publishDiagnostics")
    assert f"more than the limit of {MAX_LEN}" in diag["params"]["diagnostics"][0]["message"]
    info = raw.inspect(uri, full=True)
    assert (info["version"], info["live"], info["saved"], info["text"]) == (2, False, False, text + long_text)
    error_of(raw.request("textDocument/completion", at(uri, 0, 0)), -32602, "more than the limit")
    change(raw, uri, 3, [{"range": lsp_range(text + long_text, len(text), len(text + long_text)), "text": " ok"}])
    check_dense(model, raw.inspect(uri, full=True), text + " ok")
    open_doc(raw, "file:///big.txt", long_text)
    assert raw.inspect("file:///big.txt")["problem"].startswith("the document has")
    for u in (uri, "file:///big.txt"):
        raw.notify("textDocument/didClose", {"textDocument": {"uri": u}})


def test_dense_mode_store(model):
    store = DocumentStore(model, TOK, dense=True)
    store.open("u", TEXT, 1)
    store.change("u", [{"range": lsp_range(TEXT, 4, 4), "text": " 😀"}], 2)
    doc = store.docs["u"].doc
    assert doc.text == TEXT[:4] + " 😀" + TEXT[4:] and doc.doc.positions.tolist() == list(range(len(doc.doc)))
    assert "Dense mode" in store.describe("u", 0, 0)


# ------------------------------------------------------------------ fuzzing
CHARS = st.sampled_from(list("ab é東.\n") + ["😀", "\r\n", "🦀"])
SHORT = st.lists(CHARS, max_size=12).map("".join)
GARBAGE = [b"{", b"null", b"\xff\xfe", b'{"jsonrpc": "2.0", "id": "g", "method": "textDocument/hover", "params": 3}',
           b'{"jsonrpc": "2.0", "method": "textDocument/didChange", "params": {"textDocument": {}}}']
_uris = itertools.count()


def boundary(text: str, i: int) -> int:
    return i - 1 if text[i - 1:i + 1] == "\r\n" else i  # not between \r and \n


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_message_streams_leave_documents_exact(raw, model, data):
    docs: dict[str, list] = {}  # uri -> [text the server must hold, its version]
    for _ in range(data.draw(st.integers(1, 2))):
        uri = f"file:///fuzz/{next(_uris)}.txt"
        docs[uri] = [data.draw(SHORT), 1]
        open_doc(raw, uri, docs[uri][0])
    for _ in range(data.draw(st.integers(2, 7))):
        uri = data.draw(st.sampled_from(sorted(docs)))
        text, version = docs[uri]
        kind = data.draw(st.sampled_from(["edit", "edit", "edit", "clamped", "pair", "stale", "paste", "reset",
                                          "garbage", "query"]))
        if kind in ("edit", "clamped", "paste"):
            s = boundary(text, data.draw(st.integers(0, len(text))))
            e = boundary(text, data.draw(st.integers(s, len(text))))
            new = "word " * (MAX_LEN + 5) if kind == "paste" else data.draw(SHORT)
            rng = lsp_range(text, s, e)
            if kind == "clamped":  # past the last line: the end of the text
                rng["end"] = {"line": lsp_position(text, len(text))["line"] + data.draw(st.integers(1, 3)),
                              "character": data.draw(st.integers(0, 3))}
                e = len(text)
            change(raw, uri, version + data.draw(st.integers(1, 3)), [{"range": rng, "text": new}])
            docs[uri] = [text[:s] + new + text[e:], version + 1]  # the exact version is checked through inspect
        elif kind == "reset":
            new = data.draw(SHORT)
            change(raw, uri, version + 1, [{"text": new}])
            docs[uri] = [new, version + 1]
        elif kind == "pair" and any(ord(c) > 0xFFFF for c in text):
            i = next(i for i, c in enumerate(text) if ord(c) > 0xFFFF)
            pos = lsp_position(text, i)
            change(raw, uri, version + 1, [{"range": {"start": {**pos, "character": pos["character"] + 1},
                                                      "end": lsp_position(text, len(text))}, "text": ""}])
        elif kind == "stale":
            change(raw, uri, version, [{"text": "stale"}])
        elif kind == "garbage":
            raw.send_body(data.draw(st.sampled_from(GARBAGE)))
        else:
            line = data.draw(st.integers(0, text.count("\n") + text.count("\r") - text.count("\r\n") + 1))
            resp = raw.request(data.draw(st.sampled_from(["textDocument/completion", "textDocument/hover"])),
                               at(uri, line, data.draw(st.integers(0, 3))))
            assert "result" in resp or resp["error"]["code"] == -32602, resp
        info = raw.inspect(uri)
        docs[uri][1] = info["version"]
        assert info["text"] == docs[uri][0]
    for uri, (text, _) in docs.items():  # every open document against a dense recomputation
        info = raw.inspect(uri, full=True)
        if len(TOK.encode(text)) > MAX_LEN:
            assert info["problem"] and not info["live"] and not info["saved"]
        else:
            assert not info["problem"]
            check_dense(model, info, text)
        raw.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


# ------------------------------------------------------------ broken framing and lifecycle
def fresh(model_dir, tmp_path, *extra: str) -> RawClient:
    client = RawClient(["--model", str(model_dir), "--dtype", "float64", *extra], tmp_path / "log")
    client.start()
    return client


def frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def broken_frames(body: bytes) -> dict[str, bytes]:
    """The four ways a frame breaks, each around ``body``."""
    return {"a header without Content-Length": b"Content-Type: application/json\r\n\r\n" + body,
            "Content-Length 'abc' is not a number": b"Content-Length: abc\r\n\r\n" + body,
            "is longer than the message": b"Content-Length: %d\r\n\r\n" % (len(body) + 40) + body,
            "not valid JSON": b"Content-Length: %d\r\n\r\n" % (len(body) - 7) + body}


def test_frame_reader_splits_any_chunking_and_resynchronizes():
    import random

    rng = random.Random(0)
    good = [frame({"jsonrpc": "2.0", "id": i, "method": "m", "params": {"text": "é\r\n😀" * i}}) for i in range(20)]
    broken = list(broken_frames(json.dumps({"jsonrpc": "2.0", "method": "lost"}).encode()).values())
    stream = b"".join(g + (rng.choice(broken) if i % 3 == 1 else b"") for i, g in enumerate(good))  # 7 broken
    for _ in range(20):
        reader, got, cut = FrameReader(), [], 0
        while cut < len(stream):
            step = rng.randint(1, 300)
            reader.feed(stream[cut:cut + step])
            got += list(reader.frames())
            cut += step
        reader.feed(b"")
        got += list(reader.frames())
        assert [json.loads(f)["id"] for f in got if isinstance(f, bytes) and f.endswith(b"}}")] == list(range(20))
        assert len([f for f in got if isinstance(f, str) or not f.endswith(b"}}")]) == 7  # one per broken frame


def test_broken_frames_get_parse_errors_and_the_server_keeps_serving(model, model_dir, tmp_path):
    client = fresh(model_dir, tmp_path, "--log-level", "info")
    try:
        uri = "file:///framing.txt"
        open_doc(client, uri, TEXT)
        bad_change = {"jsonrpc": "2.0", "method": "textDocument/didChange",
                      "params": {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"text": "lost"}]}}
        for i, (what, data) in enumerate(broken_frames(json.dumps(bad_change).encode()).items()):
            request = {"jsonrpc": "2.0", "id": f"after-{i}", "method": "textDocument/hover", "params": at(uri, 0, 3)}
            client.send_raw(data + frame(request))  # the broken frame and the next request in one write
            error = client.wait(lambda m: m.get("id") is None and "error" in m, timeout=30)
            error_of(error, -32700, "parse error: .*" + what)
            assert "result" in client.wait(lambda m: m.get("id") == f"after-{i}", timeout=30)
        check_dense(model, client.inspect(uri, full=True), TEXT)  # none of the broken changes landed
        assert client.request("shutdown")["result"] is None
        error_of(client.request("textDocument/hover", at(uri, 0, 0)), -32600,
                 "the server is shut down: 'textDocument/hover' refused")
        client.notify("exit", None)
        assert client.proc.wait(timeout=30) == 0
    finally:
        client.close() if client.proc.poll() is None else client._stderr.close()
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and "INFO vqt.apps.lsp: broken frame: a header without Content-Length" in log


def test_exit_without_shutdown_is_status_1(model_dir, tmp_path):
    client = fresh(model_dir, tmp_path)
    client.notify("exit", None)
    assert client.proc.wait(timeout=30) == 1
    client._stderr.close()


def test_handled_errors_are_one_line_at_the_level_the_client_chooses(model_dir, tmp_path):
    (tmp_path / "quiet").mkdir()
    quiet = fresh(model_dir, tmp_path / "quiet")
    error_of(quiet.request("textDocument/hover", {"textDocument": {}}), -32602, "invalid params")
    error_of(quiet.request("vqt/none", {}), -32601, "none")
    assert quiet.close() == 0
    assert "Traceback" not in (tmp_path / "quiet" / "log").read_text()
    assert "invalid params" not in (tmp_path / "quiet" / "log").read_text()  # --log-level warning (the default)

    (tmp_path / "traced").mkdir()
    traced = RawClient(["--model", str(model_dir)], tmp_path / "traced" / "log")
    traced.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}, "trace": "messages"})
    traced.notify("initialized", {})
    error_of(traced.request("textDocument/hover", {"textDocument": {}}), -32602, "invalid params")
    assert traced.close() == 0
    log = (tmp_path / "traced" / "log").read_text()
    assert "Traceback" not in log and re.search(r"INFO .*invalid params for 'textDocument/hover'", log), log


def test_no_request_waits_on_a_build(model_dir, tmp_path, monkeypatch):
    """The fused backend is compiled before the server reads its first message, so initialize is the
    only answer that can be late, and documents opened after it are answered at once."""
    import shutil
    import time

    if shutil.which("ninja") is None:
        pytest.skip("building the cpu extension needs ninja")
    monkeypatch.setenv("VQT_BUILD_DIR", str(tmp_path / "empty-cache"))
    t0 = time.monotonic()
    client = RawClient(["--model", str(model_dir), "--backend", "cpu"], tmp_path / "log")
    try:
        client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}}, timeout=600)
        built = time.monotonic() - t0
        client.notify("initialized", {})
        stderr = (tmp_path / "log.stderr").read_text()
        assert "vqt: compiling the vqt_ops_cpu" in stderr and re.search(r"compiled the vqt_ops_cpu\w* extension "
                                                                         r"\(took \d+ s\)", stderr), stderr
        t1 = time.monotonic()
        open_doc(client, "file:///after-build.txt", TEXT)
        assert "result" in client.request("textDocument/hover", at("file:///after-build.txt", 0, 2))
        assert time.monotonic() - t1 < min(10.0, built / 2), (time.monotonic() - t1, built)
    finally:
        assert client.close() == 0


# ------------------------------------------------------------ a long fuzzed stream
class Mirror:
    """This test's own copy of a document, with an independent UTF-16 position -> offset table."""

    def __init__(self, text: str) -> None:
        self.text, self.version = text, 1

    def offsets(self) -> dict[tuple[int, int], int]:
        table = {}
        for i in range(len(self.text) + 1):
            if self.text[i - 1:i + 1] != "\r\n":
                p = lsp_position(self.text, i)
                table.setdefault((p["line"], p["character"]), i)
        return table

    def resolve(self, line: int, character: int) -> Optional[int]:
        """The offset of an LSP position (a character past the line's end clamps), None inside a surrogate pair."""
        table = self.offsets()
        if (line, character) in table:
            return table[(line, character)]
        ends = [(c, i) for (ln, c), i in table.items() if ln == line]
        last_char, last = max(ends)
        return last if character > last_char else None


def test_a_long_fuzzed_stream_leaves_the_server_serving_and_exact(model, model_dir, tmp_path):
    import random
    import time

    rng, started = random.Random(13), time.monotonic()
    client = fresh(model_dir, tmp_path, "--max-live", "2")
    starts = ["", "ab é", TEXT[:40], "x\r\ny\rz 😀\n"]
    docs = {f"file:///stream/{i}.txt": Mirror(rng.choice(starts)) for i in range(3)}
    for uri, m in docs.items():
        open_doc(client, uri, m.text)
    requests, sent = [], 0
    try:
        while sent < 3000 and time.monotonic() - started < 60:
            uri = rng.choice(sorted(docs))
            m = docs[uri]
            kind = rng.choices(["edit", "stale", "broken", "garbage", "request"], [12, 2, 1, 1, 2])[0]
            if kind == "edit":
                lines = lsp_position(m.text, len(m.text))["line"]
                pos = [(rng.randint(0, lines), rng.randint(0, 12)) for _ in range(2)]
                start, end = sorted(pos)
                pieces = ["a", "b", " ", "é", "東", "😀", "\n", "\r\n"]
                new = "" if len(m.text) > 150 and rng.random() < 0.7 else \
                    "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
                version = m.version + rng.randint(1, 3)
                change(client, uri, version, [{"range": {"start": {"line": start[0], "character": start[1]},
                                                         "end": {"line": end[0], "character": end[1]}}, "text": new}])
                s, e = m.resolve(*start), m.resolve(*end)
                if s is not None and e is not None and s <= e:  # else refused: inside a surrogate pair
                    m.text, m.version = m.text[:s] + new + m.text[e:], version
            elif kind == "stale":
                change(client, uri, m.version, [{"text": "stale"}])
            elif kind in ("broken", "garbage"):
                lost = {"jsonrpc": "2.0", "method": "textDocument/didChange",
                        "params": {"textDocument": {"uri": uri, "version": m.version + 1},
                                   "contentChanges": [{"text": "lost"}]}}
                client.send_raw(rng.choice(list(broken_frames(json.dumps(lost).encode()).values())) if kind == "broken"
                                else frame(lost)[:-2] + b"\xff\xfe" if rng.random() < 0.5
                                else b"Content-Length: 2\r\n\r\n[]")
            else:
                request = {"jsonrpc": "2.0", "id": f"q{sent}", "method": rng.choice(["textDocument/completion",
                                                                                      "textDocument/hover"]),
                           "params": at(uri, rng.randint(0, 3), rng.randint(0, 5))}
                requests.append(request["id"])
                client.send_raw(frame(request))
            sent += 1
        assert sent >= 500, f"only {sent} messages in the time budget"
        assert client.proc.poll() is None
        for uri, m in docs.items():  # after everything: alive, answering, and exact
            info = client.inspect(uri, full=True)
            assert (info["text"], info["version"]) == (m.text, m.version)
            check_dense(model, info, m.text)
        answered = {msg.get("id") for msg in client.received if "method" not in msg}
        assert set(requests) <= answered
        for msg in client.received:
            if msg.get("id") in requests:
                assert "result" in msg or msg["error"]["code"] == -32602, msg
    finally:
        assert client.close() == 0


# ------------------------------------------------------------ a real editor
NEOVIM_SESSION = Path(__file__).resolve().parent / "editors" / "neovim_session.lua"


def test_neovim_types_hovers_completes_and_gets_diagnostics(model, model_dir, tmp_path):
    """Headless Neovim with its built-in LSP client types into a buffer (tests/editors/neovim_session.lua);
    what it sees is checked here against a dense recomputation of the buffer's text."""
    import os
    import shutil
    import subprocess

    nvim = shutil.which("nvim")
    if nvim is None:
        pytest.skip("Neovim is not installed (apt-get install neovim; .ci/run installs it)")
    out, log = tmp_path / "nvim.json", tmp_path / "log"
    server = [sys.executable, "-m", "vqt", "lsp", "--model", str(model_dir), "--dtype", "float64", "--log", str(log),
              "--surprisal-bits", "0", "--max-surprising", "1000"]  # every token: all ranges are checked
    env = {**os.environ, "VQT_NVIM_CMD": json.dumps(server), "VQT_NVIM_FILE": str(tmp_path / "typed.txt"),
           "VQT_NVIM_OUT": str(out)}
    res = subprocess.run([nvim, "--headless", "--clean", "-c", f"luafile {NEOVIM_SESSION}"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.is_file(), (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    got = json.loads(out.read_text())
    assert "error" not in got, (got["error"], log.read_text()[-3000:] if log.is_file() else "")

    text = got["buffer"]
    assert "Café owners in" in text and text.endswith(" and left\nThe 🦀 crab walked away\n")
    info = got["inspect"]["result"]
    assert info["version"] == got["version"]
    # The server followed every keystroke exactly (Neovim's JSON keeps about 6 digits of the floats).
    assert info["text"] == text and info["tokens"] == TOK.encode(text)
    dense = model.forward_dense(info["tokens"], info["positions"])
    assert dense.codes.tolist() == info["codes"]
    torch.testing.assert_close(torch.tensor(info["pooled"], dtype=torch.float64), dense.hidden.mean(0),
                               atol=1e-5, rtol=1e-5)

    cursor = got["cursor"]["position"]
    offset = Mirror(text).resolve(cursor["line"], cursor["character"])
    assert text[:offset].endswith("The 🦀 c")
    expected = dense_completions(model, text, offset, dense)
    assert [item["data"]["token_id"] for item in got["completion"]["result"]["items"]] == [s.token_id for s in expected]
    assert got["hover"]["result"]["contents"]["value"].startswith(f"**VQT** version {got['version']}")

    assert "Next: " + ", ".join(f"`{s.text!r}` {s.probability:.1%}" for s in expected[:5]) in \
        got["hover"]["result"]["contents"]["value"]
    last = got["diagnostics"][-1]
    assert last["version"] == got["version"]
    with torch.no_grad():
        k = int(model.classify(dense.hidden.mean(0)).argmax())
    surprising = [d for d in last["diagnostics"] if d.get("code") == "surprisal"]
    assert [d["message"].split(" (")[0] for d in last["diagnostics"] if d.get("code") != "surprisal"] == \
        [f"VQT class {k}"]
    # Every token but the first, where it now stands in the text (after typing, a deletion inside a
    # line with non-ASCII text before it, and an append), with the dense forward's surprisal.
    bits = dense_surprisal(model, info["tokens"], info["positions"])
    spans = TOK.encode_with_offsets(text)[1]
    assert [d["range"] for d in surprising] == [lsp_range(text, s, e) for s, e in spans[1:]]
    np.testing.assert_allclose([d["data"]["bits"] for d in surprising], bits[1:], rtol=1e-5)


def test_surprising_tokens_follow_the_text_and_the_threshold(model):
    """Surprisal diagnostics (carried across edits) and hovers against a dense forward of each new text."""
    text = "Café owners in Zürich met on a Tuesday.\nThe 🦀 crab walked away"
    store = DocumentStore(model, TOK, surprisal_bits=None)
    store.open("u", text, 1)
    entry = store.docs["u"]
    assert store.surprising(entry) == []
    for version, (start, end, insert) in enumerate([(0, 0, "Oh. "), (len(text), len(text), " far"), (9, 15, "")],
                                                   start=2):
        store.change("u", [{"range": lsp_range(entry.text, start, end), "text": insert}], version)
        info = store.inspect("u", full=True)
        bits = dense_surprisal(model, info["tokens"], info["positions"])
        threshold = float(np.nanmedian(bits))
        store.surprisal_bits, store.max_surprising = threshold, 100
        got = store.surprising(entry)
        assert [i for i, _ in got] == [i for i in range(1, len(bits)) if bits[i] > threshold]
        np.testing.assert_allclose([b for _, b in got], bits[[i for i, _ in got]], rtol=0, atol=1e-9)
        store.max_surprising = 3  # the three most surprising, in text order
        assert [i for i, _ in store.surprising(entry)] == sorted(np.argsort(-np.nan_to_num(bits, nan=-1))[:3].tolist())
    # hover: the five most likely next tokens and the surprisal of the token before the cursor
    cursor = entry.text.index(" crab")
    hover = store.describe("u", **lsp_position(entry.text, cursor))
    out = model.forward_dense(info["tokens"], info["positions"])
    top = dense_completions(model, entry.text, cursor, out)[:5]
    assert "Next: " + ", ".join(f"`{s.text!r}` {s.probability:.1%}" for s in top) in hover
    i = max(j for j, (_, e) in enumerate(TOK.encode_with_offsets(entry.text)[1]) if e <= cursor)
    assert f"before the cursor: {bits[i]:.1f} bits" in hover
