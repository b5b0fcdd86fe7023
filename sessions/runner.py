"""The experiment runner: episodes through a model and a memory, session by session.

For each batch of episodes (one namespace each) and each session in order:
  1. score the context segments reading memory (tasks that measure context bits/byte);
  2. encode the segments into traces (the backbone alone), let the arm's write policy choose,
     and ``write`` them — the scope later sessions read;
  3. score the probes reading memory (namespace = the episode's, sessions before this one):
     exact match (every answer byte the argmax under teacher forcing, which is what greedy
     decoding of the answer produces) and answer bits per byte; log what each read layer
     retrieved at the position that predicts the first answer byte.
The memory is a ``MemoryBackend`` (``StoreMemory`` on the run's LMDB + FAISS store, or a
``TensorMemory``); nothing below ``memory_for`` knows which.

Files in the run folder (one line per probe / per session / per probe and read layer):
``probes.jsonl``, ``sessions.jsonl``, ``retrievals.jsonl``, and ``progress.json``. After each
batch the files are flushed and ``progress.json`` records their sizes, atomically; a run
killed at any point resumes from the last finished batch: the files are cut back to those
sizes and the interrupted batch's namespaces are cleared from the store before they are run
again, so the store holds each trace exactly once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engram.backends import TensorMemory, TraceBatch
from engram.model import EngramModel, model_version
from engram.write import select
from sessions.encoding import encode_probes, encode_segments, segment_targets
from sessions.episodes import Episode
from sessions.trainer import autocast

FILES = ("probes.jsonl", "sessions.jsonl", "retrievals.jsonl")
LN2 = math.log(2)


@dataclass(frozen=True)
class Arm:
    name: str  # off | trained-off | on | on:<policy>
    memory: str  # off (module absent) | trained-off (present, reads nothing) | on
    policy: str | None = None  # the write policy of an `on` arm (None: the model's own)

    @classmethod
    def parse(cls, name: str) -> Arm:
        from sessions.experiment import parse_arm

        memory, policy = parse_arm(name)
        return cls(name, memory, policy)


class Runner:
    def __init__(self, model: EngramModel, arm: Arm, exp, out_dir: Path, device: torch.device,
                 progress: bool = True):
        if arm.memory != "off" and not model.memory_enabled:
            raise ValueError(f"arm {arm.name!r} needs a model with the memory module")
        self.model, self.arm, self.exp, self.out = model.eval(), arm, exp, Path(out_dir)
        self.device, self.progress = device, progress
        self.seq_len = exp.model.seq_len
        # evaluation-time knobs come from the experiment (also for a loaded checkpoint):
        # top-k, write policy, budget and threshold
        self.read_cfg = exp.engram
        self.policy = arm.policy or exp.engram.write_policy
        self.version = model_version(model) if model.memory_enabled else "none"
        self.score_context = bool(getattr(exp.make_task("eval"), "score_context", False))
        self._store = None

    # ---- memory ------------------------------------------------------------------------
    def memory_for(self, eps: list[Episode]):
        """The backend these episodes read and write (None: the arm reads nothing)."""
        if self.arm.memory != "on":
            return None
        names = [e.namespace for e in eps]
        sessions = [[s.id for s in e.sessions] for e in eps]
        if self.exp.eval.backend == "tensor":
            mem = TensorMemory(len(eps), self.model.backbone.cfg.d_model, self.model.cfg.key_dim,
                               min(self.model.cfg.max_trace_tokens, self.seq_len), self.device,
                               namespaces=names, session_names=sessions)
        else:
            from engram.store_memory import StoreMemory

            mem = StoreMemory(self.store(), names, sessions, self.version)
        mem.read_scope = self.exp.eval.read_scope
        return mem

    def store(self):
        if self._store is None:
            from memory_store.store import TraceStore

            self._store = TraceStore.open(self.out / "store",
                                          latent_dim=self.model.cfg.key_dim + 1)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # ---- the run -----------------------------------------------------------------------
    @torch.no_grad()
    def run(self, episodes: list[Episode], resume: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        bs = self.exp.eval.batch_size
        batches = [episodes[i:i + bs] for i in range(0, len(episodes), bs)]
        done = self._restore(batches) if resume else self._fresh()
        files = {name: (self.out / name).open("a", encoding="utf-8") for name in FILES}
        try:
            bar = tqdm(total=len(episodes), initial=sum(len(b) for b in batches[:done]),
                       disable=not self.progress, desc=f"eval {self.arm.name}", mininterval=2.0)
            for k in range(done, len(batches)):
                rows = self._batch(batches[k])
                for name in FILES:
                    for row in rows[name]:
                        files[name].write(json.dumps(row, ensure_ascii=False) + "\n")
                self._commit(files, k + 1)
                bar.update(len(batches[k]))
            bar.close()
        finally:
            for f in files.values():
                f.close()
            if self._store is not None:
                self._store.flush()
            self.close()

    def _fresh(self) -> int:
        """A new run replaces whatever an earlier run left in this arm's folder."""
        for name in (*FILES, "progress.json", "summary.json"):
            (self.out / name).unlink(missing_ok=True)
        if (self.out / "store").exists():
            shutil.rmtree(self.out / "store")
        return 0

    def _restore(self, batches: list[list[Episode]]) -> int:
        path = self.out / "progress.json"
        if not path.exists():
            return self._fresh()
        state = json.loads(path.read_text())
        for name in FILES:
            with (self.out / name).open("a") as f:
                f.truncate(state["sizes"][name])
        done = state["batches_done"]
        if done < len(batches) and self.arm.memory == "on":
            self.memory_for(batches[done]).clear()  # the interrupted batch starts over
        return done

    def _commit(self, files, batches_done: int) -> None:
        sizes = {}
        for name, f in files.items():
            f.flush()
            os.fsync(f.fileno())
            sizes[name] = f.tell()
        if self._store is not None:
            self._store.flush()
        tmp = self.out / "progress.json.tmp"
        tmp.write_text(json.dumps({"batches_done": batches_done, "sizes": sizes}))
        os.replace(tmp, self.out / "progress.json")

    # ---- one batch of episodes ---------------------------------------------------------
    def _batch(self, eps: list[Episode]) -> dict[str, list[dict]]:
        mem = self.memory_for(eps)
        out = {name: [] for name in FILES}
        for s in range(max(len(e.sessions) for e in eps)):
            seg = encode_segments(eps, [s], self.seq_len)
            context = self._score_context(seg, mem, s) if self.score_context else None
            written = self._write(eps, seg, mem, s)
            for b, e in enumerate(eps):
                if s < len(e.sessions):
                    row = {"namespace": e.namespace, "session": e.sessions[s].id, "index": s,
                           "segments": int(seg.valid_Bn[b].sum()), "written": written[b]}
                    if context is not None:
                        row["context_bits"], row["context_bytes"] = context[b]
                    out["sessions.jsonl"].append(row)
            probes = encode_probes(eps, [s], self.seq_len)
            if len(probes):
                self._score_probes(eps, probes, mem, out)
        return out

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def _score_context(self, seg, mem, s: int) -> list[tuple[float, int]]:
        """(bits, predicted bytes) of each row's context in session ``s``."""
        B, n = seg.shape
        per_row = [(0.0, 0) for _ in range(B)]
        rows = seg.valid_Bn.flatten().nonzero().flatten()
        if rows.numel() == 0:
            return per_row
        targets = self._to(segment_targets(seg)[rows])
        episode = (rows // n).tolist()
        with autocast(self.device):
            res = self.model(self._to(seg.idx_NS[rows]), memory=mem.rows(episode)
                             if mem is not None else None, session=s, top_k=self.read_cfg.top_k)
        nll = F.cross_entropy(res.out.logits.float().flatten(0, 1), targets.flatten(),
                              ignore_index=-100, reduction="none").view(targets.shape)
        bits = (nll.sum(-1) / LN2).tolist()
        count = (targets != -100).sum(-1).tolist()
        for r, b in enumerate(episode):
            per_row[b] = (per_row[b][0] + bits[r], per_row[b][1] + count[r])
        return per_row

    def _write(self, eps, seg, mem, s: int) -> list[list[str]]:
        """Write session ``s``'s traces the policy keeps; returns their external ids per row."""
        B, n = seg.shape
        if mem is None or n == 0:
            return [[] for _ in range(B)]
        with autocast(self.device):
            tr = self.model.encode_traces(self._to(seg.idx_NS), self._to(seg.mask_NS),
                                          backbone_grad=False)
        sal = tr.salience_N.float().view(B, n).cpu()
        keep = torch.zeros(B, n, dtype=torch.bool)
        for b in range(B):
            valid = seg.valid_Bn[b].nonzero().flatten()
            if valid.numel():
                gen = torch.Generator().manual_seed(zlib.crc32(
                    f"{self.exp.eval.seed}:{eps[b].namespace}:{s}".encode()))
                keep[b, valid] = select(sal[b, valid], self.read_cfg, self.policy, gen).cpu()
        view = lambda t: t.view(B, n, *t.shape[1:])  # noqa: E731
        dates = [e.sessions[s].date if s < len(e.sessions) else None for e in eps]
        mem.write(TraceBatch(view(tr.key_NK), view(tr.hidden_NSD), view(tr.mask_NS),
                             view(tr.tokens_NS), view(tr.salience_N), seg.texts,
                             seg.external_ids, dates), session=s, keep_Bn=keep)
        return [[seg.external_ids[b][j] for j in range(n) if keep[b, j]] for b in range(B)]

    def _score_probes(self, eps, probes, mem, out) -> None:
        targets = self._to(probes.targets_PS)
        answer = self._to(probes.answer_PS)
        reader = mem.rows(probes.row_P) if mem is not None else None
        with autocast(self.device):
            res = self.model(self._to(probes.idx_PS), memory=reader,
                             session=self._to(probes.session_P), top_k=self.read_cfg.top_k)
        logits = res.out.logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none").view(targets.shape)
        pred = logits.argmax(-1)
        exact = ((pred == targets) | ~answer).all(-1).tolist()
        bits = ((nll * answer).sum(-1) / LN2).tolist()
        n_bytes = answer.sum(-1).tolist()
        pred_cpu, answer_cpu = pred.cpu(), answer.cpu()
        retrieved = self._retrievals(res.candidates, reader, probes.first_answer_P)
        for p, ref in enumerate(probes.refs):
            ep, sess = eps[ref.row], eps[ref.row].sessions[ref.session]
            where = {"namespace": ep.namespace, "session": sess.id, "index": ref.session,
                     "probe": ref.index}
            got = bytes(pred_cpu[p][answer_cpu[p]].clamp(0, 255).tolist()).decode(
                "utf-8", "replace")
            ranks = {layer: next((i + 1 for i, t in enumerate(traces)
                                  if t["external_id"] in ref.probe.evidence), None)
                     for layer, traces in retrieved[p].items()} if ref.probe.evidence else {}
            out["probes.jsonl"].append({
                **where, "prompt": ref.probe.prompt, "answer": ref.probe.answer,
                "prediction": got, "exact": bool(exact[p]), "answer_bits": bits[p],
                "answer_bytes": int(n_bytes[p]), "tags": ref.probe.tags,
                "evidence": list(ref.probe.evidence), "evidence_rank": ranks})
            for layer, traces in retrieved[p].items():
                out["retrievals.jsonl"].append({**where, "layer": layer, "traces": traces})

    def _retrievals(self, candidates, reader, first_P) -> list[dict]:
        """Per probe, per read layer: the traces retrieved at the position predicting the
        first answer byte, best first, as the memory itself describes them."""
        out = [{} for _ in range(len(first_P))]
        for layer, cand in candidates.items():
            at = first_P.to(cand.scores_BTM.device)
            scores = cand.scores_BTM[torch.arange(len(first_P)), at].float().cpu()  # (P, M)
            ids = cand.ids_BM.cpu()
            for p in range(len(first_P)):
                order = [m for m in scores[p].argsort(descending=True).tolist()
                         if math.isfinite(scores[p, m])]
                info = reader.describe(p, [int(ids[p, m]) for m in order]) if order else []
                for item, m in zip(info, order, strict=True):
                    item["score"] = round(float(scores[p, m]), 6)
                out[p][str(layer)] = info
        return out
