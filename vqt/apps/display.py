"""HTML views for notebooks: a text with the tokens the last edit recomputed highlighted."""

from __future__ import annotations

import html

from vqt.text.document import TextDocument


def edit_html(doc: TextDocument, max_chars: int = 4000) -> str:
    """The document's text with each token shaded by how many layers the last update recomputed it."""
    st = doc.last_stats
    if st is None or st.recomputed is None:
        return f"<pre>{html.escape(doc.text[:max_chars])}</pre>"
    L = max(1, len(st.dirty_per_layer))
    parts, cur = [], 0
    for (s, e), count in zip(doc.token_offsets, st.recomputed.tolist()):
        if s >= max_chars:
            break
        parts.append(html.escape(doc.text[cur:s]))
        piece = html.escape(doc.text[s:e])
        if count:
            alpha = 0.15 + 0.75 * count / L
            parts.append(f'<span title="recomputed in {count}/{L} layers" '
                         f'style="background: rgba(255, 120, 0, {alpha:.2f})">{piece}</span>')
        else:
            parts.append(piece)
        cur = e
    legend = (f"<p><b>{sum(1 for c in st.recomputed.tolist() if c)}</b> of {st.n_tokens} tokens recomputed; "
              f"{st.macs:.3g} MACs vs {st.dense_macs:.3g} dense ({st.ratio:.1f}x fewer); darker = more layers</p>")
    return legend + '<pre style="white-space: pre-wrap">' + "".join(parts) + "</pre>"
