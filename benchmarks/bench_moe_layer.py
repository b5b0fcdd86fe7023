"""A full mHC FFN layer (route → permute → experts → combine), forward + backward, on a GPU.

Uses ``mhc.moe.MHCFFN`` (the model's own layer) at T = 16384 tokens, d = 1024, E = 64
(8 domains × 8 components, k 1×2, expert width 512, bf16 activations), and reports tokens/s for:

  triton        routing ops = Triton kernels, experts = torch._grouped_mm (MHC_KERNELS=triton)
  torch-route   routing ops = torch reference, experts = torch._grouped_mm (isolates routing)
  torch         everything from the torch reference (experts = per-expert loop; MHC_KERNELS=torch)
  dense         the dense SwiGLU FFN with the same active parameters (width 512·2 = 1024)

Time per step = median of CUDA-event-timed iterations (fwd + bwd of a scalar loss with the
router's aux and z losses), after warm-up, two ways:

  eager   the step as a training loop runs it: includes Python, autograd and launch overhead
          (at these sizes the host, not the GPU, sets the pace, so it moves between machines)
  graph   the same step captured once in a CUDA graph and replayed: GPU time alone. Only
          variants without host syncs can be captured: the torch reference syncs (``bincount``
          in ``permute``/``expert_counts``, ``counts.tolist()`` in its grouped matmul), so its
          two variants show n/a.
  busy    GPU-busy time per step from the profiler (the sum of kernel and copy durations over
          5 eager steps): comparable across all variants, the uncapturable ones included.

    PYTHONUNBUFFERED=1 python benchmarks/bench_moe_layer.py [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.routing import ops, reference  # noqa: E402


def _hybrid():
    from kernels.routing import triton_ops

    m = types.SimpleNamespace(**{n: getattr(reference, n) for n in triton_ops.__all__})
    m.grouped_mm = triton_ops.grouped_mm
    return m


def train_step(layer, x):
    """One forward + backward of the layer on ``x`` (a fresh leaf that wants its gradient):
    loss = mean(y²) + the router's aux and z losses."""
    xi = x.detach().requires_grad_()
    y, aux = layer(xi)
    (y.float().square().mean() + 0.01 * aux.aux_loss + 1e-3 * aux.z_loss).backward()


def _median_event_s(run, iters):
    """Median seconds of ``run()`` between two CUDA events (GPU timeline span)."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def bench_layer(layer, x, iters=20, warmup=5):
    """Seconds per eager step (the host's pace when it is slower than the GPU)."""
    for _ in range(warmup):
        train_step(layer, x)
    torch.cuda.synchronize()
    return _median_event_s(lambda: train_step(layer, x), iters)


def bench_layer_graph(layer, x, iters=20):
    """GPU seconds per fwd+bwd step from CUDA-graph replay; ``None`` when the step cannot be
    captured (a host sync inside it)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                layer.zero_grad(set_to_none=True)
                train_step(layer, x)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        layer.zero_grad(set_to_none=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            train_step(layer, x)
        g.replay()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a sync inside the step: report n/a
        torch.cuda.synchronize()
        print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:100]})")
        return None
    t = _median_event_s(g.replay, iters)
    del g
    layer.zero_grad(set_to_none=True)
    return t


def profile_steps(layer, x, steps):
    """Profiler (GPU activity only) over ``steps`` eager steps, after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    train_step(layer, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(layer, x)
        torch.cuda.synchronize()
    return prof


def gpu_busy_ms(layer, x, steps=5):
    """Sum of the GPU activity (kernels, copies) the profiler records per eager step, in ms."""
    prof = profile_steps(layer, x, steps)
    us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
             for e in prof.key_averages())
    return us / steps / 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="kernel table of the triton variant")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe_layer needs a CUDA GPU")
        return 1
    from mhc.config import FFNConfig
    from mhc.moe import MHCFFN

    T, d = args.tokens, args.d
    S = 2048
    cfg = FFNConfig(kind="hierarchical", hidden=args.hidden, n_domains=8, n_components=8,
                    k1=1, k2=2)
    dense_cfg = FFNConfig(kind="dense", hidden=args.hidden, k1=1, k2=2)
    torch.manual_seed(0)
    x = torch.randn(T // S, S, d, device="cuda").bfloat16()
    moe = MHCFFN(d, cfg).cuda()
    dense = MHCFFN(d, dense_cfg).cuda()
    results = {}
    orig_impl = ops._impl
    variants = [("triton", "triton", None), ("torch-route", "torch", _hybrid),
                ("torch", "torch", None), ("dense", "torch", None)]
    for name, backend, impl in variants:
        kernels.set_backend(backend)
        if impl is not None:
            h = impl()
            ops._impl = lambda _tensor, h=h: h  # benchmark-only: reference routing, fast experts
        layer = dense if name == "dense" else moe
        try:
            t = bench_layer(layer, x)
            tg = bench_layer_graph(layer, x)
            busy = gpu_busy_ms(layer, x)
            results[name] = dict(step_ms=t * 1e3, tokens_per_s=T / t,
                                 graph_step_ms=tg * 1e3 if tg else None,
                                 graph_tokens_per_s=T / tg if tg else None,
                                 gpu_busy_ms=busy)
            gs = f"{tg * 1e3:6.2f} ms ({T / tg / 1e6:5.2f} M tok/s)" if tg else "n/a"
            print(f"{name:12} eager {t * 1e3:6.2f} ms ({T / t / 1e6:5.2f} M tok/s) | "
                  f"graph {gs} | GPU busy {busy:6.2f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: failed: {type(e).__name__}: {e}"[:300])
        finally:
            ops._impl = orig_impl
    if args.profile:
        kernels.set_backend("triton")
        prof = profile_steps(moe, x, 3)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                        max_name_column_width=60))
    if "triton" in results:
        tr = results["triton"]
        for v in results.values():
            v["triton_speedup"] = tr["tokens_per_s"] / v["tokens_per_s"]
            if tr["graph_tokens_per_s"] and v["graph_tokens_per_s"]:
                v["triton_speedup_graph"] = tr["graph_tokens_per_s"] / v["graph_tokens_per_s"]
    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, T=T, d=d,
                hidden=args.hidden, E=64, G=8, C=8, k1=1, k2=2, dtype="bfloat16")
    print(json.dumps(dict(meta=meta, results=results), indent=1))
    try:
        from benchmarks._results import append_result

        row = dict(meta, results=results)
        if os.environ.get("BENCH_GIT_SHA"):
            row["git_sha"] = os.environ["BENCH_GIT_SHA"]
        append_result("bench_moe_layer", row)
    except ImportError:
        pass
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
