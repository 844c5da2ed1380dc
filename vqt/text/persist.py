"""A Document's whole cached state: captured in memory (snapshots) and saved to disk.

The state is every tensor of the slot table (all capacity rows, free ones included), the
order and free lists and the engine settings, so a restored document allocates the same
slots and continues bit for bit as the original would.

File format, version 1: ``b"VQTSTATE\\n"``, one line of canonical JSON (the header), then a
safetensors payload. The header holds the format version, fingerprints of the model (config
and every weight, dtype included) and of the tokenizer, the engine settings, the caller's
metadata, the payload size and a SHA-256 over the rest of the header and the payload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vqt._files import atomic_write
from vqt.engine.document import Document, EditStats, model_key
from vqt.engine.macs import Baselines
from vqt.engine.options import DocumentOptions
from vqt.modeling.model import VQTModel
from vqt.text.tokenizer import Tokenizer

MAGIC = b"VQTSTATE\n"
FORMAT = "vqt-document-state"
FORMAT_VERSION = 1
_NOT_FUNCTION = ("extra", "min_spacing")  # config entries that do not change what the model computes
_TENSOR_TAG = "__tensor__"


@dataclass
class DocumentState:
    """A Document's cached tensors (slot table, order and free lists) and engine settings."""

    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]  # DocumentOptions.to_json()
    model: str  # fingerprint of the model that computed the tensors


def _hash_tensors(h: "hashlib._Hash", items: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


_model_fps: "weakref.WeakKeyDictionary[VQTModel, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_tokenizer_fps: "weakref.WeakKeyDictionary[Tokenizer, str]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: VQTModel) -> str:
    """SHA-256 of the config (less free-form metadata), the matmul dtype and every weight; cached until a
    weight or the matmul dtype changes."""
    key = model_key(model)
    hit = _model_fps.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    described = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_FUNCTION}
    if model.matmul_dtype != model.dtype:  # (absent otherwise: the fingerprints of states saved before it stay valid)
        described["matmul_dtype"] = str(model.matmul_dtype)
    h = hashlib.sha256(_canonical(described))
    _hash_tensors(h, model.state_dict().items())
    _model_fps[model] = (key, h.hexdigest())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's serialized JSON."""
    if tokenizer not in _tokenizer_fps:
        _tokenizer_fps[tokenizer] = hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()
    return _tokenizer_fps[tokenizer]


def state_digest(doc: Document) -> str:
    """SHA-256 of every tensor of ``doc.state_dict()``: equal digests mean bitwise-equal states."""
    h = hashlib.sha256()
    _hash_tensors(h, sorted(doc.state_dict().items()))
    return h.hexdigest()


# ------------------------------------------------------------------ in memory
def capture(doc: Document, copy: bool = True) -> DocumentState:
    """The document's whole state (cloned unless ``copy`` is False)."""
    t = doc.cache.state_dict()
    if copy:
        t = {k: v.clone() for k, v in t.items()}
    return DocumentState(t, doc.options.to_json(), model_fingerprint(doc.model))


def document_options(state: DocumentState) -> DocumentOptions:
    """The engine settings the state was captured with."""
    return DocumentOptions.from_json(state.settings)


def restore(doc: Document, state: DocumentState) -> None:
    """Replace ``doc``'s state by ``state`` (copied, so the state can be restored again).

    Refused with ValueError, leaving ``doc`` unchanged, when the state was computed with another
    model or its tensors do not fit the model's shapes and dtypes.
    """
    if state.model != model_fingerprint(doc.model):
        raise ValueError("the state was computed with another model (or the model's weights changed since)")
    src = state.tensors
    options = dataclasses.replace(document_options(state), backend=doc.options.backend)  # (the backend is the doc's)
    n = int(src["order"].numel()) if "order" in src else 0
    options.check_length(n, doc.cfg, "the saved state")
    if "tokens" in src and "order" in src:
        doc.model.check_inputs(src["tokens"][src["order"]])
    doc.cache.load_state_dict(src)  # checks shapes, dtypes and the slot partition before changing anything
    doc.configure(options)


def stats_to_json(stats: EditStats) -> dict[str, Any]:
    """An EditStats as JSON-able values (tensor fields become tagged lists)."""
    values = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    values["baselines"] = dataclasses.astuple(stats._baselines())
    values["recomputed_by_slot"] = stats.recomputed
    values["hidden_changed_of"] = stats.hidden_changed
    values["changed_slots"] = [t.tolist() for t in stats.changed_slots]
    return {k: {_TENSOR_TAG: v.tolist(), "dtype": str(v.dtype).removeprefix("torch.")} if isinstance(v, torch.Tensor)
            else v for k, v in values.items()}


def stats_from_json(d: dict[str, Any]) -> EditStats:
    """Inverse of ``stats_to_json``."""
    values = {k: torch.tensor(v[_TENSOR_TAG], dtype=getattr(torch, v["dtype"]))
              if isinstance(v, dict) and _TENSOR_TAG in v else v for k, v in d.items()}
    values["changed_slots"] = [torch.tensor(s, dtype=torch.long) for s in values.get("changed_slots", [])]
    if "recomputed" in values:  # written before the counts became lazy
        values["recomputed_by_slot"] = values.pop("recomputed")
    if "dense_macs" in values:  # written before the baselines' MACs became lazy
        values["baselines"] = (values.pop("dense_macs"), values.pop("prefix_macs"))
    base = tuple(values.get("baselines", (0, 0)))
    values["baselines"] = Baselines(*base) if len(base) == 3 else Baselines(base[0], base[1], base[1])  # no cone: prefix
    return EditStats(**values)


# -------------------------------------------------------------------- on disk
def _digest(header: dict, payload: bytes) -> str:
    return hashlib.sha256(_canonical(header) + b"\n" + payload).hexdigest()


def write_state(path: str | Path, state: DocumentState, tokenizer: Tokenizer, metadata: dict[str, Any]) -> None:
    """Write ``state`` and the caller's JSON-able ``metadata`` to ``path``, atomically: a failed
    write leaves neither a partial file nor a temporary one."""
    payload = st_save({k: v.detach().cpu().contiguous() for k, v in state.tensors.items()})
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": state.model,
              "tokenizer": tokenizer_fingerprint(tokenizer), "settings": state.settings, "metadata": metadata,
              "payload_bytes": len(payload)}
    header["sha256"] = _digest(header, payload)
    with atomic_write(path) as f:
        f.write(MAGIC + _canonical(header) + b"\n" + payload)


def read_state(path: str | Path, model: VQTModel, tokenizer: Tokenizer) -> tuple[DocumentState, dict[str, Any]]:
    """Read a state written by ``write_state``; returns it and the caller's metadata.

    Raises ValueError for a file that is not a state, is corrupted (checksum), has another
    format version, or was saved with another model or tokenizer.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a VQT document state (it does not start with {MAGIC!r})")
    nl = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):nl if nl >= 0 else len(data)])
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if nl < 0 or not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is corrupted: its header is not a {FORMAT} JSON object")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has state format version {header.get('format_version')!r}; "
                         f"this version of vqt reads version {FORMAT_VERSION}")
    payload = data[nl + 1:]
    checksum = header.pop("sha256", None)
    if checksum != _digest(header, payload):
        raise ValueError(f"{path} is corrupted: its SHA-256 checksum does not match its contents")
    if header["model"] != model_fingerprint(model):
        raise ValueError(f"{path} was saved with another model (fingerprint {header['model'][:12]}), "
                         f"not this one ({model_fingerprint(model)[:12]})")
    if header["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{path} was saved with another tokenizer (fingerprint {header['tokenizer'][:12]}), "
                         f"not this one ({tokenizer_fingerprint(tokenizer)[:12]})")
    try:
        tensors = st_load(payload)
    except Exception as e:  # safetensors raises its own error types on malformed payloads
        raise ValueError(f"{path} is corrupted: unreadable tensor payload ({e})") from None
    return DocumentState(tensors, header["settings"], header["model"]), header["metadata"]
