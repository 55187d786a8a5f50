"""The public miner's prover, kept as the baseline: one unbatched forward per rollout, full logits copied to the CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grail_pipeline.protocol.sketches import r_vec, sketch_hidden
from grail_pipeline.proving.proofs import ProofJob, Prover, RolloutProof
from grail_pipeline.proving.validator import validator_forward


class ReferenceProver(Prover):
    """One unbatched forward per rollout, logits copied to the CPU (the public miner's method)."""

    name = "reference"

    def prove_many(self, jobs: Sequence[ProofJob]) -> list[list[RolloutProof]]:
        return [self._prove_group(job) for job in jobs]

    @torch.inference_mode()
    def _prove_group(self, job: ProofJob) -> list[RolloutProof]:
        r = r_vec(job.randomness_hex).to(self.loaded.device)
        prompt_len = len(job.prompt_ids)
        proofs = []
        for completion in job.completions:
            tokens = list(job.prompt_ids) + list(completion)
            hidden, logits = validator_forward(self.loaded.model, tokens)
            sketches, indices = sketch_hidden(hidden, r)
            cpu_logits = logits.to("cpu")
            logprobs = torch.log_softmax(cpu_logits[prompt_len - 1:-1], dim=-1)
            chosen = torch.tensor(completion, dtype=torch.long).unsqueeze(1)
            lps = logprobs.gather(1, chosen).squeeze(1).float().tolist()
            proofs.append(RolloutProof(sketches.cpu(), indices.cpu(), [0.0] * prompt_len + lps))
        return proofs
