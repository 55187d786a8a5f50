"""Proofs with each group's prompt computed once, giving the validator's bits at about two thirds of the work.

The validator runs prompt + completion alone through the model. The 16 rollouts of a group share their
prompt, and in a causal model the prompt's keys, values and hidden states do not depend on what follows,
so they are computed once per group; the completions then run as packed rows (no padding in the
products). Attention alone sees whole sequences: the validator's causal call on [prompt, completion],
with the prompt's cached queries, keys and values copied in (attention is a few percent of the work,
and attending from the completion rows alone over cached keys rounds differently on an H100:
bench/proof_exactness.py).

That gives the validator's bits only where each per-row function (a projection, a norm) rounds a row the
same way at our row count as at the validator's, its sequence length. `RowInvariance` measures which row
counts do on the device at start-up; a rollout whose length is not among them is proved alone, unpadded,
in the validator's own shapes, and our own row counts are padded to ones that are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.common.paths import cache_root
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.protocol.sketches import r_vec, sketch_hidden
from grail_pipeline.proving.provers import BatchedProver, ProofJob, ProofRow, RolloutProof, place_rows, round_up

log = logging.getLogger("grail_pipeline")

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def supports_prefix_proofs(loaded: LoadedModel) -> bool:
    """The layer loop below reproduces transformers' Qwen2 decoder with SDPA attention, nothing else."""
    config = loaded.model.config
    return config.model_type == "qwen2" and loaded.attn_implementation == "sdpa" and not getattr(
        config, "use_sliding_window", False)


class RowInvariance:
    """The row counts at which every per-row function of a decoder layer rounds each row as a large product does.

    A matrix product's kernel, and with it the rounding of a row, can depend on the number of rows (on an
    H100 the MLP down projection does at 40 of 1020 lengths: bench/NOTES.md). Checked here with random
    rows through layer 0's own modules: every count from 1 to `max_length` (the validator's shapes) and
    every multiple of `step` up to `max_rows` (ours, after padding).
    """

    def __init__(self, exact: np.ndarray, max_length: int) -> None:
        self.exact = exact  # exact[m]: m rows give the reference bits
        self.max_length = max_length

    @classmethod
    def everywhere(cls, max_length: int, max_rows: int) -> "RowInvariance":
        """Every row count taken as exact: off the GPU, where proofs are checked against the tolerance only."""
        return cls(np.ones(max(max_length, max_rows) + 1, dtype=bool), max_length)

    @classmethod
    def cached(cls, decoder: torch.nn.Module, max_length: int, max_rows: int, step: int = 128,
               root: Path | None = None) -> "RowInvariance":
        """`measure`, kept on disk per device, software stack and shapes: it takes seconds, a restart should not."""
        path = (root or cache_root()) / "row-invariance" / f"{_stack_key(decoder, max_length, max_rows, step)}.npy"
        with contextlib.suppress(OSError, ValueError):
            exact = np.load(path, allow_pickle=False)
            if exact.dtype == np.bool_ and exact.shape == (_counts(max_length, max_rows, step)[-1] + 1,):
                return cls(exact, max_length)
        invariance = cls.measure(decoder, max_length, max_rows, step)
        with contextlib.suppress(OSError):
            write_atomically(path, lambda fh: np.save(fh, invariance.exact))
        return invariance

    @classmethod
    @torch.inference_mode()
    def measure(cls, decoder: torch.nn.Module, max_length: int, max_rows: int, step: int = 128) -> "RowInvariance":
        counts = _counts(max_length, max_rows, step)
        top = counts[-1]
        functions = _row_functions(decoder)
        weight = decoder.norm.weight
        generator = torch.Generator(weight.device).manual_seed(0)
        differs = torch.zeros(len(counts), dtype=torch.bool, device=weight.device)
        for fn in functions:
            width = fn.in_features if isinstance(fn, torch.nn.Linear) else weight.shape[0]
            x = torch.randn(top, width, generator=generator, device=weight.device, dtype=weight.dtype)
            reference = fn(x)
            differs |= torch.stack([(fn(x[:m]) != reference[:m]).any() for m in counts])
        exact = np.zeros(top + 1, dtype=bool)
        exact[counts] = ~differs.cpu().numpy()
        return cls(exact, max_length)

    def sequence_is_exact(self, length: int) -> bool:
        """Whether the validator's shape for a sequence of this length rounds as ours will."""
        return length <= self.max_length and bool(self.exact[length])

    def padded(self, rows: int, multiple: int = 1) -> int | None:
        """The fewest exact row counts at or above `rows` that `multiple` divides (None past the measured range)."""
        start = round_up(rows, multiple)
        later = np.flatnonzero(self.exact[start::multiple])
        return start + multiple * int(later[0]) if len(later) else None

    @property
    def inexact_lengths(self) -> list[int]:
        return [int(m) for m in np.flatnonzero(~self.exact[1:self.max_length + 1]) + 1]


def _counts(max_length: int, max_rows: int, step: int) -> list[int]:
    return sorted(set(range(1, max_length + 1)) | set(range(step, max_rows + 1, step)))


def _row_functions(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """Layer 0's per-row functions: every layer has the same shapes, so the same kernels."""
    layer = decoder.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
            layer.input_layernorm, decoder.norm]


def _stack_key(decoder: torch.nn.Module, max_length: int, max_rows: int, step: int) -> str:
    """What the measured rounding depends on: the device, the libraries and the functions' shapes."""
    device = decoder.norm.weight.device
    described: dict[str, object] = dict(
        version=1, torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        device=str(device), lengths=[max_length, max_rows, step],
        functions=[[type(fn).__name__, [list(p.shape) for p in fn.parameters()], str(fn.weight.dtype),
                    repr(getattr(fn, "variance_epsilon", None))] for fn in _row_functions(decoder)])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        described["gpu"] = [props.name, props.major, props.minor, props.multi_processor_count]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class _Chunk:
    """Rollouts of one group proved on its shared prompt, with the padded row counts of both passes."""

    job: int
    members: list[int]
    prompt_rows: int
    rows: int


@dataclass
class _PromptPass:
    """A group's prompt through every layer: keys and values per layer, and the final hidden rows."""

    length: int
    queries: list[torch.Tensor]  # [P, heads, head dim] per layer, after rotary embedding
    keys: list[torch.Tensor]  # [P, kv heads, head dim] per layer, after rotary embedding
    values: list[torch.Tensor]
    hidden: torch.Tensor  # [P, hidden], after the final norm


class PrefixProver(BatchedProver):
    """The prompt once per group, completions packed; the validator's own bits where `RowInvariance` allows."""

    name = "prefix"

    def __init__(self, loaded: LoadedModel, max_length: int = 1536, max_rows: int = 16384,
                 invariance: RowInvariance | None = None, **batched: int | float) -> None:
        super().__init__(loaded, **batched)
        self.max_rows = max_rows
        if invariance is None:
            on_gpu = loaded.device.type == "cuda"
            invariance = (RowInvariance.cached(self.decoder, max_length, max_rows + 128) if on_gpu
                          else RowInvariance.everywhere(max_length, max_rows))
        self.invariance = invariance
        if invariance.inexact_lengths:
            log.info("prefix prover: %d row counts up to %d round differently (their rollouts are proved whole)",
                     len(invariance.inexact_lengths), max_length)
        config = loaded.model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.layers = list(self.decoder.layers)
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        self.rotary = apply_rotary_pos_emb
        positions = torch.arange(invariance.max_length + 1, device=loaded.device)[None]
        probe = torch.zeros(1, dtype=loaded.dtype, device=loaded.device)
        cos, sin = self.decoder.rotary_emb(probe, positions)  # transformers' own table, position by position
        self.cos, self.sin = cos[0], sin[0]

    @torch.inference_mode()
    def prove_many(self, jobs: Sequence[ProofJob]) -> list[list[RolloutProof]]:
        out: list[list[RolloutProof | None]] = [[None] * len(job.completions) for job in jobs]
        shared, whole = self._plan(jobs)
        if not shared and not whole:
            return [[] for _ in jobs]
        r_vecs = {h: r_vec(h).to(self.loaded.device) for h in {job.randomness_hex for job in jobs}}
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        results: list[tuple[_Chunk | list[ProofRow], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        with stream:
            # every batch is queued before anything comes back, so the GPU never waits for the host
            for chunk in shared:
                job = jobs[chunk.job]
                results.append((chunk, self._prove_shared(job, chunk, r_vecs[job.randomness_hex])))
            for row in whole:  # alone and unpadded: every product in the validator's own shape
                results.append(([row], self._prove_batch([row], [r_vecs[jobs[row.job].randomness_hex]], span=1)))
            flat = [torch.cat(parts).cpu() for parts in zip(*(tensors for _, tensors in results))]
        self._unpack(jobs, results, flat, out)
        return [[p for p in group if p is not None] for group in out]

    def _plan(self, jobs: Sequence[ProofJob]) -> tuple[list[_Chunk], list[ProofRow]]:
        """Runs of a group's rollouts on its shared prompt, and the rollouts proved as whole sequences."""
        shared: list[_Chunk] = []
        whole: list[ProofRow] = []
        for j, job in enumerate(jobs):
            p = len(job.prompt_ids)
            prompt_rows = self.invariance.padded(p, self.attention_span)
            members = []
            for i, completion in enumerate(job.completions):
                if (prompt_rows is not None and self.invariance.sequence_is_exact(p + len(completion))
                        and len(completion) <= self.max_rows):
                    members.append(i)
                else:
                    whole.append(ProofRow(j, i, list(job.prompt_ids) + list(completion), p))
            for run in self._runs(members, [len(job.completions[i]) for i in members]):
                total = sum(len(job.completions[i]) for i in run)
                rows = self.invariance.padded(total)
                if rows is None:
                    whole.extend(ProofRow(j, i, list(job.prompt_ids) + list(job.completions[i]), p) for i in run)
                else:
                    shared.append(_Chunk(j, run, prompt_rows, rows))
        return shared, whole

    def _runs(self, members: list[int], lengths: list[int]) -> list[list[int]]:
        """Consecutive rollouts of a group with at most `max_rows` completion rows in each run."""
        runs: list[list[int]] = []
        rows = 0
        for i, n in zip(members, lengths):
            if not runs or rows + n > self.max_rows:
                runs.append([])
                rows = 0
            runs[-1].append(i)
            rows += n
        return runs

    def _unpack(self, jobs: Sequence[ProofJob], results, flat: list[torch.Tensor],
                out: list[list[RolloutProof | None]]) -> None:
        """Cut the read-back tensors into each rollout's proof, in the order they were queued."""
        sketches, indices, logprobs = flat
        pos = lp_pos = 0
        for what, _ in results:
            if isinstance(what, _Chunk):
                job = jobs[what.job]
                p = len(job.prompt_ids)
                prompt_sketches, prompt_indices = sketches[pos:pos + p], indices[pos:pos + p]
                pos += p
                for i in what.members:
                    c = len(job.completions[i])
                    out[what.job][i] = RolloutProof(torch.cat((prompt_sketches, sketches[pos:pos + c])),
                                                    torch.cat((prompt_indices, indices[pos:pos + c])),
                                                    [0.0] * p + logprobs[lp_pos:lp_pos + c].tolist())
                    pos += c
                    lp_pos += c
                continue
            pos, lp_pos = place_rows(what, flat, (pos, lp_pos), out)

    def _prove_shared(self, job: ProofJob, chunk: _Chunk,
                      r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sketches and indices of the prompt rows then of each completion's rows, and completion logprobs."""
        prompt = self._prompt_pass(job.prompt_ids, chunk.prompt_rows)
        completions = [job.completions[i] for i in chunk.members]
        hidden = self._completion_pass(prompt, completions, chunk.rows)
        rows = torch.cat((prompt.hidden, hidden))
        sketches, indices = sketch_hidden(rows, r)
        # the state before completion token t is the prompt's last row for t = 0, else completion row t - 1
        p = prompt.length
        before, starts = [], 0
        for completion in completions:
            before.append(torch.arange(p + starts - 1, p + starts + len(completion) - 1))
            before[-1][0] = p - 1
            starts += len(completion)
        states = rows.index_select(0, self._to_device(torch.cat(before)))
        targets = self._to_device(torch.tensor([t for c in completions for t in c], dtype=torch.long))
        return sketches, indices, self._token_logprobs(states, targets)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """transformers' Qwen2 decoder layers on rows [N, hidden], op for op, with attention left to `attend`."""
        cos, sin = self.cos[positions], self.sin[positions]
        n = hidden.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, -1, self.head_dim)
            k = attn.k_proj(x).view(n, -1, self.head_dim)
            v = attn.v_proj(x).view(n, -1, self.head_dim)
            q, k = self.rotary(q, k, cos, sin)
            hidden = hidden + attn.o_proj(attend(i, q, k, v).reshape(n, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.decoder.norm(hidden)

    def _embed(self, tokens: list[int], rows: int) -> torch.Tensor:
        """Token embeddings, then zero rows up to `rows` (padding that no real row attends to)."""
        ids = self._to_device(torch.tensor(tokens, dtype=torch.long))
        embedded = self.decoder.embed_tokens(ids)
        if rows == len(tokens):
            return embedded
        return torch.cat((embedded, embedded.new_zeros(rows - len(tokens), embedded.shape[1])))

    def _prompt_pass(self, prompt_ids: Sequence[int], rows: int) -> _PromptPass:
        """The prompt alone (padded to `rows`, a multiple of the attention span), causal, as the validator computes it."""
        p = len(prompt_ids)
        queries: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            queries.append(q[:p])
            keys.append(k[:p])
            values.append(v[:p])
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], is_causal=True, scale=self.scaling,
                                                 enable_gqa=True)
            return out[0].transpose(0, 1)

        positions = self._to_device(torch.cat((torch.arange(p), torch.zeros(rows - p, dtype=torch.long))))
        hidden = self._layers(self._embed(list(prompt_ids), rows), positions, attend)
        return _PromptPass(p, queries, keys, values, hidden[:p])

    def _completion_pass(self, prompt: _PromptPass, completions: list[list[int]], rows: int) -> torch.Tensor:
        """Every completion's rows after the final norm [sum of lengths, hidden], packed in order (padded to `rows`)."""
        p = prompt.length
        lengths = [len(c) for c in completions]
        total = sum(lengths)
        span = round_up(p + max(lengths), self.attention_span)
        batch = len(completions)
        # where each packed row sits in the [batch, span] grid of whole sequences (padding rows repeat the last)
        at_batch = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])
        at_position = torch.cat([p + torch.arange(n) for n in lengths])
        padding = torch.full((rows - total,), len(lengths) - 1)
        at_batch = torch.cat((at_batch, padding))
        at_position = torch.cat((at_position, torch.full((rows - total,), p)))
        positions = torch.cat((at_position[:total], torch.zeros(rows - total, dtype=torch.long)))
        at_batch, at_position, positions = (self._to_device(t) for t in (at_batch, at_position, positions))
        real = (at_batch[:total], at_position[:total])
        prefixes = (prompt.queries, prompt.keys, prompt.values)
        grids: list[torch.Tensor] = []  # [batch, span, heads, head dim] for q, k, v; padding stays zero

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # the validator's call on [prompt, completion] per row; the prompt's rows are recomputed and dropped
            if not grids:
                grids.extend(t.new_zeros(batch, span, t.shape[1], self.head_dim) for t in (q, k, v))
            for grid, new, prefix in zip(grids, (q, k, v), prefixes):
                grid[:, :p] = prefix[layer]
                grid[real] = new[:total]
            out = F.scaled_dot_product_attention(*(g.transpose(1, 2) for g in grids), is_causal=True,
                                                 scale=self.scaling, enable_gqa=True)
            return out.transpose(1, 2)[at_batch, at_position]

        tokens = [t for c in completions for t in c]
        return self._layers(self._embed(tokens, rows), positions, attend)[:total]
