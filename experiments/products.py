"""Which weight format multiplies fastest on this CPU, at the row counts an edit and a dense forward use.

    python experiments/products.py                      # SmolLM2-135M's shapes, 2 threads
    python experiments/products.py --rows 1 16 64 1024 --threads 1

For each projection of a SmolLM2 layer (q/k/v fused, gate/up fused, down, and the LM head) and each
number of rows, the median time of one product in each format, as a ratio to float32's ``F.linear``:

- ``bf16``: ``vqt.ops.layer.linear`` with bfloat16 weights (input rounded to bfloat16, oneDNN, result back
  to float32), what ``VQTModel.set_matmul_dtype(torch.bfloat16)`` runs;
- ``int8-w``: int8 weights with a float32 scale per output channel (``aten._weight_int8pack_mm``), float32
  and bfloat16 activations;
- ``int8-dyn``: int8 weights and activations quantized per call (``quantize_dynamic``): its activation
  scale is shared by the rows multiplied together, so a row's result depends on the others (not exact
  for an incremental engine; timed for comparison only).

Then whether each exact candidate gives a row bitwise the same result whatever other rows it is multiplied
with (what lets a dense forward and an incremental step agree). Timings are medians of --repeats calls
after a warm-up, on a shared machine: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqt.ops.layer import linear  # noqa: E402

# (name, input width, output width) of SmolLM2-135M's products
SHAPES = [("qkv", 576, 960), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def candidates(w: torch.Tensor) -> dict:
    """name -> (exact, product of x (m, k) float32 -> (m, n) float32)."""
    wb = w.bfloat16()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    w8 = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    sb = scale.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    return {
        "float32": (True, lambda x: F.linear(x, w)),
        "bf16": (True, lambda x: linear(x, wb)),
        "int8-w f32": (True, lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scale)),
        "int8-w bf16": (True, lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w8, sb).float()),
        "int8-dyn": (False, lambda x: dyn(x)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=[1, 8, 64, 256, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"{a.threads} thread(s); median us of float32, then each format's speed-up over it (>1: faster)")
    for name, k, n in SHAPES:
        if name not in a.shapes:
            continue
        w = torch.randn(n, k) / k ** 0.5
        cands = candidates(w)
        print(f"\n{name} ({k} -> {n})")
        print(f"{'rows':>6} {'float32 us':>11} " + " ".join(f"{c:>12}" for c in cands if c != "float32"))
        with torch.no_grad():
            for m in a.rows:
                x = torch.randn(m, k)
                base = median_us(lambda: cands["float32"][1](x), a.repeats)
                ratios = [base / median_us(lambda f=f: f(x), a.repeats) for c, (_, f) in cands.items() if c != "float32"]
                print(f"{m:>6} {base:>11.0f} " + " ".join(f"{r:>11.2f}x" for r in ratios), flush=True)
            x = torch.randn(1024, k)
            subsets = [torch.randperm(1024)[:m] for m in (1, 2, 3, 7, 16, 64, 257)]
            for c, (exact, f) in cands.items():
                full = f(x)
                same = all(torch.equal(f(x[idx]), full[idx]) for idx in subsets)
                print(f"  {c}: a row's product {'does not depend' if same else 'DEPENDS'} on the rows multiplied "
                      f"with it{'' if exact else ' (per-call activation scale)'}")


if __name__ == "__main__":
    main()
