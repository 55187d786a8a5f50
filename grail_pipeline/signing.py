"""The CPU stage: score each rollout as the validator will, bind its proof and sign it.

Runs in the pipeline's thread pool, one group at a time, and turns a proved group into the records of
the window file. The reward is computed on the completion decoded with its special tokens, exactly as
miner and validator do (so an EOS-terminated answer scores −0.111); whether the answer solves the
formula is kept apart for people.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from grail_pipeline.proof import commit_binding, commitments_with_json
from grail_pipeline.protocol import PROFILE, ProtocolProfile
from grail_pipeline.records import build_rollout_record, grpo_advantages
from grail_pipeline.sat import answer_solves, score_completion
from grail_pipeline.tasks import ProvedGroup, SignedGroup
from grail_pipeline.tokenizer import decode_completion
from grail_pipeline.wallet import Signer, rollout_challenge, sign_commit, sign_rollout


@dataclass
class GroupSigner:
    """Callable that turns a ProvedGroup into a SignedGroup (or a dropped one)."""

    tokenizer: PreTrainedTokenizerBase
    signer: Signer
    model_name: str
    profile: ProtocolProfile = PROFILE

    def __call__(self, group: ProvedGroup) -> SignedGroup:
        start = time.perf_counter()
        task = group.task
        texts = [decode_completion(self.tokenizer, c) for c in group.completions]
        scores = [score_completion(task.problem, t) for t in texts]
        solved = [answer_solves(task.problem, t) for t in texts]
        completion_tokens = sum(len(c) for c in group.completions)
        short = min(len(c) for c in group.completions)
        if short < self.profile.min_completion_tokens:
            # the miner drops the whole group when any rollout is shorter than the challenge size
            return SignedGroup(task, [], [s.reward for s in scores], [s.success for s in scores], solved,
                               completion_tokens, group.generate_seconds, group.proof_seconds,
                               time.perf_counter() - start, dropped=f"completion of {short} tokens")
        advantages = grpo_advantages([s.reward for s in scores])
        records = [
            self._record(group, i, completion, proof, score, advantage)
            for i, (completion, proof, score, advantage)
            in enumerate(zip(group.completions, group.proofs, scores, advantages))
        ]
        return SignedGroup(task, records, [s.reward for s in scores], [s.success for s in scores], solved,
                           completion_tokens, group.generate_seconds, group.proof_seconds,
                           time.perf_counter() - start)

    def _record(self, group: ProvedGroup, index: int, completion: list[int], proof, score,
                advantage: float) -> dict:
        task = group.task
        window = task.window
        tokens = task.prompt_ids + completion
        commitments, compact = commitments_with_json(proof.sketches, proof.indices)
        binding = commit_binding(tokens, window.randomness, self.model_name, self.profile.layer_index, compact)
        nonce = self.profile.nonce(task.index, index)
        challenge = rollout_challenge(window.block_hash, nonce)
        return build_rollout_record(
            window_start=window.window_start,
            block=task.block,
            block_hash=window.block_hash,
            randomness=window.randomness,
            use_drand=window.use_drand,
            checkpoint_window=window.checkpoint_window,
            rollout_group=task.index,
            rollout_index=index,
            total_in_group=len(group.completions),
            nonce=nonce,
            tokens=tokens,
            prompt_length=len(task.prompt_ids),
            commitments=commitments,
            token_logprobs=proof.token_logprobs,
            model_name=self.model_name,
            commit_signature=sign_commit(self.signer, binding),
            total_reward=score.reward,
            advantage=advantage,
            success=score.success,
            assignment=list(score.assignment),
            hotkey=self.signer.ss58_address,
            challenge=challenge,
            signature=sign_rollout(self.signer, challenge),
        )
