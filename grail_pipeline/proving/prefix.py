"""Proofs with each group's prompt computed once, giving the validator's bits at about two thirds of the work.

The validator runs prompt + completion alone through the model. The 16 rollouts of a group share their
prompt, and in a causal model the prompt's keys, values and hidden states do not depend on what follows,
so they are computed once per group; the completions then run as packed rows (no padding in the
products). Attention alone sees whole sequences: the validator's causal call on [prompt, completion],
with the prompt's cached queries, keys and values copied in (attention is a few percent of the work,
and attending from the completion rows alone over cached keys rounds differently on an H100:
bench/proof_exactness.py).

Groups are proved together: the pipeline hands the prover the groups waiting for it (up to 8), and runs of
groups with the same randomness share one pass (`_Pass`): their prompts in one prompt pass laid out as a
[groups, width] batch, their completions in one completion pass. The prover's host cost is per pass, not
per row, and on an H200 the W1 pipeline's GPU sat idle 35 % of the time while the prover thread queued one
pass per group (bench/results/h200-2026-12-02/).

The completion pass's workspace is bounded by a budget in bytes (`workspace_bytes`), not by the longest
group: a group's rollouts are cut into runs whose rows fit it (`_runs`), each run proved on the group's
prompt in row counts `RowInvariance` measured exact, so the bits are the same at any budget (the prover
tests compare every position at a budget that forces a cut). The budget is estimated from shapes
(`completion_row_bytes`, `logit_row_bytes`); by default a quarter of what this process may still reserve
when the prover is made, at most `MAX_ROWS` completion rows and 2,048 logit rows (7.1 GB on the 3B preset).

That gives the validator's bits only where each per-row function (a projection, a norm) rounds a row the
same way at our row count as at the validator's, its sequence length. `RowInvariance` (row_invariance.py)
measures which row counts do on the device at start-up; a rollout whose length is not among them is
proved alone, unpadded, in the validator's own shapes, and our own row counts are padded to ones that are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grail_pipeline.inference.devices import memory_limit_bytes
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.inference.memory import Component
from grail_pipeline.inference.models import family_for, find_family
from grail_pipeline.inference.models.decoder import Dims, rotary_tables, validator_rows
from grail_pipeline.protocol.sketches import r_vec, sketch_hidden
from grail_pipeline.proving.batched import BatchedProver
from grail_pipeline.proving.proofs import ProofJob, ProofRow, RolloutProof, place_rows, round_up
from grail_pipeline.proving.row_invariance import RowInvariance

log = logging.getLogger("grail_pipeline")

MAX_ROWS = 32768  # completion rows of a pass at most: two W1 groups at their longest, about four and a half on average
MAX_GROUPS = 8  # groups of one pass at most (the pipeline hands the prover at most 8 waiting groups)
LOGIT_SHARE = 0.4  # of the budget, at most, for the logits of the logprob pass


def completion_row_bytes(config, dtype_bytes: int) -> int:
    """Workspace per completion row of a layer at its peak, from shapes: the MLP's three live [rows, intermediate]
    tensors, the hidden rows, the float32 norm statistics, and q/k/v with their rotated copies and grids."""
    dims = Dims.of(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    qkv = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    return dtype_bytes * (3 * inter + 3 * hidden + 6 * qkv) + 8 * hidden


def logit_row_bytes(vocab: int, dtype_bytes: int) -> int:
    """Per row of the logprob pass: the head's logits in the model's dtype, in float32, and logsumexp's float32."""
    return vocab * (dtype_bytes + 4 + 4)


def default_workspace_bytes(loaded: LoadedModel) -> int:
    """A quarter of what the process may still reserve on its GPU (`--memory-gb` included), at most the fixed
    bound's bytes; off the GPU the fixed bound's bytes."""
    dtype_bytes = loaded.dtype.itemsize
    config = loaded.model.config
    ceiling = (MAX_ROWS * completion_row_bytes(config, dtype_bytes)
               + 2048 * logit_row_bytes(config.vocab_size, dtype_bytes))
    limit = memory_limit_bytes(loaded.device)
    if limit is None:
        return ceiling
    free_on_card, _ = torch.cuda.mem_get_info(loaded.device)
    free = min(free_on_card, limit - torch.cuda.memory_reserved(loaded.device))
    return max(0, min(ceiling, free // 4))

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def supports_prefix_proofs(loaded: LoadedModel) -> bool:
    """A model family (inference/models/) reproduces the decoder op for op, and attention is SDPA's, the call
    the prover's attention makes: the validator's bits, nothing else."""
    return find_family(loaded.model.config) is not None and loaded.attn_implementation == "sdpa"


@dataclass
class _Run:
    """Rollouts of one group proved on its prompt in one pass (consecutive members within `max_rows`)."""

    job: int
    members: list[int]
    rows: int  # their completion rows, unpadded


@dataclass
class _Pass:
    """Runs of one or more groups (one randomness) proved together: the groups' prompts in one prompt pass
    laid out as a [groups, prompt_width] batch, every run's completions in one completion pass.

    One pass for several groups instead of one per group: the prover's host cost is per pass (about fifty
    launches per layer per pass, each a Python call), and on an H200 the pipeline's GPU sat idle 35 % of a W1
    run while the prover thread was busy queueing (bench/results/h200-2026-12-02/, `pipeline_profile.py`)."""

    jobs: list[int]  # distinct groups, in the order of their prompts in the prompt pass
    runs: list[_Run]
    prompt_width: int  # each prompt padded to this (a multiple of the attention span)
    prompt_rows: int  # rows of the prompt pass: an exact count >= len(jobs) * prompt_width
    rows: int  # rows of the completion pass: an exact count >= the runs' rows


@dataclass
class _PromptPass:
    """The pass's prompts through every layer: queries, keys and values per layer in the [groups, width] layout
    (rows past each prompt zeroed, as a lone prompt's grid has zeros there), and the real final hidden rows."""

    lengths: list[int]
    width: int
    queries: list[torch.Tensor]  # [G, width, heads, head dim] per layer, after rotary embedding
    keys: list[torch.Tensor]  # [G, width, kv heads, head dim] per layer, after rotary embedding
    values: list[torch.Tensor]
    hidden: torch.Tensor  # [sum of lengths, hidden]: every prompt's rows after the final norm, prompt after prompt

    def last_row(self, g: int) -> int:
        """Row of `hidden` holding prompt g's last position."""
        return sum(self.lengths[:g + 1]) - 1


class PrefixProver(BatchedProver):
    """The prompt once per group, completions packed; the validator's own bits where `RowInvariance` allows."""

    name = "prefix"

    def __init__(self, loaded: LoadedModel, max_length: int = 1536, max_rows: int = MAX_ROWS,
                 invariance: RowInvariance | None = None, workspace_bytes: int | None = None,
                 fused_elementwise: bool = True, **batched: int | float) -> None:
        family_for(loaded.model.config)  # a model no family runs is refused before the measurement
        super().__init__(loaded, **batched)
        # the norms, rotary embedding and SiLU·up as eager_fused's kernels (on a GPU; elsewhere the eager ops): on an
        # H200 their proofs equal the eager ops' bit for bit on 128 W1 rollouts, 8.31 -> 7.27 ms per rollout alone
        # (bench/results/h200-2026-12-03/silu-exact/); False runs PyTorch's eager ops
        self.fused_elementwise = fused_elementwise
        self.workspace_bytes = default_workspace_bytes(loaded) if workspace_bytes is None else workspace_bytes
        self.row_bytes = completion_row_bytes(loaded.model.config, loaded.dtype.itemsize)
        logit_bytes = logit_row_bytes(loaded.model.config.vocab_size, loaded.dtype.itemsize)
        # the budget split: logit rows first (at most their share), the rest to completion rows; one of each at least
        self.logit_chunk = max(1, min(self.logit_chunk, int(LOGIT_SHARE * self.workspace_bytes) // logit_bytes))
        self.max_rows = max(1, min(max_rows, (self.workspace_bytes - self.logit_chunk * logit_bytes) // self.row_bytes))
        if invariance is None:
            on_gpu = loaded.device.type == "cuda"
            invariance = (RowInvariance.cached(self.decoder, max_length, self.max_rows + 128) if on_gpu
                          else RowInvariance.everywhere(max_length, self.max_rows))
        self.invariance = invariance
        if invariance.inexact_lengths:
            log.info("prefix prover: %d row counts up to %d round differently (their rollouts are proved whole)",
                     len(invariance.inexact_lengths), max_length)
        self.head_dim = Dims.of(loaded.model.config).head_dim
        self.scaling = self.head_dim ** -0.5
        # transformers' own table, position by position
        self.cos, self.sin = rotary_tables(self.decoder, invariance.max_length + 1, loaded.dtype, loaded.device)

    def memory(self) -> list[Component]:
        """The prover's part of the memory: its workspace bound, its rotary tables and the row-count measurement."""
        logit_bytes = logit_row_bytes(self.loaded.model.config.vocab_size, self.loaded.dtype.itemsize)
        out = [Component("prover_workspace", self.max_rows * self.row_bytes + self.logit_chunk * logit_bytes,
                         "computed", f"budget {self.workspace_bytes / 1e9:.2f} GB: runs of at most {self.max_rows} "
                                     f"completion rows, logits in chunks of {self.logit_chunk} rows"),
               Component("prover_tables", self.cos.nbytes + self.sin.nbytes, "exact", "rotary cos/sin tables")]
        measured = self.invariance.measurement
        if measured is not None:
            out.append(measured)
        return out

    @torch.inference_mode()
    def prove_many(self, jobs: Sequence[ProofJob]) -> list[list[RolloutProof]]:
        out: list[list[RolloutProof | None]] = [[None] * len(job.completions) for job in jobs]
        passes, whole = self._plan(jobs)
        if not passes and not whole:
            return [[] for _ in jobs]
        r_vecs = {h: r_vec(h).to(self.loaded.device) for h in {job.randomness_hex for job in jobs}}
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        results: list[tuple[_Pass | list[ProofRow], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        with stream:
            # every batch is queued before anything comes back, so the GPU never waits for the host
            for shared in passes:
                results.append((shared, self._prove_pass(jobs, shared, r_vecs[jobs[shared.jobs[0]].randomness_hex])))
            for row in whole:  # alone and unpadded: every product in the validator's own shape
                results.append(([row], self._prove_batch([row], [r_vecs[jobs[row.job].randomness_hex]], span=1)))
            flat = [torch.cat(parts).cpu() for parts in zip(*(tensors for _, tensors in results))]
        self._unpack(jobs, results, flat, out)
        return [[p for p in group if p is not None] for group in out]

    def _plan(self, jobs: Sequence[ProofJob]) -> tuple[list[_Pass], list[ProofRow]]:
        """Passes of runs on shared prompts, and the rollouts proved as whole sequences.

        A group's rollouts whose sequence length the validator's shapes round as ours go into runs of at most
        `max_rows` completion rows; runs of groups with the same randomness are packed, in order, into passes
        of at most `max_rows` completion rows. A pass whose row counts cannot be padded to exact ones is split
        back into its groups, and a group that still cannot is proved whole."""
        runs: list[_Run] = []
        whole: list[ProofRow] = []
        for j, job in enumerate(jobs):
            p = len(job.prompt_ids)
            prompt_ok = self.invariance.padded(p, self.attention_span) is not None
            members = []
            for i, completion in enumerate(job.completions):
                if prompt_ok and self.invariance.sequence_is_exact(p + len(completion)) and len(completion) <= self.max_rows:
                    members.append(i)
                else:
                    whole.append(ProofRow(j, i, list(job.prompt_ids) + list(completion), p))
            for run in self._runs(members, [len(job.completions[i]) for i in members]):
                runs.append(_Run(j, run, sum(len(job.completions[i]) for i in run)))
        passes: list[_Pass] = []
        batch: list[_Run] = []
        for run in runs:
            same = batch and jobs[batch[0].job].randomness_hex == jobs[run.job].randomness_hex
            groups = len({r.job for r in batch} | {run.job})
            if batch and (not same or sum(r.rows for r in batch) + run.rows > self.max_rows or groups > MAX_GROUPS):
                passes.extend(self._laid_out(jobs, batch, whole))
                batch = []
            batch.append(run)
        if batch:
            passes.extend(self._laid_out(jobs, batch, whole))
        return passes, whole

    def _laid_out(self, jobs: Sequence[ProofJob], runs: list[_Run], whole: list[ProofRow]) -> list[_Pass]:
        """`runs` as one pass with exact row counts; else one pass per run; a run with no exact counts goes whole."""
        shared = self._pass(jobs, runs)
        if shared is not None:
            return [shared]
        if len(runs) > 1:
            return [p for run in runs for p in self._laid_out(jobs, [run], whole)]
        job = jobs[runs[0].job]
        whole.extend(ProofRow(runs[0].job, i, list(job.prompt_ids) + list(job.completions[i]), len(job.prompt_ids))
                     for i in runs[0].members)
        return []

    def _pass(self, jobs: Sequence[ProofJob], runs: list[_Run]) -> _Pass | None:
        """The pass's layout: prompts padded to one width, both passes' rows padded to exact counts (None: none)."""
        groups = list(dict.fromkeys(run.job for run in runs))
        width = round_up(max(len(jobs[j].prompt_ids) for j in groups), self.attention_span)
        if len(groups) == 1:  # a lone prompt: its own padded width, as before there were passes of several groups
            width = self.invariance.padded(len(jobs[groups[0]].prompt_ids), self.attention_span)
            prompt_rows = width
        else:
            prompt_rows = self.invariance.padded(len(groups) * width)
        rows = self.invariance.padded(sum(run.rows for run in runs))
        if width is None or prompt_rows is None or rows is None:
            return None
        return _Pass(groups, runs, width, prompt_rows, rows)

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
        """Cut the read-back tensors into each rollout's proof, in the order they were queued: a pass's rows are
        its prompts' rows, prompt after prompt, then its runs' completions in order."""
        sketches, indices, logprobs = flat
        pos = lp_pos = 0
        for what, _ in results:
            if not isinstance(what, _Pass):
                pos, lp_pos = place_rows(what, flat, (pos, lp_pos), out)
                continue
            prompts = {}
            for j in what.jobs:
                p = len(jobs[j].prompt_ids)
                prompts[j] = (sketches[pos:pos + p], indices[pos:pos + p])
                pos += p
            for run in what.runs:
                prompt_sketches, prompt_indices = prompts[run.job]
                p = len(prompt_sketches)
                for i in run.members:
                    c = len(jobs[run.job].completions[i])
                    out[run.job][i] = RolloutProof(torch.cat((prompt_sketches, sketches[pos:pos + c])),
                                                   torch.cat((prompt_indices, indices[pos:pos + c])),
                                                   [0.0] * p + logprobs[lp_pos:lp_pos + c].tolist())
                    pos += c
                    lp_pos += c

    def _prove_pass(self, jobs: Sequence[ProofJob], shared: _Pass,
                    r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sketches and indices of the prompts' rows then of each completion's rows, and completion logprobs."""
        prompt = self._prompt_pass([jobs[j].prompt_ids for j in shared.jobs], shared.prompt_width, shared.prompt_rows)
        entries = [(shared.jobs.index(run.job), jobs[run.job].completions[i]) for run in shared.runs
                   for i in run.members]
        hidden = self._completion_pass(prompt, entries, shared.rows)
        rows = torch.cat((prompt.hidden, hidden))
        sketches, indices = sketch_hidden(rows, r)
        # the state before completion token t is its prompt's last row for t = 0, else completion row t - 1
        start = len(prompt.hidden)
        before = []
        for g, completion in entries:
            before.append(torch.arange(start - 1, start + len(completion) - 1))
            before[-1][0] = prompt.last_row(g)
            start += len(completion)
        states = rows.index_select(0, self._to_device(torch.cat(before)))
        targets = self._to_device(torch.tensor([t for _, c in entries for t in c], dtype=torch.long))
        return sketches, indices, self._token_logprobs(states, targets)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The decoder layers on rows [N, hidden] at `positions`, op for op, attention left to `attend`."""
        return validator_rows(self.decoder, hidden, self.cos[positions], self.sin[positions], self.head_dim, attend,
                              fused=self.fused_elementwise)

    def _embed(self, tokens: list[int], rows: int) -> torch.Tensor:
        """Token embeddings, then zero rows up to `rows` (padding that no real row attends to)."""
        ids = self._to_device(torch.tensor(tokens, dtype=torch.long))
        embedded = self.decoder.embed_tokens(ids)
        if rows == len(tokens):
            return embedded
        return torch.cat((embedded, embedded.new_zeros(rows - len(tokens), embedded.shape[1])))

    def _prompt_pass(self, prompts: Sequence[Sequence[int]], width: int, rows: int) -> _PromptPass:
        """The prompts alone, each padded to `width` (a multiple of the attention span) and laid out as a
        [prompts, width] batch for causal attention, as the validator computes a prompt; `rows` >= prompts x width
        rows in all (the extra rows are padding that attends to nothing)."""
        lengths = [len(p) for p in prompts]
        grid = len(prompts) * width
        queries: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        real = torch.zeros(rows, dtype=torch.bool)
        positions = torch.zeros(rows, dtype=torch.long)
        tokens = torch.zeros(rows, dtype=torch.long)
        for g, prompt in enumerate(prompts):
            real[g * width:g * width + len(prompt)] = True
            positions[g * width:g * width + len(prompt)] = torch.arange(len(prompt))
            tokens[g * width:g * width + len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        real_rows = torch.nonzero(real).squeeze(1)
        real, positions, tokens, real_rows = (self._to_device(t) for t in (real, positions, tokens, real_rows))
        in_prompt = real[:grid].view(len(prompts), width, 1, 1)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = (t[:grid].view(len(prompts), width, *t.shape[1:]) for t in (q, k, v))
            for kept, t in zip((queries, keys, values), (q, k, v)):
                kept.append(torch.where(in_prompt, t, 0))  # a lone prompt's grid holds zeros past the prompt
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=self.scaling, enable_gqa=True)
            out = out.transpose(1, 2).reshape(grid, *out.shape[1:2], self.head_dim)
            return out if rows == grid else torch.cat((out, out.new_zeros(rows - grid, *out.shape[1:])))

        embedded = torch.where(real[:, None], self.decoder.embed_tokens(tokens), 0)
        hidden = self._layers(embedded, positions, attend)
        return _PromptPass(lengths, width, queries, keys, values, hidden.index_select(0, real_rows))

    def _completion_pass(self, prompt: _PromptPass, entries: list[tuple[int, Sequence[int]]],
                         rows: int) -> torch.Tensor:
        """Every completion's rows after the final norm [sum of lengths, hidden], packed in order (padded to `rows`);
        `entries` are (prompt of the pass, completion tokens)."""
        lengths = [len(c) for _, c in entries]
        starts = [prompt.lengths[g] for g, _ in entries]
        total = sum(lengths)
        span = max(prompt.width, round_up(max(p + n for p, n in zip(starts, lengths)), self.attention_span))
        batch = len(entries)
        # where each packed row sits in the [batch, span] grid of whole sequences (padding rows repeat the last)
        at_batch = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])
        at_position = torch.cat([p + torch.arange(n) for p, n in zip(starts, lengths)])
        at_batch = torch.cat((at_batch, torch.full((rows - total,), batch - 1)))
        at_position = torch.cat((at_position, torch.full((rows - total,), starts[-1])))
        positions = torch.cat((at_position[:total], torch.zeros(rows - total, dtype=torch.long)))
        group_of = torch.tensor([g for g, _ in entries], dtype=torch.long)
        at_batch, at_position, positions, group_of = (self._to_device(t) for t in
                                                      (at_batch, at_position, positions, group_of))
        real = (at_batch[:total], at_position[:total])
        prefixes = (prompt.queries, prompt.keys, prompt.values)
        width = prompt.width
        grids: list[torch.Tensor] = []  # [batch, span, heads, head dim] for q, k, v; padding stays zero

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # the validator's call on [prompt, completion] per row; the prompt's rows are recomputed and dropped
            if not grids:
                grids.extend(t.new_zeros(batch, span, t.shape[1], self.head_dim) for t in (q, k, v))
            for grid, new, prefix in zip(grids, (q, k, v), prefixes):
                grid[:, :width] = prefix[layer].index_select(0, group_of)
                grid[real] = new[:total]
            out = F.scaled_dot_product_attention(*(g.transpose(1, 2) for g in grids), is_causal=True,
                                                 scale=self.scaling, enable_gqa=True)
            return out.transpose(1, 2)[at_batch, at_position]

        tokens = [t for _, c in entries for t in c]
        return self._layers(self._embed(tokens, rows), positions, attend)[:total]
