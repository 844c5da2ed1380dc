"""Test-session setup: helpers importable, and one thread per process.

The suite runs thousands of small steps whose ATen and OpenMP operators would otherwise use every
core. On a machine that is also running other work, each multi-threaded operator then waits for a
descheduled thread, and the suite slows down several times over (the float32 drift control of
tests/test_whole_documents.py took 135 s instead of 32 s beside one busy job). One thread per process, subprocesses included (they inherit
OMP_NUM_THREADS), keeps the suite's time close to its idle time. Set OMP_NUM_THREADS to override. The cores go to
test processes instead: setup.cfg runs two pytest-xdist workers (``-n 0`` runs the suite in this process).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
