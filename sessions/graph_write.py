"""The memory model's write pass replayed from CUDA graphs (``objective.graph_write``, CUDA).

Training on episodes runs the backbone up to the memory layer over every context segment of
the batch, without autograd (``objective.write_backprop`` false), to make the traces: a
forward of hundreds of small launches whose host time, in an eager step, costs more than the
GPU work it launches (H200, ``recall5_small``: docs/benchmarks.md). The batches of one task
keep a few shapes, so each shape's pass is captured once and replayed.

* Shapes are bucketed: segments padded to a multiple of ``ROW_BUCKET`` rows and of
  ``TOKEN_BUCKET`` tokens (at most ``seq_len``). Padding cannot change the real rows' states:
  rows never interact (attention within a row; routing and experts per token, no capacity),
  and attention is causal, so tokens after a segment's end do not reach it. Only a matmul's
  rounding may differ with its shape (measured bitwise equal on the H200 at the test's
  shapes; a rounding difference could flip a token's near-tied routing choice).
* Only under bf16 autocast (how the trainer runs on CUDA: the sync-free fast path of every
  op); other calls run eagerly. A shape is captured the second time it is seen (a one-off
  shape runs eagerly), at most ``max_graphs`` shapes (later new shapes run eagerly); a shape
  whose capture fails runs eagerly from then on (a warning says why). The graphs share one
  memory pool (they never run at once; the pool stays reserved for the run: validation's
  and decoding's shapes get graphs too) and every replay's output is cloned, so nothing
  returned aliases it.
* Capture and its eager warm-up run on a side stream under autocast with its cast cache off:
  a cast cached during capture would be a tensor of the graph's pool that eager code reads.
* The weights are read where they live: the optimizer updates them in place. A parameter or
  buffer that moved (``.to()``, a new tensor) drops every graph.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass

import torch


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    idx_NS: torch.Tensor  # static input (bucket shape)
    hidden_NSD: torch.Tensor  # static output


class GraphedWritePass:
    ROW_BUCKET, TOKEN_BUCKET = 64, 8

    def __init__(self, backbone: torch.nn.Module, layer: int, max_graphs: int = 8):
        """``backbone``: the ``MHCModel`` (weakly referenced: the objective that keeps this
        does not keep the model alive); ``layer``: the write pass stops after it."""
        self._backbone = weakref.ref(backbone)
        self.layer, self.max_graphs = layer, max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: Counter = Counter()
        self.failed: set[tuple] = set()  # shapes whose capture failed: eager
        self.pool = None
        self.side: torch.cuda.Stream | None = None
        self._weights = self._weight_stamp(backbone)
        self.captures = self.replays = self.eager_calls = 0

    @staticmethod
    def _weight_stamp(backbone) -> list[int]:
        return [t.data_ptr() for t in (*backbone.parameters(), *backbone.buffers())]

    def bucket(self, N: int, S: int, seq_len: int) -> tuple[int, int]:
        rows = -(-N // self.ROW_BUCKET) * self.ROW_BUCKET
        tokens = min(-(-S // self.TOKEN_BUCKET) * self.TOKEN_BUCKET, seq_len)
        return rows, tokens

    def __call__(self, idx_NS: torch.Tensor) -> torch.Tensor:
        """The backbone's hidden states after ``layer`` for ``idx_NS`` ``(N, S, D)``, as the
        eager no-grad forward computes them (call it without autograd)."""
        backbone = self._backbone()
        if backbone is None:
            raise RuntimeError("GraphedWritePass: its model no longer exists")
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedWritePass runs without autograd (the write pass "
                               "with objective.write_backprop=false)")
        if self._weight_stamp(backbone) != self._weights:  # moved weights: stale graphs
            self.graphs.clear()
            self._weights = self._weight_stamp(backbone)
        N, S = idx_NS.shape
        bf16 = torch.is_autocast_enabled("cuda") and \
            torch.get_autocast_dtype("cuda") == torch.bfloat16
        def eager() -> torch.Tensor:
            self.eager_calls += 1
            return backbone(idx_NS, stop_after_layer=self.layer).hidden

        if not bf16 or S > backbone.cfg.seq_len:  # the graphs replay bf16 passes only
            return eager()
        key = self.bucket(N, S, backbone.cfg.seq_len)
        g = self.graphs.get(key)
        if g is None:
            self.seen[key] += 1
            if key in self.failed or self.seen[key] < 2 or len(self.graphs) >= self.max_graphs:
                return eager()
            try:
                g = self.graphs[key] = self._capture(backbone, key, idx_NS.device)
            except Exception as err:  # noqa: BLE001 - any failure: this shape runs eagerly
                self.failed.add(key)
                warnings.warn(f"GraphedWritePass: capturing the write pass at {key} failed "
                              f"({type(err).__name__}: {err}); it runs eagerly",
                              RuntimeWarning, stacklevel=2)
                return eager()
        g.idx_NS[:N, :S].copy_(idx_NS)  # what lies beyond (a longer earlier batch) is inert
        g.graph.replay()
        self.replays += 1
        return g.hidden_NSD[:N, :S].clone()

    def _capture(self, backbone, key: tuple, device: torch.device) -> _Graph:
        rows, tokens = key
        if self.side is None:
            self.side = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()
        idx = torch.zeros(rows, tokens, dtype=torch.long, device=device)

        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                return backbone(idx, stop_after_layer=self.layer).hidden

        # warm-up at the bucket shape (lazy initialisation, Triton JIT), then the capture
        self.side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.side):
            forward()
        torch.cuda.current_stream(device).wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        hidden = capture(graph, forward, self.side, self.pool)
        self.captures += 1
        return _Graph(graph, idx, hidden)


def capture(graph: torch.cuda.CUDAGraph, fn, stream: torch.cuda.Stream, pool=None):
    """``fn()`` captured into ``graph`` on ``stream`` (returns its result), with the garbage
    collector paused: a dead object holding a CUDA graph (a trainer and its ``GraphStep``
    refer to each other, so only the collector frees them) destroyed mid-capture invalidates
    the capture (seen: the 16th model of `engram bench architectures --preset gpu` failed
    with CUBLAS_STATUS_EXECUTION_FAILED). Dead objects are collected first instead."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            return fn()
    finally:
        if enabled:
            gc.enable()
