"""The roofline's arithmetic on W1 (Qwen2.5-3B's shapes): the issue's own estimate, about 140 rollouts/s on an
H200, and the bounds' parts."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from grail_pipeline.tools.roofline import Ceilings, Shapes, measured_ceilings, roofline

W1 = Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936)


def test_w1_shapes() -> None:
    shapes = Shapes.of(W1, 2)
    assert shapes.kv_bytes_per_token == 36_864  # bench/NOTES.md
    assert 2 * (shapes.linear_params + shapes.head_params) == pytest.approx(6.2e9, rel=0.02)  # 6.2 GFLOP a token


def test_w1_limit_on_an_h200() -> None:
    line = roofline(Shapes.of(W1, 2), Ceilings(bandwidth_tb_s=4.3, matmul_tflop_s=790), batch_size=512,
                    occupancy=1.0, computed_share=1.0, mean_context=530, completion_tokens=436, prompt_tokens=270,
                    step_ms=7.7, rollouts_per_s=47.8)
    step = line["decode_step"]
    assert step["compute_ms"] > step["bandwidth_ms"]  # 512 occupied slots: the step is compute-bound
    assert line["proof_per_rollout"]["tflop"] == pytest.approx(2.8, rel=0.1)  # the 2.8 TFLOP
    assert 120 < line["limit_rollouts_per_s"] < 160  # the issue's ~140 rollouts/s
    assert line["fraction_of_limit"] == pytest.approx(47.8 / line["limit_rollouts_per_s"], rel=1e-3)
    assert line["decode_per_rollout"]["measured_ms"] == pytest.approx(7.7 * 436 / 512, rel=1e-3)
    assert line["proof_per_rollout"]["busy_ms"] is None  # no prove stage given


def test_w1_proof_bounds_per_pass_and_per_rollout() -> None:
    """The proof's bandwidth bound: weights once per pass, the residual stream, the completion logits twice."""
    shapes = Shapes.of(W1, 2)
    line = roofline(shapes, Ceilings(bandwidth_tb_s=4.3, matmul_tflop_s=790), batch_size=512, occupancy=1.0,
                    computed_share=1.0, mean_context=530, completion_tokens=436, prompt_tokens=270, step_ms=7.7,
                    rollouts_per_s=47.8, proof_pass_rows=32768, proof_busy_ms=15.3)
    proof, one_pass = line["proof_per_rollout"], line["proof_pass"]
    rows = 436 + 270 / 16
    expected = (436 / 32768 * shapes.weight_bytes + rows * 36 * 2 * 2048 * 2 + 2 * 436 * 151936 * 2)
    assert proof["gb"] == pytest.approx(expected / 1e9, rel=1e-3)
    assert proof["bandwidth_ms"] == pytest.approx(1e3 * expected / 4.3e12, rel=1e-2)
    assert proof["compute_ms"] > 10 * proof["bandwidth_ms"]  # the proof is compute-bound: its bound is its FLOPs
    assert one_pass["rows"] == 32768
    for bound in ("compute_ms", "bandwidth_ms"):  # a pass proves 32768 / 436 rollouts' completions
        assert one_pass[bound] == pytest.approx(proof[bound] * 32768 / 436, rel=1e-2)
    assert proof["busy_ms"] == 15.3
    without_passes = roofline(shapes, Ceilings(bandwidth_tb_s=4.3, matmul_tflop_s=790), batch_size=512,
                              occupancy=1.0, computed_share=1.0, mean_context=530, completion_tokens=436,
                              prompt_tokens=270, step_ms=7.7, rollouts_per_s=47.8)
    assert without_passes["proof_pass"]["rows"] == 436  # by default a pass is one rollout's rows
    assert without_passes["proof_per_rollout"]["bandwidth_ms"] > proof["bandwidth_ms"]  # weights read per rollout


def test_no_ceilings_off_the_gpu() -> None:
    assert measured_ceilings("cpu") is None
