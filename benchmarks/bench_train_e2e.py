"""The whole training step on a GPU, as ``engram train`` runs it: every FFN kind through the
one trainer's own step, with HF transformers anchors of the same shape.

Our rows time ``Trainer._step`` (``sessions/trainer.py``) on an ``LMObjective`` over the
synthetic text streams (``train.data=synthetic``): the batch sampled on the host, pinned and
copied without blocking, bf16 autocast forward (fp32 residual stream, fp32 master weights
and optimizer state), backward, clipping, AdamW (``sessions.optimizer``), zero grads, router-bias
update — in the trainer's modes:

  eager           ``Trainer._step`` as configured by default
  compiled        ``train.compile=true`` (``torch.compile`` of the whole model)
  graph           ``train.cuda_graph=true``: the step captured once in a CUDA graph and
                  replayed (``sessions/graph_step.py``)
  compiled-graph  both

Shapes (issue 10): ``small`` = d 512, 8 layers, 8 heads, 64 experts (8 domains × 8
components) of width 512, 4 active (k 2×2), batch 32 × 512 bytes; ``d1024`` = the same with
d 1024 and 16 heads. Models:

  dense           our dense SwiGLU FFN of equal active parameters (width 4·512)
  flat_moe, group_limited, hierarchical, progressive
                  our MoE kinds (bias balancing on, so the bias update does real work;
                  progressive gets the streams' domain labels, so its label loss runs)
  KIND:cast       the same with ``train.expert_copies=false``: the experts' bf16 weights
                  cast in every forward, fp32 gradients, torch's fused AdamW for all
                  (the default has the optimizer own the bf16 copies: sessions/optimizer.py)
  hf_llama        transformers LlamaForCausalLM, same shape, dense (intermediate 2048), tied
  hf_mixtral      transformers MixtralForCausalLM, same shape, 64 experts of width 512, top 4,
                  its default experts implementation (recorded in the row;
                  ``hf_mixtral:eager`` / ``hf_mixtral:grouped_mm`` pick one)

HF models cannot go through our trainer (no router biases, another forward signature): their
step is ``hf_step`` below, the trainer's step body on the same sampled batches (modes eager
and compiled = ``torch.compile(model)``; their MoE syncs with the host, so no graph rows).
What Engram costs in the trainer's step is ``bench_train_memory.py``'s subject
(``configs/experiments/recall5_small.yaml`` for this shape).

Per row: tokens/s = B·S ÷ the median step time over windows of back-to-back steps timed by
CUDA events (the trainer's pace: host time included); MFU = tokens/s × (6·N_active +
12·L·d·S) ÷ 989 TFLOP/s (PaLM's FLOPs per token, the H100/H200 dense bf16 peak); peak
memory; GPU-busy ms per step (profiler: kernel and copy time only) with a breakdown by kernel
family; host syncs in one warmed-up step (``set_sync_debug_mode("warn")``, with where the
first came from); expert-matmul calls on the fast path and on the loop over the whole row
(a replayed graph makes no Python calls: its calls are the warm-up's and the capture's);
first-step seconds (compilation); the expert-load CV of the last timed step (a fresh
router sends tokens to the experts very unevenly, CV ≈ 2 at the small shape, and bias
balancing evens that out over hundreds of steps; the grouped GEMMs are slower on uneven
groups, so ``--settle-steps N`` trains N steps before timing). Rows are printed and saved
as they finish (``--json``), so a run cut short keeps what it measured. Ratios compare rows
of one mode, and each model's best mode (``best``).

    PYTHONUNBUFFERED=1 BENCH_GIT_SHA=$(git rev-parse --short HEAD) \\
        python benchmarks/bench_train_e2e.py --json e2e.json
    python benchmarks/bench_train_e2e.py --shapes small --models hierarchical,dense --modes graph
    python benchmarks/bench_train_e2e.py --shapes small --settle-steps 600 \
        --rows dense@compiled-graph,hierarchical@compiled-graph
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mhc.config import FFNConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402

SHAPES = {"small": dict(d_model=512, n_heads=8), "d1024": dict(d_model=1024, n_heads=16)}
BATCH, SEQ, LAYERS, WIDTH, G, C, K1, K2 = 32, 512, 8, 512, 8, 8, 2, 2
OURS = ("dense", "flat_moe", "group_limited", "hierarchical", "progressive")
MODELS = (*OURS, "hf_llama", "hf_mixtral")
MODES = ("eager", "compiled", "graph", "compiled-graph")
PEAK_FLOPS = 989e12  # dense bf16, H100/H200 SXM datasheet


# ----------------------------------------------------------------------------- ours: the trainer


def model_config(kind: str, shape: str) -> ModelConfig:
    ffn = FFNConfig(kind=kind, hidden=WIDTH, n_domains=G, n_components=C, k1=K1, k2=K2,
                    segment_len=128, bias_balancing=kind != "dense")
    return ModelConfig(d_model=SHAPES[shape]["d_model"], n_layers=LAYERS,
                       n_heads=SHAPES[shape]["n_heads"], seq_len=SEQ, ffn=ffn)


def train_config(mode: str, expert_copies: bool = True) -> TrainConfig:
    return TrainConfig(steps=100_000, batch_size=BATCH, lr=1e-3, warmup_steps=100,
                       data="synthetic", device="cuda", compile=mode.startswith("compiled"),
                       cuda_graph=mode.endswith("graph"), expert_copies=expert_copies)


def objective_for(shape: str):
    from sessions.objectives import LMObjective

    return LMObjective(RunConfig(model=model_config("dense", shape), train=train_config("eager")),
                       quiet=True)


def build_trainer(name: str, shape: str, mode: str, out_dir: Path):
    """``(Trainer, active params per token)`` for one of our models in one trainer mode."""
    from mhc import params
    from mhc.model import MHCModel
    from sessions.trainer import Trainer

    kind, _, variant = name.partition(":")  # KIND or KIND:cast
    run = RunConfig(model=model_config(kind, shape),
                    train=train_config(mode, expert_copies=variant != "cast"))
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: 0.4-0.8 B parameters
        model = MHCModel(run.model)
    trainer = Trainer(model, objective_for(shape), run.train, out_dir, {}, progress=False)
    return trainer, params.count(run.model).active


# ----------------------------------------------------------------------------- HF anchors


def _hf_config(name: str, shape: str):
    import transformers

    d, h = SHAPES[shape]["d_model"], SHAPES[shape]["n_heads"]
    common = dict(vocab_size=256, hidden_size=d, num_hidden_layers=LAYERS, num_attention_heads=h,
                  num_key_value_heads=h, max_position_embeddings=SEQ, tie_word_embeddings=True,
                  rms_norm_eps=1e-5, rope_theta=10000.0)
    if name == "hf_llama":
        return transformers.LlamaConfig(intermediate_size=WIDTH * K1 * K2, **common)
    return transformers.MixtralConfig(intermediate_size=WIDTH, num_local_experts=G * C,
                                      num_experts_per_tok=K1 * K2, sliding_window=None,
                                      output_router_logits=False, **common)


def build_hf(name: str, shape: str):
    """``(model on CUDA, active params per token, info)``; ``hf_mixtral:IMPL`` picks
    transformers' experts implementation (``eager``, ``grouped_mm``, ...)."""
    import transformers

    base, _, experts = name.partition(":")
    hf_cfg = _hf_config(base, shape)
    cls = transformers.LlamaForCausalLM if base == "hf_llama" else \
        transformers.MixtralForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(hf_cfg)
    if experts:
        model.set_experts_implementation(experts)
    active = 0
    for pname, p in model.named_parameters():
        if "embed_tokens" in pname:
            continue  # a lookup (tied with the head, which counts once below)
        frac = (K1 * K2) / (G * C) if ".experts." in pname else 1.0
        active += int(p.numel() * frac)
    active += hf_cfg.vocab_size * hf_cfg.hidden_size  # the (tied) LM head multiplies
    info = {"transformers": transformers.__version__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    return model, active, info


def hf_step(model, step_model, optimizer, objective, step: int) -> torch.Tensor:
    """The trainer's step body for a transformers causal LM on the trainer's batch ``step``
    (they shift the labels themselves): the detached loss, on the device."""
    from sessions.objectives import move

    batch = move(objective.batch(step), torch.device("cuda"), non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step_model(input_ids=batch.x, labels=batch.x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- measuring

_FAMILIES = [  # (family, substrings of kernel names), first match wins
    ("grouped GEMM (experts)", ("GroupProblemShape", "grouped_gemm", "GroupedGemm")),
    ("optimizer + clip", ("Adam", "adam", "multi_tensor", "lpnorm", "LpNorm")),
    ("attention", ("flash", "fmha", "attention", "Attention")),
    ("GEMM", ("gemm", "Gemm", "nvjet", "xmma", "cutlass")),
    ("routing (our Triton)", ("_gate_", "_hist_rank", "_col_scan", "_pos_kernel", "_scatter_rows",
                              "_gather_sum", "_combine_bwd", "_invert", "_route_")),
    ("Inductor (fused)", ("triton_",)),
    ("copies / casts", ("copy", "Memcpy", "Memset", "memcpy", "memset")),
]


def _family(kernel: str) -> str:
    for fam, keys in _FAMILIES:
        if any(k in kernel for k in keys):
            return fam
    return "other elementwise / reductions"


def gpu_busy(run, steps: int = 3, top: int = 8) -> tuple[float, dict, list]:
    """GPU-busy ms per step (device-side events only: CPU ops also report their kernels'
    time, summing both would count it twice), by kernel family, and the ``top`` kernels as
    (ms per step, launches per step, name)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    fam: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.self_device_time_total / steps
        fam[_family(e.key)] = fam.get(_family(e.key), 0.0) + us / 1e3
        kernels.append((round(us / 1e3, 4), e.count / steps, e.key[:90]))
    kernels.sort(reverse=True)
    return sum(fam.values()), {k: round(v, 3) for k, v in sorted(fam.items())}, kernels[:top]


def host_syncs(run) -> tuple[int, list[str]]:
    """Synchronizing CUDA calls in ``run()`` and the Python lines that made the first few."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    return len(syncs), [f"{Path(w.filename).name}:{w.lineno}" for w in syncs[:4]]


def time_steps(run, steps: int, windows: int) -> float:
    """Median over ``windows`` of the mean step time (s) of ``steps`` back-to-back steps."""
    out = []
    for _ in range(windows):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            run()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / steps)
    return statistics.median(out)


def measure(name: str, shape: str, mode: str, args) -> dict:
    from kernels import optim
    from kernels.routing import grouped

    before, before_opt = dict(grouped.CALLS), dict(optim.CALLS)
    last, counter, info = {}, itertools.count(), {}
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith("hf_"):
            from sessions.optimizer import make_optimizer

            model, active, info = build_hf(name, shape)
            model.train()
            opt = make_optimizer(model, train_config(mode), torch.device("cuda"))
            step_model = torch.compile(model) if mode == "compiled" else model
            objective = objective_for(shape)

            def run():
                last["loss"] = hf_step(model, step_model, opt, objective, next(counter))
        else:
            trainer, active = build_trainer(name, shape, mode, Path(tmp))
            model = trainer.model

            def run():
                out = trainer._step(next(counter))[0]
                last["loss"], last["layers"] = out.lm_loss, out.layers
        row = _time_row(run, args)
        row.update(_balance(last.get("layers")))
    calls = {k: v - before.get(k, 0) for k, v in grouped.CALLS.items() if v - before.get(k, 0)}
    d = SHAPES[shape]["d_model"]
    flops = 6 * active + 12 * LAYERS * d * SEQ
    tok_s = BATCH * SEQ / row["step_s"]
    # our AdamW kernel's calls (the experts' copies: eager steps, warm-up and capture)
    opt_calls = {k: v - before_opt.get(k, 0) for k, v in optim.CALLS.items()
                 if v - before_opt.get(k, 0)}
    graph, copies = None, False
    if not name.startswith("hf_"):
        copies = trainer.expert_copies
        if trainer.graph is not None:
            graph = {"eager_steps": trainer.graph.eager_steps, "replays": trainer.graph.replays}
    return dict(shape=shape, model=name, mode=mode, tokens_per_s=tok_s,
                step_ms=row.pop("step_s") * 1e3, mfu=tok_s * flops / PEAK_FLOPS,
                busy_tokens_per_s=BATCH * SEQ / (row["gpu_busy_ms"] / 1e3), **row,
                expert_mm_calls=calls, expert_copies=copies, copy_adamw_calls=opt_calls,
                graph=graph, active_params=active,
                flops_per_token=flops, total_params=sum(p.numel() for p in model.parameters()),
                loss=float(last["loss"]), **info)


def _balance(layers) -> dict:
    """Expert-load balance of the last timed step (the grouped GEMMs' speed depends on it)."""
    from mhc.stats import layer_stats, summarize

    stats = summarize(layer_stats(layers)) if layers else {}
    return {"expert_cv": stats.get("expert_cv"),
            "expert_max_violation": stats.get("expert_max_violation")}


def _time_row(run, args) -> dict:
    """First step, settling steps, warm-up, timing windows, GPU-busy profile and sync count
    of ``run``."""
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for i in range(args.settle_steps):
        run()
        if (i + 1) % max(1, args.settle_steps // 4) == 0:
            torch.cuda.synchronize()
            print(f"  settling: {i + 1}/{args.settle_steps} steps "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # >= GraphStep.WARMUP + 1: the graph is captured by now
        run()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - t0) / max(args.warmup, 1)
    steps = max(2, min(args.steps, int(args.window_s / max(estimate, 1e-3))))
    torch.cuda.reset_peak_memory_stats()
    step_s = time_steps(run, steps, args.windows)
    peak = torch.cuda.max_memory_allocated() / 2**30
    busy_ms, families, top = gpu_busy(run, steps=1 if estimate > 0.5 else 3,
                                      top=args.top_kernels)
    n_syncs, sync_sites = host_syncs(run)
    return dict(step_s=step_s, gpu_busy_ms=busy_ms, gpu_busy_by_family_ms=families,
                top_kernels_ms=top, peak_mem_gib=peak, host_syncs_per_step=n_syncs,
                sync_sites=sync_sites, first_step_s=first_s, settle_steps=args.settle_steps,
                timed_steps=steps * args.windows)


def _release() -> None:
    """Free the last model's memory and compiled code before the next row."""
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def ratios(rows: list[dict]) -> list[dict]:
    """Side-by-side ratios of one run: each kind / dense, hierarchical / HF Mixtral, kinds /
    hierarchical, compiled / eager."""
    by = {(r["shape"], r["mode"], r["model"]): r["tokens_per_s"] for r in rows}
    out = []
    for (shape, mode, model), tok in sorted(by.items()):
        r = {"shape": shape, "mode": mode, "model": model, "tokens_per_s": tok}
        for ref in ("dense", "hierarchical", "hf_mixtral", "hf_llama"):
            if (shape, mode, ref) in by and ref != model:
                r[f"vs_{ref}"] = tok / by[(shape, mode, ref)]
        eager = by.get((shape, "eager", model))
        if mode != "eager" and eager:
            r["vs_eager"] = tok / eager
        out.append(r)
    best: dict[tuple, tuple] = {}  # each model's fastest mode
    for (shape, mode, model), tok in by.items():
        if tok > best.get((shape, model), (0.0, ""))[0]:
            best[(shape, model)] = (tok, mode)
    for (shape, model), (tok, mode) in sorted(best.items()):
        r = {"shape": shape, "mode": "best", "model": model, "best_mode": mode,
             "tokens_per_s": tok}
        for ref in ("dense", "hierarchical", "hf_mixtral", "hf_llama"):
            if (shape, ref) in best and ref != model:
                r[f"vs_{ref}"] = tok / best[(shape, ref)][0]
        out.append(r)
    return out


def _print_row(r: dict) -> None:
    print(f"{r['shape']:6} {r['model']:20} {r['mode']:14} {r['tokens_per_s'] / 1e3:8.1f}k tok/s "
          f"{r['step_ms']:7.2f} ms  MFU {100 * r['mfu']:5.1f}%  busy {r['gpu_busy_ms']:7.2f} ms  "
          f"peak {r['peak_mem_gib']:5.1f} GiB  syncs {r['host_syncs_per_step']}  "
          f"first {r['first_step_s']:.1f}s  calls {r['expert_mm_calls']}"
          + (f"  load cv {r['expert_cv']:.2f}" if r.get("expert_cv") is not None else ""),
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--shapes", default="small,d1024")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default="graph,eager,compiled",
                    help=f"trainer modes, of {list(MODES)} (HF anchors: eager, compiled)")
    ap.add_argument("--steps", type=int, default=10, help="most steps per timing window")
    ap.add_argument("--window-s", type=float, default=2.0, help="longest timing window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--top-kernels", type=int, default=8,
                    help="kernels listed per row (ms and launches per step)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settle-steps", type=int, default=0,
                    help="train this many steps before timing, so bias balancing evens out "
                    "the expert loads of a fresh router (each row records the expert-load CV "
                    "of its last timed step)")
    ap.add_argument("--rows", default="", help="MODEL@MODE,... in this order (instead of "
                    "--models x --modes), e.g. dense@graph,hierarchical@graph,hf_mixtral@eager")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_e2e needs a CUDA GPU")
        return 1
    from benchmarks._results import environment

    if args.rows:
        plan = [tuple(item.split("@", 1)[::-1]) if "@" in item else ("", item)
                for item in args.rows.split(",") if item]
    else:
        plan = [(mode, name) for mode in args.modes.split(",") if mode
                for name in args.models.split(",") if name]
    def known(name: str) -> bool:  # MODEL, hf_*:IMPL or one of ours :cast
        base, _, variant = name.partition(":")
        return name in MODELS or base in ("hf_llama", "hf_mixtral") or \
            (base in OURS and variant == "cast")

    unknown = sorted({n for _, n in plan if not known(n)})
    if unknown:
        ap.error(f"--models/--rows: unknown {unknown}; known {list(MODELS)}")
    bad_modes = sorted({m for m, _ in plan} - set(MODES))
    if bad_modes:
        ap.error(f"--modes/--rows: unknown {bad_modes}; known {list(MODES)}")
    env = environment()
    rows, failures, began = [], [], time.perf_counter()

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(
                dict(env=env, shape=dict(batch=BATCH, seq=SEQ, layers=LAYERS, experts=G * C,
                                         width=WIDTH, k=K1 * K2, shapes=SHAPES),
                     rows=rows, ratios=ratios(rows), failures=failures), indent=1))

    for shape in args.shapes.split(","):
        for mode, name in plan:
            if name.startswith("hf_") and mode.endswith("graph"):
                continue  # HF's MoE syncs with the host: nothing to capture
            if args.budget_s and time.perf_counter() - began > args.budget_s:
                failures.append(dict(shape=shape, model=name, mode=mode, error="budget"))
                continue
            if name.startswith("hf_"):
                try:
                    import transformers  # noqa: F401
                except ImportError:
                    continue  # an anchor where importable, never a dependency
            try:
                rows.append(measure(name, shape, mode, args))
                _print_row(rows[-1])
            except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
                traceback.print_exc()
                failures.append(dict(shape=shape, model=name, mode=mode,
                                     error=f"{type(e).__name__}: {e}"[:500]))
            _release()
            save()
    print("\nratios (tokens/s, same run):")
    for r in ratios(rows):
        keys = [k for k in r if k.startswith("vs_")]
        print(f"  {r['shape']:6} {r['mode']:14} {r['model']:20} {r.get('best_mode', ''):14} " +
              "  ".join(f"{k} {r[k]:.2f}" for k in keys))
    for f in failures:
        print("FAILED", f)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
