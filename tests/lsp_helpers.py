"""Test utilities for editors: an independent LSP position oracle and a raw JSON-RPC client over stdio."""

from __future__ import annotations

import itertools
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional


def units(s: str, encoding: str = "utf-16") -> int:
    """The length of ``s`` in code units of ``encoding``, computed by Python's codecs."""
    return {"utf-16": len(s.encode("utf-16-le")) // 2, "utf-8": len(s.encode()), "utf-32": len(s)}[encoding]


def lsp_position(text: str, offset: int, encoding: str = "utf-16") -> dict[str, int]:
    """The LSP position of a code-point offset, computed from scratch (lines end at \\n, \\r\\n or \\r)."""
    line_start, line, i = 0, 0, 0
    while i < offset:
        if text[i] == "\r" and text[i + 1:i + 2] == "\n":
            if i + 2 > offset:
                break
            i += 2
        elif text[i] in "\r\n":
            i += 1
        else:
            i += 1
            continue
        line, line_start = line + 1, i
    return {"line": line, "character": units(text[line_start:offset], encoding)}


def lsp_range(text: str, start: int, end: int, encoding: str = "utf-16") -> dict[str, Any]:
    return {"start": lsp_position(text, start, encoding), "end": lsp_position(text, end, encoding)}


class RawClient:
    """Drives ``python -m vqt lsp`` over its stdin/stdout with hand-made JSON-RPC frames.

    Every message the server sends is kept in ``received`` (responses are also matched to
    their requests); ``request`` returns the whole response object, result or error.
    """

    def __init__(self, server_args: list[str], log: Path) -> None:
        self._stderr = open(log.with_suffix(".stderr"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "vqt", "lsp", *server_args, "--log", str(log)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self.received: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    self._inbox.put(None)
                    return
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                elif line in (b"\r\n", b"\n") and length is not None:
                    break
            self._inbox.put(json.loads(out.read(length)))

    def _next(self, timeout: float) -> dict:
        msg = self._inbox.get(timeout=timeout)
        if msg is None:
            raise RuntimeError(f"the server exited with code {self.proc.wait()}")
        self.received.append(msg)
        return msg

    def send_body(self, body: bytes) -> None:
        """One framed message with an arbitrary body."""
        self.send_raw(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are: broken frames, several frames at once."""
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message: Any) -> None:
        self.send_body(json.dumps(message).encode())

    def notify(self, method: str, params: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params: Any = None, timeout: float = 60) -> dict:
        msg_id = next(self._ids)
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return self.wait(lambda m: m.get("id") == msg_id and "method" not in m, timeout)

    def wait(self, predicate: Callable[[dict], bool], timeout: float = 60) -> dict:
        """The next message (from now on) that satisfies ``predicate``."""
        while True:
            msg = self._next(timeout)
            if predicate(msg):
                return msg

    def inspect(self, uri: str, full: bool = False) -> dict:
        resp = self.request("workspace/executeCommand", {"command": "vqt.inspect", "arguments": [uri, full]})
        assert "result" in resp, resp
        return resp["result"]

    def start(self, capabilities: Optional[dict] = None) -> dict:
        resp = self.request("initialize", {"processId": None, "rootUri": None, "capabilities": capabilities or {}})
        self.notify("initialized", {})
        return resp["result"]

    def close(self) -> int:
        try:
            self.request("shutdown", None, timeout=30)
            self.notify("exit", None)
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._stderr.close()
