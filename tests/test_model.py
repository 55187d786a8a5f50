"""Model loading: dummy presets (their architectures), devices, attention choice and the one-line errors."""

from __future__ import annotations

import logging

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.checkpoints import DUMMY_SEED, dummy_config
from grail_pipeline.inference.loading import attention_implementation, load_model, resolve_device, wants_multi_gpu
from grail_pipeline.inference.model_ref import PRESETS, parse_model_ref

QWEN_VOCAB = 151936


@pytest.fixture(autouse=True)
def no_grail_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GRAIL_USE_FLASH_ATTENTION", "GRAIL_MULTI_GPU"):
        monkeypatch.delenv(name, raising=False)


# the published Qwen2.5 configurations (config.json of Qwen/Qwen2.5-3B-Instruct and Qwen/Qwen2.5-0.5B-Instruct)
@pytest.mark.parametrize("preset, layers, hidden, heads, kv_heads, intermediate, params_b", [
    ("qwen2.5-3b", 36, 2048, 16, 2, 11008, 3.09),
    ("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 0.49),
    ("tiny", 2, 64, 4, 2, 128, None),
])
def test_dummy_configs_have_the_real_architecture(preset, layers, hidden, heads, kv_heads, intermediate,
                                                   params_b) -> None:
    cfg = dummy_config(preset)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == (layers, hidden, heads, kv_heads, intermediate)
    assert cfg.vocab_size == QWEN_VOCAB and cfg.tie_word_embeddings
    assert cfg.model_type == "qwen2" and not cfg.use_sliding_window
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_parameters["rope_theta"] == 1_000_000.0
    assert (cfg.bos_token_id, cfg.eos_token_id) == (151643, 151645)
    if params_b is not None:
        # on the meta device: shapes only, no weights are allocated
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(cfg)
        unique = {id(p): p.numel() for p in net.parameters()}  # the tied head counts once
        assert round(sum(unique.values()) / 1e9, 2) == params_b


def test_tiny_dummy_loads_on_the_cpu(tiny) -> None:
    assert tiny.name == "dummy:tiny" and tiny.device == torch.device("cpu")
    assert tiny.dtype == torch.float32 and tiny.attn_implementation == "sdpa"
    assert tiny.vocab_size == QWEN_VOCAB
    net = tiny.model
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.get_output_embeddings().weight is net.get_input_embeddings().weight  # tied
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())


def test_dummy_weights_are_reproducible(tiny) -> None:
    """The same seed every time: two loads (and two machines) hold the same numbers."""
    torch.manual_seed(DUMMY_SEED + 1)  # the global state before the load does not matter
    again = load_model("dummy:tiny", "cpu")
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("nope", "", "cuda:x", "gpu"):
        with pytest.raises(UserError, match=f"unknown device '{bad}'"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_user_error(device) -> None:
    with pytest.raises(UserError, match=f"device '{device}' requested but no CUDA GPU is visible"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "hip"])
def test_devices_the_tool_cannot_run_on_are_user_errors(device) -> None:
    with pytest.raises(UserError, match=f"device '{device}' is not supported: use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_cuda_index_beyond_the_visible_gpus_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Needs two visible GPUs to see the message for cuda:2, so the count is stood in (no GPU is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(UserError, match=r"device 'cuda:2' requested but only 2 GPUs are visible \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"device 'cuda:1' requested but only 1 GPU is visible \(cuda:0\)$"):
        resolve_device("cuda:1")


def test_flash_attention_on_the_cpu_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="grail_pipeline")
    assert attention_implementation(torch.device("cpu"), env={}) == "sdpa"
    assert attention_implementation(torch.device("cpu"), env={"GRAIL_USE_FLASH_ATTENTION": "0"}) == "sdpa"
    assert not caplog.records

    monkeypatch.setenv("GRAIL_USE_FLASH_ATTENTION", "1")
    loaded = load_model("dummy:tiny", "cpu")
    assert loaded.attn_implementation == "sdpa" and loaded.model.config._attn_implementation == "sdpa"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "GRAIL_USE_FLASH_ATTENTION=1 ignored" in message and "using sdpa" in message and "\n" not in message


def test_flash_attention_without_the_package_falls_back_to_sdpa(monkeypatch, caplog) -> None:
    """The CUDA branch only looks at the device type and the import, so it runs without a GPU."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    caplog.set_level(logging.WARNING, logger="grail_pipeline")
    env = {"GRAIL_USE_FLASH_ATTENTION": "1"}
    assert attention_implementation(torch.device("cuda"), env=env) == "sdpa"
    assert len(caplog.records) == 1 and "flash-attn is not installed" in caplog.records[0].getMessage()


def test_multi_gpu_needs_the_variable_and_several_gpus() -> None:
    assert not wants_multi_gpu({})
    assert not wants_multi_gpu({"GRAIL_MULTI_GPU": "0"})
    assert wants_multi_gpu({"GRAIL_MULTI_GPU": "1"}) == (torch.cuda.device_count() > 1)


def test_unknown_preset_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"unknown model preset 'dummy:nope' \(known: dummy:qwen2.5-3b, "
                                        r"dummy:qwen2.5-0.5b, dummy:qwen3-4b, dummy:llama3-1b, dummy:tiny, "
                                        r"dummy:tiny-qwen3, dummy:tiny-llama\)"):
        load_model("dummy:nope", "cpu")
    with pytest.raises(UserError, match="--model is empty"):
        load_model("  ", "cpu")


@pytest.mark.parametrize("path", ["./no/such/dir", "/no/such/dir", "~/no-such-grail-model-dir"])
def test_missing_local_directory_is_a_user_error(path) -> None:
    with pytest.raises(UserError, match=f"model directory '{path}' does not exist"):
        load_model(path, "cpu")


def test_directory_without_a_model_is_a_user_error(tmp_path) -> None:
    assert parse_model_ref(str(tmp_path)).kind == "local"
    with pytest.raises(UserError, match=f"cannot load the checkpoint '{tmp_path}'") as err:
        load_model(str(tmp_path), "cpu")
    assert "\n" not in str(err.value)


def test_hub_id_offline_is_a_user_error_naming_the_model(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(UserError) as err:
        load_model("no-such-org/no-such-model", "cpu")
    message = str(err.value)
    assert message.startswith("cannot load model 'no-such-org/no-such-model' (")
    assert "--model dummy:qwen2.5-3b" in message and "\n" not in message and len(message) < 500


def test_model_refs() -> None:
    assert parse_model_ref("dummy:tiny").is_dummy and parse_model_ref("dummy:tiny").preset == "tiny"
    hub = parse_model_ref("Qwen/Qwen2.5-3B-Instruct")
    assert (hub.kind, hub.preset, hub.is_dummy) == ("hub", None, False)
    assert parse_model_ref(" dummy:qwen2.5-3b ").raw == "dummy:qwen2.5-3b"
    assert PRESETS.keys() == {"qwen2.5-3b", "qwen2.5-0.5b", "qwen3-4b", "llama3-1b", "tiny", "tiny-qwen3",
                              "tiny-llama"}


# The architecture each preset stands for (DESIGN.md §3 for W1), and what every Qwen2.5 checkpoint shares. The
# same config gives the same random weights (same seed, same init), so the benchmark's W1 model and the test model
# stay what they were before the presets became one table.
_SHARED = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
               rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"}, use_sliding_window=False,
               bos_token_id=151643, eos_token_id=151645, num_key_value_heads=2, hidden_act="silu")
_SIZES = {
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       max_position_embeddings=32768),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=4096),
}


@pytest.mark.parametrize("preset", sorted(_SIZES))
def test_preset_configs_are_the_architectures_they_stand_for(preset) -> None:
    got = dummy_config(preset).to_dict()
    expected = dict(_SHARED, **_SIZES[preset])
    assert {key: got[key] for key in expected} == expected
    assert PRESETS[preset].model_type == got["model_type"]
    dummy_config(preset).rope_parameters["rope_theta"] = 1.0  # the table is not shared with a built config
    assert dummy_config(preset).rope_parameters["rope_theta"] == 1_000_000.0
