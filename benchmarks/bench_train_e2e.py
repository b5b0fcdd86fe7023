"""The whole training step on a GPU: every FFN kind, Engram on, and HF transformers anchors.

One step is what the trainer (``sessions/trainer.py``) runs: bf16 autocast forward (fp32
residual stream, fp32 master weights and optimizer state), backward, ``clip_grad_norm_``,
fused AdamW, zero grads, router-bias update — ``train_step`` below, one function for every
model. Shapes (issue 10): ``small`` = d 512, 8 layers, 8 heads, 64 experts (8 domains × 8
components) of width 512, 4 active (k 2×2), batch 32 × 512 bytes; ``d1024`` = the same with
d 1024 and 16 heads. Models:

  dense           our dense SwiGLU FFN of equal active parameters (width 4·512)
  flat_moe, group_limited, hierarchical, progressive
                  our MoE kinds (bias balancing on, so the bias update does real work;
                  progressive gets domain labels, so its label loss runs)
  engram          EngramModel (hierarchical backbone) + a TensorMemory: each row reads 8
                  traces of 64 bytes written in an earlier session (segments encoded by the
                  backbone without autograd, as the episode objective does); loss adds the
                  write gate's budget loss
  hf_llama        transformers LlamaForCausalLM, same shape, dense (intermediate 2048), tied
  hf_mixtral      transformers MixtralForCausalLM, same shape, 64 experts of width 512, top 4,
                  its default experts implementation (recorded in the row;
                  ``hf_mixtral:eager`` / ``hf_mixtral:grouped_mm`` pick one)

Modes: ``eager``; ``compiled`` with ``--compile blocks`` (default: every transformer block
compiled, regional compilation, one compile serving all identical blocks, for every model)
or ``--compile whole`` (``torch.compile(model, fullgraph=True)`` for ours, as
``train.compile=true`` does; Engram keeps block compilation, its memory read runs between
blocks; HF models ``torch.compile(model)``); ``graph``: the whole eager step (forward,
backward, clip, fused AdamW with ``capturable=True``, bias update) captured once in a CUDA
graph and replayed — the step's GPU-bound pace, with no host overhead (ours only: HF's MoE
syncs with the host, so it cannot be captured).

Per row: tokens/s = B·S ÷ the median step time over windows of back-to-back steps timed by
CUDA events (the trainer's pace: host time included); MFU = tokens/s × (6·N_active +
12·L·d·S) ÷ 989 TFLOP/s (PaLM's FLOPs per token, the H100/H200 dense bf16 peak); peak
memory; GPU-busy ms per step (profiler: kernel and copy time only) with a breakdown by kernel
family; host syncs in one warmed-up step (``set_sync_debug_mode("warn")``, with where the
first came from); expert-matmul calls on the fast path and on the loop; compile seconds
(first step). Rows are printed and saved as they finish (``--json``), so a run cut short
keeps what it measured.

    PYTHONUNBUFFERED=1 BENCH_GIT_SHA=$(git rev-parse --short HEAD) \\
        python benchmarks/bench_train_e2e.py --json e2e.json
    python benchmarks/bench_train_e2e.py --shapes small --models hierarchical,dense --modes eager
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mhc.config import FFNConfig, ModelConfig  # noqa: E402

SHAPES = {"small": dict(d_model=512, n_heads=8), "d1024": dict(d_model=1024, n_heads=16)}
BATCH, SEQ, LAYERS, WIDTH, G, C, K1, K2 = 32, 512, 8, 512, 8, 8, 2, 2
OURS = ("dense", "flat_moe", "group_limited", "hierarchical", "progressive")
MODELS = (*OURS, "engram", "hf_llama", "hf_mixtral")
PEAK_FLOPS = 989e12  # dense bf16, H100/H200 SXM datasheet
MEMORY_SEGMENTS, SEGMENT_LEN = 8, 64  # Engram: traces per row, bytes per trace


# ----------------------------------------------------------------------------- the step


@dataclass
class StepOut:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    layers: list = field(default_factory=list)


@dataclass
class Batch:
    x: torch.Tensor  # (B, S) input bytes
    y: torch.Tensor  # (B, S) next bytes
    domains: torch.Tensor  # (B,) domain labels
    segments: torch.Tensor | None = None  # (B·n, SEGMENT_LEN) bytes of earlier sessions

    @property
    def tokens(self) -> int:
        return self.x.numel()


def lm_loss(model, batch: Batch) -> StepOut:
    """Our models (``MHCModel`` or its compiled wrapper), as ``LMObjective.loss``."""
    out = model(batch.x, batch.y, batch.domains)
    return StepOut(out.loss, out.lm_loss.detach(), out.layers)


def engram_loss(model, batch: Batch) -> StepOut:
    """``EngramModel``: write the earlier segments into a TensorMemory (backbone without
    autograd, writer with it), read it while training on the batch, as the episode
    objective does."""
    from engram.backends import TensorMemory, TraceBatch

    B = batch.x.shape[0]
    tr = model.encode_traces(batch.segments, backbone_grad=False)
    n = tr.key_NK.shape[0] // B
    mem = TensorMemory(B, tr.hidden_NSD.shape[-1], model.cfg.key_dim, tr.hidden_NSD.shape[1],
                       batch.x.device, tr.hidden_NSD.dtype)
    view = lambda t: t.view(B, n, *t.shape[1:])  # noqa: E731
    mem.write(TraceBatch(view(tr.key_NK), view(tr.hidden_NSD), view(tr.mask_NS),
                         view(tr.tokens_NS), view(tr.salience_N)), session=0)
    res = model(batch.x, batch.y, memory=mem, session=1)
    loss = res.out.loss + model.writer.salience_loss(mem.salience_BM)
    return StepOut(loss, res.out.lm_loss.detach(), res.out.layers)


def hf_loss(model, batch: Batch) -> StepOut:
    """transformers causal LMs (they shift the labels themselves)."""
    out = model(input_ids=batch.x, labels=batch.x)
    return StepOut(out.loss, out.loss.detach())


def make_optimizer(model: torch.nn.Module, lr: float = 1e-3,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """As the trainer's: AdamW, decay on matrices only, fused on CUDA (``capturable``: its
    step can be captured in a CUDA graph)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=True, capturable=capturable)


def train_step(model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
               loss=lm_loss, step_model: torch.nn.Module | None = None,
               grad_clip: float = 1.0) -> torch.Tensor:
    """One training step, the body of ``sessions.trainer.Trainer._step``: ``loss(step_model,
    batch)`` under bf16 autocast (``step_model``: the compiled model, default ``model``),
    backward, clip, optimizer step, zero grads, router-bias update of the backbone. Returns
    the detached LM loss (on the device: nothing here syncs with the host)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = loss(step_model if step_model is not None else model, batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    backbone = getattr(model, "backbone", model)
    if hasattr(backbone, "update_router_biases"):
        backbone.update_router_biases(out.layers)
    return out.lm_loss


def capture_step(model, batch: Batch, optimizer, loss=lm_loss):
    """``train_step`` captured once as a CUDA graph (a static batch; the optimizer made with
    ``capturable=True``): ``(graph, its LM-loss tensor)``. Replaying it runs the whole step
    with no host work; it can only be captured because nothing in it syncs with the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        for _ in range(3):
            train_step(model, batch, optimizer, loss)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # gradients are None here: backward allocates them inside
        lm = train_step(model, batch, optimizer, loss)
    return graph, lm


# ----------------------------------------------------------------------------- models


def model_config(kind: str, shape: str) -> ModelConfig:
    ffn = FFNConfig(kind=kind, hidden=WIDTH, n_domains=G, n_components=C, k1=K1, k2=K2,
                    segment_len=128, bias_balancing=kind != "dense")
    return ModelConfig(d_model=SHAPES[shape]["d_model"], n_layers=LAYERS,
                       n_heads=SHAPES[shape]["n_heads"], seq_len=SEQ, ffn=ffn)


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


def build(name: str, shape: str):
    """``(model on CUDA, loss function, active params per token, info)``; ``hf_mixtral:IMPL``
    picks transformers' experts implementation (``eager``, ``grouped_mm``, ...)."""
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: 0.4-0.8 B parameters
        return _build(name, shape)


def _build(name: str, shape: str):
    if name in OURS or name == "engram":
        from mhc import params
        from mhc.model import MHCModel

        cfg = model_config("hierarchical" if name == "engram" else name, shape)
        active = params.count(cfg).active
        if name != "engram":
            return MHCModel(cfg), lm_loss, active, {}
        from engram.config import EngramConfig
        from engram.model import EngramModel

        model = EngramModel(cfg, EngramConfig(enabled=True, max_trace_tokens=SEGMENT_LEN))
        extra = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone"))
        return model, engram_loss, active + extra, {}
    import transformers

    base, _, experts = name.partition(":")
    hf_cfg = _hf_config(base, shape)
    cls = transformers.LlamaForCausalLM if base == "hf_llama" else \
        transformers.MixtralForCausalLM
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
    return model, hf_loss, active, info


def compile_model(name: str, model: torch.nn.Module, how: str):
    """The step model for the compiled mode (``model`` itself when compiled in place)."""
    if how == "whole" and name in OURS:
        return torch.compile(model, fullgraph=True)
    if how == "whole" and name.startswith("hf_"):  # graph breaks allowed: not our model
        return torch.compile(model)
    blocks = (model.model.layers if name.startswith("hf_") else
              model.backbone.blocks if name == "engram" else model.blocks)
    for block in blocks:
        block.compile(fullgraph=not name.startswith("hf_"))
    return model


def make_batch(shape: str, with_segments: bool, seed: int = 0) -> Batch:
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, 256, (BATCH, SEQ + 1), device="cuda", generator=g)
    domains = torch.randint(0, G, (BATCH,), device="cuda", generator=g)
    segments = None
    if with_segments:
        segments = torch.randint(0, 256, (BATCH * MEMORY_SEGMENTS, SEGMENT_LEN), device="cuda",
                                 generator=g)
    return Batch(idx[:, :-1].contiguous(), idx[:, 1:].contiguous(), domains, segments)


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


def gpu_busy(run, steps: int = 3) -> tuple[float, dict, list]:
    """GPU-busy ms per step (device-side events only: CPU ops also report their kernels'
    time, summing both would count it twice), by kernel family, and the top kernels."""
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
        kernels.append((us / 1e3, e.key[:90]))
    kernels.sort(reverse=True)
    return sum(fam.values()), {k: round(v, 3) for k, v in sorted(fam.items())}, kernels[:8]


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
    from kernels.routing import grouped

    model, loss, active, info = build(name, shape)
    model.train()
    opt = make_optimizer(model, capturable=mode == "graph")
    batch = make_batch(shape, with_segments=name == "engram")
    step_model = compile_model(name, model, args.compile) if mode == "compiled" else None
    last = {}
    t0 = time.perf_counter()
    if mode == "graph":
        graph, last["loss"] = capture_step(model, batch, opt, loss)
        run = graph.replay
    else:
        def run():
            last["loss"] = train_step(model, batch, opt, loss, step_model)

    run()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        run()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - t0) / max(args.warmup, 1)
    steps = max(2, min(args.steps, int(2.0 / max(estimate, 1e-3))))  # windows of <= ~2 s
    torch.cuda.reset_peak_memory_stats()
    step_s = time_steps(run, steps, args.windows)
    peak = torch.cuda.max_memory_allocated() / 2**30
    busy_ms, families, top = gpu_busy(run, steps=1 if estimate > 0.5 else 3)
    before = dict(grouped.CALLS)
    n_syncs, sync_sites = host_syncs(run)
    calls = {k: v - before.get(k, 0) for k, v in grouped.CALLS.items() if v - before.get(k, 0)}
    d = SHAPES[shape]["d_model"]
    flops = 6 * active + 12 * LAYERS * d * SEQ
    tok_s = BATCH * SEQ / step_s
    row = dict(shape=shape, model=name, mode=mode + (f"-{args.compile}" if mode == "compiled"
                                                    else ""),
               tokens_per_s=tok_s, step_ms=step_s * 1e3, mfu=tok_s * flops / PEAK_FLOPS,
               gpu_busy_ms=busy_ms, busy_tokens_per_s=BATCH * SEQ / (busy_ms / 1e3),
               gpu_busy_by_family_ms=families, top_kernels_ms=top, peak_mem_gib=peak,
               host_syncs_per_step=n_syncs, sync_sites=sync_sites, expert_mm_calls=calls,
               first_step_s=first_s, timed_steps=steps * args.windows, active_params=active,
               flops_per_token=flops,
               total_params=sum(p.numel() for p in model.parameters()),
               loss=float(last["loss"]), **info)
    return row


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
    return out


def _print_row(r: dict) -> None:
    print(f"{r['shape']:6} {r['model']:13} {r['mode']:16} {r['tokens_per_s'] / 1e3:8.1f}k tok/s "
          f"{r['step_ms']:7.2f} ms  MFU {100 * r['mfu']:5.1f}%  busy {r['gpu_busy_ms']:7.2f} ms  "
          f"peak {r['peak_mem_gib']:5.1f} GiB  syncs {r['host_syncs_per_step']}  "
          f"first {r['first_step_s']:.1f}s  calls {r['expert_mm_calls']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--shapes", default="small,d1024")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--compile", choices=("blocks", "whole"), default="blocks")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_e2e needs a CUDA GPU")
        return 1
    from benchmarks._results import environment

    models = [m for m in args.models.split(",") if m]
    unknown = sorted({m.partition(":")[0] for m in models} - set(MODELS))
    if unknown:
        ap.error(f"--models: unknown {unknown}; known {list(MODELS)}")
    env = environment()
    rows, failures, began = [], [], time.perf_counter()

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(
                dict(env=env, shape=dict(batch=BATCH, seq=SEQ, layers=LAYERS, experts=G * C,
                                         width=WIDTH, k=K1 * K2, shapes=SHAPES),
                     rows=rows, ratios=ratios(rows), failures=failures), indent=1))

    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            for name in models:
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
        print(f"  {r['shape']:6} {r['mode']:16} {r['model']:13} " +
              "  ".join(f"{k} {r[k]:.2f}" for k in keys))
    for f in failures:
        print("FAILED", f)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
