"""BM25 lexical retrieval (own implementation), scoped like the vector search.

Tokenizer: lowercase word pieces (letters/digits), English possessive and contraction tails
dropped, a small English stopword list removed, and a light suffix stemmer (plural ``s``/``es``,
``ing``, ``ed``, ``ly``) so "paints", "painted" and "painting" meet. Scoring is Okapi BM25
(k1, b) with the Lucene idf ``log(1 + (N - df + 0.5) / (df + 0.5))``; corpus statistics are
those of the namespace. A scoped search accumulates scores only over documents whose scope
code is in the query's scope (filtering inside the search, never a post-filter).

Documents may carry context fields whose term frequencies are down-weighted (BM25F style).
The index is an in-memory cache built from LMDB per namespace on first use; like the vector
index it records the LMDB generation (of its namespace) it reflects, and appends to the
namespace are applied to it in place (``search.py``). It keeps each document's
times and speaker, so a search applies the scope's time window and hidden ids in the scoring
loop, and hybrid search can find the traces of a speaker named in the query.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from .index import NO_FILTER, RowFilter

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself
just me more most my myself no nor not now of off on once only or other our ours ourselves out
over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves s t d ll m re ve
""".split())


def stem(w: str) -> str:
    """A deliberately light stemmer: enough to join inflections, never below 3 letters."""
    for suf, rep in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("ly", ""), ("s", "")):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            w = w[: len(w) - len(suf)] + rep
            if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":  # running -> run
                w = w[:-1]
            return w
    return w


def tokenize(text: str) -> list[str]:
    out = []
    for tok in _WORD.findall(text.lower()):
        tok = tok.split("'", 1)[0]
        if tok and tok not in STOPWORDS:
            out.append(stem(tok))
    return out


class BM25Index:
    """Postings of one namespace: token -> (doc rows, term frequencies).

    Rows are appended; ``remove`` marks a row dead (its terms leave the document
    frequencies and the length statistics) and a replaced document is added again as a new
    row, so statistics and scores always equal those of an index built from the live
    documents alone. Ties are ordered by document id."""

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.ids: list[int] = []
        self.codes: list[int] = []
        self.lens: list[float] = []
        self.rec: list[float] = []
        self.hap: list[float] = []
        self.live: list[bool] = []
        self.row_of: dict[int, int] = {}  # live document id -> row
        self.speaker_of: dict[int, str] = {}  # live document id -> lowercased speaker
        self.after: dict[int, list[int]] = {}  # id -> ids whose previous turns include it
        self._row_toks: list[Counter] = []
        self._df: Counter = Counter()
        self._post: dict[str, tuple[list[int], list[float]]] = {}
        self._frozen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._dirty: set[str] = set()
        self._stale = True
        self.generation = 0

    def add(self, doc_id: int, code: int, text: str,
            fields: list[tuple[str, float]] = (), recorded_at: float = 0.0,
            happened_at: float = math.nan, speaker: str | None = None) -> None:
        """Index a document (replacing a live one of the same id); the tokens of each
        ``(text, weight)`` field count ``weight``."""
        if doc_id in self.row_of:
            self.remove(doc_id)
        row = len(self.ids)
        toks: Counter = Counter(tokenize(text))
        for field_text, weight in fields:
            if field_text and weight > 0:
                for tok in tokenize(field_text):
                    toks[tok] += weight
        self.ids.append(doc_id)
        self.codes.append(code)
        self.lens.append(sum(toks.values()))
        self.rec.append(recorded_at)
        self.hap.append(happened_at)
        self.live.append(True)
        self.row_of[doc_id] = row
        if speaker:
            self.speaker_of[doc_id] = speaker.lower()
        self._row_toks.append(toks)
        post = self._post
        for tok, tf in toks.items():
            p = post.get(tok)
            if p is None:
                p = post[tok] = ([], [])
            p[0].append(row)
            p[1].append(tf)
        self._df.update(toks.keys())
        self._dirty.update(toks)
        self._stale = True

    def remove(self, doc_id: int) -> None:
        row = self.row_of.pop(doc_id, None)
        if row is None:
            return
        self.live[row] = False
        self.speaker_of.pop(doc_id, None)
        for tok in self._row_toks[row]:
            self._df[tok] -= 1
        self._row_toks[row] = Counter()
        self._stale = True

    def _arrays(self):
        for tok in self._dirty:
            rows, tfs = self._post[tok]
            self._frozen[tok] = (np.asarray(rows, np.int64), np.asarray(tfs, np.float32))
        self._dirty.clear()
        if self._stale:
            self._ids = np.asarray(self.ids, np.int64)
            self._codes = np.asarray(self.codes, np.int32)
            self._rec = np.asarray(self.rec, np.float64)
            self._hap = np.asarray(self.hap, np.float64)
            self._live = np.asarray(self.live, bool)
            lens = np.asarray(self.lens, np.float64)
            avg = float(lens[self._live].mean()) if self._live.any() else 1.0
            self._norm = (self.k1 * (1 - self.b + self.b * lens / max(avg, 1e-9))).astype(
                np.float32)
            self._stale = False
        return self._frozen

    def speaker_ids(self, query: str) -> set[int]:
        """Ids of the documents of the one speaker the query names (empty when it names
        none or several)."""
        words = set(re.findall(r"[a-z0-9]+", query.lower()))
        speakers = set(self.speaker_of.values())
        named = [s for s in speakers if set(re.findall(r"[a-z0-9]+", s)) <= words]
        if len(named) != 1:
            return set()
        return {i for i, s in self.speaker_of.items() if s == named[0]}

    def search(self, query: str, scope_codes: np.ndarray, k: int,
               filt: RowFilter = NO_FILTER, keep_ties: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) among live documents whose code is in ``scope_codes`` and that
        pass ``filt``; documents sharing no query token are not returned. ``keep_ties``:
        also return the documents tied with the k-th."""
        post = self._arrays()
        n = len(self.row_of)
        in_scope = np.isin(self._codes, scope_codes) & self._live
        if filt.active:
            in_scope &= filt.mask(self._ids, self._rec, self._hap)
        scores = np.zeros(len(self.ids), np.float32)
        hit = np.zeros(len(self.ids), bool)
        for tok, qtf in Counter(tokenize(query)).items():
            p = post.get(tok)
            if p is None or not self._df[tok]:
                continue
            rows, tf = p
            keep = in_scope[rows]
            rows, tf = rows[keep], tf[keep]
            if not len(rows):
                continue
            df = self._df[tok]
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            scores[rows] += qtf * idf * tf * (self.k1 + 1) / (tf + self._norm[rows])
            hit[rows] = True
        cand = np.flatnonzero(hit)
        if not len(cand):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        s = scores[cand]
        order = np.lexsort((self._ids[cand], -s))
        cut = min(k, len(order))
        if keep_ties:
            while cut < len(order) and s[order[cut]] == s[order[cut - 1]]:
                cut += 1
        top = cand[order[:cut]]
        return scores[top], self._ids[top]
