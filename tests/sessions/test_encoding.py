"""Episodes to tensors (``sessions.encoding``): the batched encoders against a cell-by-cell
reference written from the module's definitions (hypothesis: unicode text, pieces split at
the window, empty sessions, probes whose prompt is cut to fit)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.encoding import (
    IGNORE,
    encode_probes,
    encode_segments,
    probe_bytes,
    session_segments,
)
from sessions.episodes import Episode, Probe, Session

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
ANSWER = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=3)


@st.composite
def batches(draw):
    eps = []
    for b in range(draw(st.integers(1, 4))):
        sessions = tuple(
            Session(f"s{s}", tuple(draw(st.lists(TEXT, max_size=3))),
                    tuple(Probe(draw(TEXT), draw(ANSWER)) for _ in range(draw(st.integers(0, 2)))))
            for s in range(draw(st.integers(1, 3))))
        eps.append(Episode(f"ns{b}", sessions))
    # every answer fits after a prompt byte: 3 characters of at most 4 UTF-8 bytes, + 1
    return eps, draw(st.integers(13, 24))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_segments_match_a_cell_by_cell_reference(case):
    eps, seq_len = case
    sessions = list(range(max(len(e.sessions) for e in eps)))
    seg = encode_segments(eps, sessions, seq_len)
    B, n = seg.valid_Bn.shape
    assert B == len(eps) and seg.idx_NS.shape[0] == B * n
    assert (seg.idx_NS.dtype, seg.mask_NS.dtype) == (torch.long, torch.bool)
    assert (seg.valid_Bn.dtype, seg.session_Bn.dtype) == (torch.bool, torch.long)
    for b, ep in enumerate(eps):
        pieces = [(s, eid, t) for s in sessions if s < len(ep.sessions)
                  for eid, t in session_segments(ep.sessions[s], seq_len)]
        for j in range(n):
            row = b * n + j
            if j >= len(pieces):
                assert not seg.valid_Bn[b, j] and not seg.mask_NS[row].any()
                assert not seg.idx_NS[row].any() and seg.texts[b][j] == ""
                assert int(seg.session_Bn[b, j]) == 0 and seg.external_ids[b][j] == ""
                continue
            s, eid, text = pieces[j]
            raw = text.encode("utf-8")
            assert len(raw) <= seq_len
            assert seg.valid_Bn[b, j] and int(seg.session_Bn[b, j]) == s
            assert (seg.texts[b][j], seg.external_ids[b][j]) == (text, eid)
            assert int(seg.mask_NS[row].sum()) == len(raw)
            assert bool(seg.mask_NS[row, :len(raw)].all())
            assert bytes(seg.idx_NS[row, :len(raw)].tolist()) == raw
            assert not seg.idx_NS[row, len(raw):].any()


@settings(max_examples=80, deadline=None)
@given(batches(), st.sampled_from(["all", "last", "first and last", "odd rows"]))
def test_probes_match_a_cell_by_cell_reference(case, which):
    """All probes, those of some sessions (``sessions``), or a ``select``ed few."""
    eps, seq_len = case
    n_sessions = max(len(e.sessions) for e in eps)
    sessions = {"all": None, "last": [n_sessions - 1], "first and last": [0, n_sessions - 1],
                "odd rows": None}[which]
    select = (lambda r: r.row % 2 == 1) if which == "odd rows" else None  # noqa: E731
    probes = encode_probes(eps, sessions, seq_len, select)
    refs = [(b, s, p) for b, ep in enumerate(eps) for s, sess in enumerate(ep.sessions)
            for p in sess.probes if (sessions is None or s in sessions)
            and (select is None or b % 2 == 1)]
    assert len(probes) == len(refs)
    assert (probes.idx_PS.dtype, probes.targets_PS.dtype, probes.answer_PS.dtype,
            probes.first_answer_P.dtype) == (torch.long, torch.long, torch.bool, torch.long)
    if not refs:
        return
    width = probes.idx_PS.shape[1]
    for r, (b, s, probe) in enumerate(refs):
        seq, start = probe_bytes(probe, seq_len)
        assert seq.endswith(probe.answer.encode("utf-8")) and len(seq) - 1 <= width
        assert probes.row_P[r] == b and int(probes.session_P[r]) == s
        assert bytes(probes.idx_PS[r, :len(seq) - 1].tolist()) == seq[:-1]
        for t in range(width):
            target = seq[t + 1] if t < len(seq) - 1 else IGNORE
            assert int(probes.targets_PS[r, t]) == target, (r, t)
            assert bool(probes.answer_PS[r, t]) == (start - 1 <= t < len(seq) - 1), (r, t)
        assert int(probes.first_answer_P[r]) == start - 1
        answer = bytes(probes.targets_PS[r][probes.answer_PS[r]].tolist())
        assert answer == probe.answer.encode("utf-8")


def test_an_answer_too_long_for_the_window_is_named():
    ep = Episode("ns", (Session("s0", (), (Probe("q", "x" * 20),)),))
    with pytest.raises(ValueError, match=r"ns/s0/probes\[0\].*seq_len=8"):
        encode_probes([ep], None, 8)


def test_an_empty_prompt_is_named():
    ep = Episode("ns", (Session("s0", (), (Probe("", "ab"),)),))
    with pytest.raises(ValueError, match=r"ns/s0/probes\[0\].*prompt is empty"):
        encode_probes([ep], None, 8)


def test_a_batch_without_context_has_no_slots():
    ep = Episode("ns", (Session("s0", (), (Probe("q", "a"),)),))
    seg = encode_segments([ep], [0], 16)
    assert seg.valid_Bn.shape == (1, 0) and seg.idx_NS.shape[0] == 0
    # input position 0 ("q") predicts the answer's first byte
    assert torch.equal(encode_probes([ep], [0], 16).first_answer_P, torch.tensor([0]))
