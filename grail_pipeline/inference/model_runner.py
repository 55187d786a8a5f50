"""A slot-based decoder over the transformers model's own weights.

The runner keeps the paged KV cache (kv_cache.py; which pages a slot holds is the engine's host state,
kv_pages.py, applied here by `set_pages`), prefills a prompt once and copies it into the slots of its rollouts, and advances the active slots by one token per `step(width)`: embeddings, the layers
(the families' shared decoder, models/decoder.py), the head and sampling, all on the device, so the step can be
captured as one CUDA graph (cuda_graphs.py). Weights are shared with the transformers model (the
decoder's `fuse_weights`: the fused QKV and gate/up projections are the storage the transformers modules
then view), so proofs and decoding use the same numbers at no extra memory.

A step runs on `width` rows, the slots `set_active` named: the occupied ones, topped up with free ones to the
next of a few widths (`decode_widths`), each its own CUDA graph. A step's matrix products cost what their
rows cost, occupied or not, and a run's slots empty as it ends (a benchmark's tail, every window's drain
before its cut): at 512 slots 36 % of the rows computed over a 96-problem W1 run were empty
(bench/results/h200-2026-12-02/before/). Rows a free slot computes write only that slot's state, which its
next prefill resets. With shared prompt pages (`shared_prompt_pages`), the step also maps each slot to its row
for the attention's shared-prompt kernel, whose group tables `set_shared_prompts` fills.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from grail_pipeline.common.paths import cache_root
from grail_pipeline.inference.cuda_graphs import CudaGraphs
from grail_pipeline.inference.decode_attention import SharedPrompts, decode_attention
from grail_pipeline.inference.engine import SamplingParams
from grail_pipeline.inference.kv_cache import KVCache
from grail_pipeline.inference.kv_pages import PageChanges
from grail_pipeline.inference.models import decoder, family_for
from grail_pipeline.inference.prompt_groups import PromptGroups

PREFILL_ALIGN = 64
STEP = "step"  # the decode step's key among the runner's graphs is (STEP, width); a prefill's is (width, group)
DECODE_WIDTHS = 8  # decode widths per slot count at most: each is a graph, and a compiled variant past the first


def decode_widths(slots: int, count: int = DECODE_WIDTHS) -> list[int]:
    """The widths a decode step runs at: multiples of a step of slots / count (rounded up to 16), up to `slots`."""
    share = -(-slots // count)
    step = max(16, -(-share // 16) * 16)
    return sorted({min(slots, k * step) for k in range(1, -(-slots // step) + 1)})


def prefill_width(n: int, max_len: int) -> int:
    """The padded width a prompt of n + 1 tokens is prefilled at (its last token waits for decode)."""
    return min(max_len - 1, -(-max(n, 1) // PREFILL_ALIGN) * PREFILL_ALIGN)


class SlotRunner:
    """Decode state for `slots` sequences of up to `max_len` tokens each in `pages` KV pages, on the model's
    device."""

    def __init__(self, model: torch.nn.Module, sampling: SamplingParams, slots: int, max_len: int, pages: int,
                 compile_step: bool, shared_prompt_pages: int = 0) -> None:
        family_for(model.config)  # a model no family runs is refused here, before anything is allocated
        self.sampling = sampling
        self.slots = slots
        self.max_len = max_len
        self.dims = decoder.Dims.of(model.config)
        self.weights = decoder.fuse_weights(model)
        device, dtype = self.weights.embed.device, self.weights.embed.dtype
        self.device = device
        self.cos, self.sin = decoder.rotary_tables(model.get_decoder(), max_len, dtype, device)
        self.kv = KVCache(len(self.weights.layers), slots, pages, self.dims.kv_heads, max_len, self.dims.head_dim,
                          dtype, device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # input token per slot
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # its position
        self.generated = torch.zeros(slots, dtype=torch.long, device=device)
        self.targets = torch.zeros(slots, dtype=torch.long, device=device)
        self.seen = torch.zeros((slots, self.dims.vocab), dtype=torch.bool, device=device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)  # a device scalar keeps the step capturable
        self.widths = decode_widths(slots)
        # each width's static slot list (its graph reads it): slots 0..width-1 until `set_active` says otherwise
        self.active = {width: torch.arange(width, device=device) for width in self.widths}
        self.shared = self._shared_prompts(shared_prompt_pages) if shared_prompt_pages else None
        self.graphs = CudaGraphs(device)
        self._prefill_inputs: dict[tuple[int, int], torch.Tensor] = {}  # each prefill graph's static input
        self._kernels_at = self._kernels(compile_step)

    def _shared_prompts(self, max_shared: int) -> SharedPrompts:
        """The device side of prompt_groups.py (its shapes) and each row's softmax state after the shared pages."""
        groups = PromptGroups(self.slots, max_shared)
        members, pages, count, start = (torch.from_numpy(a).to(self.device) for a in groups.snapshot())
        heads = (self.slots, self.dims.heads)
        return SharedPrompts(members, pages, count, start,
                             row_of=torch.full((self.slots,), -1, dtype=torch.int32, device=self.device),
                             acc=torch.zeros(*heads, self.dims.head_dim, dtype=torch.float32, device=self.device),
                             m=torch.zeros(heads, dtype=torch.float32, device=self.device),
                             l=torch.zeros(heads, dtype=torch.float32, device=self.device))

    def buffer_bytes(self) -> int:
        """Bytes of the per-slot decode state besides the KV cache (the sampler's inputs and outputs, and the
        shared-prompt attention's tables and softmax state where it runs)."""
        shared = () if self.shared is None else tuple(vars(self.shared).values())
        return sum(t.nbytes for t in (self.tokens, self.positions, self.generated, self.targets,
                                      self.seen, self.next_tokens, self.kv.table, *self.active.values(), *shared))

    def step_logits_bytes(self) -> int:
        """The decode step's float32 logits [slots, vocab], the largest temporary of the head and sampler."""
        return self.slots * self.dims.vocab * 4

    def _kernels(self, compile_step: bool) -> Callable[[int], tuple[Callable, Callable, Callable]]:
        """The step's three kernels for a width: compiled for the full width with static shapes (as before there
        were widths), once more with a dynamic row count for every narrower width; eager off the GPU."""
        kernels = (decoder.pre_attention, decoder.post_attention, decoder.head_and_sample)
        if not compile_step:
            return lambda width: kernels
        # compiled kernels are kept between runs, so a restarted miner skips most of the compilation
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        full = tuple(torch.compile(kernel, dynamic=False, fullgraph=True) for kernel in kernels)
        narrow = tuple(torch.compile(kernel, dynamic=True, fullgraph=True) for kernel in kernels)
        return lambda width: full if width == self.slots else narrow

    @torch.inference_mode()
    def capture_graphs(self, group: int, max_prompt_tokens: int, warmup_steps: int = 3) -> None:
        """The decode step's graph, and the prefill graph of every width a prompt of up to `max_prompt_tokens`
        needs for a group of `group` rollouts, captured now (off the GPU: nothing).

        The step's warm-up runs compile, autotune and load every kernel outside the capture. Capturing a
        prefill later, while the prover thread runs kernels of its own, fails in the default capture mode
        (seen on an H100 in `mine`), and takes the host away from decoding in any mode.
        """
        if not self.graphs.on_gpu:
            return
        for width in sorted(self.widths, reverse=True):  # the full width first: its compile is the static one
            self.graphs.capture((STEP, width), lambda w=width: self._step(w), warmups=warmup_steps,
                                thread_local=False)
        for width in sorted({prefill_width(n, self.max_len) for n in range(1, max_prompt_tokens)}):
            self._prefill_input((width, group))

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
        key = (width, len(slots))
        if self.graphs.on_gpu:
            packed = packed.pin_memory()  # an async copy: the host does not wait for queued decode steps
            static = self._prefill_input(key)
            static.copy_(packed, non_blocking=True)
        self.graphs.run(key, lambda: self._prefill(packed, width, len(slots)))

    def release(self, slots: list[int]) -> None:
        """Park finished slots at position 0, so that until they are refilled they read one key, not hundreds."""
        index = self._upload(torch.tensor(slots, dtype=torch.long))
        self.positions.index_put_((index,), torch.zeros_like(index))

    def set_pages(self, changes: PageChanges) -> None:
        """The page table's entries `changes` names, set behind the work already queued: steps in flight still
        read the entries they were launched with (a page taken back may be written by them, never read after)."""
        if len(changes):
            packed = self._upload(torch.from_numpy(np.stack([changes.slots, changes.columns, changes.pages])))
            self.kv.set_pages(packed[0], packed[1], packed[2])

    def set_shared_prompts(self, groups: PromptGroups) -> None:
        """prompt_groups.py's arrays into the device tables, behind the work already queued (as `set_pages`)."""
        for device, host in zip((self.shared.members, self.shared.pages, self.shared.count, self.shared.start),
                                groups.snapshot(), strict=True):
            device.copy_(self._upload(torch.from_numpy(host)), non_blocking=True)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, copied behind the queued work (pinned: the host does not wait for it)."""
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _prefill_input(self, key: tuple[int, int]) -> torch.Tensor:
        """The static input of the prefill graph for (width, group), its graph captured first if need be."""
        if key not in self._prefill_inputs:
            width, group = key
            static = torch.zeros(width + 2 + 2 * group, dtype=torch.long, device=self.device)
            static[width + 2:width + 2 + group] = torch.arange(group)  # distinct slots for the warm-up run
            # thread_local: a width first met mid-run is captured while other threads use the GPU
            self.graphs.capture(key, lambda: self._prefill(static, width, group), warmups=1, thread_local=True)
            self._prefill_inputs[key] = static
        return self._prefill_inputs[key]

    def _prefill(self, packed: torch.Tensor, width: int, group: int) -> None:
        """The prefill on device tensors only: [prompt padded to width+1, n, slots, targets]."""
        d, w = self.dims, self.weights
        packed = packed.to(self.device, non_blocking=True)
        ids, n, slots, targets = packed.split([width + 1, 1, group, group])
        x = w.embed[ids[:width]]
        cos, sin = self.cos[:width], self.sin[:width]
        rows = self.kv.rows(slots[:, None], torch.arange(width, device=self.device)[None, :])  # [group, width]
        for i, layer in enumerate(w.layers):
            q, k, v = decoder.pre_attention(x, layer.ln1, layer.qkv_w, layer.qkv_b, layer.q_norm, layer.k_norm, cos,
                                            sin, d.eps, d.heads, d.kv_heads, d.head_dim)
            self.kv.write(i, rows, k, v)  # into every rollout's slot (a page they share takes the same values 16 times)
            k_t, v_t = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, width, D]
            attn = F.scaled_dot_product_attention(q.transpose(0, 1), k_t, v_t, is_causal=True, enable_gqa=True)
            x = decoder.post_attention(attn.transpose(0, 1), x, layer.o_w, layer.ln2, layer.gate_up_w, layer.down_w,
                                      d.eps)
        self.tokens.index_put_((slots,), ids.index_select(0, n).expand(group))
        self.positions.index_put_((slots,), n.expand(group))
        self.generated.index_put_((slots,), torch.zeros_like(slots))
        self.targets.index_put_((slots,), targets)
        self.seen.index_put_((slots,), ~self._true)
        self.seen.index_put_((slots[:, None], ids[None, :]), self._true)

    def width_for(self, occupied: int) -> int:
        """The narrowest decode width that holds `occupied` slots."""
        return next(width for width in self.widths if width >= occupied)

    def set_active(self, slots: torch.Tensor) -> None:
        """The slots the next step of width len(slots) runs on (a host tensor, pinned on the GPU: the copy is
        queued behind the steps in flight and the caller must keep the buffer until that step has run)."""
        self.active[len(slots)].copy_(slots, non_blocking=True)

    def step(self, width: int | None = None) -> torch.Tensor:
        """Advance the `width` active slots (default: every slot) by one token; returns the static tensor of
        sampled tokens [slots] (a slot's entry is new only where it was active)."""
        width = self.slots if width is None else width
        self.graphs.run((STEP, width), lambda: self._step(width))
        return self.next_tokens

    @torch.inference_mode()
    def _step(self, width: int) -> None:
        s, d, w = self.sampling, self.dims, self.weights
        pre, post, head = self._kernels_at(width)
        slots = self.active[width]
        positions = self.positions[slots]
        x = w.embed[self.tokens[slots]]
        cos, sin = self.cos[positions], self.sin[positions]
        lengths = (positions + 1).to(torch.int32)
        rows = self.kv.rows(slots, positions)
        if self.shared is not None:  # each slot's row in this step, for the shared-prompt kernel
            self.shared.row_of.fill_(-1)
            self.shared.row_of.index_put_((slots,), torch.arange(width, dtype=torch.int32, device=self.device))
        for i, layer in enumerate(w.layers):
            q, k, v = pre(x, layer.ln1, layer.qkv_w, layer.qkv_b, layer.q_norm, layer.k_norm, cos, sin, d.eps,
                          d.heads, d.kv_heads, d.head_dim)
            self.kv.write(i, rows, k, v)
            k_cache, v_cache = self.kv.layer(i)
            attn = decode_attention(q, k_cache, v_cache, self.kv.table, lengths, slots, self.shared)
            x = post(attn, x, layer.o_w, layer.ln2, layer.gate_up_w, layer.down_w, d.eps)
        noise = torch.empty((width, s.top_k), dtype=torch.float32, device=self.device).exponential_()
        nxt = head(x, w.final_norm, w.head, self.seen[slots], self.generated[slots], self.targets[slots], noise,
                   d.eps, s.eos_token_id, s.repetition_penalty, s.temperature, s.top_k, s.top_p)
        self.seen.index_put_((slots, nxt), self._true)
        self.next_tokens.index_put_((slots,), nxt)
        self.tokens.index_put_((slots,), nxt)
        self.positions.index_put_((slots,), (positions + 1).clamp_(max=self.max_len - 1))
        self.generated.index_put_((slots,), self.generated[slots] + 1)
