"""The prover's RMSNorm, rotary embedding and SiLU·up as Triton kernels that round exactly as PyTorch's eager ops do.

Why: the prover spends a third of its device time in PyTorch's element-wise kernels (2.6 of 7.85 ms per W1
rollout, H200, bench/results/h200-2026-12-02/after-1, prover_alone): RMSNorm makes six passes over float32
copies, the rotary embedding five (a `cat`, and broadcast products that run PyTorch's unvectorised kernel).
Here RMSNorm is two passes around torch's own mean, the rotary embedding one and SiLU·up one (at 8,192 W1 rows
on an H200: 0.244 -> 0.102 ms, 0.249 -> 0.099 ms and 0.227 -> 0.179 ms, bench/results/h200-2026-12-03/fused-exact/
and silu-exact/; the op timings vary between calls there, the prover's whole time less).

Why the bits are the validator's: each kernel computes, per element, the float32 operations of the eager chain
in the same order, and rounds to the storage dtype exactly where an eager op writes a tensor (`_rounded`; the
product of two bf16 values is exact in float32, so those rounding points are the only ones there are).
Reductions are not fused: RMSNorm's mean stays torch's own kernel over the same float32 squares in the same
shape, because its summation order is that kernel's. Two compiler defaults had to go (`EXACT`): the first rotary
kernel, written with plain `*`, `+` and `.to(bf16)` round trips, differed from eager in 19 % of its outputs on an
H200 (2026-12-03): Triton contracts a product and a sum into an FMA and may drop the rounding between them. So
products and sums are libdevice's `mul_rn`/`add_rn`, bf16 rounding is done on the bits, and fp fusion is off.
`bench/eager_fused_probe.py` compares each kernel with the eager ops bit for bit on the GPU, and the prover's
proofs with and without them: on an H200 (2026-12-03, third session) 0 differing elements of 356 M (RMSNorm) and
56.6 M (rotary), and the prefix prover's proofs with these kernels equal its proofs without, bit for bit, on 128 W1
rollouts (8.05 -> 7.09 ms per rollout). The prefix prover runs them by default (`fused_elementwise`).

SiLU·up (`act(gate) * up`, three passes in eager) is one pass: PyTorch's `x / (1 + expf(-x))` on libdevice's
`exp` and IEEE division, rounded, then the product. Under Triton's defaults that SiLU gave other bits than
PyTorch's for 2,032 of the 65,280 finite bf16 inputs; launched with `EXACT`, for none (H200, 2026-12-03, the
probe). The probe checks it over every bf16 input and in the prover's proofs.

Only where that reasoning holds: CUDA tensors in bf16 or fp16, weights and tables in the activations' dtype, and
the RMSNorm classes whose forward is the chain written here (Qwen2, Qwen3, Llama, Mistral). Anything else runs
the eager ops; so does the CPU.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs
    triton = None

# the RMSNorm classes whose forward is: float32, pow(2).mean(-1), * rsqrt(+ eps), to the input dtype, weight *
RMS_NORMS = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
# the activation modules whose forward is torch's silu (transformers' ACT2FN["silu"], torch's own)
SILUS = ("SiLUActivation", "SiLU")
HALF_TYPES = (torch.bfloat16, torch.float16)
_BLOCK = 1024  # elements per program of the squares and SiLU·up kernels


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels give eager's bits for these tensors: on a GPU, one 16-bit dtype, contiguous."""
    first = tensors[0]
    return (triton is not None and first.is_cuda and first.dtype in HALF_TYPES
            and all(t.dtype == first.dtype and t.is_contiguous() for t in tensors))


# Compile options for every kernel here: no contraction of a product and a sum into an FMA (Triton's default
# contracts, and then also drops the bf16 rounding between them: 19 % of the first rotary kernel's outputs
# differed on an H200), and libdevice without flush-to-zero (Triton's default flushes subnormals; torch's CUDA
# build does not).
EXACT = dict(enable_fp_fusion=False, enable_reflect_ftz=False)

if triton is not None:
    @triton.jit
    def _rounded(x, dtype: tl.constexpr):
        """float32 `x` rounded to `dtype` (bf16 or fp16) to nearest, ties to even, kept as float32.

        bf16 by integer operations on the bits (finite inputs; infinities stay infinite), which no compiler pass
        folds away as it may a float32 -> bf16 -> float32 round trip; fp16 by the round trip (fp16 is the
        dtype CPU tests run, in Triton's interpreter, which truncates to bf16 instead of rounding)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)

    @triton.jit
    def _squares_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)  # hidden_states.to(torch.float32)
        tl.store(out_ptr + offsets, x * x, mask=mask)  # .pow(2): PyTorch's kernel multiplies for exponent 2

    @triton.jit
    def _norm_scale_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rows, D: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        col = tl.arange(0, BLOCK_D)[None, :]
        mask = (row < rows) & (col < D)
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * D + col, mask=mask).to(tl.float32)
        r = tl.load(r_ptr + row, mask=row < rows)
        scaled = _rounded(libdevice.mul_rn(x, r), dtype)  # hidden_states * rsqrt(...), then .to(input_dtype)
        w = tl.load(w_ptr + col, mask=col < D).to(tl.float32)
        out = _rounded(libdevice.mul_rn(w, scaled), dtype)  # weight * hidden_states
        tl.store(out_ptr + row * D + col, out.to(dtype), mask=mask)  # exact: `out` is already a dtype value

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # x [N, heads, 2 * HALF], cos/sin [N, 2 * HALF]: x * cos + cat(-x2, x1) * sin, rounded as eager's ops
        n = tl.program_id(0)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        j = tl.arange(0, HALF)[None, :]
        mask = (head < heads) & (j < HALF)
        base = n * heads * 2 * HALF + head * 2 * HALF
        x1 = tl.load(x_ptr + base + j, mask=mask).to(tl.float32)
        x2 = tl.load(x_ptr + base + HALF + j, mask=mask).to(tl.float32)
        cos1 = tl.load(cos_ptr + n * 2 * HALF + j).to(tl.float32)
        cos2 = tl.load(cos_ptr + n * 2 * HALF + HALF + j).to(tl.float32)
        sin1 = tl.load(sin_ptr + n * 2 * HALF + j).to(tl.float32)
        sin2 = tl.load(sin_ptr + n * 2 * HALF + HALF + j).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        # q * cos, rotate_half(q) * sin and their sum: each an eager op that writes a tensor of the input dtype
        first = _rounded(libdevice.add_rn(_rounded(libdevice.mul_rn(x1, cos1), dtype),
                                          _rounded(libdevice.mul_rn(-x2, sin1), dtype)), dtype)
        second = _rounded(libdevice.add_rn(_rounded(libdevice.mul_rn(x2, cos2), dtype),
                                           _rounded(libdevice.mul_rn(x1, sin2), dtype)), dtype)
        tl.store(out_ptr + base + j, first.to(dtype), mask=mask)
        tl.store(out_ptr + base + HALF + j, second.to(dtype), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
        # act_fn(gate): PyTorch's silu in float32, x / (1 + expf(-x)), written as the input dtype
        act = _rounded(libdevice.div_rn(gate, libdevice.add_rn(1.0, libdevice.exp(-gate))), dtype)
        out = _rounded(libdevice.mul_rn(act, up), dtype)  # * up_proj(x)
        tl.store(out_ptr + offsets, out.to(dtype), mask=mask)


def rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for the families' RMSNorm over the last dimension, in two passes and torch's mean."""
    weight = module.weight
    if type(module).__name__ not in RMS_NORMS or not fusable(x, weight) or weight.shape != x.shape[-1:]:
        return module(x)
    squares = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _squares_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, squares, x.numel(), BLOCK=_BLOCK, **EXACT)
    scale = torch.rsqrt(squares.mean(-1, keepdim=True) + module.variance_epsilon)  # eager's own two ops
    out = torch.empty_like(x)
    dim = x.shape[-1]
    rows = x.numel() // dim
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, 4096 // block_d)
    _norm_scale_kernel[(triton.cdiv(rows, block_r),)](x, scale, weight, out, rows, D=dim, BLOCK_R=block_r,
                                                       BLOCK_D=block_d, **EXACT)
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` for q, k [N, heads, D] and cos, sin [N, D]."""
    if not fusable(q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_mul(act: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`act(gate) * up`, the MLP's product before its down projection, in one pass where `act` is silu."""
    if type(act).__name__ not in SILUS or not fusable(gate, up) or gate.shape != up.shape:
        return act(gate) * up
    out = torch.empty_like(gate)
    _silu_mul_kernel[(triton.cdiv(gate.numel(), _BLOCK),)](gate, up, out, gate.numel(), BLOCK=_BLOCK, **EXACT)
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rows, heads, dim = x.shape
    out = torch.empty_like(x)
    block_h = min(triton.next_power_of_2(heads), 16)
    _rotary_kernel[(rows, triton.cdiv(heads, block_h))](x, cos, sin, out, heads, HALF=dim // 2, BLOCK_H=block_h,
                                                         **EXACT)
    return out
