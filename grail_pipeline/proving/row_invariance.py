"""Which row counts round every per-row function of the decoder as the validator's shapes do, measured on the device.

The prefix prover (prefix.py) gives the validator's bits only where each per-row function (a projection,
a norm) rounds a row the same way at its row count as at the validator's, the sequence length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.common.paths import cache_root
from grail_pipeline.inference.memory import Component
from grail_pipeline.inference.models import decoder as layers
from grail_pipeline.inference.models import family_for
from grail_pipeline.proving.proofs import round_up


class RowInvariance:
    """The row counts at which every per-row function of a decoder layer rounds each row as a large product does.

    A matrix product's kernel, and with it the rounding of a row, can depend on the number of rows (on an
    H100 the MLP down projection does at 40 of 1020 lengths: bench/NOTES.md). Checked here with random
    rows through layer 0's own modules: every count from 1 to `max_length` (the validator's shapes) and
    every multiple of `step` up to `max_rows` (ours, after padding).
    """

    def __init__(self, exact: np.ndarray, max_length: int, measurement: Component | None = None) -> None:
        self.exact = exact  # exact[m]: m rows give the reference bits
        self.max_length = max_length
        self.measurement = measurement  # what measuring took on the device, for the memory breakdown

    @classmethod
    def everywhere(cls, max_length: int, max_rows: int) -> "RowInvariance":
        """Every row count taken as exact: off the GPU, where proofs are checked against the tolerance only."""
        return cls(np.ones(max(max_length, max_rows) + 1, dtype=bool), max_length,
                   Component("row_count_measurement", 0, "exact", "not run off the GPU"))

    @classmethod
    def cached(cls, decoder: torch.nn.Module, max_length: int, max_rows: int, step: int = 128,
               root: Path | None = None) -> "RowInvariance":
        """`measure`, kept on disk per device, software stack and shapes: it takes seconds, a restart should not."""
        path = (root or cache_root()) / "row-invariance" / f"{_stack_key(decoder, max_length, max_rows, step)}.npy"
        with contextlib.suppress(OSError, ValueError):
            exact = np.load(path, allow_pickle=False)
            if exact.dtype == np.bool_ and exact.shape == (_counts(max_length, max_rows, step)[-1] + 1,):
                return cls(exact, max_length, Component("row_count_measurement", 0, "exact",
                                                        f"read from {path.parent}, not run in this process"))
        invariance = cls.measure(decoder, max_length, max_rows, step)
        with contextlib.suppress(OSError):
            write_atomically(path, lambda fh: np.save(fh, invariance.exact))
        return invariance

    @classmethod
    @torch.inference_mode()
    def measure(cls, decoder: torch.nn.Module, max_length: int, max_rows: int, step: int = 128) -> "RowInvariance":
        counts = _counts(max_length, max_rows, step)
        top = counts[-1]
        functions = row_functions(decoder)
        weight = decoder.norm.weight
        on_gpu = weight.device.type == "cuda"
        if on_gpu:
            before = torch.cuda.memory_allocated(weight.device)
            torch.cuda.reset_peak_memory_stats(weight.device)
        generator = torch.Generator(weight.device).manual_seed(0)
        differs = torch.zeros(len(counts), dtype=torch.bool, device=weight.device)
        for fn, row_shape in functions:
            x = torch.randn(top, *row_shape, generator=generator, device=weight.device, dtype=weight.dtype)
            reference = fn(x)
            differs |= torch.stack([(fn(x[:m]) != reference[:m]).any() for m in counts])
        exact = np.zeros(top + 1, dtype=bool)
        exact[counts] = ~differs.cpu().numpy()
        if on_gpu:
            used = Component("row_count_measurement", torch.cuda.max_memory_allocated(weight.device) - before,
                             "measured", f"peak allocation over measuring {len(counts)} row counts up to {top}")
            # The measurement asks for outputs of ~1,500 sizes. On an H200 (W1, bench/results/h200-2026-12-02/
            # final-w1/) a first run on a fresh machine, which measures here, peaked at 137.7 GB reserved
            # against 39.8 GB when the counts came from the on-disk cache, while this measurement's own peak
            # allocation was 1.9 GB: the caching allocator kept what it had reserved for these sizes. Handing
            # it back keeps what the process holds (and what other processes on the card can have) to what
            # the run needs. Not yet re-measured on a GPU.
            del x, reference
            torch.cuda.empty_cache()
        else:
            used = Component("row_count_measurement", measurement_bytes(decoder, top), "computed",
                             f"random rows, reference and one output at {top} rows")
        return cls(exact, max_length, used)

    def sequence_is_exact(self, length: int) -> bool:
        """Whether the validator's shape for a sequence of this length rounds as ours will."""
        return length <= self.max_length and bool(self.exact[length])

    def padded(self, rows: int, multiple: int = 1) -> int | None:
        """The fewest exact row counts at or above `rows` that `multiple` divides (None past the measured range)."""
        start = round_up(rows, multiple)
        later = np.flatnonzero(self.exact[start::multiple])
        return start + multiple * int(later[0]) if len(later) else None

    @property
    def inexact_lengths(self) -> list[int]:
        return [int(m) for m in np.flatnonzero(~self.exact[1:self.max_length + 1]) + 1]


def measurement_bytes(decoder: torch.nn.Module, rows: int) -> int:
    """What `measure` holds at once for its largest function, from shapes: the random rows, the reference
    output and the output at one row count."""
    itemsize = decoder.norm.weight.dtype.itemsize
    largest = 0
    for fn, row_shape in row_functions(decoder):
        width = int(np.prod(row_shape))
        out = getattr(fn, "out_features", width)
        largest = max(largest, width + 2 * out)
    return rows * largest * itemsize


def _counts(max_length: int, max_rows: int, step: int) -> list[int]:
    return sorted(set(range(1, max_length + 1)) | set(range(step, max_rows + 1, step)))


def row_functions(decoder: torch.nn.Module) -> list[layers.RowFunction]:
    """The per-row functions the prover runs (models/decoder.py: `row_functions`), for a model a family runs."""
    family_for(decoder.config)
    return layers.row_functions(decoder)


def _stack_key(decoder: torch.nn.Module, max_length: int, max_rows: int, step: int) -> str:
    """What the measured rounding depends on: the device, the libraries and the functions' shapes."""
    device = decoder.norm.weight.device
    described: dict[str, object] = dict(
        version=1, torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        device=str(device), lengths=[max_length, max_rows, step],
        functions=[[type(fn).__name__, [list(p.shape) for p in fn.parameters()], str(fn.weight.dtype),
                    repr(getattr(fn, "variance_epsilon", None))] for fn, _ in row_functions(decoder)])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        described["gpu"] = [props.name, props.major, props.minor, props.multi_processor_count]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]
