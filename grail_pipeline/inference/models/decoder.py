"""The decoder Qwen2, Qwen3, Llama and Mistral share, the one place its math lives: for the fast engine and
for the prefix prover.

These families run the same layer: RMSNorm, q/k/v projections, rotary embedding from transformers' own
rotary module (so every rope type transformers computes, llama3 scaling included, comes out as the
validator's), causal attention, o projection, SwiGLU MLP, final norm, a tied or untied head. They differ
only in parts read here from the modules themselves: q/k/v biases (Qwen2), RMSNorm on each head's queries
and keys before the rotary embedding (Qwen3), a head_dim other than hidden / heads (Qwen3). Which configs
a family runs is its own module's (`unsupported`); the checks every family shares are `unsupported_layer`.

Two forms of the same layer. The engine's (`pre_attention`, `post_attention`, `head_and_sample`) is free
functions over fused weights, so that torch.compile(fullgraph=True, dynamic=False) compiles each whole
and a decode step can be captured as one CUDA graph (absent parts are None, which compiles to the graph
without them: Qwen2's graph is the one it was before Qwen3 and Llama came). The prover's (`validator_rows`)
calls transformers' own modules op for op, because its bits must be the validator's, who runs
transformers (its norms, rotary embedding and SiLU·up may run as `eager_fused`'s kernels, which round exactly as
those ops do; the products and the norms' mean stay transformers' own calls); the per-row functions the prover's
row-count measurement checks (`row_functions`) are read from the same `LayerModules` that `validator_rows`
calls, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from grail_pipeline.inference.models import eager_fused
from grail_pipeline.inference.sampler import apply_target_lengths, penalize_repeats, sample_top_k_top_p

# rope types whose table does not depend on the sequence length (a "dynamic" one is recomputed per forward
# from the length the validator's call has, which one table for every position cannot reproduce)
STATIC_ROPE_TYPES = ("default", "llama3")


def unsupported_layer(config) -> str | None:
    """Why this decoder's math cannot run a config whatever its family (None: it can); reads the config only."""
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation '{config.hidden_act}'"
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "use_sliding_window", False) or any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        return f"rope type '{rope}'"
    return None


@dataclass(frozen=True)
class Dims:
    """The sizes the layer math needs, from the transformers config."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    vocab: int

    @classmethod
    def of(cls, config) -> "Dims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_attention_heads, config.num_key_value_heads, head_dim, config.rms_norm_eps,
                   config.vocab_size)


# --- weights: the engine's view of the transformers checkpoint ---------------------------------------

@dataclass
class LayerWeights:
    ln1: torch.Tensor
    qkv_w: torch.Tensor  # q_proj, k_proj, v_proj rows, in that order
    qkv_b: torch.Tensor | None  # Qwen2's q/k/v biases; None where the projections have none
    q_norm: torch.Tensor | None  # Qwen3's per-head RMSNorm of queries and keys; None where there is none
    k_norm: torch.Tensor | None
    o_w: torch.Tensor
    ln2: torch.Tensor
    gate_up_w: torch.Tensor  # gate_proj then up_proj rows
    down_w: torch.Tensor


@dataclass
class DecoderWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    head: torch.Tensor  # `embed` itself where the checkpoint ties them (Qwen2.5, Qwen3-4B, Llama-3.2-1B)


def fuse_weights(model: torch.nn.Module) -> DecoderWeights:
    """The engine's weights: q/k/v (with their biases, if any) and gate/up fused into one product each.

    The fused tensors are the storage: each transformers module's weight (and bias) becomes a view of
    its rows, so the numbers exist once (a copy would cost about 4 GB on the 3B model) and keep their
    values bit for bit. So after this the transformers modules view the engine's storage; nothing reads
    that, the prover gives the same bits on a model fused or not (tests/test_models.py). Idempotent: where
    a group's rows already lie one after another in one storage (a second engine on the same model) that
    storage is taken as it is, nothing is copied.
    """
    decoder = model.get_decoder()
    layers = []
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv_b = _fused_rows(qkv, "bias") if attn.q_proj.bias is not None else None
        q_norm, k_norm = (getattr(getattr(attn, name, None), "weight", None) for name in ("q_norm", "k_norm"))
        layers.append(LayerWeights(layer.input_layernorm.weight, _fused_rows(qkv, "weight"), qkv_b, q_norm, k_norm,
                                   attn.o_proj.weight,
                                   layer.post_attention_layernorm.weight,
                                   _fused_rows([mlp.gate_proj, mlp.up_proj], "weight"), mlp.down_proj.weight))
    return DecoderWeights(decoder.embed_tokens.weight, layers, decoder.norm.weight,
                          model.get_output_embeddings().weight)


def _fused_rows(modules: list[torch.nn.Linear], name: str) -> torch.Tensor:
    """The modules' `name` parameters (weight or bias) as one tensor of their rows, each module viewing its part."""
    parts = [getattr(m, name).data for m in modules]
    rows = sum(p.shape[0] for p in parts)
    first = parts[0]
    if all(p.is_contiguous() and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           for p in parts) and all(b.storage_offset() == a.storage_offset() + a.numel()
                                   for a, b in zip(parts, parts[1:])):
        return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
    fused = torch.cat(parts, dim=0)
    row = 0
    for m, part in zip(modules, parts):
        getattr(m, name).data = fused[row:row + part.shape[0]]
        row += part.shape[0]
    return fused


def rotary_tables(decoder: torch.nn.Module, length: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] for positions 0..length-1, from transformers' own rotary module."""
    positions = torch.arange(length, device=device)[None, :]
    probe = torch.zeros(1, dtype=dtype, device=device)
    cos, sin = decoder.rotary_emb(probe, positions)
    return cos[0].contiguous(), sin[0].contiguous()


# --- the engine's math: free functions, compiled whole ----------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The families' RMSNorm (Qwen2RMSNorm, Qwen3RMSNorm, LlamaRMSNorm): float32 statistics, scaled in the input
    dtype."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, `x * cos + rotate_half(x) * sin`, with cos/sin broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def pre_attention(x: torch.Tensor, ln1: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
                  q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, n_q: int, n_kv: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused QKV projection, the per-head q/k norms where there are any, and rotary: q [N, Hq, D], k and v
    [N, Hkv, D]."""
    h = rms_norm(x, ln1, eps)
    qkv = F.linear(h, qkv_w, qkv_b)
    q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(-1, n_q, head_dim)
    k = k.view(-1, n_kv, head_dim)
    v = v.view(-1, n_kv, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    c, s = cos[:, None, :], sin[:, None, :]
    return rotate(q, c, s), rotate(k, c, s), v


def post_attention(attn: torch.Tensor, x: torch.Tensor, o_w: torch.Tensor, ln2: torch.Tensor,
                   gate_up_w: torch.Tensor, down_w: torch.Tensor, eps: float) -> torch.Tensor:
    """Output projection and residual, then the SwiGLU MLP and residual."""
    x = x + F.linear(attn.flatten(1), o_w)
    gate, up = F.linear(rms_norm(x, ln2, eps), gate_up_w).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


def head_and_sample(x: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, seen: torch.Tensor,
                    generated: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, eps: float,
                    eos_token_id: int, penalty: float, temperature: float, top_k: int,
                    top_p: float) -> torch.Tensor:
    """Final norm, head in the model dtype, float32 logits, then the miner's sampling."""
    logits = F.linear(rms_norm(x, norm_w, eps), head_w).float()
    logits = penalize_repeats(logits, seen, penalty)
    logits = apply_target_lengths(logits, generated, targets, eos_token_id)
    return sample_top_k_top_p(logits, temperature, top_k, top_p, noise)


# --- the prover's math: transformers' modules, op for op --------------------------------------------

class LayerModules(NamedTuple):
    """A decoder layer's per-row functions (each norm and projection sees one row at a time), in the order
    `validator_rows` applies them; q_norm and k_norm (Qwen3) see one head of a row at a time, and are None
    where the family has none. Attention mixes rows and is left to the caller; the activation and the rotary
    embedding are element-wise."""

    input_norm: torch.nn.Module
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    o: torch.nn.Linear
    post_norm: torch.nn.Module
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear

    @classmethod
    def of(cls, layer: torch.nn.Module) -> "LayerModules":
        attn, mlp = layer.self_attn, layer.mlp
        return cls(layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, getattr(attn, "q_norm", None),
                   getattr(attn, "k_norm", None), attn.o_proj,
                   layer.post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


class RowFunction(NamedTuple):
    """A per-row function and the shape of one row of its input (a q/k norm sees a row as [heads, head_dim])."""

    module: torch.nn.Module
    row_shape: tuple[int, ...]


def row_functions(decoder: torch.nn.Module) -> list[RowFunction]:
    """Every per-row function `validator_rows` calls: layer 0's (every layer has the same shapes, so the
    same kernels), then the final norm, each with the shape of the rows it is given there."""
    config = decoder.config
    dims = Dims.of(config)
    m = LayerModules.of(decoder.layers[0])
    hidden = (config.hidden_size,)
    shapes = dict(input_norm=hidden, q_norm=(dims.heads, dims.head_dim), k_norm=(dims.kv_heads, dims.head_dim),
                  post_norm=hidden)
    out = [RowFunction(module, shapes.get(name) or (module.in_features,))
           for name, module in m._asdict().items() if module is not None]
    return [*out, RowFunction(decoder.norm, hidden)]


def validator_rows(decoder: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   head_dim: int,
                   attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   fused: bool = False) -> torch.Tensor:
    """transformers' decoder layers on rows [N, hidden], op for op, with attention left to `attend`.

    `attend(layer, q, k, v)` gets q [N, heads, D] and k, v [N, kv heads, D] after the rotary embedding
    (cos/sin [N, D], one row per input row) and returns [N, heads, D]. Ends with the final norm. The MLP
    is the family's MLP forward written out, `down(act(gate(x)) * up(x))`, so that every product it runs is
    one of `row_functions`; Qwen3's q/k norms run on the [N, heads, D] view, as its attention runs them on
    [1, L, heads, D]. With `fused`, the norms, the rotary embedding and SiLU·up run as `eager_fused`'s kernels,
    which give these ops' bits in fewer passes where they apply (the GPU, 16-bit dtypes) and call them elsewhere.
    """
    n = hidden.shape[0]
    norm = eager_fused.rms_norm if fused else _call
    rotate = eager_fused.rotary if fused else apply_rotary_pos_emb
    act_mul = eager_fused.silu_mul if fused else _act_mul
    for i, layer in enumerate(decoder.layers):
        m = LayerModules.of(layer)
        x = norm(m.input_norm, hidden)
        q = m.q(x).view(n, -1, head_dim)
        k = m.k(x).view(n, -1, head_dim)
        v = m.v(x).view(n, -1, head_dim)
        if m.q_norm is not None:
            q, k = norm(m.q_norm, q), norm(m.k_norm, k)
        q, k = rotate(q, k, cos, sin)
        hidden = hidden + m.o(attend(i, q, k, v).reshape(n, -1))
        x = norm(m.post_norm, hidden)
        hidden = hidden + m.down(act_mul(layer.mlp.act_fn, m.gate(x), m.up(x)))
    return norm(decoder.norm, hidden)


def _call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _act_mul(act: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up
