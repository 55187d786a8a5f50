"""Assembling a pipeline from command-line choices, shared by benchmark, calibrate and mine.

One place decides what "engine X at batch size B" means, so that what the benchmark measures is what
the daemon runs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.engine import Engine, SamplingParams
from grail_pipeline.inference.loading import LoadedModel, load_model, load_tokenizer, resolve_device, wants_multi_gpu
from grail_pipeline.inference.model_ref import parse_model_ref
from grail_pipeline.mining.lengths import W1_SPEC, LengthProfile, parse_length_profile
from grail_pipeline.mining.messages import ProvedGroup, SignedGroup
from grail_pipeline.mining.pipeline import Pipeline, PipelineConfig
from grail_pipeline.mining.signing import GroupSigner, SigningPool
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.wallet import Signer
from grail_pipeline.proving.batched import BatchedProver
from grail_pipeline.proving.prefix import PrefixProver, supports_prefix_proofs
from grail_pipeline.proving.proofs import Prover
from grail_pipeline.proving.reference import ReferenceProver


def resolve_engine(kind: str, device: torch.device) -> str:
    """`auto` is the fast engine on a GPU and hf on the CPU; one model over several GPUs is hf only."""
    spread = device.type == "cuda" and wants_multi_gpu()
    if kind == "auto":
        return "fast" if device.type == "cuda" and not spread else "hf"
    if kind == "fast" and spread:
        raise UserError("GRAIL_MULTI_GPU=1 spreads one model over every GPU, and the fast engine runs on one: "
                        "use --engine hf, or one worker per GPU without GRAIL_MULTI_GPU")
    return kind


def check_batch_size(engine_kind: str, batch_size: int) -> None:
    """The fast engine's batch size is its decode slots: at least one problem's rollouts."""
    if engine_kind == "fast" and batch_size < PROFILE.rollouts_per_problem:
        raise UserError(f"the fast engine's batch size is its number of decode slots and must be at least "
                        f"{PROFILE.rollouts_per_problem} (one problem's rollouts); got {batch_size}")


def length_profile_for(model: str, spec: str | None) -> LengthProfile:
    """W1 lengths for dummy models (they never stop by themselves), the model's own otherwise."""
    if spec is None:
        spec = W1_SPEC if parse_model_ref(model).is_dummy else "natural"
    return parse_length_profile(spec)


def checked_length_profile(model: str, spec: str | None, max_new_tokens: int) -> LengthProfile:
    """The run's length profile; one that draws more tokens than --max-new-tokens allows is a user error."""
    lengths = length_profile_for(model, spec)
    longest = lengths.longest
    if longest is not None and longest > max_new_tokens:
        raise UserError(f"length profile '{lengths.spec}' draws up to {longest} tokens, "
                        f"more than --max-new-tokens {max_new_tokens}")
    return lengths


def preflight(args: argparse.Namespace, batch_sizes: list[int] | None) -> str:
    """Check the shared flags (and any batch sizes) before anything slow; returns the engine kind."""
    engine_kind = resolve_engine(args.engine, resolve_device(args.device))
    checked_length_profile(args.model, args.length_profile, args.max_new_tokens)
    parse_model_ref(args.model)
    for size in batch_sizes or []:
        check_batch_size(engine_kind, size)
    return engine_kind


@dataclass
class Runtime:
    """A loaded model and tokenizer, able to build engines, provers and pipelines on demand.

    It may own signing worker processes (group_signer): call close() when done with it.
    """

    loaded: LoadedModel
    tokenizer: PreTrainedTokenizerBase
    engine_kind: str
    sampling: SamplingParams
    lengths: LengthProfile
    max_prompt_tokens: int
    _signing_pools: dict[str, SigningPool] = field(default_factory=dict, init=False, repr=False)
    _provers: dict[str, Prover] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Runtime":
        lengths = checked_length_profile(args.model, args.length_profile, args.max_new_tokens)
        tokenizer = load_tokenizer(args.model)
        loaded = load_model(args.model, args.device)
        sampling = SamplingParams(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  max_new_tokens=args.max_new_tokens)
        return cls(loaded, tokenizer, resolve_engine(args.engine, loaded.device), sampling, lengths,
                   args.max_prompt_tokens)

    def check_batch_size(self, batch_size: int) -> None:
        check_batch_size(self.engine_kind, batch_size)

    def engine(self, batch_size: int) -> Engine:
        if self.engine_kind == "hf":
            from grail_pipeline.inference.hf_engine import HFEngine

            return HFEngine(self.loaded, self.sampling, min(batch_size, PROFILE.rollouts_per_problem))
        from grail_pipeline.inference.fast_engine import FastEngine

        return FastEngine(self.loaded, self.sampling, slots=batch_size, max_prompt_tokens=self.max_prompt_tokens)

    def prover(self) -> Prover:
        """The engine kind's prover, made once per runtime (the prefix prover measures the device at start-up)."""
        prover = self._provers.get(self.engine_kind)
        if prover is None:
            prover = self._provers[self.engine_kind] = self._new_prover()
        return prover

    def _new_prover(self) -> Prover:
        if self.engine_kind == "hf":
            return ReferenceProver(self.loaded)  # the reference method, as the public miner proves
        if supports_prefix_proofs(self.loaded):
            return PrefixProver(self.loaded, max_length=self.max_prompt_tokens + self.sampling.max_new_tokens)
        return BatchedProver(self.loaded)

    def pipeline_config(self) -> PipelineConfig:
        # the reference method handles one problem at a time with nothing overlapped
        return PipelineConfig(max_in_flight=1, proof_pool=1) if self.engine_kind == "hf" else PipelineConfig()

    def group_signer(self, signer: Signer) -> Callable[[ProvedGroup], SignedGroup]:
        """How the pipeline signs: in worker processes for the fast engine on a GPU, in its own threads otherwise.

        On the GPU, signing in the engine's interpreter would take the lock its host loop needs
        between decode steps. The pool is made once per hotkey and kept until close(), so several
        pipelines (the benchmark's batch sizes) share its warm workers.
        """
        sign = GroupSigner(self.tokenizer, signer, self.loaded.name)
        if self.engine_kind != "fast" or self.loaded.device.type != "cuda":
            return sign  # the hf engine, CPU runs and the tests: nothing to gain from processes
        pool = self._signing_pools.get(signer.ss58_address)
        if pool is None:
            workers = min(PipelineConfig().sign_workers, os.cpu_count() or 1)
            pool = self._signing_pools[signer.ss58_address] = SigningPool(sign, workers)
        return pool

    def pipeline(self, engine: Engine, signer: Signer) -> Pipeline:
        return Pipeline(engine, self.prover(), self.group_signer(signer), self.pipeline_config())

    def close(self) -> None:
        """Stop the signing workers, if any (waits for them to exit)."""
        while self._signing_pools:
            self._signing_pools.popitem()[1].close()
