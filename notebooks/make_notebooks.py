"""Writes notebooks/replay_history.ipynb from the cells below (run it after editing them)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("# Replaying a Wikipedia edit history through VQT\n\n"
                      "Load a real revision history, replay it edit by edit through the incremental engine, "
                      "look at the distribution of operations saved, and see which tokens one edit recomputed. "
                      "Set `MAX_EDITS` higher for a fuller picture; CI runs this notebook with the small default."),
    new_code_cell("import os\nfrom pathlib import Path\n\nimport matplotlib.pyplot as plt\nimport numpy as np\n"
                  "import torch\nfrom IPython.display import HTML, display\n\n"
                  "from vqt.apps.loading import load_model\nfrom vqt.histories.formats import iter_history\nfrom vqt.apps.demo import demo_history\n"
                  "from vqt.apps.display import edit_html\nfrom vqt.histories.replay import format_summary, replay, summarize\n"
                  "from vqt.text.document import TextDocument\n\n"
                  "MAX_EDITS = int(os.environ.get('VQT_NOTEBOOK_EDITS', 20))\nWINDOW = 512"),
    new_markdown_cell("## A history and a model\n\nThe Nintendo Switch article's API history from `../shared/data` "
                      "when it is there, else the project's built-in demo history. The model is the shipped "
                      "small VQT model (or the built-in demo model before one is shipped)."),
    new_code_cell("history = Path('../../shared/data/wiki/api/nintendo_switch.json.xz')\n"
                  "revisions = list(iter_history(history)) if history.exists() else demo_history()\n"
                  "model, name, tokenizer = load_model(None, torch.float32)\n"
                  "print(f'{len(revisions)} revisions; model: {name}')\nprint(model.describe())"),
    new_markdown_cell("## Replay\n\nEvery atomic edit that touches the first `WINDOW` tokens, with the dense forward "
                      "and prefix reuse timed in the same process."),
    new_code_cell("records = list(replay(model, revisions, tokenizer, window_tokens=WINDOW, max_edits=MAX_EDITS))\n"
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
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, Path(__file__).with_name("replay_history.ipynb"))


if __name__ == "__main__":
    main()
