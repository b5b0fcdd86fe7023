"""What ``engram bench architectures`` measures on one trained model: held-out bits per byte
and next-byte accuracy per domain and on the mixed items, level-1 routing accuracy against
the true domain labels, load balance and collapse, whether the LM loss reaches level 1,
counted parameters, and routing latency per layer.

Level-1 pick of a token in a layer: the group (domain) of its best expert, read from the
router's output ``ids_TK`` (two-level kinds list the best domain's picks first;
group-limited: the group of the best expert). Accuracy maps each router domain to the data
domain it serves most often on *training* batches (majority, fitted before looking at the
held-out data), then scores held-out tokens; ``accuracy_direct`` uses router domain d = label
d (what progressive routing's label loss trains). ``accuracy_ctx`` leaves out each
sequence's first ``segment_len`` tokens (progressive routing chooses segment 0 from no
context, by the encoder's bias alone).

Shape legend: B batch, S sequence, T tokens, G router domains, L layers.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

import kernels
from kernels.routing import ops
from mhc import stats
from mhc.experts import expert_to_slot
from mhc.model import MHCModel
from mhc.moe import FFNAux
from sessions.data import Batch
from sessions.trainer import autocast

LN2 = math.log(2)
# A level-1 gradient below this fraction of level 2's is rounding noise, not learning
# (tests/mhc/test_level1_gradient.py measures both sides).
MIN_LEVEL1_GRAD_RATIO = 1e-4


def has_level1(model: MHCModel) -> bool:
    return model.cfg.ffn.kind in ("group_limited", "hierarchical", "progressive")


class RouterTap:
    """Forward hooks on every layer's router: the inputs it got and its level-1 picks."""

    def __init__(self, model: MHCModel, keep_inputs: bool = False):
        self.picks: list[list[torch.Tensor]] = [[] for _ in model.blocks]
        self.inputs: list[tuple] = [() for _ in model.blocks]
        C = model.cfg.ffn.n_components
        self._handles = []
        for i, block in enumerate(model.blocks):
            if not model.cfg.ffn.is_moe:
                continue

            def hook(_mod, args, out, i=i):
                self.picks[i].append(out[1][:, 0] // C)
                if keep_inputs:
                    self.inputs[i] = args

            self._handles.append(block.ffn.router.register_forward_hook(hook))

    def take(self) -> list[torch.Tensor]:
        """Level-1 picks per layer since the last take, ``(L, T)``."""
        out = [torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in self.picks]
        self.picks = [[] for _ in self.picks]
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def evaluate(model: MHCModel, val_sets: dict[str, list[Batch]], fit_batches: list[Batch],
             labels: tuple[str, ...], device: torch.device) -> dict:
    """Every held-out measurement of one model (``val_sets``: name -> fixed batches;
    the sets named in ``labels`` carry domain labels, ``mixed:*`` sets are mixed items)."""
    model.eval()
    cfg = model.cfg.ffn
    tap = RouterTap(model)
    out: dict = {"bpb": {}, "accuracy": {}}
    try:
        fit_conf = None
        if has_level1(model):
            fit_conf = torch.zeros(cfg.n_domains, len(labels), dtype=torch.long)
            for b in fit_batches:
                _forward(model, b, device)
                fit_conf += _confusion(tap.take(), b, cfg.n_domains, len(labels), 0).sum(0)
        conf = conf_ctx = None
        counts: list[list[torch.Tensor]] = []
        for name, batches in val_sets.items():
            nll, hits, n = 0.0, 0, 0
            for b in batches:
                res = _forward(model, b, device)
                logits = res.logits.float().flatten(0, 1)
                y = b.y.to(device).flatten()
                nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                hits += int((logits.argmax(-1) == y).sum())
                n += y.numel()
                picks = tap.take()
                if name not in labels or not cfg.is_moe:
                    continue
                counts.append([a.counts_E.cpu() for a in res.layers])
                if fit_conf is not None:
                    c = _confusion(picks, b, cfg.n_domains, len(labels), 0)
                    cc = _confusion(picks, b, cfg.n_domains, len(labels), cfg.segment_len)
                    conf = c if conf is None else conf + c
                    conf_ctx = cc if conf_ctx is None else conf_ctx + cc
            out["bpb"][name] = nll / n / LN2
            out["accuracy"][name] = hits / n
    finally:
        tap.close()
    mixed = [k for k in val_sets if k.startswith("mixed:")]
    if mixed:
        out["mixed_bpb"] = statistics.fmean(out["bpb"][k] for k in mixed)
        out["mixed_accuracy"] = statistics.fmean(out["accuracy"][k] for k in mixed)
    out["domain_bpb"] = statistics.fmean(out["bpb"][k] for k in labels if k in out["bpb"])
    if counts:
        out["balance"] = _balance(counts, cfg.n_domains)
    if conf is not None:
        out["level1"] = _level1(conf, conf_ctx, fit_conf)
    return out


def _forward(model: MHCModel, b: Batch, device: torch.device):
    with autocast(device):
        return model(b.x.to(device))


def _confusion(picks: list[torch.Tensor], b: Batch, G: int, D: int, skip: int) -> torch.Tensor:
    """Per layer, tokens of router domain g with data label d: ``(L, G, D)``, leaving out
    each sequence's first ``skip`` positions."""
    B, S = b.x.shape
    keep = (torch.arange(S) >= skip).expand(B, S).flatten()
    label = b.domains[:, None].expand(B, S).flatten()
    keep &= (label >= 0) & (label < D)
    out = torch.zeros(len(picks), G, D, dtype=torch.long)
    for i, p in enumerate(picks):
        if p.numel():
            out[i].view(-1).scatter_add_(0, (p.cpu()[keep] * D + label[keep]),
                                         torch.ones(int(keep.sum()), dtype=torch.long))
    return out


def _level1(conf: torch.Tensor, conf_ctx: torch.Tensor, fit: torch.Tensor) -> dict:
    """Accuracy per layer: mapped by the training majority, and direct (domain d = label d)."""
    mapping = fit.argmax(1)  # router domain -> data label
    G, D = fit.shape

    def acc(c: torch.Tensor, direct: bool) -> list[float]:
        res = []
        for layer in c:
            if direct:
                right = sum(int(layer[d, d]) for d in range(min(G, D)))
            else:
                right = sum(int(layer[g, mapping[g]]) for g in range(G))
            res.append(right / max(int(layer.sum()), 1))
        return res

    per_layer = acc(conf, False)
    return {"accuracy": statistics.fmean(per_layer), "accuracy_per_layer": per_layer,
            "accuracy_ctx": statistics.fmean(acc(conf_ctx, False)),
            "accuracy_direct": statistics.fmean(acc(conf, True)),
            "mapping": mapping.tolist(),
            "domain_share": (conf.sum((0, 2)).double() / conf.sum()).tolist()}


def _balance(counts: list[list[torch.Tensor]], G: int) -> dict:
    """Load statistics and collapse check on the held-out tokens of every labelled domain."""
    per_layer = [sum(c[i] for c in counts) for i in range(len(counts[0]))]
    zero = torch.zeros(())
    layer = stats.layer_stats([FFNAux(zero, zero, c, c.view(G, -1).sum(1)) for c in per_layer])
    summary = stats.summarize(layer)
    return {"expert_cv": summary["expert_cv"], "domain_cv": summary["domain_cv"],
            "dead_experts": summary["dead_experts"],
            "dead_per_layer": [s["experts"]["dead"] for s in layer],
            "experts_per_layer": len(per_layer[0]),
            "collapse": stats.collapse_reasons(layer)}


def level1_grad_ratio(model: MHCModel, batch: Batch, device: torch.device) -> float | None:
    """Norm of the LM loss's gradient on the level-1 router parameters over that on the
    level-2 router parameters (hierarchical: the G domain columns vs the rest of each
    router; progressive: the encoder vs the routers). ``None`` without a level 1 of its own."""
    kind, G = model.cfg.ffn.kind, model.cfg.ffn.n_domains
    if kind not in ("hierarchical", "progressive"):
        return None
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(device):
        out = model(batch.x.to(device), batch.y.to(device))
    out.lm_loss.backward()
    routers = [b.ffn.router.weight_DR.grad for b in model.blocks]
    if kind == "hierarchical":
        l1 = [g[:, :G] for g in routers]
        l2 = [g[:, G:] for g in routers]
    else:
        l1 = [p.grad for p in model.domain_encoder.parameters() if p.grad is not None]
        l2 = routers
    norm = lambda gs: math.sqrt(sum(float(g.float().pow(2).sum()) for g in gs))  # noqa: E731
    ratio = norm(l1) / max(norm(l2), 1e-30)
    model.zero_grad(set_to_none=True)
    return ratio


def counted_params(model: MHCModel) -> dict:
    """Total and active parameters counted from the module's tensors (independent of
    ``mhc.params``): active = all - lookup tables - every expert + k picks of one expert."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    if model.domain_encoder is not None:
        active -= model.domain_encoder.embed.weight.numel()
    if model.lm_head.weight is not model.tok_emb.weight:
        active -= model.tok_emb.weight.numel()
    f = model.cfg.ffn
    for block in model.blocks:
        if f.is_moe:
            ex = list(block.ffn.experts.parameters())
            active += f.top_k * sum(p[0].numel() for p in ex) - sum(p.numel() for p in ex)
    return {"total": total, "active": active}


@torch.no_grad()
def routing_latency(models: dict[str, MHCModel], batch: Batch, device: torch.device,
                    backends: list[str], repeats: int) -> dict[str, dict]:
    """Per model (MoE kinds only) and kernel backend: µs per 1k tokens, per layer, of the
    router alone and of router + permutation (the model's own ``Router`` on the inputs it saw
    in a forward of ``batch``); progressive adds its encoder (run once for all layers).
    Side by side: each repeat times one call of every router of every model in turn, so a
    change in the machine's load touches every model alike."""
    calls: dict[tuple[str, str, int | None], object] = {}
    for name, model in models.items():
        if not model.cfg.ffn.is_moe:
            continue
        model.eval()
        tap = RouterTap(model, keep_inputs=True)
        try:
            _forward(model, batch, device)
        finally:
            tap.close()
        f = model.cfg.ffn
        for i, (block, args) in enumerate(zip(model.blocks, tap.inputs, strict=True)):
            router = block.ffn.router

            def alone(router=router, args=args):
                return router(*args)

            def with_permute(router=router, args=args, f=f):
                _, ids_TK, _ = router(*args)
                return ops.permute(args[0], expert_to_slot(ids_TK, f.n_domains,
                                                           f.n_components), f.n_experts)

            calls[(name, "router_us_per_1k", i)] = alone
            calls[(name, "router_permute_us_per_1k", i)] = with_permute
        if model.domain_encoder is not None:
            idx = batch.x.to(device)
            calls[(name, "encoder_us_per_1k", None)] = lambda m=model, idx=idx: _encode(m, idx)
    T = batch.x.numel()
    out: dict[str, dict] = {}
    prev = kernels.backend()
    try:
        for backend in backends:
            kernels.set_backend(backend)
            for (name, metric, layer), us in _time_side_by_side(calls, device, repeats).items():
                row = out.setdefault(name, {}).setdefault(f"{device.type}:{backend}",
                                                          {"tokens": T})
                if layer is None:
                    row[metric] = us * 1000.0 / T
                else:  # layers come in order
                    row.setdefault(metric, []).append(us * 1000.0 / T)
    finally:
        kernels.set_backend(prev)
    return out


def _encode(model: MHCModel, idx_BS: torch.Tensor) -> torch.Tensor:
    """Progressive level 1 for every token: the encoder once per segment, top-k1 domains."""
    seg = model.domain_encoder(idx_BS)
    logits = model.domain_encoder.per_token(seg, idx_BS.shape[1])
    return torch.topk(logits.float(), model.cfg.ffn.k1, dim=-1).indices


def _time_side_by_side(calls: dict, device: torch.device, repeats: int) -> dict:
    """Median synchronised wall time (µs) of one call of each function, the functions taking
    turns within every repeat (eager: what a training step pays)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in calls.values():
        for _ in range(3):
            fn()
    sync()
    times: dict = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(v) * 1e6 for key, v in times.items()}
