"""A slot-based Qwen2 decoder over the transformers model's own weights.

The runner keeps one KV cache row per slot ([layers, slots, kv_heads, max_len, head_dim]), prefills a
prompt once and copies it into the slots of its rollouts, and advances every slot by one token per
`step()`: embeddings, 36 layers, the tied head and sampling, all on the device, so the step can be
captured as one CUDA graph. Weights are shared with the transformers model (fused QKV and gate/up
projections are the storage the transformers modules then view), so proofs and decoding use the same
numbers at no extra memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grail_pipeline.common.errors import UserError
from grail_pipeline.common.paths import cache_root
from grail_pipeline.inference.decode_attention import decode_attention
from grail_pipeline.inference.engine import SamplingParams
from grail_pipeline.inference.sampler import apply_target_lengths, penalize_repeats, sample_top_k_top_p

PREFILL_ALIGN = 64


def prefill_width(n: int, max_len: int) -> int:
    """The padded width a prompt of n + 1 tokens is prefilled at (its last token waits for decode)."""
    return min(max_len - 1, -(-max(n, 1) // PREFILL_ALIGN) * PREFILL_ALIGN)


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    ln2: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor


def _fuse(modules: list[torch.nn.Linear], with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate output rows and make each module's parameter a view of the fused tensor."""
    weight = torch.cat([m.weight.data for m in modules], dim=0)
    bias = torch.cat([m.bias.data for m in modules], dim=0) if with_bias else None
    row = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = weight[row:row + n]
        if bias is not None:
            m.bias.data = bias[row:row + n]
        row += n
    return weight, bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: float32 statistics, scaled in the input dtype."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, `x * cos + rotate_half(x) * sin`, with cos/sin broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def pre_attention(x: torch.Tensor, ln1: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, eps: float, n_q: int, n_kv: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused QKV projection and rotary: q [N, Hq, D], k and v [N, Hkv, D]."""
    h = rms_norm(x, ln1, eps)
    qkv = F.linear(h, qkv_w, qkv_b)
    q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(-1, n_q, head_dim)
    k = k.view(-1, n_kv, head_dim)
    v = v.view(-1, n_kv, head_dim)
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
    """Final norm, tied head in the model dtype, float32 logits, then the miner's sampling."""
    logits = F.linear(rms_norm(x, norm_w, eps), head_w).float()
    logits = penalize_repeats(logits, seen, penalty)
    logits = apply_target_lengths(logits, generated, targets, eos_token_id)
    return sample_top_k_top_p(logits, temperature, top_k, top_p, noise)


class SlotRunner:
    """Decode state for `slots` sequences of up to `max_len` tokens each, on the model's device."""

    def __init__(self, model: torch.nn.Module, sampling: SamplingParams, slots: int, max_len: int,
                 compile_step: bool) -> None:
        cfg = model.config
        if cfg.model_type != "qwen2" or getattr(cfg, "use_sliding_window", False):
            raise UserError(f"the fast engine runs Qwen2 models; '{cfg.model_type}' needs --engine hf")
        self.sampling = sampling
        self.slots = slots
        self.max_len = max_len
        self.n_q = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.vocab = cfg.vocab_size
        decoder = model.get_decoder()
        self.embed = decoder.embed_tokens.weight
        self.final_norm = decoder.norm.weight
        self.head = model.get_output_embeddings().weight
        self.layers = [self._layer(layer) for layer in decoder.layers]
        device, dtype = self.embed.device, self.embed.dtype
        self.device = device
        self.cos, self.sin = self._rotary_tables(decoder.rotary_emb, max_len, dtype)
        shape = (len(self.layers), slots, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_ids = torch.arange(slots, device=device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # input token per slot
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # its position
        self.generated = torch.zeros(slots, dtype=torch.long, device=device)
        self.targets = torch.zeros(slots, dtype=torch.long, device=device)
        self.seen = torch.zeros((slots, self.vocab), dtype=torch.bool, device=device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)  # a device scalar keeps the step capturable
        self._prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self._pre, self._post, self._head = self._kernels(compile_step)

    def _layer(self, layer: torch.nn.Module) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], with_bias=attn.q_proj.bias is not None)
        gate_up_w, _ = _fuse([mlp.gate_proj, mlp.up_proj], with_bias=False)
        if qkv_b is None:
            qkv_b = torch.zeros(qkv_w.shape[0], dtype=qkv_w.dtype, device=qkv_w.device)
        return LayerWeights(layer.input_layernorm.weight, qkv_w, qkv_b, attn.o_proj.weight,
                            layer.post_attention_layernorm.weight, gate_up_w, mlp.down_proj.weight)

    def _rotary_tables(self, rotary: torch.nn.Module, max_len: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin per position exactly as the transformers rotary module computes them."""
        positions = torch.arange(max_len, device=self.embed.device)[None, :]
        probe = torch.zeros(1, dtype=dtype, device=self.embed.device)
        cos, sin = rotary(probe, positions)
        return cos[0].contiguous(), sin[0].contiguous()

    def _kernels(self, compile_step: bool) -> tuple[Callable, Callable, Callable]:
        if not compile_step:
            return pre_attention, post_attention, head_and_sample
        # compiled kernels are kept between runs, so a restarted miner skips most of the compilation
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        opts = dict(dynamic=False, fullgraph=True)
        return (torch.compile(pre_attention, **opts), torch.compile(post_attention, **opts),
                torch.compile(head_and_sample, **opts))

    @torch.inference_mode()
    def admit(self, prompt_ids: list[int], slots: list[int], targets: list[int]) -> None:
        """Prefill a prompt once into every slot of `slots` and reset their decode state.

        The prompt's last token is left for the first decode step, whose logits give every rollout its
        own first sample. The prefill runs over the prompt padded to a multiple of 64 (causal attention
        keeps padding out of the real positions; decode overwrites the padded positions before it reads
        them), so on a GPU each padded width is one CUDA graph, replayed for every problem.
        """
        n = len(prompt_ids) - 1
        width = prefill_width(n, self.max_len)
        padded = list(prompt_ids) + [prompt_ids[-1]] * (width + 1 - len(prompt_ids))
        packed = torch.tensor(padded + [n] + list(slots) + list(targets), dtype=torch.long)
        if self.device.type == "cuda":
            packed = packed.pin_memory()  # an async copy: the host does not wait for queued decode steps
        key = (width, len(slots))
        if self.device.type == "cuda":
            graph, static = self._prefill_graph(key)
            static.copy_(packed, non_blocking=True)
            graph.replay()
        else:
            self._prefill(packed, width, len(slots))

    def release(self, slots: list[int]) -> None:
        """Park finished slots at position 0, so that until they are refilled they read one key, not hundreds."""
        index = torch.tensor(slots, dtype=torch.long)
        if self.device.type == "cuda":
            index = index.pin_memory()
        index = index.to(self.device, non_blocking=True)
        self.positions.index_put_((index,), torch.zeros_like(index))

    def capture_prefills(self, group: int, max_prompt_tokens: int) -> None:
        """The prefill graph of every width a prompt of up to `max_prompt_tokens` needs, captured now.

        Capturing one later, while the prover thread runs kernels of its own, fails in the default
        capture mode (seen on an H100 in `mine`), and takes the host away from decoding in any mode.
        """
        if self.device.type != "cuda":
            return
        for width in sorted({prefill_width(n, self.max_len) for n in range(1, max_prompt_tokens)}):
            self._prefill_graph((width, group))

    def _prefill_graph(self, key: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if key not in self._prefill_graphs:
            width, group = key
            static = torch.zeros(width + 2 + 2 * group, dtype=torch.long, device=self.device)
            static[width + 2:width + 2 + group] = torch.arange(group)  # distinct slots for the warm-up run
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._prefill(static, width, group)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a width first met mid-run is captured while other threads use the GPU
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                self._prefill(static, width, group)
            self._prefill_graphs[key] = (graph, static)
        return self._prefill_graphs[key]

    def _prefill(self, packed: torch.Tensor, width: int, group: int) -> None:
        """The prefill on device tensors only: [prompt padded to width+1, n, slots, targets]."""
        packed = packed.to(self.device, non_blocking=True)
        ids, n, slots, targets = packed.split([width + 1, 1, group, group])
        x = self.embed[ids[:width]]
        cos, sin = self.cos[:width], self.sin[:width]
        for i, w in enumerate(self.layers):
            q, k, v = pre_attention(x, w.ln1, w.qkv_w, w.qkv_b, cos, sin, self.eps, self.n_q, self.n_kv,
                                    self.head_dim)
            k_t, v_t = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, width, D]
            self.k_cache[i, :, :, :width].index_put_((slots,), k_t.unsqueeze(0).expand(group, -1, -1, -1))
            self.v_cache[i, :, :, :width].index_put_((slots,), v_t.unsqueeze(0).expand(group, -1, -1, -1))
            attn = F.scaled_dot_product_attention(q.transpose(0, 1), k_t, v_t, is_causal=True, enable_gqa=True)
            x = post_attention(attn.transpose(0, 1), x, w.o_w, w.ln2, w.gate_up_w, w.down_w, self.eps)
        self.tokens.index_put_((slots,), ids.index_select(0, n).expand(group))
        self.positions.index_put_((slots,), n.expand(group))
        self.generated.index_put_((slots,), torch.zeros_like(slots))
        self.targets.index_put_((slots,), targets)
        self.seen.index_put_((slots,), ~self._true)
        self.seen.index_put_((slots[:, None], ids[None, :]), self._true)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Advance every slot by one token; returns the static tensor of sampled tokens [slots]."""
        s = self.sampling
        x = self.embed[self.tokens]
        cos, sin = self.cos[self.positions], self.sin[self.positions]
        lengths = (self.positions + 1).to(torch.int32)
        for i, w in enumerate(self.layers):
            q, k, v = self._pre(x, w.ln1, w.qkv_w, w.qkv_b, cos, sin, self.eps, self.n_q, self.n_kv, self.head_dim)
            self.k_cache[i][self.slot_ids, :, self.positions] = k
            self.v_cache[i][self.slot_ids, :, self.positions] = v
            attn = decode_attention(q, self.k_cache[i], self.v_cache[i], lengths)
            x = self._post(attn, x, w.o_w, w.ln2, w.gate_up_w, w.down_w, self.eps)
        noise = torch.empty((self.slots, s.top_k), dtype=torch.float32, device=self.device).exponential_()
        nxt = self._head(x, self.final_norm, self.head, self.seen, self.generated, self.targets, noise, self.eps,
                         s.eos_token_id, s.repetition_penalty, s.temperature, s.top_k, s.top_p)
        self.seen.index_put_((self.slot_ids, nxt), self._true)
        self.next_tokens.copy_(nxt)
        self.tokens.copy_(nxt)
        self.positions.add_(1).clamp_(max=self.max_len - 1)
        self.generated.add_(1)
        return self.next_tokens
