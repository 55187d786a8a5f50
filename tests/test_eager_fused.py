"""`eager_fused`'s kernels against the eager ops they stand in for.

On the GPU they must give eager's bits: `bench/eager_fused_probe.py` checks that there, and the prover's proofs
with and without them. Here Triton's interpreter runs them (TRITON_INTERPRET=1, in a process of its own since
the variable is read when a kernel is defined), with numpy's product, sum and quotient and torch's exp for
libdevice's mul_rn, add_rn, div_rn and exp (numpy's float32 exp differs from the CPU's in the last bit for some
inputs, which turned 6 of 37,000 fp16 SiLU values), in bf16 and fp16 (the interpreter's own float32 -> bf16
conversion truncates, but the kernels round to bf16 on the bits before they store, so what they store is exact):
the norms, the rotary embedding and SiLU·up bit for bit against the CPU's eager ops, and every family's prover
rows with the kernels equal to those without, every kernel launched where the family runs its op.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from grail_pipeline.inference.models import eager_fused

INTERPRETED = textwrap.dedent("""
    import types
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle
    import torch.nn.functional as F
    from transformers.activations import ACT2FN
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from grail_pipeline.inference.loading import load_model
    from grail_pipeline.inference.models import decoder as decoder_module
    from grail_pipeline.inference.models import eager_fused as ef

    def torch_exp(a):  # the CPU's exp, as eager's silu runs it (numpy's differs in the last bit at times)
        return tl.core.tensor(TensorHandle(torch.from_numpy(a.handle.data).exp().numpy(), a.handle.dtype), a.type)

    # the kernels on CPU tensors (the interpreter's device); numpy's arithmetic for libdevice's
    ef.fusable = lambda *t: t[0].dtype in ef.HALF_TYPES and all(x.dtype == t[0].dtype and x.is_contiguous() for x in t)
    ef.libdevice = types.SimpleNamespace(mul_rn=lambda a, b: a * b, add_rn=lambda a, b: a + b,
                                         div_rn=lambda a, b: a / b, exp=torch_exp)
    launches = {}

    class Counted:  # each kernel's launches, so that "fused = eager" below cannot pass on the eager fallbacks
        def __init__(self, name):
            self.name, self.kernel = name, getattr(ef, name)

        def __getitem__(self, grid):
            launches[self.name] = launches.get(self.name, 0) + 1
            return self.kernel[grid]

    KERNELS = ("_squares_kernel", "_norm_scale_kernel", "_rotary_kernel", "_silu_mul_kernel")
    for kernel in KERNELS:
        setattr(ef, kernel, Counted(kernel))
    g = torch.Generator().manual_seed(0)
    for half in (torch.bfloat16, torch.float16):
        for module, shape in ((Qwen2RMSNorm(2048, eps=1e-6), (37, 2048)), (Qwen3RMSNorm(128, eps=1e-6), (37, 12, 128))):
            module = module.to(half)
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.5 + 1)
            for scale in (1e-2, 1.0, 30.0):
                x = (torch.randn(shape, generator=g) * scale).to(half)
                assert torch.equal(ef.rms_norm(module, x), module(x)), (type(module).__name__, scale, half)

        angles = torch.rand(37, 64, generator=g) * 300
        cos = torch.cat((angles.cos(), angles.cos()), -1).to(half)
        sin = torch.cat((angles.sin(), angles.sin()), -1).to(half)
        for heads, kv_heads in ((16, 2), (12, 3), (40, 8)):  # block of 16 heads: a partial block, two blocks
            q = torch.randn(37, heads, 128, generator=g).to(half)
            k = torch.randn(37, kv_heads, 128, generator=g).to(half)
            got, expected = ef.rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (heads, half)

        gate, up = (torch.randn(37, 1000, generator=g) * 4).to(half), torch.randn(37, 1000, generator=g).to(half)
        assert torch.equal(ef.silu_mul(ACT2FN["silu"], gate, up), ACT2FN["silu"](gate) * up), half

        for name in ("tiny", "tiny-qwen3", "tiny-llama"):
            loaded = load_model(f"dummy:{name}", device="cpu")
            decoder = loaded.model.get_decoder().to(half)
            ids = torch.tensor([[5, 17, 3000, 42, 7, 151000, 9, 11, 12]])
            head_dim = decoder_module.Dims.of(loaded.model.config).head_dim
            cos, sin = decoder_module.rotary_tables(decoder, ids.shape[1], half, torch.device("cpu"))

            def attend(layer, q, k, v):
                out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                     v.transpose(0, 1)[None], is_causal=True, scale=head_dim ** -0.5,
                                                     enable_gqa=True)
                return out[0].transpose(0, 1)

            with torch.inference_mode():
                embedded = decoder.embed_tokens(ids[0])
                eager = decoder_module.validator_rows(decoder, embedded, cos, sin, head_dim, attend)
                launches.clear()
                fused = decoder_module.validator_rows(decoder, embedded, cos, sin, head_dim, attend, fused=True)
            assert torch.equal(fused, eager), (name, half)
            # per layer two norms (four with Qwen3's q/k norms), one rotary (q and k) and one SiLU·up; a final norm
            layers, norms = len(decoder.layers), 4 if name == "tiny-qwen3" else 2
            assert launches == dict(_squares_kernel=norms * layers + 1, _norm_scale_kernel=norms * layers + 1,
                                    _rotary_kernel=2 * layers, _silu_mul_kernel=layers), (name, half, launches)
    print("kernels = eager ops")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_kernels_round_as_the_eager_ops_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "kernels = eager ops" in done.stdout, done.stderr[-3000:]


def test_off_the_gpu_the_fused_ops_are_the_eager_ops() -> None:
    """On the CPU (and for float32 anywhere) nothing is fused: the same calls, the same bits."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2048, generator=g).bfloat16()
    norm = Qwen2RMSNorm(2048).bfloat16()
    q, k = torch.randn(5, 4, 64, generator=g).bfloat16(), torch.randn(5, 2, 64, generator=g).bfloat16()
    cos, sin = torch.randn(5, 64, generator=g).bfloat16(), torch.randn(5, 64, generator=g).bfloat16()
    assert not eager_fused.fusable(x, norm.weight)
    assert torch.equal(eager_fused.rms_norm(norm, x), norm(x))
    assert all(torch.equal(a, b) for a, b in zip(eager_fused.rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)))
    gate, up = torch.randn(5, 300, generator=g).bfloat16(), torch.randn(5, 300, generator=g).bfloat16()
    assert torch.equal(eager_fused.silu_mul(ACT2FN["silu"], gate, up), ACT2FN["silu"](gate) * up)
