"""BM25 lexical retrieval (own implementation), scoped like the vector search.

Tokenizer: lowercase word pieces (letters/digits), English possessive and contraction tails
dropped, a small English stopword list removed, and a light suffix stemmer (plural ``s``/``es``,
``ing``, ``ed``, ``ly``) so "paints", "painted" and "painting" meet. Scoring is Okapi BM25
(k1, b) with the Lucene idf ``log(1 + (N - df + 0.5) / (df + 0.5))``; corpus statistics are
those of the namespace. A scoped search accumulates scores only over documents whose scope
code is in the query's scope (filtering inside the search, never a post-filter).

Documents may carry a context field whose term frequencies are down-weighted (BM25F style).
The index is an in-memory cache built from LMDB per namespace on first use and extended by
appends; like the vector index it records the LMDB generation it reflects.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

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
    """Postings of one namespace: token -> (doc rows, term frequencies)."""

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.ids: list[int] = []
        self.codes: list[int] = []
        self.lens: list[int] = []
        self._post: dict[str, tuple[list[int], list[int]]] = {}
        self._frozen: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.generation = 0

    def add(self, doc_id: int, code: int, text: str, context: str = "",
            context_weight: float = 0.0) -> None:
        """Index a document; ``context`` tokens count ``context_weight`` each."""
        row = len(self.ids)
        toks: Counter = Counter(tokenize(text))
        if context and context_weight > 0:
            for tok in tokenize(context):
                toks[tok] += context_weight
        self.ids.append(doc_id)
        self.codes.append(code)
        self.lens.append(sum(toks.values()))
        for tok, tf in toks.items():
            rows, tfs = self._post.setdefault(tok, ([], []))
            rows.append(row)
            tfs.append(tf)
        self._frozen = None

    def _arrays(self):
        if self._frozen is None:
            self._frozen = {t: (np.asarray(r, np.int64), np.asarray(f, np.float32))
                            for t, (r, f) in self._post.items()}
            self._ids = np.asarray(self.ids, np.int64)
            self._codes = np.asarray(self.codes, np.int32)
            lens = np.asarray(self.lens, np.float32)
            avg = float(lens.mean()) if len(lens) else 1.0
            self._norm = self.k1 * (1 - self.b + self.b * lens / max(avg, 1e-9))
        return self._frozen

    def search(self, query: str, scope_codes: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
        """Top-k (scores, ids) among documents whose code is in ``scope_codes``; documents
        sharing no query token are not returned."""
        post = self._arrays()
        n = len(self.ids)
        in_scope = np.isin(self._codes, scope_codes)
        scores = np.zeros(n, np.float32)
        hit = np.zeros(n, bool)
        for tok, qtf in Counter(tokenize(query)).items():
            p = post.get(tok)
            if p is None:
                continue
            rows, tf = p
            keep = in_scope[rows]
            rows, tf = rows[keep], tf[keep]
            if not len(rows):
                continue
            df = len(p[0])
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            scores[rows] += qtf * idf * tf * (self.k1 + 1) / (tf + self._norm[rows])
            hit[rows] = True
        cand = np.flatnonzero(hit)
        if not len(cand):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        s = scores[cand]
        top = cand[np.argsort(-s, kind="stable")[:k]]
        return scores[top], self._ids[top]
