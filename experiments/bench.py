"""Wall-clock benchmark on real edits: VQT (every available backend) vs dense forward, prefix reuse and the cone.

    python experiments/bench.py --threads 1                          # shipped model, windows 512/1024/2048
    python experiments/bench.py --model runs/X/model --windows 1024 --max-edits 50
    python experiments/bench.py --windows --lengths 1024 4096 16384 65536 262144 --threads 1   # lengths only

Flags:
  --model PATH         checkpoint (default: the shipped data/vqt-small)
  --dtype float32|bf16 bf16: bfloat16 products, float32 activations (VQT and every baseline alike)
  --data FILE...       histories (default: the held-out API-JSON articles)
  --windows N...       real-edit section: documents cut to N tokens (`--windows` alone skips the section)
  --max-edits N        real edits per window, taken round-robin over the histories (one from each in turn,
                       so every article contributes equally; one that runs out leaves its turns to the others)
  --single-token N     also time N single-token substitutions at random places of a real window (0: skip)
  --lengths N...       length section (off by default): a document of N tokens of held-out text (the
                       articles concatenated, repeated as needed), then --length-edits small random edits
                       (replace, insert or delete 1-3 tokens; new tokens drawn from the text) on the fastest
                       backend; each length runs in a fresh process so its memory can be read from
                       /proc/self/status. Only windowed models (no length cap); full attention is O(n^2).
  --length-edits N     edits per length (default 50)
  --whole N            whole-document section (off by default): N real edits of the Anarchism history in
                       ../shared/data from revision --whole-start (default 3000: 15k-20k tokens), each edit
                       applied to the whole document wherever it falls (`replay`); VQT against the dense
                       forward and prefix reuse on the same backend's kernels
  --threads N          torch threads (0: torch's default); use 1 on a shared machine
  --device cpu|cuda    where the model, the documents and the baselines run

Real-edit section: every baseline runs in this process on the same edits, on its fastest exact path:
the dense forward and prefix reuse (a KV cache of the common prefix: only the rows from the first
changed token on, against the cached keys) use the fastest backend's kernels (`forward_dense(...,
backend=...)`; the dense forward is also timed on the reference operators, for the kernels' own
speedup), and the cone of influence is the same weights without quantization on the same engine and
backend. Prints medians and per-edit ratio distributions (median, p10, p90), MAC ratios, p95 latency of
single-token edits, and the document-state memory per token next to a plain KV cache's.

Length section: per length, the median engine time per edit (EditStats.seconds) and its ratio to the
first length's; state bytes per slot (SlotCache.bytes_per_slot), allocated state bytes per live
token after the edits (Document.state_bytes_per_token: every cached tensor, free capacity included) and
a plain KV cache's bytes per token; the RSS
growth while building the document (peak, VmHWM) and after it (steady, VmRSS), each over the process's
RSS before the build, per token (below ~64k tokens RSS moves in the allocator's steps, so read those
rows as rough; the peak is the build's dense pass plus the document's tables). A 262,144-token
document of the shipped model takes about 40-60 s to build and 11 GB at the peak on a 2-core CPU.
Timings are noisy on shared machines: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vqt import _memory as memory  # noqa: E402
from vqt.apps.loading import load_model  # noqa: E402
from vqt.engine.document import Document  # noqa: E402
from vqt.engine.options import DocumentOptions  # noqa: E402
from vqt.histories.corpus import HELDOUT, WIKI, heldout_texts  # noqa: E402
from vqt.histories.formats import iter_history  # noqa: E402
from vqt.histories.replay import EditRecord, percentile, quantiles, replay  # noqa: E402
from vqt.ops import BACKENDS, get_backend  # noqa: E402
from vqt.text.document import TextDocument  # noqa: E402

LENGTH_RESULT = "LENGTH_RESULT "  # prefix of the one stdout line a length subprocess reports on


def available_backends(device: str) -> list[str]:
    out = []
    for name in BACKENDS:
        try:
            get_backend(name, device)
            out.append(name)
        except (RuntimeError, ValueError) as e:
            print(f"backend {name}: unavailable ({e})")
    return out


def fmt(q: dict) -> str:
    return f"median {q['median']:8.3g}  p10 {q['p10']:8.3g}  p90 {q['p90']:8.3g}"


def round_robin(streams: Iterable[Iterator], limit: int) -> list:
    """Up to ``limit`` records, one from each stream in turn; an exhausted stream drops out."""
    live, out = list(streams), []
    while live and len(out) < limit:
        for stream in list(live):
            if len(out) >= limit:
                break
            rec = next(stream, None)
            if rec is None:
                live.remove(stream)
            else:
                out.append(rec)
    return out


def edit_key(r: EditRecord) -> tuple:
    return r.doc_id, r.rev_id, r.edit_index


# ------------------------------------------------------------------ real edits
@dataclass
class BaselineTimes:
    dense_reference: float  # dense forward on the reference operators
    dense: float  # dense forward on the fastest backend's kernels
    prefix: float  # prefix reuse on the fastest backend's kernels


def baseline_timer(model, fastest: str, times: list[BaselineTimes]):
    """A replay ``observe`` callback timing the dense forward and prefix reuse of each edited document.

    Prefix reuse reads the cached rows [0, first_changed), which are the same before and after the edit
    (tokens and positions there are unchanged), so this edit's own dense output stands in for the
    previous one's; its result is checked against the dense forward.
    """
    atol = 1e-9 if model.dtype == torch.float64 else 1e-4

    def observe(doc: TextDocument, rec: EditRecord) -> None:
        tok, pos = doc.doc.token_ids, doc.doc.positions
        t0 = time.perf_counter()
        model.forward_dense(tok, pos)
        t1 = time.perf_counter()
        dense = model.forward_dense(tok, pos, backend=fastest)
        t2 = time.perf_counter()
        prefix = model.forward_dense(tok, pos, cache=dense, start=rec.first_changed, keep_prefix=False, backend=fastest)
        t3 = time.perf_counter()
        if not torch.allclose(prefix.hidden, dense.hidden[rec.first_changed:], atol=atol):
            raise RuntimeError(f"prefix reuse from token {rec.first_changed} disagrees with the dense forward "
                               f"({rec.doc_id} revision {rec.rev_id} edit {rec.edit_index})")
        times.append(BaselineTimes(t1 - t0, t2 - t1, t3 - t2))

    return observe


def line(label: str, values: list[float]) -> str:
    return f"{label:<46}{fmt(quantiles(values))}"


def bench_window(model, tok, paths: list[str], window: int, max_edits: int, backends: list[str]) -> None:
    fastest = backends[-1]
    times: list[BaselineTimes] = []
    sources: list[str] = []  # the history each record of the first run came from

    def run(m, backend: str, observe=None) -> list[EditRecord]:
        def stream(path: str) -> Iterator[tuple[str, EditRecord]]:
            for rec in replay(m, iter_history(path), tok, prefix_tokens=window, max_edits=max_edits,
                              baselines=False, observe=observe, options=DocumentOptions(backend=backend)):
                yield Path(path).name, rec

        tagged = round_robin([stream(path) for path in paths], max_edits)
        if not sources:
            sources.extend(name for name, _ in tagged)
        return [r for _, r in tagged]

    runs = {be: run(model, be, baseline_timer(model, fastest, times) if be == backends[0] else None)
            for be in backends}
    # The cone of influence on its fastest exact path: the same weights without quantization, on the same
    # engine and backend (every row whose attention changes is recomputed, by delta updates).
    cone = run(model.without_quantization(), fastest)
    base = runs[backends[0]]
    for name, recs in [*runs.items(), ("cone", cone)]:
        if [edit_key(r) for r in recs] != [edit_key(r) for r in base]:
            raise RuntimeError(f"the {name} run replayed other edits than the {backends[0]} run")
    per_history = {name: sources.count(name) for name in dict.fromkeys(sources)}
    print(f"\n=== window {window} tokens: {len(base)} real edits (median doc "
          f"{quantiles([r.n_tokens for r in base])['median']:.0f} tokens), round-robin over {len(paths)} histories: "
          + (", ".join(f"{name} {k}" for name, k in per_history.items()) or "none touches the window"))
    print(line("MAC ratio vs dense", [r.ratio for r in base]))
    print(line("MAC ratio prefix reuse", [r.prefix_ratio for r in base]))
    print(line("MAC ratio cone vs dense", [r.dense_macs / r.cone_macs for r in base]))
    print(line("VQ MAC saving over cone", [r.cone_ratio for r in base]))
    print(line("dense forward ms, reference operators", [t.dense_reference * 1e3 for t in times]))
    print(line(f"dense forward ms, {fastest} kernels", [t.dense * 1e3 for t in times]))
    print(line(f"  dense forward, {fastest} kernels vs reference", [t.dense_reference / t.dense for t in times]))
    print(line(f"prefix reuse ms, {fastest} kernels", [t.prefix * 1e3 for t in times]))
    print(line(f"cone ms ({fastest}, no VQ)", [r.seconds * 1e3 for r in cone]))
    for be, recs in runs.items():
        ms = [r.seconds * 1e3 for r in recs]
        single = [r.seconds * 1e3 for r in recs if r.inserted_tokens <= 1 and r.deleted_tokens <= 1]
        print(line(f"VQT {be} ms", ms) +
              (f"  p95 single-token {sorted(single)[int(0.95 * (len(single) - 1))]:.1f} ms (n={len(single)})"
               if single else ""))
        print(line(f"  speedup vs dense ({fastest} kernels)", [t.dense / r.seconds for t, r in zip(times, recs)]))
        print(line(f"  speedup vs prefix reuse ({fastest} kernels)",
                   [t.prefix / r.seconds for t, r in zip(times, recs)]))
        print(line(f"  speedup vs cone ({fastest}, no VQ)", [c.seconds / r.seconds for c, r in zip(cone, recs)]))
        if be != "reference" and "reference" in runs:
            print(line("  speedup vs VQT reference", [d.seconds / r.seconds for d, r in zip(runs["reference"], recs)]))


def single_token_ms(model, ids: list[int], backend: str, count: int, seed: int = 0) -> list[float]:
    """Milliseconds of ``count`` single-token substitutions (random place, random token) on one document."""
    rng = random.Random(seed)
    doc = Document(model, ids, backend=backend)
    out = []
    for _ in range(count):
        i = rng.randrange(len(doc))
        out.append(doc.replace(i, i + 1, [rng.randrange(model.config.vocab_size)]).seconds * 1e3)
    return out


def bench_single_token(model, tok, paths: list[str], window: int, count: int, backends: list[str]) -> None:
    ids: list[int] = []
    for rev in (r for path in paths for r in iter_history(path)):  # the first revision that fills the window
        ids = max(ids, tok.encode(rev["text"])[:window], key=len)
        if len(ids) >= window:
            break
    print(f"single-token substitutions at random places of a real {len(ids)}-token window "
          f"({count} each, same places and tokens for every backend):")
    for be in backends:
        ms = single_token_ms(model, ids, be, count)
        print(f"  VQT {be:<10} ms      p50 {statistics.median(ms):6.2f}  p95 {percentile(ms, 0.95):6.2f}")


# --------------------------------------------------------------------- lengths
def heldout_tokens(tok, paths: list[str]) -> list[int]:
    """The latest revision of every history, tokenized and concatenated (blank-line separated)."""
    ids = tok.encode("\n\n".join(t for t in heldout_texts(paths) if t))
    if not ids:
        raise ValueError(f"the histories {paths} hold no text to build long documents from")
    return ids


def proc_status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in kB."""
    kb = memory.proc_status_kb(field)
    if kb is None:
        raise RuntimeError(f"/proc/self/status has no {field} (the length section needs Linux)")
    return kb


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def random_edit(rng: random.Random, n: int, pool: list[int]) -> tuple[int, int, list[int]]:
    """A small edit at a random place: replace, insert or delete 1-3 tokens (new ones drawn from ``pool``)."""
    kind, k = rng.choice(("replace", "insert", "delete")), rng.randint(1, 3)
    if kind == "insert" or n <= k:
        i = rng.randint(0, n)
        return i, i, [rng.choice(pool) for _ in range(k)]
    i = rng.randrange(n - k + 1)
    return i, i + k, [] if kind == "delete" else [rng.choice(pool) for _ in range(k)]


def length_child(a: argparse.Namespace) -> None:
    """One length, in this fresh process: build, measure memory, time the edits; one JSON line on stdout."""
    n = a.length_child
    model, _, tok = load_model(a.model, a.dtype)
    model = model.to(a.device)
    if model.config.window is None:
        raise SystemExit("the length section needs a windowed model (full attention is O(n^2) per document)")
    text = heldout_tokens(tok, a.data or [str(x) for x in HELDOUT])
    ids = torch.tensor(list(itertools.islice(itertools.cycle(text), n)), dtype=torch.long, device=a.device)
    options = DocumentOptions(backend=a.backend)
    # Warm up before measuring: the extension, the fused weights and lookup tables, the allocator's pools.
    warm = Document(model, ids[:min(n, 256)], options)
    warm.apply_edits([random_edit(random.Random(-1), len(warm), text)])
    del warm
    rng = random.Random(a.seed)
    gc.collect()
    before = proc_status_kb("VmRSS")
    exact_peak = reset_peak_rss()
    t0 = time.perf_counter()
    doc = Document(model, ids, options)
    build_s = time.perf_counter() - t0
    gc.collect()
    steady = proc_status_kb("VmRSS")
    peak = proc_status_kb("VmHWM")  # (read after steady: the high-water mark so far, so never below it)
    time.sleep(a.settle)  # (a writer does not type within milliseconds of opening; the kernel reclaims the build's
    # freed pages meanwhile)
    seconds, collections = [], []
    collected = [0, 0, 0]  # collections per generation, counted by gc's callback

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collected[info["generation"]] += 1

    gc.callbacks.append(count)
    for _ in tqdm(range(a.length_edits), desc=f"{n} tokens: edits", unit="edit", file=sys.stderr):
        edit = [random_edit(rng, len(doc), text)]
        before_gc = list(collected)
        seconds.append(doc.apply_edits(edit).seconds)
        collections.append(max((g for g in range(3) if collected[g] > before_gc[g]), default=-1))
    gc.callbacks.remove(count)
    print(LENGTH_RESULT + json.dumps(dict(  # (memory after the edits: free capacity the edits grew included)
        n=n, build_s=build_s, edit_s=seconds, gc_generation=collections, state_bytes_per_token=doc.cache.bytes_per_slot(),
        allocated_bytes_per_token=doc.state_bytes_per_token(), kv_bytes_per_token=doc.kv_cache_bytes_per_token(),
        peak_rss_bytes_per_token=(peak - before) * 1024 / n, steady_rss_bytes_per_token=(steady - before) * 1024 / n,
        exact_peak=exact_peak)), flush=True)


def bench_whole(model, tok, path: str, start: int, edits: int, backend: str) -> None:
    """Real edits of a whole document (every atomic edit wherever it falls), VQT on ``backend`` against
    the dense forward and prefix reuse on the same backend's kernels, timed in this process."""
    if not Path(path).exists():
        print(f"\nwhole documents: skipped ({path} not found)")
        return
    revisions = itertools.islice(iter_history(path), start, None)
    recs = list(tqdm(replay(model, revisions, tok, max_edits=edits, baselines=True,
                            options=DocumentOptions(backend=backend)), total=edits, desc="whole documents",
                     unit="edit", file=sys.stderr))
    print(f"\n=== whole documents: {len(recs)} real edits of {Path(path).name} from revision {start}, "
          f"{backend} backend; baselines on the same kernels (medians; p10-p90)")
    rows = [("tokens", [r.n_tokens for r in recs]), ("VQT ms", [r.seconds * 1e3 for r in recs]),
            ("dense ms", [r.dense_seconds * 1e3 for r in recs]), ("prefix ms", [r.prefix_seconds * 1e3 for r in recs]),
            ("wall vs dense", [r.dense_seconds / r.seconds for r in recs]),
            ("wall vs prefix reuse", [r.prefix_seconds / r.seconds for r in recs]),
            ("MACs vs dense", [r.ratio for r in recs]), ("MACs vs prefix reuse", [r.prefix_macs / r.macs for r in recs]),
            ("MACs vs the cone", [r.cone_ratio for r in recs])]
    for label, values in rows:
        q = quantiles(values)
        print(f"{label:<22} {q['median']:>10.3g}  ({q['p10']:.3g}-{q['p90']:.3g})")


def bench_lengths(a: argparse.Namespace, backend: str) -> None:
    rows = []
    for n in a.lengths:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--length-child", str(n), "--backend", backend,
               "--length-edits", str(a.length_edits), "--threads", str(a.threads), "--device", a.device,
               "--seed", str(a.seed), "--settle", str(a.settle), "--dtype", a.dtype]
        cmd += ["--model", a.model] if a.model else []
        cmd += ["--data", *a.data] if a.data else []
        print(f"length {n}: building and editing in a fresh process ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress bars pass through on stderr
        lines = [line for line in proc.stdout.splitlines() if line.startswith(LENGTH_RESULT)]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"length {n}: the measuring process failed (exit status {proc.returncode}); "
                             f"its output:\n{proc.stdout[-2000:]}")
        row = json.loads(lines[-1][len(LENGTH_RESULT):])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
    first = statistics.median(rows[0]["edit_s"])
    print(f"\n=== lengths: {a.length_edits} random small edits each (replace/insert/delete 1-3 tokens), "
          f"{backend} backend; memory per live token, RSS over the process's RSS before the build")
    print(f"{'tokens':>8} {'build s':>8} {'edit ms p50':>11} {'p90':>8} {'max':>8} {'max/p50':>7} "
          f"{'vs ' + str(rows[0]['n']):>9} "
          f"{'state B/slot':>12} {'alloc B/tok':>11} {'KV B/tok':>8} {'peak RSS B/tok':>14} {'steady RSS B/tok':>16} "
          f"{'wall s':>7}")
    for r in rows:
        med = statistics.median(r["edit_s"])
        print(f"{r['n']:>8} {r['build_s']:>8.2f} {med * 1e3:>11.2f} {percentile(r['edit_s'], 0.9) * 1e3:>8.2f} "
              f"{max(r['edit_s']) * 1e3:>8.2f} {max(r['edit_s']) / med:>6.1f}x {med / first:>8.2f}x {r['state_bytes_per_token']:>12} {r['allocated_bytes_per_token']:>11.0f} "
              f"{r['kv_bytes_per_token']:>8} {r['peak_rss_bytes_per_token']:>14.0f} "
              f"{r['steady_rss_bytes_per_token']:>16.0f} {r['wall_s']:>7.1f}")
    print("slowest edits: ms (edit number, the oldest generation Python's cyclic collector swept during it or -); "
          "the same length twice replays the same edits, so a slow edit that is slow in both runs is the engine's:")
    for r in rows:
        slow = sorted(zip(r["edit_s"], range(len(r["edit_s"])), r["gc_generation"]), reverse=True)[:5]
        swept = [sum(g == k for g in r["gc_generation"]) for k in range(3)]
        print(f"{r['n']:>8}: " + ", ".join(f"{t * 1e3:.2f} (#{i}, {g if g >= 0 else '-'})" for t, i, g in slow)
              + f"; edits with a sweep of generation 0/1/2: {swept[0]}/{swept[1]}/{swept[2]}")
    if not all(r["exact_peak"] for r in rows):
        print("(the kernel refused to reset VmHWM: peaks include whatever came before the build)")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                   help="bf16: bfloat16 products (float32 activations) for VQT and every baseline alike")
    p.add_argument("--data", nargs="*", default=None, help="histories (default: the held-out API-JSON articles)")
    p.add_argument("--windows", type=int, nargs="*", default=[512, 1024, 2048])
    p.add_argument("--max-edits", type=int, default=80)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model, the documents and the baselines)")
    p.add_argument("--single-token", type=int, default=100,
                   help="also time this many single-token substitutions at random places of a real window")
    p.add_argument("--lengths", type=int, nargs="*", default=[], help="document lengths of the length section")
    p.add_argument("--length-edits", type=int, default=50, help="random small edits per length")
    p.add_argument("--seed", type=int, default=0, help="seed of the length section's edits")
    p.add_argument("--settle", type=float, default=1.0, help="length section: seconds between the build and the "
                   "first edit")
    p.add_argument("--whole", type=int, default=0, metavar="N",
                   help="whole-document section: N real edits of whole 10k+-token documents (default 0: skip)")
    p.add_argument("--whole-data", default=str(WIKI / "enwiki-anarchism-history.xml.lzma"),
                   help="the history of the whole-document section")
    p.add_argument("--whole-start", type=int, default=3000, help="its first revision (the article has 15k+ tokens)")
    p.add_argument("--length-child", type=int, default=None, help=argparse.SUPPRESS)  # one length, in a subprocess
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("max_edits", "length_edits"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if any(n < 2 for n in [*a.windows, *a.lengths]):
        p.error("--windows and --lengths take token counts of at least 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    if a.length_child is not None:
        return length_child(a)
    model, name, tok = load_model(a.model, a.dtype)
    model = model.to(a.device)
    print(f"model: {name}: {model.describe()}; device {a.device}; torch threads {torch.get_num_threads()}")
    backends = available_backends(a.device)
    paths = a.data or [str(x) for x in HELDOUT]
    for window in a.windows:
        if model.config.window is None and window > model.config.max_len:  # full attention keeps its max_len
            print(f"\nwindow {window}: skipped (model max_len {model.config.max_len})")
            continue
        bench_window(model, tok, paths, window, a.max_edits, backends)
        if a.single_token:
            bench_single_token(model, tok, paths, window, a.single_token, backends)
    if a.windows:
        doc = TextDocument(model, tok, "memory probe " * 50).doc
        print(f"\ndocument state {doc.state_bytes_per_token():.0f} B/token allocated vs plain KV cache "
              f"{doc.kv_cache_bytes_per_token()} B/token "
              f"({doc.state_bytes_per_token() / doc.kv_cache_bytes_per_token():.2f}x)")
    if a.whole:
        bench_whole(model, tok, a.whole_data, a.whole_start, a.whole, backends[-1])
    if a.lengths:
        if model.config.window is None:
            raise SystemExit("--lengths needs a windowed model (full attention is O(n^2) per document)")
        bench_lengths(a, backends[-1])


if __name__ == "__main__":
    main()
