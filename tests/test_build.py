"""Extension builds: cached by what changes the binary, reused without ninja, and announced every time."""

from __future__ import annotations

import os
import shutil

import pytest

from vqt.ops.build import build_key, build_root, jit_load

PROBE = """#include <Python.h>
#define CAT(a, b) CAT2(a, b)
#define CAT2(a, b) a##b
#define STR(a) STR2(a)
#define STR2(a) #a
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(%d); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A tiny extension (plain Python C API, seconds to build) in a fresh build cache."""
    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("building extensions needs ninja and a C++ compiler on PATH")
    monkeypatch.setenv("VQT_BUILD_DIR", str(tmp_path / "cache"))
    src = tmp_path / "probe.cpp"
    src.write_text(PROBE % 42)
    return src


def test_every_build_is_announced_and_reuse_needs_no_ninja(probe, tmp_path, monkeypatch, capfd):
    module, why = jit_load("vqt_probe", [probe])
    assert why == "" and module.answer() == 42
    err = capfd.readouterr().err
    assert "vqt: compiling the vqt_probe extension" in err and "took" in err and " s)" in err

    # A finished build is imported as it is: a broken ninja on PATH (another environment's) changes nothing.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\necho 'ninja from another environment' >&2\nexit 1\n")
    (fake / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    module, why = jit_load("vqt_probe", [probe])
    assert why == "" and module.answer() == 42
    assert capfd.readouterr().err == ""
    monkeypatch.undo()
    monkeypatch.setenv("VQT_BUILD_DIR", str(tmp_path / "cache"))

    # New flags or new source contents: a new build, announced again (not a silent rebuild in place).
    module, why = jit_load("vqt_probe", [probe], extra_cflags=["-O1"])
    assert why == "" and "compiling the vqt_probe extension" in capfd.readouterr().err
    probe.write_text(PROBE % 43)
    module, why = jit_load("vqt_probe", [probe])
    assert why == "" and module.answer() == 43 and "took" in capfd.readouterr().err
    assert len(list(build_root().glob("vqt_probe-*"))) == 3


def test_the_key_covers_sources_headers_flags_and_compiler(probe, tmp_path, monkeypatch):
    headers = tmp_path / "include"
    headers.mkdir()
    (headers / "common.h").write_text("#define X 1\n")
    key = build_key([probe], [headers], {"extra_cflags": ["-O3"]})
    assert key == build_key([probe], [headers], {"extra_cflags": ["-O3"]})
    assert key != build_key([probe], [headers], {"extra_cflags": ["-O2"]})
    (headers / "common.h").write_text("#define X 2\n")
    assert key != (key := build_key([probe], [headers], {"extra_cflags": ["-O3"]}))
    probe.write_text(PROBE % 7)
    assert key != (key := build_key([probe], [headers], {"extra_cflags": ["-O3"]}))
    monkeypatch.setenv("CXX", "g++-that-is-not-installed")
    assert key != build_key([probe], [headers], {"extra_cflags": ["-O3"]})


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("VQT_BUILD_DIR", str(tmp_path / "cache"))
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++\n")
    module, why = jit_load("vqt_broken", [src])
    assert module is None and why.startswith("building vqt_broken failed:")
