"""A full mHC FFN layer (route → permute → experts → combine), forward + backward, on a GPU,
on the path the model runs.

Uses ``mhc.moe.MHCFFN`` (the model's own layer) at T = 16384 tokens, d = 1024, E = 64
(8 domains × 8 components, k 1×2, expert width 512). The input is what a block hands the
layer under bf16 autocast: fp32 rows of the residual stream (the layer casts them to bf16 at
its boundary; the fp32 expert weights go through their bf16 compute copies). Variants:

  triton        routing ops = Triton kernels (MHC_KERNELS=triton)
  torch-route   routing ops = the torch reference (MHC_KERNELS=torch; isolates routing)
  dense         the dense SwiGLU FFN with the same active parameters (width 512·2 = 1024)

Expert matmuls take ``torch._grouped_mm`` in both MoE variants (one op for both backends);
the script checks that no call took the per-group loop.

Time per step = median of CUDA-event-timed iterations (fwd + bwd of a scalar loss with the
router's aux and z losses, under autocast), after warm-up, three ways:

  eager   the step as a training loop runs it: includes Python, autograd and launch overhead
          (at these sizes the host, not the GPU, sets the pace, so it moves between machines)
  graph   the same step captured once in a CUDA graph and replayed: GPU time alone (every
          variant is sync-free, so every variant can be captured)
  busy    GPU-busy time per step from the profiler (kernel and copy time over 3 eager steps)

    PYTHONUNBUFFERED=1 python benchmarks/bench_moe_layer.py [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import kernels  # noqa: E402


def train_step(layer, x):
    """One forward + backward of the layer on ``x`` (fp32 rows, a fresh leaf that wants its
    gradient) under bf16 autocast: loss = mean(y²) + the router's aux and z losses."""
    xi = x.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
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
    from benchmarks.bench_train_e2e import gpu_busy
    from kernels.routing import grouped
    from mhc.config import FFNConfig
    from mhc.moe import MHCFFN

    T, d = args.tokens, args.d
    S = 2048
    cfg = FFNConfig(kind="hierarchical", hidden=args.hidden, n_domains=8, n_components=8,
                    k1=1, k2=2)
    dense_cfg = FFNConfig(kind="dense", hidden=args.hidden, k1=1, k2=2)
    torch.manual_seed(0)
    x = torch.randn(T // S, S, d, device="cuda")  # fp32, as the residual stream is
    moe = MHCFFN(d, cfg).cuda()
    dense = MHCFFN(d, dense_cfg).cuda()
    results = {}
    for name, backend in [("triton", "triton"), ("torch-route", "torch"), ("dense", "triton")]:
        kernels.set_backend(backend)
        layer = dense if name == "dense" else moe
        try:
            grouped.CALLS.clear()
            t = bench_layer(layer, x)
            tg = bench_layer_graph(layer, x)
            busy, families, _ = gpu_busy(lambda layer=layer: train_step(layer, x))
            if grouped.CALLS["loop"] or grouped.CALLS["loop_backward"]:
                raise RuntimeError(f"an expert matmul left the fast path: {dict(grouped.CALLS)}")
            results[name] = dict(step_ms=t * 1e3, tokens_per_s=T / t,
                                 graph_step_ms=tg * 1e3 if tg else None,
                                 graph_tokens_per_s=T / tg if tg else None,
                                 gpu_busy_ms=busy, gpu_busy_by_family_ms=families)
            gs = f"{tg * 1e3:6.2f} ms ({T / tg / 1e6:5.2f} M tok/s)" if tg else "n/a"
            print(f"{name:12} eager {t * 1e3:6.2f} ms ({T / t / 1e6:5.2f} M tok/s) | "
                  f"graph {gs} | GPU busy {busy:6.2f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: failed: {type(e).__name__}: {e}"[:300])
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
                hidden=args.hidden, E=64, G=8, C=8, k1=1, k2=2,
                dtype="bf16 autocast, fp32 input rows and master weights")
    print(json.dumps(dict(meta=meta, results=results), indent=1))
    try:
        from benchmarks._results import append_result

        append_result("bench_moe_layer", dict(meta, results=results))
    except ImportError:
        pass
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
