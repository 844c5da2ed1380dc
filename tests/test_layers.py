"""The package's layers: every import inside vqt points down the stack of docs/architecture.md, and the
engine works without the applications' extras."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vqt"
LAYERS = ["ops", "modeling", "engine", "text", "histories", "training", "pretrained", "apps"]


def layer_of(module: str) -> int:
    """Index of a vqt module's layer; -1 for the leaf modules at the package top (vqt._errors, ...)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return -1
    return LAYERS.index(parts[1])


def imports(path: Path) -> list[str]:
    """vqt modules imported by a file, at any depth (function-level imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vqt"):
            out += [f"{node.module}.{a.name}" if layer_of(f"{node.module}.{a.name}") >= 0 and node.module == "vqt"
                    else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("vqt")]
    return out


def test_imports_only_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        if module in ("vqt", "vqt.__main__"):
            continue  # the package's public names and `python -m vqt` gather from every layer
        for target in imports(path):
            there = layer_of(target)
            if target != "vqt" and there > own or (own == -1 and there >= 0):
                bad.append(f"{module} imports {target}")
            if target == "vqt" and own >= 0:
                bad.append(f"{module} imports the top-level package")
    assert not bad, "imports pointing up the layers:\n" + "\n".join(sorted(bad))


def test_the_engine_imports_without_the_applications_extras():
    """A core install (no pygls, lsprotocol, matplotlib, gguf, ray) can build, edit and read a Document."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('pygls', 'lsprotocol', 'matplotlib', 'gguf', 'ray'):\n"
            "            raise ImportError(f'{name} is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from vqt import Document, VQTConfig, VQTModel, TextDocument\n"
            "m = VQTModel(VQTConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, codebook_size=4)).eval()\n"
            "d = Document(m, [1, 2, 3, 4])\n"
            "d.replace(1, 2, [7, 8])\n"
            "print(d.codes.shape)\n"
            "from vqt.apps.cli import main\n"
            "sys.exit(main(['lsp']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("torch.Size([2, 5, 2])"), proc.stdout + proc.stderr
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "pip install 'vqt[lsp]'" in last and "Traceback" not in proc.stderr, proc.stderr
