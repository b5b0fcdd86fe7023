"""Routing kernels on a GPU: Triton ops vs the torch reference, eager and under torch.compile.

Ops (shape legend as in ``kernels/__init__.py``):
  gate   logits_TR -> (weights_TK, ids_TK)                      floor: read logits, write K picks
  route  x_TD, w_DR -> (weights_TK, ids_TK, logits_TR)          floor: read x (+w), write logits
         (provider ``triton``: cuBLAS projection + gate kernel; ``fused``: one Triton kernel)
  perm   permute(x_TD, ids_TK) + combine(y_ND = x_ND, weights)  floor: read x, write x_ND, read
                                                                 y_ND, write y_TD (+ indices)
Times: ``graph`` = GPU time per call from CUDA-graph replay (20 calls per graph, inputs rotated
over enough copies to defeat the 50 MB L2), ``eager`` = median per-call wall time from
``triton.testing.do_bench`` (includes launch overhead). ``floor`` = bytes / 3.0 TB/s (the
H100's measured copy bandwidth).

    PYTHONUNBUFFERED=1 python benchmarks/bench_routing.py            # full table
    python benchmarks/bench_routing.py --quick                        # T=16384 only
    python benchmarks/bench_routing.py --sweep                        # gate launch sweep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kernels.routing import reference as ref  # noqa: E402
from kernels.routing.reference import GateSpec  # noqa: E402

BW = 3.0e12  # bytes/s, measured device-to-device copy on the H100
L2_DEFEAT = 160 * 2**20
CONFIGS = [(256, 8, 32, 2, 4), (64, 8, 8, 1, 2)]  # (E, G, C, k1, k2); target first


def _spec(E, G, C, k1, k2):
    assert G * C == E
    return GateSpec("two_level", G, C, k1, k2)


def time_graph(fn, inputs, calls=20, replays=10):
    """GPU µs per call from CUDA-graph replay; ``None`` if the op cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(3):
                fn(*inputs[i % len(inputs)])
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(*inputs[i % len(inputs)])
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / calls)
        del g
        times.sort()
        return times[len(times) // 2]
    except Exception as e:  # noqa: BLE001 - report and carry on
        torch.cuda.synchronize()
        print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:80]})")
        return None


def time_eager(fn, inputs):
    import triton

    it = iter(range(10**9))

    def call():
        fn(*inputs[next(it) % len(inputs)])

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3


def _copies(make, nbytes):
    n = max(1, min(8, math.ceil(L2_DEFEAT / max(nbytes, 1))))
    return [make(i) for i in range(n)]


def make_ops(T, d, cfg, dtype, dev):
    E, G, C, k1, k2 = cfg
    spec = _spec(*cfg)
    K, R = spec.top_k, spec.n_router_outputs
    b = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=dev)

    def rnd(*shape, scale=1.0, seed=0):
        gen.manual_seed(seed)
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dtype)

    w_DR = rnd(d, R, scale=d**-0.5, seed=99)
    ops = {}
    # gate
    gate_in = _copies(lambda i: (rnd(T, R, scale=2.0, seed=i),), T * R * b)
    ops["gate"] = dict(fn=lambda impl: (lambda l: impl.gate(l, spec)), inputs=gate_in,
                       floor_bytes=T * R * b + T * K * (b + 8))
    # route (fused projection + gate)
    route_in = _copies(lambda i: (rnd(T, d, seed=10 + i), w_DR), T * d * b)
    ops["route"] = dict(fn=lambda impl: (lambda x, w: impl.route(x, w, spec)), inputs=route_in,
                        floor_bytes=T * d * b + d * R * b + T * R * b + T * K * (b + 8))
    # permute + combine with identity experts
    with torch.no_grad():
        ids = ref.gate(rnd(T, R, scale=2.0, seed=50), spec)
    w_TK, ids_TK = ids

    def perm(impl):
        def f(x, ids_TK, w_TK):
            x_ND, order_N, _ = impl.permute(x, ids_TK, E)
            return impl.combine(x_ND, order_N, w_TK)
        return f

    perm_in = _copies(lambda i: (rnd(T, d, seed=20 + i), ids_TK, w_TK), T * d * b * (2 * K + 2))
    N = T * K
    ops["perm"] = dict(fn=perm, inputs=perm_in,
                       floor_bytes=2 * T * d * b + 2 * N * d * b + T * K * (8 + b) + N * 8)
    return spec, ops


def providers(names):
    from kernels.routing import triton_ops

    class Compiled:
        pass

    out = {}
    if "triton" in names:
        out["triton"] = triton_ops
    if "torch" in names:
        out["torch"] = ref
    if "fused" in names:  # the one-kernel route (projection + selection); route op only
        f = Compiled()
        f.route = lambda x, w, spec: triton_ops.route(x, w, spec, fused=True)
        out["fused"] = f
    if "compile" in names:
        c = Compiled()
        c.gate = torch.compile(ref.gate, dynamic=True)
        c.route = torch.compile(ref.route, dynamic=True)
        c.permute = torch.compile(ref.permute, dynamic=True)
        c.combine = torch.compile(ref.combine, dynamic=True)
        out["compile"] = c
    return out


def run(Ts, ds, cfgs, names, dtype, out_rows):
    dev = "cuda"
    provs = providers(names)
    print(f"{'op':6} {'T':>6} {'d':>5} {'E':>4} {'prov':8} {'graph_us':>9} {'eager_us':>9} "
          f"{'floor_us':>9} {'x_floor':>8}")
    for cfg in cfgs:
        for T in Ts:
            for d in ds:
                spec, ops = make_ops(T, d, cfg, dtype, dev)
                for op, o in ops.items():
                    if op == "gate" and d != ds[0]:
                        continue  # gate does not depend on d
                    floor = o["floor_bytes"] / BW * 1e6
                    for pname, impl in provs.items():
                        if pname == "fused" and op != "route":
                            continue
                        fn = o["fn"](impl)
                        try:
                            g = time_graph(fn, o["inputs"])
                            e = time_eager(fn, o["inputs"])
                        except Exception as ex:  # noqa: BLE001
                            print(f"    {op} {pname} failed: {type(ex).__name__}: {ex}"[:200])
                            continue
                        best = g if g is not None else e
                        row = dict(op=op, T=T, d=d if op != "gate" else None, E=cfg[0],
                                   G=cfg[1], C=cfg[2], k1=cfg[3], k2=cfg[4],
                                   dtype=str(dtype).split(".")[-1], provider=pname,
                                   graph_us=g, eager_us=e, floor_us=floor,
                                   x_floor=best / floor)
                        out_rows.append(row)
                        gs = f"{g:9.1f}" if g is not None else f"{'n/a':>9}"
                        print(f"{op:6} {T:6d} {row['d'] or '-':>5} {cfg[0]:4d} {pname:8} {gs} "
                              f"{e:9.1f} {floor:9.1f} {best / floor:8.2f}")
                del ops
                torch.cuda.empty_cache()


def check(T, cfg, d, dtype):
    """Correctness at benchmark scale: ids exact vs reference.gate on the same logits."""
    from kernels.routing import triton_ops

    spec, ops = make_ops(T, d, cfg, dtype, "cuda")
    x, w = ops["route"]["inputs"][0]
    wf, itf, lf = triton_ops.route(x, w, spec, fused=True)
    fused_ok = bool(torch.equal(itf, ref.gate(lf, spec)[1]))
    wt, it, lt = triton_ops.route(x, w, spec)
    wr, ir = ref.gate(lt, spec)
    lr = x @ w
    x_, ids, wk = ops["perm"]["inputs"][0]
    yt = ops["perm"]["fn"](triton_ops)(x_, ids, wk)
    yr = ops["perm"]["fn"](ref)(x_, ids, wk)
    res = dict(ids_equal=bool(torch.equal(it, ir)), fused_ids_equal=fused_ok,
               fused_logit_relerr=float((lf.float() - lt.float()).norm() / lt.float().norm()),
               w_maxerr=float((wt.float() - wr.float()).abs().max()),
               logit_relerr=float((lt.float() - lr.float()).norm() / lr.float().norm()),
               ids_vs_ref_route=float((it == ref.gate(lr, spec)[1]).all(1).float().mean()),
               perm_maxerr=float((yt.float() - yr.float()).abs().max()))
    print(f"check T={T} cfg={cfg} d={d}: {res}")
    return res


def sweep(dtype):
    """Gate-kernel launch sweep at T=16384 for both configs, with the cuBLAS projection and
    cuBLAS + gate beside it (the fused route's sweep: ``bench_route_fused.py``)."""
    from kernels.routing import triton_gate as tg

    best = {}
    for cfg in CONFIGS:
        spec, ops = make_ops(16384, 1024, cfg, dtype, "cuda")
        E = cfg[0]
        gi = ops["gate"]["inputs"]
        for bt in (4, 8, 16, 32, 64):
            for nw in (1, 2):
                t = time_graph(lambda l, bt=bt, nw=nw, spec=spec: tg.gate_fwd(l, spec, block_t=bt,
                                                                   num_warps=nw), gi)
                print(f"  E={E} gate bt={bt:3d} warps={nw}: {t}")
                if t is not None:
                    best.setdefault(f"gate{E}", (t, bt, nw))
                    best[f"gate{E}"] = min(best[f"gate{E}"], (t, bt, nw))
        ri = ops["route"]["inputs"]
        tp = time_graph(lambda x, w: x @ w, ri)
        tu = time_graph(lambda x, w, spec=spec: tg.gate_fwd(x @ w, spec), ri)
        print(f"E={E}: cuBLAS projection alone: {tp} µs; cuBLAS + triton gate: {tu} µs")
        best[f"proj_cublas{E}"] = tp
        best[f"proj_cublas_plus_gate{E}"] = tu
    print("best:", best)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=16384 only")
    ap.add_argument("--sweep", action="store_true",
                    help="gate-kernel launch sweep, then exit (fused route: bench_route_fused.py)")
    ap.add_argument("--providers", default="triton,fused,torch,compile")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_routing needs a CUDA GPU")
        return 1
    import kernels

    kernels.set_backend("triton")
    torch._dynamo.config.cache_size_limit = 64
    dtype = getattr(torch, args.dtype)
    if args.sweep:
        best = sweep(dtype)
        if args.json:
            Path(args.json).write_text(json.dumps(best, indent=1))
        return 0
    checks = [check(16384, c, 1024, dtype) for c in CONFIGS]
    Ts = [16384] if args.quick else [4096, 16384, 65536]
    rows = []
    run(Ts, [1024, 4096], CONFIGS, args.providers.split(","), dtype, rows)
    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
                cuda=torch.version.cuda, checks=checks)
    import triton

    meta["triton"] = triton.__version__
    try:
        from benchmarks._results import append_result

        for r in rows:
            if os.environ.get("BENCH_GIT_SHA"):
                r["git_sha"] = os.environ["BENCH_GIT_SHA"]
            append_result("bench_routing", r)
    except ImportError:
        pass
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    # summary vs targets
    print("\nspeed-up of triton over torch.compile (best of graph/eager per provider):")
    key = {}
    for r in rows:
        best = r["graph_us"] if r["graph_us"] is not None else r["eager_us"]
        key[(r["op"], r["T"], r["d"], r["E"], r["provider"])] = best
    for (op, T, d, E, p), v in sorted(key.items(), key=lambda kv: str(kv[0])):
        if p == "triton" and (op, T, d, E, "compile") in key:
            c = key[(op, T, d, E, "compile")]
            print(f"  {op:6} T={T:6d} d={d} E={E:4d}: triton {v:8.1f} µs, compile {c:8.1f} µs, "
                  f"x{c / v:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
