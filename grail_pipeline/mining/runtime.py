"""Assembling a pipeline from command-line choices, shared by benchmark, calibrate and mine.

One place decides what "engine X at batch size B" means, so that what the benchmark measures is what
the daemon runs.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.engine import Engine, SamplingParams
from grail_pipeline.inference.loading import (
    LoadedModel,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    wants_multi_gpu,
)
from grail_pipeline.inference.models import family_for, why_not_fast
from grail_pipeline.mining.lengths import LengthProfile
from grail_pipeline.mining.messages import ProvedGroup, SignedGroup
from grail_pipeline.mining.pipeline import Pipeline, PipelineConfig
from grail_pipeline.mining.rules import check_batch_size, check_workload, checked_length_profile
from grail_pipeline.mining.signing import GroupSigner, SigningPool
from grail_pipeline.protocol.wallet import Signer
from grail_pipeline.proving.batched import BatchedProver
from grail_pipeline.proving.prefix import PrefixProver, supports_prefix_proofs
from grail_pipeline.proving.proofs import Prover
from grail_pipeline.proving.reference import ReferenceProver

log = logging.getLogger("grail_pipeline")


def resolve_engine(kind: str, device: torch.device, model: str) -> str:
    """`auto` is the fast engine on a GPU and hf on the CPU; one model over several GPUs is hf only, and so is
    a model no family of the fast engine runs (inference/models/; read from its config, before any weights).
    `--engine fast` for such a model is a user error, `auto` falls back to hf and says why in one line."""
    spread = device.type == "cuda" and wants_multi_gpu()
    if kind == "auto":
        if device.type != "cuda" or spread:
            return "hf"
        why = why_not_fast(load_config(model))
        if why is not None:
            _say_once(f"--engine auto: using the hf engine, since {why}")
            return "hf"
        return "fast"
    if kind == "fast" and spread:
        raise UserError("GRAIL_MULTI_GPU=1 spreads one model over every GPU, and the fast engine runs on one: "
                        "use --engine hf, or one worker per GPU without GRAIL_MULTI_GPU")
    if kind == "fast":
        family_for(load_config(model))
    return kind


@functools.cache
def _say_once(line: str) -> None:
    """A warning logged once per process (the engine is resolved before the model loads and again after)."""
    log.warning("%s", line)


def preflight(args: argparse.Namespace, batch_sizes: list[int] | None) -> str:
    """Check the shared flags (and any batch sizes) before anything slow; returns the engine kind."""
    engine_kind = resolve_engine(args.engine, resolve_device(args.device), args.model)
    check_workload(args.model, args.length_profile, args.max_new_tokens, args.max_prompt_tokens)
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
        engine_kind = resolve_engine(args.engine, resolve_device(args.device), args.model)  # before the weights
        loaded = load_model(args.model, args.device)
        sampling = SamplingParams(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  max_new_tokens=args.max_new_tokens)
        return cls(loaded, tokenizer, engine_kind, sampling, lengths, args.max_prompt_tokens)

    def check_batch_size(self, batch_size: int) -> None:
        check_batch_size(self.engine_kind, batch_size)

    def engine(self, batch_size: int) -> Engine:
        if self.engine_kind == "hf":
            from grail_pipeline.inference.hf_engine import HFEngine

            return HFEngine(self.loaded, self.sampling, batch_size)  # rules.check_batch_size: at most 16
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
