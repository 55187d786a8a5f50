"""Proofs from right-padded batches of whole rollouts, logits kept on the device.

Right-padded batches with a plain causal mask, so every real position sees exactly the context it sees
alone; its pass rate against the validator's method is measured, not assumed (bench/proof_exactness.py).
The fallback for models without a family (inference/models/) the prefix prover can run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.protocol.sketches import r_vec, sketch_hidden
from grail_pipeline.proving.proofs import ProofJob, ProofRow, Prover, RolloutProof, place_rows, round_up

# attention runs on sequence lengths rounded up to this: each new shape costs cuDNN's attention a plan of its
# own, milliseconds of host time (bench/proof_profile.py); padding after the last real token changes no real row
ATTENTION_SPAN = 64


@contextmanager
def row_exact_linears(linears: list[torch.nn.Linear], lengths: list[int]) -> Iterator[None]:
    """The given projections computed one sequence at a time, in the shape the validator's forward has.

    A matrix product's kernel (and with it the rounding of a row) can depend on how many rows the
    product has. bench/batch_invariance.py on an H100 (torch 2.11) found it for the MLP down projection
    alone, the product with the long reduction (11008), at 40 of 1020 lengths (split reductions for
    few rows); q/k/v/o/gate/up and causal attention gave the same bits alone and batched. The
    validator runs each rollout alone, so its rows go through a down projection of its own length.
    """
    if len(lengths) == 1:
        yield
        return

    def exact(module: torch.nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(*x.shape[:-1], module.out_features)
            for b, n in enumerate(lengths):
                out[b, :n] = F.linear(x[b, :n], module.weight, module.bias)
            return out
        return forward

    previous = [vars(module).get("forward") for module in linears]  # a wrapper already on the instance, if any
    for module in linears:
        module.forward = exact(module)
    try:
        yield
    finally:
        for module, forward in zip(linears, previous):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


class BatchedProver(Prover):
    """Right-padded batches of whole rollouts from one or more groups, on a CUDA stream of its own.

    Rollouts of all groups handed over together are sorted by length and cut into batches of at most
    `max_batch_tokens` padded tokens in which no row is more than `max_waste` shorter than the longest,
    so that little compute goes to padding.
    """

    name = "batched"

    def __init__(self, loaded: LoadedModel, max_batch_tokens: int = 16384, max_waste: float = 0.12,
                 logit_chunk: int = 2048, attention_span: int = ATTENTION_SPAN) -> None:
        super().__init__(loaded)
        self.attention_span = attention_span
        self.max_batch_tokens = max_batch_tokens
        self.max_waste = max_waste
        self.logit_chunk = logit_chunk
        self.decoder = loaded.model.get_decoder()
        hidden = loaded.model.config.hidden_size
        # the products whose reduction is longer than the hidden size (the MLP down projection)
        self.linears = [m for m in self.decoder.modules()
                        if isinstance(m, torch.nn.Linear) and m.in_features > hidden]
        self.lm_head = loaded.model.get_output_embeddings()
        self.stream = torch.cuda.Stream(loaded.device) if loaded.device.type == "cuda" else None

    @torch.inference_mode()
    def prove_many(self, jobs: Sequence[ProofJob]) -> list[list[RolloutProof]]:
        rows = [ProofRow(j, i, list(job.prompt_ids) + list(c), len(job.prompt_ids))
                for j, job in enumerate(jobs) for i, c in enumerate(job.completions)]
        if not rows:  # nothing to run (and nothing to concatenate below)
            return [[] for _ in jobs]
        out: list[list[RolloutProof | None]] = [[None] * len(job.completions) for job in jobs]
        r_vecs = {h: r_vec(h).to(self.loaded.device) for h in {job.randomness_hex for job in jobs}}
        stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        order: list[ProofRow] = []
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with stream:
            # every batch is queued before anything comes back, so the GPU never waits for the host
            for batch in self.batches([len(row.tokens) for row in rows]):
                members = [rows[k] for k in batch]
                parts.append(self._prove_batch(members, [r_vecs[jobs[row.job].randomness_hex] for row in members]))
                order.extend(members)
            sketches, indices, logprobs = (torch.cat(t).cpu() for t in zip(*parts))
        place_rows(order, (sketches, indices, logprobs), (0, 0), out)
        return [[p for p in group if p is not None] for group in out]

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices grouped longest first: within the token budget and the padding bound."""
        batches: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            if batches:
                width = lengths[batches[-1][0]]
                fits = (len(batches[-1]) + 1) * width <= self.max_batch_tokens
                if fits and lengths[i] >= (1.0 - self.max_waste) * width:
                    batches[-1].append(i)
                    continue
            batches.append([i])
        return batches

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a stream synchronisation (pinned, asynchronous)."""
        if self.loaded.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.loaded.device, non_blocking=True)

    def _prove_batch(self, rows: list[ProofRow], r_vecs: list[torch.Tensor],
                     span: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sketches, top-k indices (every position of every row, in order) and completion logprobs.

        The batch is right-padded to a multiple of `span` (default: the attention span).
        """
        lengths = [len(row.tokens) for row in rows]
        width = round_up(max(lengths), span or self.attention_span)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : lengths[b]] = torch.tensor(row.tokens)
        positions = torch.cat([torch.arange(n) + b * width for b, n in enumerate(lengths)])
        ids, positions = self._to_device(ids), self._to_device(positions)
        with row_exact_linears(self.linears, lengths):
            # causal attention only: padding sits after every real token and no real position sees it
            hidden = self.decoder(input_ids=ids).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        sketches, indices = self._sketch_rows(flat, lengths, r_vecs)
        return sketches, indices, self._completion_logprobs(hidden, ids, rows)

    @staticmethod
    def _sketch_rows(flat: torch.Tensor, lengths: list[int],
                     r_vecs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sketches of every position; one call per distinct randomness (usually one per batch)."""
        if all(r is r_vecs[0] for r in r_vecs):
            return sketch_hidden(flat, r_vecs[0])
        parts = [sketch_hidden(chunk, r) for chunk, r in zip(flat.split(lengths), r_vecs)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _completion_logprobs(self, hidden: torch.Tensor, ids: torch.Tensor, rows: list[ProofRow]) -> torch.Tensor:
        """log_softmax(logits[p-1])[token_p] for every completion token, in chunks, on the device."""
        index_rows = torch.cat([torch.full((len(r.tokens) - r.prompt_len,), b, dtype=torch.long)
                                for b, r in enumerate(rows)])
        index_cols = torch.cat([torch.arange(r.prompt_len, len(r.tokens), dtype=torch.long) for r in rows])
        index_rows, index_cols = self._to_device(index_rows), self._to_device(index_cols)
        return self._token_logprobs(hidden[index_rows, index_cols - 1], ids[index_rows, index_cols])

    def _token_logprobs(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log_softmax(lm_head(state))[target] per row, float32, in chunks of `logit_chunk` rows."""
        out = torch.empty(len(targets), dtype=torch.float32, device=states.device)
        for start in range(0, len(targets), self.logit_chunk):
            sl = slice(start, start + self.logit_chunk)
            logits = self.lm_head(states[sl]).float()
            out[sl] = logits.gather(1, targets[sl, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return out
