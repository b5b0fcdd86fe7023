"""What the one trainer optimises: an objective makes batch ``step`` (a pure function of the
seed and the step) and turns it into a loss.

* ``LMObjective`` — next-byte language modelling on text streams (``engram train CONFIG``).
* ``EpisodeObjective`` — multi-session episodes of a task (``engram train|run|ablate
  EXPERIMENT``): for the memory model, every context segment of every session is encoded into
  a trace (the backbone alone: a trace is a function of its text) and written softly into a
  ``TensorMemory``; the probes of every session then read the traces of *earlier* sessions
  (one forward for all sessions: writes do not depend on reads, so this equals running the
  sessions in order). Loss: LM loss on the probe tokens + ``answer_weight`` × answer loss (+
  the context's LM loss reading memory, for tasks that score context) + router losses + the
  write gate's budget loss. The no-memory arm runs the same objective with no memory.

Every tensor an objective reports is detached and stays on the device; the trainer reads them
every ``log_every`` steps. Under several ranks the trainer sets ``shard``
(``sessions.distributed.Shard``): ``batch(step)`` is then this rank's slice of the same global
batch (rows of a text batch; whole episodes, with the probes chosen over the global batch).
"""

from __future__ import annotations

import random
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engram.backends import TensorMemory, TraceBatch
from engram.write import write_distillation_loss, write_probability
from mhc.moe import FFNAux
from sessions.data import Sampler, build_streams, eval_batches
from sessions.encoding import IGNORE, encode_probes, encode_segments, segment_targets
from sessions.episodes import Episode, with_references
from sessions.graph_write import GraphedWritePass


@dataclass
class StepOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    router_loss: torch.Tensor
    layers: list[FFNAux]
    tokens: int  # tokens of the batch (known on the host: no sync)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


def backbone_of(model: torch.nn.Module):
    """The ``MHCModel`` inside (an ``EngramModel`` wraps one)."""
    return getattr(model, "backbone", model)


class LMObjective:
    name = "lm"
    # one forward per step: each expert weight is read once, so its gradient arrives whole
    # (the trainer lets the optimizer own bf16 compute copies only then: sessions/optimizer)
    one_forward = True
    shard = None  # several ranks: this rank's rows of every batch (set by the trainer)

    def __init__(self, run, cache_dir: Path = Path("cache"), quiet: bool = False):
        t = run.train
        streams, val_streams = build_streams(t.data, cache_dir, seed=t.seed, quiet=quiet)
        self.sampler = Sampler(streams, t.batch_size, run.model.seq_len, t.seed)
        self.val_sets = {s.name: eval_batches(s, t.batch_size, run.model.seq_len,
                                                         t.eval_batches) for s in val_streams}

    def batch(self, step: int):
        batch = self.sampler.batch(step)
        return batch if self.shard is None else self.shard.rows(batch)

    def loss(self, model, batch) -> StepOutput:
        out = model(batch.x, batch.y, batch.domains)
        return StepOutput(out.loss, out.lm_loss.detach(), out.router_loss.detach(), out.layers,
                          batch.x.numel())

    @torch.no_grad()
    def validate(self, model, device, autocast) -> dict:
        """Mean next-byte loss (nats per byte) on fixed validation windows, per stream."""
        out = {}
        for name, batches in self.val_sets.items():
            total = torch.zeros((), device=device)
            for b in batches:
                with autocast:
                    total += model(b.x.to(device), b.y.to(device)).lm_loss.float()
            out[name] = float(total) / len(batches)
        return out


@dataclass
class EpisodeBatch:
    episodes: list[Episode]
    seg_idx: torch.Tensor
    seg_mask: torch.Tensor
    seg_valid: torch.Tensor
    seg_session: torch.Tensor
    seg_targets: torch.Tensor
    probe_idx: torch.Tensor
    probe_targets: torch.Tensor
    probe_answer: torch.Tensor
    probe_row: torch.Tensor  # the episode row each probe reads
    probe_session: torch.Tensor
    ctx_rows: torch.Tensor  # segment rows whose LM loss is scored (tasks that score context)
    ctx_episode: torch.Tensor  # their episode rows


def sample_probes(eps: list[Episode], k: int, rng: random.Random, balance_by: str = ""
                  ) -> set[tuple[int, int, int]]:
    """``k`` probes of each episode, as ``(row, session, index)``: uniformly, or with
    ``balance_by`` (a tag) weighted by 1 / (how often the probe's tag value occurs in the
    batch), so every value is about equally likely (weighted sampling without replacement:
    the k largest of u^(1/w), Efraimidis & Spirakis)."""
    refs = [[((b, s, i), p.tags.get(balance_by)) for s, sess in enumerate(e.sessions)
             for i, p in enumerate(sess.probes)] for b, e in enumerate(eps)]
    if not balance_by:
        return {r for row in refs for r in rng.sample([r for r, _ in row], min(k, len(row)))}
    counts = Counter(v for row in refs for _, v in row)
    chosen = set()
    for row in refs:
        keys = [(rng.random() ** counts[v], r) for r, v in row]  # u^(1/w), w = 1/count
        chosen.update(r for _, r in sorted(keys, reverse=True)[:k])
    return chosen


class EpisodeObjective:
    name = "episodes"
    one_forward = False  # context, traces and probes: the backbone runs two or three times
    shard = None  # several ranks: this rank's episodes of every batch (set by the trainer)

    def __init__(self, exp, seed: int, probes_per_episode: int = 0):
        """``probes_per_episode`` > 0 samples that many probes per episode and step (all
        otherwise)."""
        self.exp, self.seed = exp, seed
        self.task, self.eval_task = exp.make_task("train"), exp.make_task("eval")
        self.batch_size, self.seq_len = exp.train.batch_size, exp.model.seq_len
        self.probes_per_episode = probes_per_episode
        self._write_passes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def episodes(self, split: str, start: int, n: int) -> list[Episode]:
        seed = self.seed if split == "train" else self.exp.eval.seed
        task = self.task if split == "train" else self.eval_task
        return [task.episode(split, seed, start + i) for i in range(n)]

    def batch(self, step: int) -> EpisodeBatch:
        eps = self.episodes("train", step * self.batch_size, self.batch_size)
        return self.encode(eps, random.Random(f"probes:{self.seed}:{step}"), self.shard)

    def encode(self, eps: list[Episode], rng: random.Random | None = None,
               shard=None) -> EpisodeBatch:
        """``shard``: encode only that rank's episodes (probes chosen over all of ``eps``)."""
        eps = [with_references(e) for e in eps]  # training writes the reference solutions
        chosen = None
        if self.probes_per_episode and rng is not None:
            chosen = sample_probes(eps, self.probes_per_episode, rng,
                                   self.exp.objective.balance_probes_by)
        if shard is not None:
            eps, chosen = shard.episodes(eps, chosen)
        n_sessions = max(len(e.sessions) for e in eps)
        seg = encode_segments(eps, list(range(n_sessions)), self.seq_len)
        select = None
        if chosen is not None:
            select = lambda r: (r.row, r.session, r.index) in chosen  # noqa: E731
        probes = encode_probes(eps, None, self.seq_len, select)
        if len(probes) == 0 and not train_context(self.task):
            raise ValueError(f"task {self.task.name}: a training batch has no probes to score")
        n = seg.valid_Bn.shape[1]
        ctx = seg.valid_Bn.flatten().nonzero().flatten() if train_context(self.task) else \
            torch.zeros(0, dtype=torch.long)
        return EpisodeBatch(eps, seg.idx_NS, seg.mask_NS, seg.valid_Bn, seg.session_Bn,
                            segment_targets(seg), probes.idx_PS, probes.targets_PS,
                            probes.answer_PS, torch.tensor(probes.row_P, dtype=torch.long),
                            probes.session_P, ctx, ctx // max(n, 1))

    def graphed_write_pass(self, model, idx: torch.Tensor) -> GraphedWritePass | None:
        """The CUDA-graph write pass for ``model`` (``objective.graph_write``): on CUDA, in
        one process, when no gradient flows through the backbone's write pass."""
        if not (self.exp.objective.graph_write and idx.is_cuda and self.shard is None
                and not self.exp.objective.write_backprop):
            return None
        backbone = backbone_of(model)
        graphed = self._write_passes.get(backbone)
        if graphed is None or graphed.layer != model.write_layer:
            graphed = self._write_passes[backbone] = GraphedWritePass(backbone,
                                                                      model.write_layer)
        return graphed

    def build_memory(self, model, batch: EpisodeBatch) -> TensorMemory:
        """Every segment of every session written softly (training) into a TensorMemory."""
        B, n = batch.seg_valid.shape
        tr = model.encode_traces(batch.seg_idx, batch.seg_mask,
                                 backbone_grad=self.exp.objective.write_backprop,
                                 write_pass=self.graphed_write_pass(model, batch.seg_idx))
        mem = TensorMemory(B, tr.hidden_NSD.shape[-1], model.cfg.key_dim,
                           tr.hidden_NSD.shape[1], batch.seg_idx.device, tr.hidden_NSD.dtype,
                           salience_prior=model.cfg.salience_in_read)
        view = lambda t: t.view(B, n, *t.shape[1:])  # noqa: E731
        mem.write(TraceBatch(view(tr.key_NK), view(tr.hidden_NSD), view(tr.mask_NS),
                             view(tr.tokens_NS), view(tr.salience_N)),
                  session=batch.seg_session, keep_Bn=batch.seg_valid)
        mem.read_scope = self.exp.eval.read_scope
        return mem

    def loss(self, model, batch: EpisodeBatch) -> StepOutput:
        obj = self.exp.objective
        mem, k = None, None
        if model.memory_enabled:
            mem = self.build_memory(model, batch)
            k = mem.size if obj.retrieve_all else None
        res, loss, lm_loss, tokens, extras = None, 0.0, None, 0, {}
        if batch.probe_idx.shape[0]:
            reader = mem.rows(batch.probe_row) if mem is not None else None
            res = model(batch.probe_idx, batch.probe_targets, memory=reader,
                        session=batch.probe_session, top_k=k)
            answer_loss = _answer_loss(res.out.logits, batch.probe_targets, batch.probe_answer)
            loss = res.out.loss + obj.answer_weight * answer_loss
            lm_loss, tokens = res.out.lm_loss, batch.probe_idx.numel()
            extras["answer_loss"] = answer_loss.detach()
        if batch.ctx_episode.numel():
            rows = batch.ctx_rows
            ctx = model(batch.seg_idx.index_select(0, rows),
                        batch.seg_targets.index_select(0, rows),
                        memory=mem.rows(batch.ctx_episode) if mem is not None else None,
                        session=batch.seg_session.flatten().index_select(0, rows), top_k=k)
            if res is None:  # a context-only task: the context forward is the step's output
                res, loss, lm_loss = ctx, ctx.out.loss, ctx.out.lm_loss
            else:
                loss = loss + ctx.out.lm_loss
                lm_loss = (lm_loss + ctx.out.lm_loss) / 2
            tokens += len(batch.ctx_episode) * batch.seg_idx.shape[1]
        out = res.out
        if mem is not None:
            loss = loss + model.writer.salience_loss(mem.salience_BM, mem.valid_BM)
            read = next(iter(res.reads.values()))
            extras.update(gate=read.gate, memory_mass=read.memory_mass,
                          write_prob=write_probability(mem.salience_BM.detach(), mem.valid_BM))
            if model.cfg.write_distill_coef:
                write = _write_distillation(mem, batch, res,
                                            ctx if batch.ctx_episode.numel() else None)
                loss = loss + model.cfg.write_distill_coef * write
                extras["write_loss"] = write.detach()
            distill = [r.retrieval_loss for r in res.reads.values()
                       if r.retrieval_loss is not None]
            if distill:
                retrieval = sum(distill) / len(distill)
                loss = loss + model.cfg.retrieval_coef * retrieval
                extras["retrieval_loss"] = retrieval.detach()
        return StepOutput(loss, lm_loss.detach(), out.router_loss.detach(), out.layers, tokens,
                          extras)

    @torch.no_grad()
    def validate(self, model, device, autocast, n_episodes: int = 32) -> dict:
        """Answer loss and exact match on fixed evaluation episodes (tensor memory, every
        trace written): a cheap curve for training; `engram run` does the real evaluation.
        A task without probes reports its context loss (nats/byte) instead."""
        task = self.eval_task
        if hasattr(task, "validation_episode"):  # a task whose eval episodes are too large
            n = getattr(task, "validation_episodes", n_episodes)
            eps = [task.validation_episode(self.exp.eval.seed, i) for i in range(n)]
        else:
            eps = self.episodes("eval", 0, n_episodes)
        batch = move(self.encode(eps), device)
        if not batch.probe_idx.shape[0]:
            with autocast:
                mem = self.build_memory(model, batch) if model.memory_enabled else None
                rows = batch.ctx_rows
                ctx = model(batch.seg_idx.index_select(0, rows),
                            batch.seg_targets.index_select(0, rows),
                            memory=mem.rows(batch.ctx_episode) if mem is not None else None,
                            session=batch.seg_session.flatten().index_select(0, rows))
            return {"val_context_loss": float(ctx.out.lm_loss)}
        with autocast:
            mem = self.build_memory(model, batch) if model.memory_enabled else None
            res = model(batch.probe_idx, memory=mem.rows(batch.probe_row) if mem else None,
                        session=batch.probe_session)
        logits = res.out.logits.float()
        hit = (logits.argmax(-1) == batch.probe_targets) | ~batch.probe_answer
        return {"val_answer_loss": float(_answer_loss(logits, batch.probe_targets,
                                                      batch.probe_answer)),
                "val_exact": float(hit.all(-1).float().mean())}


def _write_distillation(mem: TensorMemory, batch: EpisodeBatch, probes, ctx):
    """The write distillation loss (``engram.write.write_distillation_loss``): the attention
    mass each trace got from the reads that are scored — a probe's answer tokens (its prompt
    reads every retrieved trace alike), a scored context segment's tokens — summed per
    episode."""
    mass = torch.zeros(mem.salience_BM.shape, dtype=torch.float32,
                       device=mem.salience_BM.device)
    answer = batch.probe_answer.float().to(mass.device)
    for res, rows, answer_RT in ((probes, batch.probe_row, answer), (ctx, batch.ctx_episode, None)):
        if res is None or not rows.numel():
            continue
        for read in res.reads.values():
            if read.trace_mass is not None:  # a scored context segment: all its tokens
                per_row = read.trace_mass.sum(1) if answer_RT is None else \
                    torch.einsum("rtm,rt->rm", read.trace_mass, answer_RT)
                mass.index_add_(0, rows.to(mass.device), per_row)
    return write_distillation_loss(mem.salience_BM, mem.session_BM, mem.valid_BM, mass)


def train_context(task) -> bool:
    """Whether training scores the LM loss of a task's context segments: tasks that measure
    context do, and a task may train on its context without measuring it (``train_context``:
    the reasoning task learns to write worked solutions)."""
    return bool(getattr(task, "train_context", task.score_context))


def _answer_loss(logits_PSV, targets_PS, answer_PS) -> torch.Tensor:
    tgt = targets_PS.masked_fill(~answer_PS, IGNORE)
    return F.cross_entropy(logits_PSV.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)


def move(batch, device: torch.device, non_blocking: bool = False):
    """A copy of a batch dataclass with every tensor on ``device`` (pinned first on CUDA)."""
    if device.type == "cpu":
        return batch
    values = {}
    for name, value in vars(batch).items():
        if torch.is_tensor(value):
            value = value.pin_memory().to(device, non_blocking=True) if non_blocking else \
                value.to(device)
        values[name] = value
    return type(batch)(**values)
