"""Just-in-time builds of the C++/CUDA extensions, cached by everything that changes the binary.

A build lives in ``<root>/<extension>-<key>`` (root: ``$VQT_BUILD_DIR``, else
``~/.cache/vqt/torch_extensions``), where the key hashes the contents of the sources and of
the headers beside them, the torch, CUDA and Python versions, the compiler's identity and
every flag. A finished build is imported directly, without asking ninja or torch whether
something changed, so two checkouts, environments or ninja versions sharing one cache
never rebuild each other's binaries; anything that would change the binary changes the key
instead. Every build, first or not, is announced on stderr before it starts and timed when
it ends, because it stalls the caller for up to a minute.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

import torch

_DONE = "vqt-build.json"  # written once a build has been imported: the folder holds a finished binary


def build_root() -> Path:
    """The folder that holds every extension build (``$VQT_BUILD_DIR`` or ``~/.cache/vqt/torch_extensions``)."""
    return Path(os.environ.get("VQT_BUILD_DIR") or Path.home() / ".cache" / "vqt" / "torch_extensions")


@functools.lru_cache(maxsize=None)
def _identity(tool: str) -> str:
    """The first line of ``tool --version`` (or why it cannot be run)."""
    try:
        proc = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{tool}: {e}"
    return f"{tool}: " + next((line for line in proc.stdout.splitlines() if line.strip()), "")


def _compiler(with_cuda: bool) -> str:
    """The identity of the compilers torch will call ($CXX or c++, and nvcc for CUDA)."""
    return "; ".join(_identity(t) for t in [os.environ.get("CXX", "c++")] + (["nvcc"] if with_cuda else []))


def build_key(sources: Sequence[Path], include_dirs: Sequence[Path], options: dict[str, Any]) -> str:
    """A short hash of what determines the binary: source and header contents, toolchain and ``options``
    (the flags passed to the build)."""
    h = hashlib.sha256()
    files = sorted({Path(s).resolve() for s in sources} |
                   {f.resolve() for d in include_dirs for f in Path(d).iterdir() if f.is_file()})
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    with_cuda = bool(options.get("with_cuda"))
    toolchain = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None,
                 "python": sysconfig.get_config_var("SOABI") or sys.version, "compiler": _compiler(with_cuda)}
    h.update(json.dumps([toolchain, options], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _import(name: str, binary: Path) -> ModuleType:
    """Import a built extension module from its shared library."""
    spec = importlib.util.spec_from_file_location(name, binary)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jit_load(extension: str, sources: Sequence[Path], include_dirs: Sequence[Path] = (),
             **options: Any) -> tuple[Optional[ModuleType], str]:
    """Build (or reuse) a torch extension module; returns (module, "") or (None, why it could not be built).

    ``options`` are passed on to ``torch.utils.cpp_extension.load`` (flags, ``with_cuda``) and
    are part of the cache key."""
    try:
        key = build_key(sources, include_dirs, options)
        folder = build_root() / f"{extension}-{key}"
        name = f"{extension}_{key}"  # the module's name (TORCH_EXTENSION_NAME): unique per binary
        binary = folder / f"{name}.so"  # the file torch's build writes
        if (folder / _DONE).is_file() and binary.is_file():
            return _import(name, binary), ""
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        print(f"vqt: compiling the {extension} extension into {folder} (up to a minute; once per "
              f"source, compiler and torch version)...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        module = load(name=name, sources=[str(s) for s in sources],
                      extra_include_paths=[str(d) for d in include_dirs], build_directory=str(folder),
                      verbose=False, **options)
        print(f"vqt: compiled the {extension} extension (took {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        (folder / _DONE).write_text(json.dumps({"extension": extension, "sources": [str(s) for s in sources],
                                                "options": options, "torch": torch.__version__}, default=str))
    except Exception as exc:  # a missing compiler, ninja or header: the reason is reported, not raised
        return None, f"building {extension} failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}"
    return module, ""

