"""Model families on the fast path (issue #14): Qwen2, Qwen3 and Llama through their tiny presets, and what the
fast path does not cover.

Per family, the fast engine gives the hf engine's tokens under deterministic sampling (top_k=1), and the
prefix prover's proofs of those rollouts equal the validator's own forward (the reference prover) at every
position. A model no family runs falls back to hf under --engine auto with one line, and --engine fast
refuses it from its config alone, before any weights exist to load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Phi3Config

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.checkpoints import dummy_checkpoint, dummy_config
from grail_pipeline.inference.engine import GroupRequest, SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine
from grail_pipeline.inference.hf_engine import HFEngine
from grail_pipeline.inference.loading import LoadedModel, load_model, load_tokenizer
from grail_pipeline.inference.models import find_family, llama, qwen2, qwen3, why_not_fast
from grail_pipeline.mining.choices import resolve_engine
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sat import problem_for_seed
from grail_pipeline.protocol.tokenizer import prompt_ids
from grail_pipeline.proving.prefix import PrefixProver, supports_prefix_proofs
from grail_pipeline.proving.proofs import ProofJob
from grail_pipeline.proving.reference import ReferenceProver

FAMILIES = {"tiny": qwen2, "tiny-qwen3": qwen3, "tiny-llama": llama}
CUDA = torch.device("cuda")  # resolve_engine reads only the device's type: no GPU is needed to ask it


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    """(preset, its model loaded from its checkpoint, float32 on the CPU)."""
    return request.param, load_model(f"dummy:{request.param}", device="cpu")


def test_each_preset_is_its_family_and_the_big_presets_are_their_architectures() -> None:
    for preset, family in FAMILIES.items():
        assert find_family(dummy_config(preset)) is family
    qwen3_4b, llama3_1b, tiny_llama = dummy_config("qwen3-4b"), dummy_config("llama3-1b"), dummy_config("tiny-llama")
    assert find_family(qwen3_4b) is qwen3 and find_family(llama3_1b) is llama
    assert (qwen3_4b.num_hidden_layers, qwen3_4b.hidden_size, qwen3_4b.num_attention_heads,
            qwen3_4b.num_key_value_heads, qwen3_4b.head_dim, qwen3_4b.intermediate_size, qwen3_4b.vocab_size,
            qwen3_4b.tie_word_embeddings) == (36, 2560, 32, 8, 128, 9728, 151936, True)
    assert (llama3_1b.num_hidden_layers, llama3_1b.hidden_size, llama3_1b.num_attention_heads,
            llama3_1b.num_key_value_heads, llama3_1b.intermediate_size, llama3_1b.vocab_size,
            llama3_1b.tie_word_embeddings) == (16, 2048, 32, 8, 8192, 151936, True)
    for config in (llama3_1b, tiny_llama):
        assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500_000
        assert (config.bos_token_id, config.eos_token_id) == (151643, 151645)  # the built-in Qwen tokenizer's
    assert not tiny_llama.tie_word_embeddings  # the untied head of Llama-3-8B, tested on the CPU


def test_the_tiny_presets_carry_what_their_family_differs_in(family_model) -> None:
    preset, loaded = family_model
    attn = loaded.model.get_decoder().layers[0].self_attn
    head = loaded.model.get_output_embeddings().weight
    tied = head.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()
    assert (attn.q_proj.bias is not None, hasattr(attn, "q_norm"), tied) == {
        "tiny": (True, False, True), "tiny-qwen3": (False, True, True), "tiny-llama": (False, False, False)}[preset]
    if preset == "tiny-qwen3":
        assert attn.head_dim == 32 != loaded.model.config.hidden_size // loaded.model.config.num_attention_heads
    if preset == "tiny-llama":  # llama3 scaling changed the low frequencies of transformers' own table
        rotary = loaded.model.get_decoder().rotary_emb
        plain = 1.0 / (500_000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
        assert not torch.equal(rotary.inv_freq, plain) and torch.equal(rotary.inv_freq[0], plain[0])
    assert supports_prefix_proofs(loaded)


def test_the_fast_engine_gives_the_hf_tokens_and_the_prefix_proofs_are_the_validators(family_model, tok) -> None:
    _, loaded = family_model
    sampling = SamplingParams(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, top_k=1,
                              max_new_tokens=8, repetition_penalty=2.0)  # 2.0: the argmax moves step to step
    sat = prompt_ids(tok, problem_for_seed(7))
    groups = [GroupRequest("short", tok("Hi there").input_ids, [3, 8, 5]),
              GroupRequest("long", tok(" ".join(f"w{i}" for i in range(40))).input_ids, [6, 2]),
              GroupRequest("sat", sat, [8, 4, 7, 1])]
    expected = {r.request.key: r.completions for r in HFEngine(loaded, sampling, batch_size=4).generate(groups)}
    got = {r.request.key: r.completions
           for r in FastEngine(loaded, sampling, slots=6, max_prompt_tokens=256, lag=2).generate(groups)}
    assert got == expected
    assert any(len(set(c[:-1])) > 2 for completions in got.values() for c in completions)

    jobs = [ProofJob(g.prompt_ids, got[g.key], hashlib.sha256(g.key.encode()).hexdigest()) for g in groups]
    ours, validator = PrefixProver(loaded).prove_many(jobs), ReferenceProver(loaded).prove_many(jobs)
    for job, group_ours, group_validator in zip(jobs, ours, validator, strict=True):
        for a, b, completion in zip(group_ours, group_validator, job.completions, strict=True):
            n = len(job.prompt_ids) + len(completion)
            assert a.sketches.shape == (n,) and a.indices.shape == (n, PROFILE.proof_topk)
            assert torch.equal(a.sketches, b.sketches) and torch.equal(a.indices, b.indices)  # every position
            assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True)) < 1e-4


def _config_only(tmp_path, config) -> str:
    """A checkpoint directory holding a config and nothing else: no weights to load, no tokenizer."""
    config.save_pretrained(tmp_path)
    assert not any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    return str(tmp_path)


UNCOVERED = {
    "phi3": (Phi3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
             "the fast engine runs Qwen2, Qwen3 and Llama models; 'phi3' needs --engine hf"),
    "gemma3": (Gemma3TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8),
               "the fast engine runs Qwen2, Qwen3 and Llama models; 'gemma3_text' needs --engine hf"),
    "mistral-sliding": (MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16),
                        "the fast engine runs Qwen2, Qwen3 and Llama models; 'mistral' needs --engine hf "
                        "(sliding-window attention)"),
}


@pytest.mark.parametrize("name", sorted(UNCOVERED))
def test_an_uncovered_family_falls_back_under_auto_and_is_refused_by_fast_before_loading(name, tmp_path,
                                                                                         caplog) -> None:
    config, line = UNCOVERED[name]
    directory = _config_only(tmp_path, config)
    assert why_not_fast(config) == line and find_family(config) is None
    with caplog.at_level(logging.WARNING, logger="grail_pipeline"):
        assert resolve_engine("auto", CUDA, directory) == "hf"
        assert resolve_engine("auto", CUDA, directory) == "hf"  # asked again (after loading): said once
    assert [r.getMessage() for r in caplog.records] == [f"--engine auto: using the hf engine, since {line}"]
    with pytest.raises(UserError) as err:
        resolve_engine("fast", CUDA, directory)  # the directory has no weights: refused from the config alone
    assert str(err.value) == line and "\n" not in line
    assert resolve_engine("hf", CUDA, directory) == "hf"
    assert resolve_engine("auto", torch.device("cpu"), directory) == "hf"


def test_a_covered_family_stays_on_the_fast_engine_under_auto(tmp_path) -> None:
    for preset in FAMILIES:
        assert resolve_engine("auto", CUDA, f"dummy:{preset}") == "fast"
    mistral = MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    assert find_family(mistral) is llama
    assert resolve_engine("fast", CUDA, _config_only(tmp_path, mistral)) == "fast"


def test_the_uncovered_model_itself_runs_on_hf_and_the_fast_engine_refuses_it(tok) -> None:
    config, line = UNCOVERED["phi3"]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    loaded = LoadedModel(model, "phi3", torch.device("cpu"), torch.float32, "sdpa", source="phi3")
    sampling = SamplingParams(eos_token_id=2, pad_token_id=0, top_k=1, max_new_tokens=4)
    with pytest.raises(UserError, match=f"^{line}$"):
        FastEngine(loaded, sampling, slots=2)
    (result,) = HFEngine(loaded, sampling, batch_size=2).generate([GroupRequest("g", [5, 6, 7], [3, 3])])
    assert [len(c) for c in result.completions] == [3, 3]


def test_a_checkpoint_without_tokenizer_files_is_one_clear_line(tmp_path) -> None:
    source = dummy_checkpoint("tiny")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, tmp_path / name)
    with pytest.raises(UserError) as err:
        load_tokenizer(str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"model '{tmp_path}' has no tokenizer") and "tokenizer files" in message
    assert "\n" not in message
    # the same directory with the tokenizer files loads, as the checkpoint it was copied from
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")) or file.name == "chat_template.jinja":
            shutil.copy(file, tmp_path / file.name)
    assert len(load_tokenizer(str(tmp_path))) == len(load_tokenizer(str(source)))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"

