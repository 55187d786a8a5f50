"""The CPU stage: score each rollout as the validator will, bind its proof and sign it.

Runs in the pipeline's thread pool, one group at a time, and turns a proved group into the records of
the window file. The reward is computed on the completion decoded with its special tokens, exactly as
miner and validator do (so an EOS-terminated answer scores −0.111); whether the answer solves the
formula is kept apart for people.

Signing costs milliseconds of pure-Python CPU per rollout under the interpreter lock, which on the GPU
starves the engine's host loop; there `SigningPool` runs the same `GroupSigner` in worker processes,
and the pipeline's signing threads only pickle groups in and records out.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from grail_pipeline.mining import signing_worker
from grail_pipeline.mining.messages import ProvedGroup, SignedGroup
from grail_pipeline.protocol.profile import PROFILE, ProtocolProfile
from grail_pipeline.protocol.records import (
    EncodedCommitments,
    build_rollout_record,
    commitments_file_text,
    grpo_advantages,
)
from grail_pipeline.protocol.sat import answer_solves, score_completion
from grail_pipeline.protocol.sketches import commit_binding, commitments_with_json
from grail_pipeline.protocol.tokenizer import decode_completion
from grail_pipeline.protocol.wallet import Signer, rollout_challenge, sign_commit, sign_rollout


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
        model_name = window.model_name or self.model_name  # a rotated checkpoint's name travels with its window
        binding = commit_binding(tokens, window.randomness, model_name, self.profile.layer_index, compact)
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
            commitments=EncodedCommitments(commitments, commitments_file_text(compact)),  # the sink encodes nothing
            token_logprobs=proof.token_logprobs,
            model_name=model_name,
            commit_signature=sign_commit(self.signer, binding),
            total_reward=score.reward,
            advantage=advantage,
            success=score.success,
            assignment=list(score.assignment),
            hotkey=self.signer.ss58_address,
            challenge=challenge,
            signature=sign_rollout(self.signer, challenge),
        )


class SigningPool:
    """A GroupSigner in `workers` spawned processes: call it with a ProvedGroup from any thread, it blocks for the result.

    The workers ignore SIGINT and SIGTERM (signing_worker says why) and leave by themselves when the
    parent is gone. A worker that dies breaks the pool: every call from then on raises
    BrokenProcessPool instead of waiting.
    """

    exit_grace_s: float = 10.0

    def __init__(self, sign: GroupSigner, workers: int) -> None:
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=signing_worker.start, initargs=(pickle.dumps(sign),))
        for _ in range(workers):  # start every worker now (each takes seconds to import), not on the first groups
            self._executor.submit(signing_worker.started)

    def __call__(self, group: ProvedGroup) -> SignedGroup:
        signed = self._executor.submit(signing_worker.sign, _portable(group)).result()
        # the caller's own task object, and the time it came back here
        return dataclasses.replace(signed, task=group.task, done=time.perf_counter())

    def close(self) -> None:
        """Stop the workers and wait for them; any still there after `exit_grace_s` is killed.

        Idle workers leave at once. But once a worker has died, the executor's own clean-up stops the
        others with SIGTERM, which they ignore, and would wait for them forever.
        """
        workers = list((self._executor._processes or {}).values())
        timer = threading.Timer(self.exit_grace_s, lambda: [w.kill() for w in workers])
        timer.start()
        try:
            self._executor.shutdown(wait=True)
        finally:
            timer.cancel()

    def __enter__(self) -> SigningPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _portable(group: ProvedGroup) -> ProvedGroup:
    """The group with numpy arrays for tensors: pickling copies only each proof's own slice of the
    prover's output, without torch's shared-memory reductions."""
    proofs = [dataclasses.replace(p, sketches=np.asarray(p.sketches), indices=np.asarray(p.indices))
              for p in group.proofs]
    return dataclasses.replace(group, proofs=proofs)
