"""Fused route (projection + selection in one kernel) on the GPU: correctness + timing of the
kernel's launch configs against cuBLAS + gate and cuBLAS alone, in one process per routing
config (a config that faults on the device only loses its child process).

    cd benchmarks && PYTHONUNBUFFERED=1 python bench_route_fused.py --out DIR [--budget 220]

Correct = logits within bf16 rounding of an fp32 x @ w (max |Δ| ≤ 2 bf16 ulp of the row's
magnitude, rel. error ≤ 1e-2) and ids equal to ``reference.gate`` on the kernel's own logits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Launcher kwargs of ``triton_route.fused_route_fwd`` to sweep. Run 1 (2026-11-23) swept the
# pointer-load v3 over BT 64/128 × BK 64/128 × 4/8 warps × 2–4 stages and split loops (BT 128 ×
# 8 warps, BK 64, 4 stages won); run 2 its selection sub-block; run 3 v3 against the TMA v4
# (now the kernel) with BK 128, 3 stages, a transposed w copy, Triton's warp specialization,
# persistent programs and BS 128 (raw: benchmarks/results/bench_route_fused_h100_run3.json).
# Run 4: thread-block clusters (num_ctas 2, so two programs could share w's tiles) do not
# compile in Triton 3.6 (PassManager::run failed). Run 5 (this list): 64-token programs on one
# warpgroup, two per SM where shared memory allows (w read twice as often from L2).
_V = dict(block_t=128, block_k=64, num_warps=8, num_stages=4)
VARIANTS = [
    dict(_V), dict(_V, select=False),
    dict(_V, block_t=64, num_warps=4, num_stages=2), dict(_V, block_t=64, num_warps=4,
                                                          num_stages=2, select=False),
    dict(_V, block_t=64, num_warps=4, num_stages=3),
    dict(_V, block_t=64, num_warps=4, num_stages=4),
]
EXTRA_VARIANTS = (0,)
EXTRA_SHAPES = [(4096, 1024), (4096, 4096), (65536, 1024), (65536, 4096)]
CFGS = {256: (256, 8, 32, 2, 4), 64: (64, 8, 8, 1, 2)}


def _check(spec, x, w, out):
    import torch

    from kernels.routing import reference as ref
    wt, it, lt = out
    lr = x.float() @ w.float()
    rel = float((lt.float() - lr).norm() / lr.norm())
    amax = float((lt.float() - lr).abs().max())
    G = spec.n_groups
    dom = float((lt.float()[:, :G] - lr[:, :G]).abs().max())
    exp = float((lt.float()[:, G:] - lr[:, G:]).abs().max())
    wr, ir = ref.gate(lt, spec)
    ids_ok = bool(torch.equal(it, ir))
    werr = float((wt.float() - wr.float()).abs().max())
    ok = ids_ok and rel < 1e-2 and werr < 1e-2 and bool(torch.isfinite(lt).all())
    return dict(ok=ok, ids_equal=ids_ok, logit_rel=rel, logit_maxabs=amax, dom_maxabs=dom,
                exp_maxabs=exp, w_maxerr=werr)


def child(E, skip, shapes, budget_end):
    import bench_routing as br
    import torch

    from kernels.routing import triton_gate as tg
    from kernels.routing import triton_route as trr
    cfg = CFGS[E]
    dt = torch.bfloat16

    def emit(**kw):
        print("RES " + json.dumps(kw), flush=True)

    data = {}
    for T, d in shapes:
        spec, ops = br.make_ops(T, d, cfg, dt, "cuda")
        ri = ops["route"]["inputs"]
        floor = ops["route"]["floor_bytes"] / br.BW * 1e6
        tp = br.time_graph(lambda x, w: x @ w, ri)
        tu = br.time_graph(lambda x, w, spec=spec: tg.gate_fwd(x @ w, spec), ri)
        # tile quantization probe: cuBLAS on the E expert columns alone (N = 256 or 64)
        re_ = [(x, w[:, spec.n_groups:].contiguous()) for x, w in ri]
        te = br.time_graph(lambda x, w: x @ w, re_)
        emit(kind="base", E=E, T=T, d=d, floor=floor, cublas=tp, cublas_gate=tu,
             cublas_experts_only=te)
        data[(T, d)] = (spec, ri)
    for i, v in enumerate(VARIANTS):
        if i in skip or time.time() > budget_end:
            continue
        print(f"START {i}", flush=True)
        kw = v
        launch = trr.fused_route_fwd
        select = kw.get("select", True)
        for T, d in shapes:
            spec, ri = data[(T, d)]
            x, w = ri[0]
            def f(x, w, kw=kw, spec=spec, launch=launch):
                return launch(x, w, spec, **kw)

            out = f(x, w)
            torch.cuda.synchronize()
            res = _check(spec, x, w, out)
            if not select:  # projection only: judge the logits alone
                res["ok"] = res["logit_rel"] < 1e-2
            k = trr._LAST["kernel"]
            ptx = k.asm.get("ptx", "")
            res.update(wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                       regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                       smem=getattr(k, "shared", None))
            t = br.time_graph(f, ri) if res["ok"] else None
            emit(kind="fused", E=E, T=T, d=d, variant=kw, idx=i, t=t, **res)


def l2_probe(programs=128, rows=1024, cols=256, block_rows=64):
    """L2 → SM read bandwidth as the fused route sees it: ``programs`` programs each read the
    same ``rows × cols`` bf16 matrix (w at d = 1024, E = 256: 0.5 MB, L2-resident) in
    ``[block_rows, cols]`` tiles and reduce it. Returns (µs per call, TB/s delivered)."""
    import bench_routing as br
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _read_all(w_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, BR: tl.constexpr):
        acc = tl.zeros([BR, COLS], dtype=tl.float32)
        r = tl.arange(0, BR)[:, None]
        c = tl.arange(0, COLS)[None, :]
        for r0 in range(0, ROWS, BR):
            acc += tl.load(w_ptr + (r0 + r) * COLS + c).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))

    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(programs, device="cuda")

    def f(w, out):
        _read_all[(programs,)](w, out, ROWS=rows, COLS=cols, BR=block_rows, num_warps=8,
                               num_stages=4)

    t = br.time_graph(f, [(w, out)])
    return t, programs * w.numel() * 2 / (t * 1e-6) / 1e12


def cublas_width_probe(T=16384, widths=(256, 264, 272, 288, 320, 384, 512), ds=(1024, 4096)):
    """cuBLAS ``x @ w`` (bf16) time against w's width: how much of the projection's cost at
    R = 264 (G 8 + E 256) is tile quantization. Prints one line per (d, width)."""
    import bench_routing as br
    import torch

    for d in ds:
        x = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for n in widths:
            w = torch.randn(d, n, device="cuda", dtype=torch.bfloat16) * d**-0.5
            t = br.time_graph(lambda x, w: x @ w, [(xi, w) for xi in x])
            print(f"cuBLAS width probe: T={T} d={d} N={n}: {t:.1f} µs")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=int)
    ap.add_argument("--only0", action="store_true")
    ap.add_argument("--skip", default="")
    ap.add_argument("--shapes", default="16384x1024,16384x4096")
    ap.add_argument("--budget-end", type=float, default=1e18)
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=220)
    ap.add_argument("--l2-probe", action="store_true",
                    help="only measure L2 → SM read bandwidth (l2_probe) and exit")
    ap.add_argument("--width-probe", action="store_true",
                    help="only time cuBLAS x @ w against w's width and exit")
    a = ap.parse_args()
    if a.width_probe:
        cublas_width_probe()
        return
    if a.l2_probe:
        for progs in (128, 132, 264):
            t, tbs = l2_probe(programs=progs)
            print(f"L2 probe: {progs} programs × 0.5 MB: {t:.1f} µs, {tbs:.2f} TB/s")
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    if a.child is not None:
        skip = {int(s) for s in a.skip.split(",") if s}
        if a.only0:
            skip |= set(range(len(VARIANTS))) - set(EXTRA_VARIANTS)
        child(a.child, skip, shapes, a.budget_end)
        return
    t0 = time.time()
    end = t0 + a.budget
    rows, log = [], []

    def spawn(E, extra, shapes_s, end=end):
        skip = set()
        while True:
            cmd = [sys.executable, __file__, "--child", str(E), "--skip",
                   ",".join(map(str, sorted(skip))), "--shapes", shapes_s,
                   "--budget-end", str(end)] + extra
            p = subprocess.run(cmd, capture_output=True, text=True,
                               cwd=str(Path(__file__).parent))
            last = None
            for line in p.stdout.splitlines():
                if line.startswith("RES "):
                    r = json.loads(line[4:])
                    rows.append(r)
                    if "idx" in r:
                        skip.add(r["idx"])
                    print(r, flush=True)
                    last = None
                elif line.startswith("START "):
                    last = line[6:]
            log.append(p.stdout[-3000:] + p.stderr[-3000:])
            if p.returncode == 0 or last is None:
                if p.returncode:
                    print(p.stderr[-2000:])
                return
            print(f"E={E} {extra} crashed at {last}: {p.stderr.strip().splitlines()[-1:]}")
            rows.append(dict(kind="crash", E=E, at=last, err=p.stderr[-600:]))
            skip.add(int(last))

    spawn(256, [], a.shapes, end=end - 45)
    spawn(64, [], a.shapes)
    if time.time() < end:
        ex = ",".join(f"{T}x{d}" for T, d in EXTRA_SHAPES)
        for E in (256, 64):
            spawn(E, ["--only0"], ex)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_route_fused.json").write_text(json.dumps(rows, indent=1))
    (out / "bench_route_fused.log").write_text("\n----\n".join(log))
    print(f"\n== elapsed {time.time() - t0:.0f} s ==")
    print("E   T     d    variant (changes from BT 128, BK 64, 8 warps, 4 stages)  ok  "
          "wgmma  t_us | cuBLAS+gate  cuBLAS  cuBLAS(E cols)")
    base = {(r["E"], r["T"], r["d"]): r for r in rows if r["kind"] == "base"}
    for r in rows:
        if r["kind"] == "fused":
            b = base[(r["E"], r["T"], r["d"])]
            kw = {k: v for k, v in r["variant"].items() if _V.get(k) != v}
            t = f"{r['t']:.1f}" if r["t"] else "—"
            print(f"{r['E']:<3} {r['T']:<5} {r['d']:<4} {str(kw):44} "
                  f"{r['ok']!s:5} {r['wgmma']!s:5} {t:>6} | {b['cublas_gate']:.1f}  "
                  f"{b['cublas']:.1f}  {b['cublas_experts_only']:.1f}  "
                  f"regs={r['regs']} spills={r['spills']} smem={r['smem']}")
        elif r["kind"] == "crash":
            print({k: v for k, v in r.items() if k != "err"}, r.get("err", "")[-200:])


if __name__ == "__main__":
    main()
