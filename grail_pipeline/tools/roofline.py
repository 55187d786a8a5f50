"""The two bounds of a run, from the model's shapes and the card's measured ceilings: how fast could it be?

A rollout costs two passes over its tokens: the decode steps that generate them, and the proof's forward
that recomputes them as the validator will (plus its prompt, once per group of 16). For each, the compute
bound is its floating-point operations over the card's measured matrix rate, and the bandwidth bound the
bytes it must move over the measured copy rate: for a decode step, the weights once plus every occupied
slot's live keys and values; for the proof, its weights once per pass (a pass proves up to 32,768 completion
rows, proving/prefix.py), each layer's input and output rows and the completion rows' logits (the proof's
products are large enough that compute bounds it, by about 30x on W1). The larger bound of each pass is its
floor, and one over the sum of both passes' floors per rollout is the rate no version of
this pipeline can pass (issue #21: about 140 rollouts/s on W1 on an H200). The measured rate over it is the
fraction of the limit reached.

The ceilings are measured on the device the run used (a 512-MB device copy counted as bytes read plus written,
an 8192³ bf16 product), once per process; off the GPU, or where there is no memory left to measure
with, there are none and no bound is given.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from grail_pipeline.protocol.profile import PROFILE

# 512 MB: eight times the H200's L2, and room enough under a --memory-gb cap (2 GB buffers ran out of it on
# an H200 capped at 24 GB, bench/results/h200-2026-12-02/after-2/)
COPY_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class Ceilings:
    """What the card does at best, measured: bytes per second moved, floating-point operations per second."""

    bandwidth_tb_s: float
    matmul_tflop_s: float


def timed_ms(fn, reps: int = 20) -> float:
    """Mean milliseconds of `fn` over `reps` back-to-back runs on the GPU (CUDA events), after one untimed run."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _copy(a):
    b = a.clone()
    return lambda: b.copy_(a)


def _product(x):
    y = x.clone().normal_()
    return lambda: x @ y


@functools.cache
def measured_ceilings(device: str) -> Ceilings | None:
    """The card's copy bandwidth and bf16 matrix rate (random data, about a second); None off the GPU."""
    if not device.startswith("cuda"):
        return None
    import torch  # here: the module is read by commands that must not import torch before their checks

    try:
        with torch.cuda.device(torch.device(device)):
            copy_ms = timed_ms(_copy(torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)), reps=10)
            mm_ms = timed_ms(_product(torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)), reps=10)
    except torch.OutOfMemoryError:  # a run under --memory-gb may have no room left at its end: no bound, no crash
        return None
    finally:
        torch.cuda.empty_cache()
    return Ceilings(bandwidth_tb_s=2 * COPY_BYTES / (copy_ms / 1e3) / 1e12,
                    matmul_tflop_s=2 * 8192**3 / (mm_ms / 1e3) / 1e12)


@dataclass(frozen=True)
class Shapes:
    """What one token costs the model: products' parameters, attention's width, the KV cache's bytes."""

    linear_params: int  # every projection of every layer (q, k, v, o, gate, up, down)
    head_params: int  # the output head (vocabulary x hidden)
    attention_width: int  # layers x query heads x head dim: one query-key product per token of context
    kv_bytes_per_token: int  # layers x (K, V) x KV heads x head dim x dtype bytes
    weight_bytes: int  # what a decode step reads of the weights: the projections and the head
    stream_bytes_per_token: int  # layers x (in, out) x hidden x dtype bytes: the residual stream through a forward
    logit_bytes_per_token: int  # vocabulary x dtype bytes: one row of logits

    @classmethod
    def of(cls, config, dtype_bytes: int) -> "Shapes":
        text = getattr(config, "text_config", None) or config
        hidden, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
        heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
        linear, head = layers * per_layer, text.vocab_size * hidden
        return cls(linear, head, layers * heads * head_dim, layers * 2 * kv_heads * head_dim * dtype_bytes,
                   (linear + head) * dtype_bytes, layers * 2 * hidden * dtype_bytes, text.vocab_size * dtype_bytes)


def roofline(shapes: Shapes, ceilings: Ceilings, *, batch_size: int, occupancy: float, computed_share: float,
             mean_context: float, completion_tokens: float, prompt_tokens: float, step_ms: float,
             rollouts_per_s: float, proof_pass_rows: float | None = None, proof_busy_ms: float | None = None) -> dict:
    """Both bounds of the decode step and of the proof, per step and per rollout, and the fraction reached.

    `completion_tokens` and `prompt_tokens` are per rollout and per group; `computed_share` is the rows a step
    computes over the slots (the fast engine's decode width). The proof's step is a pass of `proof_pass_rows`
    completion rows (default: one rollout's); `proof_busy_ms` is what the run's prove stage was busy per
    rollout (wall time, host included, while decoding shared the card), shown beside the bounds."""
    flops, bandwidth = ceilings.matmul_tflop_s * 1e12, ceilings.bandwidth_tb_s * 1e12
    occupied = occupancy * batch_size
    rows = computed_share * batch_size
    step_flop = 2 * rows * (shapes.linear_params + shapes.head_params) + 4 * occupied * mean_context * shapes.attention_width
    step_bytes = shapes.weight_bytes + occupied * mean_context * shapes.kv_bytes_per_token
    step_compute_ms, step_bandwidth_ms = 1e3 * step_flop / flops, 1e3 * step_bytes / bandwidth
    steps_per_rollout = completion_tokens / occupied if occupied else 0.0
    # the proof: every completion row and a share of the prompt's through the layers, the head on completion rows
    proof_rows = completion_tokens + prompt_tokens / PROFILE.rollouts_per_problem
    context = prompt_tokens + completion_tokens / 2
    proof_flop = (2 * proof_rows * shapes.linear_params + 2 * completion_tokens * shapes.head_params
                  + 4 * completion_tokens * context * shapes.attention_width)
    decode_ms = steps_per_rollout * max(step_compute_ms, step_bandwidth_ms)
    pass_rows = proof_pass_rows or completion_tokens
    passes = completion_tokens / pass_rows if pass_rows else 0.0  # passes per rollout
    proof_bytes = (passes * shapes.weight_bytes + proof_rows * shapes.stream_bytes_per_token
                   + 2 * completion_tokens * shapes.logit_bytes_per_token)  # logits written, then read for logprobs
    proof_compute_ms, proof_bandwidth_ms = 1e3 * proof_flop / flops, 1e3 * proof_bytes / bandwidth
    proof_ms = max(proof_compute_ms, proof_bandwidth_ms)
    limit = 1e3 / (decode_ms + proof_ms) if decode_ms + proof_ms else 0.0
    per_pass = 1 / passes if passes else 0.0
    return dict(
        ceilings=asdict(ceilings),
        decode_step=dict(compute_ms=round(step_compute_ms, 3), bandwidth_ms=round(step_bandwidth_ms, 3),
                         measured_ms=round(step_ms, 3), rows=round(rows, 1), occupied=round(occupied, 1)),
        decode_per_rollout=dict(compute_ms=round(steps_per_rollout * step_compute_ms, 3),
                                bandwidth_ms=round(steps_per_rollout * step_bandwidth_ms, 3),
                                measured_ms=round(steps_per_rollout * step_ms, 3)),
        proof_pass=dict(rows=round(pass_rows, 1), compute_ms=round(per_pass * proof_compute_ms, 3),
                        bandwidth_ms=round(per_pass * proof_bandwidth_ms, 3)),
        proof_per_rollout=dict(compute_ms=round(proof_compute_ms, 3), bandwidth_ms=round(proof_bandwidth_ms, 3),
                               tflop=round(proof_flop / 1e12, 3), gb=round(proof_bytes / 1e9, 3),
                               busy_ms=None if proof_busy_ms is None else round(proof_busy_ms, 3)),
        limit_rollouts_per_s=round(limit, 2),
        fraction_of_limit=round(rollouts_per_s / limit, 4) if limit else None,
    )


def result_roofline(runtime, result) -> dict | None:
    """`roofline` for one measured batch size (a `BatchResult`) of a runtime's model; None off the GPU or for a row
    with nothing run."""
    loaded = runtime.loaded
    config, dtype_bytes = loaded.model.config, loaded.dtype.itemsize
    ceilings = measured_ceilings(str(loaded.device))
    engine = result.engine or {}
    if ceilings is None or not result.rollouts or not engine.get("decode_steps"):
        return None
    from grail_pipeline.proving.prefix import MAX_GROUPS, MAX_ROWS  # here: it imports torch

    completion_tokens = result.completion_tokens / result.rollouts
    # a pass takes waiting groups until MAX_ROWS completion rows or MAX_GROUPS groups; a full pipeline keeps it fed
    pass_rows = min(MAX_ROWS, MAX_GROUPS * PROFILE.rollouts_per_problem * completion_tokens)
    prove_s = (result.stage_seconds or {}).get("prove")
    return roofline(Shapes.of(config, dtype_bytes), ceilings, batch_size=result.batch_size,
                    occupancy=engine.get("batch_occupancy", 0.0), computed_share=engine.get("computed_rows_share", 1.0),
                    mean_context=engine.get("mean_context", 0.0),
                    completion_tokens=completion_tokens,
                    prompt_tokens=result.prompt_tokens / max(1, result.problems), step_ms=engine.get("step_ms", 0.0),
                    rollouts_per_s=result.rollouts_per_s, proof_pass_rows=pass_rows,
                    proof_busy_ms=None if prove_s is None else 1e3 * prove_s / result.rollouts)
