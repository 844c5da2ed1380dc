"""Replaying a corpus of histories: work units run in this process, in local worker processes or on Ray.

Every executor runs the same work units (see `vqt.histories.sources`) through the same pure
`replay_unit`, so their per-edit records are equal; only the wall-clock fields differ. With an
output folder each unit's records go to one Parquet file, written atomically when the unit
ends: a rerun skips the units already written, and an interrupted run loses only the units
in flight. The summary of a folder is computed from its files (`read_output`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import re
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from vqt._errors import UserError
from vqt._extras import require
from vqt.engine.options import DocumentOptions
from vqt.histories.replay import EditRecord, ReplayStats, replay
from vqt.histories.sources import CorpusInput, WorkUnit, plan_input, read_unit
from vqt.modeling.model import VQTModel
from vqt.ops import get_backend
from vqt.text.tokenizer import Tokenizer

# Loads (model, tokenizer) in a worker; must pickle (a module-level function or a partial of one).
ModelLoader = Callable[[], tuple[VQTModel, Tokenizer]]

RECORDS = "records"  # subfolder of the output folder that holds one Parquet file per work unit
RUN_FILE = "run.json"  # the settings of the run that wrote the folder; a resumed run must match them
WALL_CLOCK = ("seconds", "dense_seconds", "prefix_seconds")  # the record fields that vary between runs
_JSON_FIELDS = ("macs_by_kind", "flags")  # dict fields, stored as JSON text (their keys vary)


@dataclass(frozen=True)
class ReplayOptions:
    """What every work unit is replayed with (`vqt.histories.replay.replay`'s options) and how units are cut."""

    prefix_tokens: Optional[int] = None  # replay only the first N tokens of each document (None: whole documents)
    max_tokens: Optional[int] = None  # the memory guard (DocumentOptions.max_tokens): longer documents are skipped
    max_edits: Optional[int] = None  # per work unit
    baselines: bool = True
    verify: bool = False
    positions: str = "stable"  # the position mode (vqt.engine.positions)
    backend: str = "auto"
    range_revisions: int = 200  # revision pairs per work unit; longer histories are split
    max_revisions: Optional[int] = None  # per history, before splitting
    strict: bool = False  # a malformed revision fails its history (default: it is skipped and counted)

    def __post_init__(self) -> None:
        for name in ("prefix_tokens", "max_tokens", "range_revisions", "max_edits", "max_revisions"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def device(self) -> str:
        return "cuda" if self.backend == "cuda" else "cpu"


@dataclass
class UnitResult:
    """The records of one work unit (rows of `EditRecord.to_json()` plus `history` and `title`)."""

    unit: WorkUnit
    rows: list[dict[str, Any]]
    error: Optional[str]  # why the unit stopped early (its rows before the failure are kept)
    seconds: float
    skipped: list[str] = dataclasses.field(default_factory=list)  # the malformed revisions skipped
    over_guard: int = 0  # revision pairs skipped: their document is longer than the memory guard (max_tokens)
    guard_reasons: list[str] = dataclasses.field(default_factory=list)  # why, once per document that went over

    def status(self) -> dict[str, Any]:
        """What the output file records about the unit besides its rows."""
        u = self.unit
        return {"history": u.history, "title": u.title, "doc_id": u.doc_id, "input": u.input.index,
                "page": u.page, "start": u.start, "stop": u.stop, "edits": len(self.rows),
                "error": self.error, "skipped": len(self.skipped),
                "first_skipped": self.skipped[0] if self.skipped else None, "over_guard": self.over_guard,
                "first_over_guard": self.guard_reasons[0] if self.guard_reasons else None, "seconds": self.seconds}


def replay_unit(model: VQTModel, tokenizer: Tokenizer, unit: WorkUnit, options: ReplayOptions) -> UnitResult:
    """Replay one work unit; an error (an unreadable file, with `strict` a malformed revision) ends the unit,
    not the corpus. Without `strict` a malformed revision is skipped and counted."""
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    stats, reasons = ReplayStats(), []
    error = unit.error
    if error is None:
        try:
            doc_options = DocumentOptions.make(backend=get_backend(options.backend, model.device).name,
                                               position_mode=options.positions, max_tokens=options.max_tokens)
            revisions = read_unit(unit, None if options.strict else lambda bad: skipped.append(str(bad)))
            for rec in replay(model, revisions, tokenizer, prefix_tokens=options.prefix_tokens,
                              max_edits=options.max_edits, baselines=options.baselines, verify=options.verify,
                              options=doc_options, stats=stats, on_skip=reasons.append):
                rows.append({"history": unit.history, "title": unit.title, **rec.to_json()})
        except Exception as e:  # noqa: BLE001  (recorded in the unit's status and the summary)
            error = f"{type(e).__name__}: {e}"
    return UnitResult(unit, rows, error, time.perf_counter() - t0, skipped, stats.over_guard, reasons)


def load_worker_model(load: ModelLoader, options: ReplayOptions) -> tuple[VQTModel, Tokenizer]:
    """Load the model once in a worker, with one torch thread, on the device the backend needs."""
    torch.set_num_threads(1)
    model, tokenizer = load()
    return model.to(options.device), tokenizer


# --------------------------------------------------------------------------- output files


def unit_path(out: Path, unit: WorkUnit) -> Path:
    """Where the records of `unit` go: a readable slug of its history name plus a hash that keeps names unique."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", unit.history)[-80:]
    digest = hashlib.sha1(unit.name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return out / RECORDS / f"{slug}@{unit.start}-{digest}.parquet"


def _arrow_type(pa: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:  # Optional[X]: nullable X
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return pa.list_(_arrow_type(pa, typing.get_args(tp)[0]))
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(), dict: pa.string()}[tp]


def record_schema() -> Any:
    """The Arrow schema of a records file: history, title, then `EditRecord.to_json()`'s fields."""
    pa = require("pyarrow", "ray")
    hints = typing.get_type_hints(EditRecord)
    fields = [("history", pa.string()), ("title", pa.string())]
    fields += [(f.name, _arrow_type(pa, hints[f.name])) for f in dataclasses.fields(EditRecord)]
    return pa.schema(fields + [("dirty_fraction", pa.float64())])


def write_unit(out: Path, result: UnitResult) -> Path:
    """Write a unit's records (and its status, as file metadata) to its Parquet file, atomically."""
    pa, pq = require("pyarrow", "ray"), require("pyarrow.parquet", "ray")
    rows = [{**r, **{k: json.dumps(r[k], sort_keys=True) for k in _JSON_FIELDS}} for r in result.rows]
    table = pa.Table.from_pylist(rows, schema=record_schema()).replace_schema_metadata(
        {"vqt": json.dumps(result.status())})
    path = unit_path(out, result.unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_output(folder: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records, unit statuses) of a folder of saved records, in corpus order.

    Reads the Parquet files `vqt replay --out` writes (statuses from their metadata) and any
    JSONL files of records (`--jsonl`), recursively.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of saved records (`vqt replay --out` writes them)")
    units: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    parquet = sorted(folder.rglob("*.parquet"))
    if parquet:
        pq = require("pyarrow.parquet", "ray")
        for path in parquet:
            table = pq.read_table(path)
            rows = table.to_pylist()
            for r in rows:
                r.update({k: json.loads(r[k]) for k in _JSON_FIELDS})
            units.append((json.loads(table.schema.metadata[b"vqt"]), rows))
    for path in sorted(folder.rglob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        units.append(({"history": str(path), "input": -1, "page": 0, "start": 0, "edits": len(rows),
                       "error": None, "skipped": 0, "over_guard": 0}, rows))
    if not units:
        raise UserError(f"{folder} holds no records (.parquet or .jsonl files)")
    units.sort(key=lambda u: (u[0]["input"], u[0]["page"], u[0]["start"], u[0]["history"]))  # WorkUnit.key order
    return [r for _, rows in units for r in rows], [status for status, _ in units]


def to_records(rows: Iterable[dict[str, Any]]) -> list[EditRecord]:
    """EditRecords from saved rows (the extra columns dropped)."""
    names = [f.name for f in dataclasses.fields(EditRecord)]
    return [EditRecord(**{k: r[k] for k in names if k in r}) for r in rows]


def without_wall_clock(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without their wall-clock fields: what equal replays on any executor have in common."""
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def _check_run(out: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings in the folder, or refuse to resume a run made with other settings."""
    path = out / RUN_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        for key in sorted(set(before) | set(settings)):
            if before.get(key) != settings.get(key):
                raise UserError(f"--out {out} holds a run with another {key} ({before.get(key)!r}, now "
                                 f"{settings.get(key)!r}): use another folder, or the same settings to resume")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


# --------------------------------------------------------------------------- executors


@dataclass
class CorpusRun:
    """What a corpus replay did: every unit's status and records (including units a resumed run skipped)."""

    statuses: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    replayed: list[dict[str, Any]]  # statuses of the units this run replayed (others were already written)
    seconds: float

    def throughput(self) -> str:
        """Histories and edits per second of what this run replayed (planning and start-up included)."""
        histories = len({s["history"] for s in self.replayed})
        edits = sum(s["edits"] for s in self.replayed)
        return (f"this run replayed {len(self.replayed)} work units of {histories} histories in {self.seconds:.1f} s: "
                f"{histories / self.seconds:.2f} histories/s, {edits / self.seconds:.1f} edits/s")


def replay_corpus(inputs: Sequence[CorpusInput], load: ModelLoader, options: ReplayOptions, *,
                  workers: Optional[int] = None, out: Optional[str | Path] = None, ray: Optional[str] = None,
                  settings: Optional[dict[str, Any]] = None,
                  progress: Optional[Callable[[dict[str, Any]], None]] = None) -> CorpusRun:
    """Plan and replay every history of `inputs`; records come back in corpus order, whatever the executor.

    workers: local processes (default 1: this process), or with Ray the actors (default: one per
    CPU of the cluster, or per GPU with the cuda backend). out: a folder for one Parquet file
    per unit, which makes the run resumable; required with Ray. ray: None runs locally; "" starts
    a local Ray cluster (or uses the one this process already started); else the address of a
    running cluster ("auto", "ray://head:10001"). settings: what else identifies the run (model,
    dtype), checked with the options when resuming. progress: called with each unit's status.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if ray is not None:
        require("ray.data", "ray")
        if out is None:
            raise UserError("--ray writes its records as Parquet files: give --out DIR")
    t0 = time.perf_counter()
    out = Path(out) if out is not None else None
    if out is not None:
        _check_run(out, {**(settings or {}), **dataclasses.asdict(options), "inputs": [i.name for i in inputs]})
    if ray is not None:
        replayed = _run_ray(inputs, load, options, out, ray or None, workers, progress)
        rows, statuses = read_output(out)
        return CorpusRun(statuses, rows, replayed, time.perf_counter() - t0)
    get_backend(options.backend, options.device)  # a backend this machine cannot run fails here, not in each unit
    results = []
    with _LocalPool(load, options, workers or 1) as pool:
        units = [u for units in pool.map(_plan, [(i, options) for i in inputs]) for u in units]
        for result in pool.map(_replay, _todo(units, out), ordered=False):
            if out is not None:
                write_unit(out, result)
            results.append(result)
            if progress:
                progress(result.status())
    if out is not None:
        rows, statuses = read_output(out)
    else:
        results.sort(key=lambda r: r.unit.key)
        rows, statuses = [row for r in results for row in r.rows], [r.status() for r in results]
    return CorpusRun(statuses, rows, [r.status() for r in results], time.perf_counter() - t0)


def _plan(args: tuple[CorpusInput, ReplayOptions]) -> list[WorkUnit]:
    inp, options = args
    return plan_input(inp, options.range_revisions, options.max_revisions, options.strict)


def _todo(units: list[WorkUnit], out: Optional[Path]) -> list[WorkUnit]:
    """The units not yet in the output folder, longest first (so that the last ones to start are short)."""
    todo = [u for u in units if out is None or not unit_path(out, u).is_file()]
    return sorted(todo, key=lambda u: u.start - u.stop)


# The model of a local worker process, loaded once by its pool initializer.
_worker: dict[str, Any] = {}


def _init_worker(load: ModelLoader, options: ReplayOptions) -> None:
    _worker["model"], _worker["tokenizer"] = load_worker_model(load, options)
    _worker["options"] = options


def _replay(unit: WorkUnit) -> UnitResult:
    return replay_unit(_worker["model"], _worker["tokenizer"], unit, _worker["options"])


class _LocalPool:
    """`workers` spawned processes that each load the model once, or this process when workers is 1.

    A process pool from concurrent.futures: when a worker cannot start (its model does not load),
    the pool breaks and the run fails, where multiprocessing.Pool would respawn it forever.
    """

    def __init__(self, load: ModelLoader, options: ReplayOptions, workers: int) -> None:
        self.load, self.options, self.workers = load, options, workers
        self.pool: Optional[ProcessPoolExecutor] = None
        self.threads = torch.get_num_threads()

    def __enter__(self) -> _LocalPool:
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(self.workers, initializer=_init_worker, initargs=(self.load, self.options),
                                            mp_context=multiprocessing.get_context("spawn"))  # no fork of torch threads
        else:
            _init_worker(self.load, self.options)
        return self

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], ordered: bool = True) -> Iterator[Any]:
        if self.pool is None:
            return map(fn, items)
        if ordered:
            return self.pool.map(fn, items)
        return (future.result() for future in as_completed([self.pool.submit(fn, item) for item in items]))

    def __exit__(self, *exc: Any) -> None:
        _worker.clear()
        torch.set_num_threads(self.threads)  # this process's own setting, changed when it was the worker
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class _RayReplayer:
    """The callable class of `map_batches`: loads the model once per actor, replays and writes each unit of a batch."""

    def __init__(self, load: ModelLoader, options: ReplayOptions, out: str) -> None:
        self.model, self.tokenizer = load_worker_model(load, options)
        self.options, self.out = options, Path(out)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        statuses = []
        for unit in batch["unit"]:
            result = replay_unit(self.model, self.tokenizer, pickle.loads(unit), self.options)
            write_unit(self.out, result)
            statuses.append(result.status())
        return {"status": [json.dumps(s) for s in statuses]}


def _run_ray(inputs: Sequence[CorpusInput], load: ModelLoader, options: ReplayOptions, out: Path,
             address: Optional[str], workers: Optional[int],
             progress: Optional[Callable[[dict[str, Any]], None]]) -> list[dict[str, Any]]:
    """Plan with Ray tasks, replay with Ray Data actors writing Parquet under `out`; return the replayed units' statuses."""
    ray = require("ray", "ray")
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=workers if address is None else None,
                 include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no log line per stage: the caller reports each unit
    plan = ray.remote(num_cpus=1)(_plan)
    units = [u for units in ray.get([plan.remote((i, options)) for i in inputs]) for u in units]
    todo = _todo(units, out)
    if not todo:
        return []
    gpu = options.device == "cuda"
    slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
    if not slots:  # actors asking for what the cluster lacks would wait forever
        raise UserError(f"the Ray cluster has no {'GPU' if gpu else 'CPU'} for the replay actors")
    # One row, one block per unit (a pickled WorkUnit: a reference to revisions, not the revisions themselves).
    ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in todo], override_num_blocks=len(todo))
    actors = ray.data.ActorPoolStrategy(size=min(len(todo), workers or slots))
    ds = ds.map_batches(_RayReplayer, fn_constructor_kwargs=dict(load=load, options=options, out=str(out)),
                        batch_size=1, compute=actors, num_cpus=1, num_gpus=1 if gpu else 0)
    statuses = []
    for row in ds.iter_rows():
        statuses.append(json.loads(row["status"]))
        if progress:
            progress(statuses[-1])
    return statuses
