"""Seeded synthetic text in three domains, for routing experiments with domain labels.

* ``arithmetic``: multi-digit sums and products with worked steps.
* ``code``: small Python-like functions (defs, loops, conditionals, returns).
* ``prose``: template sentences over a fixed vocabulary (subjects, verbs, places, times).

Same seed, same text: every generator draws from its own ``random.Random``.
"""

from __future__ import annotations

import random

import torch

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_NOUNS = ["river", "garden", "market", "library", "harbour", "forest", "station", "tower"]
_VERBS = ["walked to", "looked at", "painted", "remembered", "visited", "described", "left"]
_TIMES = ["in the morning", "at dusk", "on monday", "after the rain", "before dinner"]
_ADJS = ["quiet", "old", "bright", "narrow", "crowded", "distant", "green", "cold"]
_FUNCS = ["total", "scale", "merge", "count", "clip", "shift", "mean", "pack"]
_VARS = ["x", "y", "n", "acc", "item", "value", "buf", "idx"]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(10, 9999), rng.randint(10, 999)
    if rng.random() < 0.5:
        lines = [f"Q: {a} + {b} = ?"]
        carry, digits = 0, []
        sa, sb = str(a)[::-1], str(b)[::-1]
        for i in range(max(len(sa), len(sb))):
            da = int(sa[i]) if i < len(sa) else 0
            db = int(sb[i]) if i < len(sb) else 0
            s = da + db + carry
            lines.append(f"  {da} + {db} + {carry} = {s}, write {s % 10}, carry {s // 10}")
            digits.append(str(s % 10))
            carry = s // 10
        if carry:
            digits.append(str(carry))
        lines.append(f"A: {''.join(reversed(digits))}")
    else:
        b = rng.randint(2, 99)
        lines = [f"Q: {a} * {b} = ?"]
        parts = []
        for power, digit in enumerate(reversed(str(b))):
            part = a * int(digit) * 10**power
            parts.append(part)
            lines.append(f"  {a} * {digit}{'0' * power} = {part}")
        lines.append(f"  sum {' + '.join(map(str, parts))} = {sum(parts)}")
        lines.append(f"A: {a * b}")
    return "\n".join(lines) + "\n\n"


def _code(rng: random.Random) -> str:
    f, a, b = rng.choice(_FUNCS), rng.choice(_VARS), rng.choice(_VARS)
    n = rng.randint(1, 9)
    body = [f"def {f}_{n}({a}, {b}={n}):", f"    acc = {rng.randint(0, 5)}"]
    kind = rng.randrange(3)
    if kind == 0:
        body += [f"    for i in range({a}):", f"        acc += i * {b}"]
    elif kind == 1:
        body += [f"    if {a} > {b}:", f"        acc = {a} - {b}", "    else:",
                 f"        acc = {b} - {a}"]
    else:
        body += [f"    while acc < {a}:", f"        acc = acc * 2 + {n}"]
    body.append("    return acc")
    return "\n".join(body) + "\n\n"


def _prose(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        out.append(f"{rng.choice(_NAMES).capitalize()} {rng.choice(_VERBS)} the "
                   f"{rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_TIMES)}.")
    return " ".join(out) + "\n"


GENERATORS = {"arithmetic": _arithmetic, "code": _code, "prose": _prose}


def text(domain: str, seed: int, n_bytes: int) -> str:
    """At least ``n_bytes`` of one domain's text (whole examples), deterministic in seed."""
    if domain not in GENERATORS:
        raise ValueError(f"unknown synthetic domain {domain!r}; one of {sorted(GENERATORS)}")
    rng = random.Random(f"{domain}:{seed}")
    pieces, size = [], 0
    while size < n_bytes:
        piece = GENERATORS[domain](rng)
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def corpus(domain: str, seed: int, n_bytes: int) -> torch.Tensor:
    raw = text(domain, seed, n_bytes).encode("ascii")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
