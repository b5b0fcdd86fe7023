"""Episodes to tensors: context segments and probes as right-padded byte rows.

* A context segment longer than the model's window is split (at character boundaries) into
  pieces of at most ``seq_len`` bytes; piece i > 0 of segment j gets the external id
  ``"<session>/<j>.<i>"`` (piece 0 keeps ``"<session>/<j>"``, what evidence names).
* A probe is ``prompt + answer`` bytes; inputs are all but the last byte, targets all but the
  first, and the answer positions are the targets that are answer bytes. A prompt too long
  for the window keeps its last bytes; an answer that cannot fit is an error.

Rows are padded on the right (the model is causal: padding after a segment changes nothing
before it); padded targets are ``-100`` (ignored by the loss). Every tensor is made whole from
Python lists and lengths, not element by element: a training batch has ~10³ rows, and one
indexing op per row and slot cost ~25k tensor ops (tens of ms) a step.

Shapes: N segment rows, P probe rows, S bytes per row, B episodes, n segment slots per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sessions.episodes import Episode, Probe, segment_id

IGNORE = -100


def split_segment(text: str, max_bytes: int) -> list[str]:
    """``text`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut between characters."""
    if text and len(text.encode("utf-8")) <= max_bytes:  # most segments fit whole
        return [text]
    pieces, cur, size = [], [], 0
    for ch in text:
        n = len(ch.encode("utf-8"))
        if size + n > max_bytes and cur:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += n
    if cur:
        pieces.append("".join(cur))
    return pieces


def session_segments(session, seq_len: int) -> list[tuple[str, str]]:
    """(external id, text) of every piece of a session's context."""
    out = []
    for j, text in enumerate(session.context):
        for i, piece in enumerate(split_segment(text, seq_len)):
            base = segment_id(session.id, j)
            out.append((base if i == 0 else f"{base}.{i}", piece))
    return out


def _rows(byte_rows: list[bytes], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, mask) of byte rows right-padded to ``width`` (>= every row's length): each row's
    bytes are a prefix, so the mask's True cells in row-major order are the joined bytes."""
    lengths = torch.tensor([len(r) for r in byte_rows], dtype=torch.long)
    mask = torch.arange(width) < lengths[:, None]
    idx = torch.zeros(len(byte_rows), width, dtype=torch.long)
    joined = b"".join(byte_rows)
    if joined:
        idx[mask] = torch.frombuffer(bytearray(joined), dtype=torch.uint8).long()
    return idx, mask


@dataclass
class Segments:
    """Context pieces of some sessions of B episodes in an (B, n) slot layout."""

    idx_NS: torch.Tensor  # (B·n, S) bytes, right-padded
    mask_NS: torch.Tensor  # valid bytes
    valid_Bn: torch.Tensor  # slot holds a piece (False: padding slot)
    session_Bn: torch.Tensor  # the session index each slot belongs to
    texts: list[list[str]]
    external_ids: list[list[str]]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid_Bn.shape)


def encode_segments(episodes: list[Episode], sessions: list[int], seq_len: int) -> Segments:
    """The pieces of sessions ``sessions`` (indices) of every episode, slot-aligned per row."""
    per_row = []
    for ep in episodes:
        row = []
        for s in sessions:
            if s < len(ep.sessions):
                row += [(s, eid, t) for eid, t in session_segments(ep.sessions[s], seq_len)]
        per_row.append(row)
    B, n = len(episodes), max((len(r) for r in per_row), default=0)
    pad = [(0, "", "")]  # an empty slot: session 0, no id, no text
    slots = [row + pad * (n - len(row)) for row in per_row]
    raw = [text.encode("utf-8") for row in slots for _, _, text in row]
    valid = torch.tensor([[j < len(row) for j in range(n)] for row in per_row],
                         dtype=torch.bool).view(B, n)
    sess = torch.tensor([[s for s, _, _ in row] for row in slots], dtype=torch.long).view(B, n)
    texts = [[text for _, _, text in row] for row in slots]
    ids = [[eid for _, eid, _ in row] for row in slots]
    width = max((len(r) for r in raw), default=1) or 1
    idx, mask = _rows(raw, width)
    return Segments(idx, mask, valid, sess, texts, ids)


@dataclass
class ProbeRef:
    row: int  # episode row in the batch
    session: int  # session index
    index: int  # probe index within the session
    probe: Probe


@dataclass
class Probes:
    idx_PS: torch.Tensor
    targets_PS: torch.Tensor  # next bytes, IGNORE at padding
    answer_PS: torch.Tensor  # targets that are answer bytes
    first_answer_P: torch.Tensor  # input position predicting the first answer byte
    row_P: list[int]
    session_P: torch.Tensor
    refs: list[ProbeRef]

    def __len__(self) -> int:
        return len(self.refs)


def probe_bytes(probe: Probe, seq_len: int, where: str = "probe") -> tuple[bytes, int]:
    """(prompt + answer bytes fitted to the window, index where the answer starts)."""
    prompt, answer = probe.prompt.encode("utf-8"), probe.answer.encode("utf-8")
    if not prompt:  # the first answer byte is predicted from the last prompt byte
        raise ValueError(f"{where}: the prompt is empty; a probe needs at least one prompt "
                         "byte before its answer")
    if len(answer) + 1 > seq_len:
        raise ValueError(f"{where}: answer of {len(answer)} bytes does not fit the model's "
                         f"window (ModelConfig.seq_len={seq_len}) after a prompt byte")
    keep = seq_len + 1 - len(answer)
    prompt = prompt[-keep:]
    return prompt + answer, len(prompt)


def encode_probes(episodes: list[Episode], sessions: list[int] | None, seq_len: int,
                  select=None) -> Probes:
    """The probes of sessions ``sessions`` (None: all) of every episode; ``select(ref)``
    may drop some (training samples a few per episode)."""
    refs = []
    for b, ep in enumerate(episodes):
        for s, sess in enumerate(ep.sessions):
            if sessions is not None and s not in sessions:
                continue
            for i, p in enumerate(sess.probes):
                ref = ProbeRef(b, s, i, p)
                if select is None or select(ref):
                    refs.append(ref)
    seqs = [probe_bytes(r.probe, seq_len, f"{episodes[r.row].namespace}/"
                        f"{episodes[r.row].sessions[r.session].id}/probes[{r.index}]")
            for r in refs]
    width = max((len(s) - 1 for s, _ in seqs), default=1) or 1
    full, _ = _rows([s for s, _ in seqs], width + 1)
    # targets past each row's last byte are padding; the answer is targets[start-1, len-1)
    ends = torch.tensor([len(seq) - 1 for seq, _ in seqs], dtype=torch.long).view(-1, 1)
    first = torch.tensor([start - 1 for _, start in seqs], dtype=torch.long)
    pos = torch.arange(width)
    idx, targets = full[:, :-1].clone(), full[:, 1:].masked_fill(pos >= ends, IGNORE)
    answer = (pos >= first.view(-1, 1)) & (pos < ends)
    return Probes(idx, targets, answer, first, [r.row for r in refs],
                  torch.tensor([r.session for r in refs], dtype=torch.long), refs)


def segment_targets(seg: Segments) -> torch.Tensor:
    """Next-byte targets of segment rows (IGNORE past each segment's end)."""
    targets = torch.full_like(seg.idx_NS, IGNORE)
    targets[:, :-1] = seg.idx_NS[:, 1:].masked_fill(~seg.mask_NS[:, 1:], IGNORE)
    return targets
