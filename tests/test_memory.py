"""The memory breakdown on the CPU: present, non-negative, the KV cache's size as its formula says.

On the CPU nothing is measured: the parts are exact tensor bytes or sizes computed from shapes.
"""

from __future__ import annotations

import pytest

from grail_pipeline.inference.engine import SamplingParams
from grail_pipeline.inference.kv_cache import PAGE, kv_cache_bytes, positions_per_slot
from grail_pipeline.inference.memory import module_bytes
from grail_pipeline.mining.lengths import parse_length_profile
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.workload import benchmark_window
from grail_pipeline.protocol.wallet import ephemeral_signer
from grail_pipeline.tools.measurement import measure_batch_size


def test_benchmark_memory_breakdown_on_the_cpu(tiny, tok) -> None:
    slots, prompt_limit, new_tokens = 16, 320, 24
    runtime = Runtime(tiny, tok, "fast", SamplingParams(tok.eos_token_id, tok.pad_token_id, max_new_tokens=new_tokens),
                      parse_length_profile("fixed:20"), prompt_limit)
    try:
        result = measure_batch_size(runtime, ephemeral_signer(), slots, 1, 0, benchmark_window(0), 0, None)
    finally:
        runtime.close()
    assert result.ok
    memory = result.as_dict()["memory"]
    parts = {c["name"]: c for c in memory["components"]}
    assert {"weights", "kv_cache", "sampler_buffers", "step_logits", "prover_workspace", "prover_tables",
            "row_count_measurement"} <= set(parts)
    assert all(c["bytes"] >= 0 and c["how"] in ("exact", "measured", "computed") for c in parts.values())
    assert memory["peak_reserved_gb"] is None and "no GPU" in memory["note"]  # nothing measured off the GPU
    config = tiny.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # keys and values of every layer and page: by default a page for every 64 positions of every slot's longest
    # sequence (a prompt of up to the limit and the new tokens, less one), and the scratch page
    assert positions_per_slot(prompt_limit, new_tokens) == prompt_limit + new_tokens - 1
    pages = slots * -(-(prompt_limit + new_tokens - 1) // PAGE) + 1
    expected = 2 * config.num_hidden_layers * pages * PAGE * config.num_key_value_heads * head_dim * tiny.dtype.itemsize
    assert parts["kv_cache"]["bytes"] == expected == kv_cache_bytes(
        config.num_hidden_layers, pages, config.num_key_value_heads, head_dim, tiny.dtype.itemsize)
    assert parts["weights"]["bytes"] == module_bytes(tiny.model) > 0
    assert parts["step_logits"]["bytes"] == slots * config.vocab_size * 4
    assert parts["kv_cache"]["gb"] == pytest.approx(expected / 1e9, abs=1e-3)


def test_memory_gb_is_ignored_with_a_note_on_the_cpu() -> None:
    import argparse

    from grail_pipeline.cli.arguments import apply_memory_cap

    assert apply_memory_cap(argparse.Namespace(memory_gb=None, device="cpu")) is None
    note = apply_memory_cap(argparse.Namespace(memory_gb=24.0, device="cpu"))
    assert note == "--memory-gb 24: no GPU, nothing to cap (ignored on the CPU)"
