"""Every CUDA graph of the fast engine, captured one way, into one memory pool.

A decode step is a few hundred small kernels; launched one by one from Python the host takes longer
than the GPU (bench/NOTES.md: 18 ms of host time against a 5.5 ms graph). So the whole step is captured
once as a CUDA graph and replayed, and so is the prefill of each padded prompt width (one graph per
width, replayed for every problem of that width).

Capture, the same for every graph: `warmups` runs on a side stream first, so that compilation,
autotuning and kernel loading all happen outside the capture, then the capture itself. All graphs
share one memory pool. That is safe because they are replayed one at a time, in order, on the engine
thread's stream, and none leaves a live tensor in the pool: every input and output of a graph is a
static tensor allocated outside the capture (the runner's state, the KV cache, a prefill's static
input), so the pool holds only temporaries, dead between replays.

Off the GPU nothing is captured and `run` calls the function.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class CudaGraphs:
    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.on_gpu else None
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        """Graphs captured so far (bench/rotation.py: a weight copy captures none)."""
        return len(self._graphs)

    def capture(self, key: Hashable, fn: Callable[[], object], warmups: int, thread_local: bool) -> None:
        """`fn` captured as the graph replayed for `key` (off the GPU: nothing).

        `thread_local` is the capture mode for a graph that may be captured while other threads use the
        GPU (the prover's): in the default (global) mode a CUDA call another thread makes during the
        capture invalidates it.
        """
        if not self.on_gpu:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local" if thread_local else "global"):
            fn()
        self._graphs[key] = graph

    def run(self, key: Hashable, fn: Callable[[], object]) -> None:
        """Replay the graph captured for `key`; where there is none (off the GPU, or not captured), call `fn`."""
        graph = self._graphs.get(key)
        if graph is None:
            fn()
        else:
            graph.replay()
