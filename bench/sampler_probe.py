"""The decode step's top-k over the vocabulary: torch.topk on whole rows against a two-stage top-k (the top k of
equal pieces, then of those) at each piece count that divides the vocabulary, on the step's shape.

On an H200 (bench/results/h200-2026-12-02/after-1/) the one-stage torch.topk was the fastest (1.07 ms for
512 x 151,936; two stages 1.10 to 2.59 ms): the sampler keeps it, and this script keeps the variant.

    python bench/sampler_probe.py --rows 512 --vocab 151936 --k 50

Prints milliseconds per call (CUDA events, median) and whether each variant's values equal torch.topk's.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from pipeline_profile import time_graph  # bench scripts run with bench/ on the path


def vocab_topk(x: torch.Tensor, k: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k)` over the last dimension (values descending, their indices), in two stages where the
    row splits into `chunks` equal pieces: the top k of each piece, then the top k of those.

    The k largest of a row are among the k largest of the piece each lies in, so the values are
    torch.topk's (which of several equal values is taken may differ; sampling does not care).
    """
    n = x.shape[-1]
    rows = x.shape[:-1]
    piece = n // chunks
    values, indices = torch.topk(x.reshape(*rows, chunks, piece), k, dim=-1, sorted=False)
    offsets = torch.arange(chunks, device=x.device).mul_(piece)[:, None]
    values, best = torch.topk(values.reshape(*rows, chunks * k), k, dim=-1)
    indices = (indices + offsets).reshape(*rows, chunks * k).gather(-1, best)
    return values, indices


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--k", type=int, default=50)
    args = p.parse_args()
    x = torch.randn(args.rows, args.vocab, device="cuda") * 3
    ref_v, _ = torch.topk(x, args.k)
    rows = [dict(variant="torch.topk", ms=time_graph(lambda: torch.topk(x, args.k)), equal=True)]
    for chunks in [c for c in range(2, 1025) if args.vocab % c == 0 and args.vocab // c >= 4 * args.k]:
        v, i = vocab_topk(x, args.k, chunks)
        equal = torch.equal(v, ref_v) and torch.equal(x.gather(1, i), v)
        rows.append(dict(variant=f"two-stage {chunks} chunks of {args.vocab // chunks}",
                         ms=time_graph(lambda c=chunks: vocab_topk(x, args.k, c)), equal=equal))
    for r in rows:
        print(f"{r['variant']:40s} {r['ms']:.3f} ms  equal={r['equal']}")
    with open(os.path.join(os.environ.get("OUT", "."), "sampler_probe.json"), "w") as fh:
        json.dump(dict(args=vars(args), gpu=torch.cuda.get_device_name(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
