"""Model families: the registry, the Qwen2 family's fused weights, and its two forms of the layer.

The prover's bits must not depend on whether an engine fused the weights of the model it shares: the
same proofs on a freshly loaded model and on one a fast engine (or two) fused first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Phi3Config

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.checkpoints import dummy_config
from grail_pipeline.inference.engine import SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine
from grail_pipeline.inference.loading import LoadedModel, load_model
from grail_pipeline.inference.models import decoder as decoder_module
from grail_pipeline.inference.models import family_for, find_family, qwen2
from grail_pipeline.proving.prefix import PrefixProver, supports_prefix_proofs
from grail_pipeline.proving.proofs import ProofJob

SAMPLING = SamplingParams(eos_token_id=151645, pad_token_id=151643, max_new_tokens=8)


def small_phi3() -> LoadedModel:
    config = Phi3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return LoadedModel(model, "phi3", torch.device("cpu"), torch.float32, "sdpa", source="phi3")


def test_qwen2_configs_find_the_qwen2_family_before_any_weights_load() -> None:
    for preset in ("qwen2.5-3b", "qwen2.5-0.5b", "tiny"):
        assert find_family(dummy_config(preset)) is qwen2 and family_for(dummy_config(preset)) is qwen2


def test_other_families_are_refused_with_the_reason() -> None:
    phi3 = Phi3Config()
    assert find_family(phi3) is None and qwen2.unsupported(phi3) == "model type 'phi3'"
    with pytest.raises(UserError) as err:
        family_for(phi3)
    assert str(err.value) == "the fast engine runs Qwen2, Qwen3 and Llama models; 'phi3' needs --engine hf"
    sliding = dummy_config("tiny")
    sliding.use_sliding_window = True
    with pytest.raises(UserError, match=r"^the fast engine runs Qwen2, Qwen3 and Llama models; 'qwen2' needs --engine hf "
                                        r"\(sliding-window attention\)$"):
        family_for(sliding)


def test_the_fast_engine_refuses_a_model_without_a_family_and_the_prefix_prover_steps_aside(tiny) -> None:
    phi3 = small_phi3()
    with pytest.raises(UserError, match="the fast engine runs Qwen2, Qwen3 and Llama models; 'phi3' needs --engine hf"):
        FastEngine(phi3, SAMPLING, slots=2)
    assert not supports_prefix_proofs(phi3)
    assert supports_prefix_proofs(tiny)
    assert not supports_prefix_proofs(dataclasses.replace(tiny, attn_implementation="eager"))


def test_fusing_makes_the_modules_views_of_the_engine_storage_and_twice_changes_nothing() -> None:
    loaded = load_model("dummy:tiny", device="cpu")
    model = loaded.model
    attn = model.get_decoder().layers[0].self_attn
    mlp = model.get_decoder().layers[0].mlp
    before = {name: p.clone() for name, p in model.state_dict().items()}
    expected_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])

    first = decoder_module.fuse_weights(model)
    layer = first.layers[0]
    assert torch.equal(layer.qkv_w, expected_qkv)
    assert attn.q_proj.weight.data_ptr() == layer.qkv_w.data_ptr()
    assert attn.v_proj.bias.data_ptr() + attn.v_proj.bias.numel() * 4 == layer.qkv_b.data_ptr() + layer.qkv_b.nbytes
    assert mlp.up_proj.weight.data_ptr() == layer.gate_up_w[mlp.gate_proj.out_features:].data_ptr()

    second = decoder_module.fuse_weights(model)  # a second engine on the same model: the same storage, no copy
    for a, b in zip(first.layers, second.layers, strict=True):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if x is None:  # Qwen2 has no q/k norms
                assert y is None
                continue
            assert x.data_ptr() == y.data_ptr() and x.shape == y.shape and torch.equal(x, y)
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name


def jobs(vocab: int) -> list[ProofJob]:
    rng = random.Random(3)
    out = []
    for g, (prompt_len, lengths) in enumerate([(5, [9, 14, 2]), (17, [30, 1])]):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        completions = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
        out.append(ProofJob(prompt, completions, hashlib.sha256(f"w{g}".encode()).hexdigest()))
    return out


def test_the_prover_gives_the_same_bits_on_a_fused_and_a_fresh_model() -> None:
    fresh, fused = load_model("dummy:tiny", device="cpu"), load_model("dummy:tiny", device="cpu")
    FastEngine(fused, SAMPLING, slots=2)
    FastEngine(fused, SAMPLING, slots=2)  # and fused again
    work = jobs(fresh.vocab_size)
    got, expected = PrefixProver(fused).prove_many(work), PrefixProver(fresh).prove_many(work)
    for group_got, group_expected in zip(got, expected, strict=True):
        for a, b in zip(group_got, group_expected, strict=True):
            assert torch.equal(a.sketches, b.sketches) and torch.equal(a.indices, b.indices)
            assert a.token_logprobs == b.token_logprobs


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3", "tiny-llama"])
def each_family(request) -> LoadedModel:
    """The tiny preset of each family (Qwen2, Qwen3, Llama), float32 on the CPU."""
    return load_model(f"dummy:{request.param}", device="cpu")


def test_row_functions_are_every_norm_and_product_the_prover_calls(each_family) -> None:
    decoder = each_family.model.get_decoder()
    functions = [f.module for f in decoder_module.row_functions(decoder)]
    layer = decoder.layers[0]
    per_row = [m for m in layer.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__.endswith("RMSNorm")]
    assert {id(m) for m in functions} == {id(m) for m in per_row} | {id(decoder.norm)}
    assert len(functions) == len(per_row) + 1


@pytest.mark.parametrize("fused", [False, True])
def test_the_prover_rows_are_the_transformers_forward(each_family, fused: bool) -> None:
    """`validator_rows` with causal attention gives transformers' last hidden state bit for bit, per family (off
    the GPU `fused` runs the same eager ops: tests/test_eager_fused.py)."""
    decoder = each_family.model.get_decoder()
    ids = torch.tensor([[5, 17, 3000, 42, 7, 151000, 9]])
    head_dim = decoder_module.Dims.of(each_family.model.config).head_dim
    cos, sin = decoder_module.rotary_tables(decoder, ids.shape[1], each_family.dtype, each_family.device)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, scale=head_dim ** -0.5,
                                             enable_gqa=True)
        return out[0].transpose(0, 1)

    with torch.inference_mode():
        expected = decoder(input_ids=ids).last_hidden_state[0]
        got = decoder_module.validator_rows(decoder, decoder.embed_tokens(ids[0]), cos, sin, head_dim, attend,
                                            fused=fused)
    assert torch.equal(got, expected)
