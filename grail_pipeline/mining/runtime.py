"""Assembling a pipeline from command-line choices, shared by benchmark, calibrate and mine.

One place decides what "engine X at batch size B" means, so that what the benchmark measures is what
the daemon runs.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from grail_pipeline.inference.engine import Engine, SamplingParams
from grail_pipeline.inference.loading import LoadedModel, load_model, load_tokenizer
from grail_pipeline.mining.choices import RunChoices, resolve_choices
from grail_pipeline.mining.lengths import LengthProfile
from grail_pipeline.mining.messages import ProvedGroup, SignedGroup
from grail_pipeline.mining.pipeline import Pipeline, PipelineConfig
from grail_pipeline.mining.rules import KV_CACHE_AUTO, KV_CACHE_FULL, check_batch_size
from grail_pipeline.mining.signing import GroupSigner, SigningPool
from grail_pipeline.protocol.wallet import Signer
from grail_pipeline.proving.batched import BatchedProver
from grail_pipeline.proving.prefix import PrefixProver, supports_prefix_proofs
from grail_pipeline.proving.proofs import Prover
from grail_pipeline.proving.reference import ReferenceProver


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
    kv_cache_gb: float | str | None = None  # the fast engine's KV cache: GB, "auto", "full" or None (full)
    shared_prompt_attention: bool = False  # the fast engine's decode reads a group's shared prompt pages once
    _signing_pools: dict[str, SigningPool] = field(default_factory=dict, init=False, repr=False)
    _provers: dict[str, Prover] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_choices(cls, choices: RunChoices) -> "Runtime":
        """The tokenizer and the weights of the run's choices (mining/choices.py): the slow part, after them."""
        tokenizer = load_tokenizer(choices.model)
        loaded = load_model(choices.model, choices.device, choices.checkpoint)
        sampling = SamplingParams(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  max_new_tokens=choices.max_new_tokens)
        return cls(loaded, tokenizer, choices.engine_kind, sampling, choices.lengths, choices.max_prompt_tokens,
                   choices.kv_cache_gb, choices.shared_prompt_attention)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Runtime":
        """Choices and load in one call (scripts and tests; the commands resolve the choices first)."""
        return cls.from_choices(resolve_choices(args))

    def check_batch_size(self, batch_size: int) -> None:
        check_batch_size(self.engine_kind, batch_size)

    def engine(self, batch_size: int) -> Engine:
        if self.engine_kind == "hf":
            from grail_pipeline.inference.hf_engine import HFEngine

            return HFEngine(self.loaded, self.sampling, batch_size)  # rules.check_batch_size: at most 16
        from grail_pipeline.inference.fast_engine import FastEngine

        return FastEngine(self.loaded, self.sampling, slots=batch_size, max_prompt_tokens=self.max_prompt_tokens,
                          kv_cache_gb=self.kv_cache_gb_for(batch_size),
                          shared_prompt_attention=self.shared_prompt_attention)

    def kv_cache_gb_for(self, batch_size: int) -> float | None:
        """The fast engine's KV cache for `batch_size` slots: --kv-cache-gb as given, or `auto`'s from the workload
        (mining/kv_sizing.py; None: every slot's longest sequence)."""
        if self.kv_cache_gb in (None, KV_CACHE_FULL):
            return None
        if self.kv_cache_gb != KV_CACHE_AUTO:
            return self.kv_cache_gb
        from grail_pipeline.inference.kv_cache import positions_per_slot
        from grail_pipeline.mining.kv_sizing import kv_cache_gb

        return kv_cache_gb(self._kv_demand, self.loaded.model.config, self.loaded.dtype.itemsize, batch_size,
                           positions_per_slot(self.max_prompt_tokens, self.sampling.max_new_tokens))

    @functools.cached_property
    def _kv_demand(self):
        """What an occupied slot holds on this workload (kv_sizing.kv_demand), from the first problems' prompts."""
        from grail_pipeline.mining.kv_sizing import SAMPLE_GROUPS, kv_demand
        from grail_pipeline.protocol.sat import problem_for_seed
        from grail_pipeline.protocol.tokenizer import prompt_ids

        prompts = [len(prompt_ids(self.tokenizer, problem_for_seed(seed))) for seed in range(SAMPLE_GROUPS)]
        return kv_demand([min(n, self.max_prompt_tokens) for n in prompts], self.lengths)

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
