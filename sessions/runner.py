"""The experiment runner: episodes through a model and a memory, session by session.

For each batch of episodes (one namespace each) and each session in order:
  1. score the context segments reading memory (tasks that measure context bits/byte);
  2. encode the segments into traces (the backbone alone), let the arm's write policy choose,
     and ``write`` them — the scope later sessions read;
  3. score the probes reading memory (namespace = the episode's, sessions before this one):
     exact match (every answer byte the argmax under teacher forcing, which is what greedy
     decoding of the answer produces) and answer bits per byte; log what each read layer
     retrieved at the position that predicts the first answer byte.
Before 1., a session's generation requests (``Session.generate``) are decoded greedily
(reading memory) and ``prompt + generation`` joins the session's context, so the model's own
worked solution is what the write policy may persist. The memory is a ``MemoryBackend``
(``StoreMemory`` on the run's LMDB + FAISS store, a ``TensorMemory``, or for the ``knn``
anchor arm a ``KNNMemory`` of every token); nothing below ``memory_for`` knows which.
Tasks may add: ``byte_classifier(episode, s)`` (context bits per byte by class of position)
and ``text_retrieval = True`` (log what the store's own text search returns for each probe).

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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engram.backends import TensorMemory, TraceBatch
from engram.knn_memory import KNNMemory, encode_all_tokens, footprint_bytes
from engram.model import EngramModel, model_version
from engram.write import select
from sessions.encoding import Probes, encode_probes, encode_segments, segment_targets
from sessions.episodes import Episode, segment_id
from sessions.trainer import autocast

FILES = ("probes.jsonl", "sessions.jsonl", "retrievals.jsonl")
LN2 = math.log(2)
CONTEXT_CHUNK = 32  # context segments scored per forward
PROBE_CHUNK = 32  # probes scored per forward
TEXT_TOP_K = 10  # hits of the store's text search logged per probe (text_retrieval tasks)


@dataclass(frozen=True)
class Arm:
    name: str  # off | trained-off | on | on:<policy>
    memory: str  # off (module absent) | trained-off (present, reads nothing) | on
    policy: str | None = None  # the write policy of an `on` arm (None: the model's own)
    backend: str | None = None  # "knn": the all-tokens anchor memory (None: eval.backend)

    @classmethod
    def parse(cls, name: str) -> Arm:
        from sessions.experiment import parse_arm

        memory, policy = parse_arm(name)
        return cls(name, memory, policy, "knn" if name == "knn" else None)


def probe_slice(probes: Probes, start: int, stop: int) -> Probes:
    """Probes ``start:stop`` of an encoded set (rows keep their episode indices)."""
    cut = slice(start, stop)
    return Probes(probes.idx_PS[cut], probes.targets_PS[cut], probes.answer_PS[cut],
                  probes.first_answer_P[cut], probes.row_P[cut], probes.session_P[cut],
                  probes.refs[cut])


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
        self.task = exp.make_task("eval")
        self.score_context = bool(getattr(self.task, "score_context", False))
        self.text_retrieval = bool(getattr(self.task, "text_retrieval", False))
        self._store = None

    # ---- memory ------------------------------------------------------------------------
    def memory_for(self, eps: list[Episode]):
        """The backend these episodes read and write (None: the arm reads nothing)."""
        if self.arm.memory != "on":
            return None
        names = [e.namespace for e in eps]
        sessions = [[s.id for s in e.sessions] for e in eps]
        prior = self.model.cfg.salience_in_read
        if self.arm.backend == "knn":
            return KNNMemory(len(eps), self.model.backbone.cfg.d_model, self.model.cfg.key_dim,
                             self.seq_len, self.device, namespaces=names,
                             session_names=sessions, salience_prior=prior)
        if self.exp.eval.backend == "tensor":
            mem = TensorMemory(len(eps), self.model.backbone.cfg.d_model, self.model.cfg.key_dim,
                               min(self.model.cfg.max_trace_tokens, self.seq_len), self.device,
                               namespaces=names, session_names=sessions, salience_prior=prior)
        else:
            from engram.store_memory import StoreMemory

            mem = StoreMemory(self.store(), names, sessions, self.version, salience_prior=prior)
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
        eps = list(eps)  # sessions are replaced by their generated form as they run
        for s in range(max(len(e.sessions) for e in eps)):
            generated = self._generate(eps, mem, s)
            seg = encode_segments(eps, [s], self.seq_len)
            context = self._score_context(eps, seg, mem, s) if self.score_context else None
            written, stored = self._write(eps, seg, mem, s)
            for b, e in enumerate(eps):
                if s < len(e.sessions):
                    row = {"namespace": e.namespace, "session": e.sessions[s].id, "index": s,
                           "segments": int(seg.valid_Bn[b].sum()), "written": written[b],
                           **stored[b]}
                    if context is not None:
                        row["context_bits"], row["context_bytes"] = context[b][:2]
                        if context[b][2]:
                            row["context_by_class"] = context[b][2]
                    if generated[b]:
                        row["generated"] = generated[b]
                    out["sessions.jsonl"].append(row)
            probes = encode_probes(eps, [s], self.seq_len)
            for c in range(0, len(probes), PROBE_CHUNK):  # bounded memory per forward
                self._score_probes(eps, probe_slice(probes, c, c + PROBE_CHUNK), mem, out)
        return out

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def _score_context(self, eps, seg, mem, s: int) -> list[tuple[float, int, dict]]:
        """(bits, predicted bytes, {class: [bits, bytes]}) of each row's context in session
        ``s`` (classes when the task labels positions), ``CONTEXT_CHUNK`` segments at a time
        (reading all of a large memory costs rows × tokens × memory tokens)."""
        B, n = seg.shape
        per_row = [[0.0, 0, {}] for _ in range(B)]
        rows = seg.valid_Bn.flatten().nonzero().flatten()
        classify = getattr(self.task, "byte_classifier", None)
        classifiers = {}
        for c in range(0, rows.numel(), CONTEXT_CHUNK):
            chunk = rows[c:c + CONTEXT_CHUNK]
            targets = segment_targets(seg)[chunk]
            episode = (chunk // n).tolist()
            with autocast(self.device):
                res = self.model(self._to(seg.idx_NS[chunk]), memory=mem.rows(episode)
                                 if mem is not None else None, session=s,
                                 top_k=self.read_cfg.top_k)
            nll_bits = (F.cross_entropy(res.out.logits.float().flatten(0, 1),
                                        self._to(targets).flatten(), ignore_index=-100,
                                        reduction="none").view(targets.shape) / LN2).cpu()
            valid = targets != -100
            for r, b in enumerate(episode):
                acc = per_row[b]
                acc[0] += float(nll_bits[r][valid[r]].sum())
                acc[1] += int(valid[r].sum())
                if classify is None or s == 0:
                    continue
                if b not in classifiers:
                    classifiers[b] = classify(eps[b], s)
                j = int(chunk[r]) % n
                labels = classifiers[b](seg.texts[b][j])[1:]  # target t is byte t + 1
                for label, bits in zip(labels, nll_bits[r][:len(labels)].tolist(),
                                       strict=True):
                    cell = acc[2].setdefault(label, [0.0, 0])
                    cell[0] += bits
                    cell[1] += 1
        return [(bits, count, {k: [round(v[0], 6), v[1]] for k, v in sorted(by.items())})
                for bits, count, by in per_row]

    def _generate(self, eps: list[Episode], mem, s: int) -> list[list[dict]]:
        """Decode session ``s``'s generation requests greedily, reading memory; replace the
        session in ``eps`` by one whose context ends with ``prompt + generation``. Arms that
        write nothing skip decoding (nothing they score depends on it)."""
        asks = [(b, g) for b, e in enumerate(eps) if s < len(e.sessions)
                for g in e.sessions[s].generate]
        if not asks:
            return [[] for _ in eps]
        texts = self.generate([g for _, g in asks], [b for b, _ in asks], mem, s) \
            if mem is not None else None
        out, added = [[] for _ in eps], [[] for _ in eps]
        for i, (b, g) in enumerate(asks):
            sess = eps[b].sessions[s]
            if texts is None:
                continue
            seg_id = segment_id(sess.id, len(sess.context) + len(added[b]))
            added[b].append(g.prompt + texts[i])
            out[b].append({"id": seg_id, "text": texts[i], "reference": g.reference,
                           "exact": texts[i].removesuffix(g.stop) == g.reference,
                           "answer_correct": bool(g.answer) and
                           texts[i].removesuffix(g.stop).endswith(g.answer)})
        for b, e in enumerate(eps):
            if s < len(e.sessions) and e.sessions[s].generate:
                sess = replace(e.sessions[s], context=e.sessions[s].context + tuple(added[b]),
                               generate=())
                eps[b] = replace(e, sessions=e.sessions[:s] + (sess,) + e.sessions[s + 1:])
        return out

    def generate(self, asks, rows: list[int], mem, s: int) -> list[str]:
        """Greedy decoding of every ask (batch row ``rows[i]``'s memory), one byte a step for
        all asks at once, until each one's stop string or ``max_bytes``."""
        prompts = [bytearray(g.prompt.encode("utf-8")) for g in asks]
        start = [len(p) for p in prompts]
        done = [False] * len(asks)
        reader = mem.rows(rows) if mem is not None else None
        for _ in range(max(g.max_bytes for g in asks)):
            live = [i for i in range(len(asks)) if not done[i]]
            if not live:
                break
            seqs = [bytes(prompts[i][-self.seq_len:]) for i in live]
            width = max(len(x) for x in seqs)
            idx = torch.zeros(len(live), width, dtype=torch.long)
            for r, x in enumerate(seqs):
                idx[r, :len(x)] = torch.tensor(list(x), dtype=torch.long)
            last = torch.tensor([len(x) - 1 for x in seqs])
            with autocast(self.device):
                res = self.model(self._to(idx), memory=reader.rows(live) if reader else None,
                                 session=s, top_k=self.read_cfg.top_k)
            nxt = res.out.logits[torch.arange(len(live)), self._to(last)].argmax(-1).tolist()
            for i, byte in zip(live, nxt, strict=True):
                prompts[i].append(byte)
                gen = bytes(prompts[i][start[i]:])
                stop = asks[i].stop.encode("utf-8")
                done[i] = (bool(stop) and gen.endswith(stop)) or len(gen) >= asks[i].max_bytes
        return [bytes(p[start[i]:]).decode("utf-8", "replace") for i, p in enumerate(prompts)]

    def _write(self, eps, seg, mem, s: int) -> tuple[list[list[str]], list[dict]]:
        """Write session ``s``'s traces the policy keeps; returns their external ids per row
        and what each row's memory now holds more (tokens, bytes: ``footprint_bytes``)."""
        B, n = seg.shape
        if mem is None or n == 0:
            return [[] for _ in range(B)], [{} for _ in range(B)]
        with autocast(self.device):
            if self.arm.backend == "knn":
                tr = encode_all_tokens(self.model, self._to(seg.idx_NS), self._to(seg.mask_NS))
            else:
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
        if self.arm.backend == "knn":
            keep = seg.valid_Bn.clone()  # no write policy
        view = lambda t: t.view(B, n, *t.shape[1:])  # noqa: E731
        dates = [e.sessions[s].date if s < len(e.sessions) else None for e in eps]
        mem.write(TraceBatch(view(tr.key_NK), view(tr.hidden_NSD), view(tr.mask_NS),
                             view(tr.tokens_NS), view(tr.salience_N), seg.texts,
                             seg.external_ids, dates), session=s, keep_Bn=keep)
        tokens = (tr.mask_NS.view(B, n, -1).sum(-1).cpu() * keep).sum(-1).tolist()
        traces = keep.sum(-1).tolist()
        stored = [{"written_tokens": int(tokens[b]), "memory_bytes": footprint_bytes(
            int(tokens[b]), int(traces[b]), self.model.backbone.cfg.d_model,
            self.model.cfg.key_dim)} for b in range(B)]
        return [[seg.external_ids[b][j] for j in range(n) if keep[b, j]]
                for b in range(B)], stored

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
        text_hits = self._text_search(eps, probes) if self.text_retrieval else None
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
                "evidence": list(ref.probe.evidence), "evidence_rank": ranks,
                **({"text_retrieved": text_hits[p]} if text_hits is not None else {})})
            for layer, traces in retrieved[p].items():
                out["retrievals.jsonl"].append({**where, "layer": layer, "traces": traces})

    def _text_search(self, eps, probes) -> list[list[str]] | None:
        """Per probe: external ids of the store's own text search (``TraceStore.search``,
        its default mode) for the probe's prompt over the namespace's earlier sessions."""
        if self.arm.memory != "on" or self._store is None:
            return None
        from memory_store.scope import Scope

        store, out = self._store, []
        for ref in probes.refs:
            ep = eps[ref.row]
            present = {x.session for x in store.sessions(ep.namespace)} \
                if ep.namespace in store.namespaces() else set()
            earlier = tuple(x.id for x in ep.sessions[:ref.session] if x.id in present)
            hits = store.search(ref.probe.prompt, Scope(ep.namespace, sessions=earlier),
                                k=TEXT_TOP_K) if earlier else []
            out.append([h.external_id or h.meta.get("external_id") for h in hits])
        return out

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
