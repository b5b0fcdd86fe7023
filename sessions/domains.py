"""Multi-domain text with real domain labels (``train.data=domains``), built offline.

Three domains, labelled by index in ``DOMAIN_NAMES`` (so a router with ``n_domains >= 3``
can learn label ``d`` as its domain ``d``):

* ``literature`` — the 42 works of the Shakespeare corpus (``engram data prepare`` puts them
  in ``cache/shakespeare/works/``; nothing is fetched here).
* ``code`` — the ``.py`` files of the standard library of the interpreter running the job
  (``sysconfig`` ``stdlib``; test folders, ``site-packages`` and ``__pycache__`` left out).
  The interpreter's version is recorded in ``meta``: another Python gives other code.
* ``arithmetic`` — seeded worked sums and products (``sessions.synthetic``).

Fixed split by file: a work or a source file is held out when the first 8 hex digits of the
SHA-256 of its name (the work's stem, or the path relative to the stdlib folder) are 0 mod 10
(``is_held_out``) — about one file in ten, the same on every machine for the same files.
Arithmetic is generated: training text from seed ``s``, held-out text from seed ``s + 10_007``.

Mixed items blend two domains; they are made from held-out sources only and are never trained
on (``MIXED_PAIRS``):

* ``verse_code`` (code + literature): held-out stdlib files whose comments and string
  literals are replaced by held-out verse lines;
* ``prose_arithmetic`` (arithmetic + literature): worked sums and products told as prose,
  with the names and nouns of the plays;
* ``arithmetic_code`` (code + arithmetic): Python functions whose comments, docstrings and
  asserts carry worked arithmetic.
"""

from __future__ import annotations

import hashlib
import io
import platform
import random
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from sessions import synthetic

DOMAIN_NAMES = ("literature", "code", "arithmetic")
MIXED_PAIRS = {"verse_code": ("code", "literature"),
               "prose_arithmetic": ("arithmetic", "literature"),
               "arithmetic_code": ("code", "arithmetic")}
HELD_OUT_MODULUS = 10
HELD_OUT_SEED_OFFSET = 10_007
ARITHMETIC_BYTES = (1_000_000, 100_000)  # (train, held out)
MIXED_BYTES = 60_000  # per mixed kind
_SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}


def is_held_out(name: str) -> bool:
    """The fixed split: a file is held out when sha256(name) (first 8 hex) ≡ 0 mod 10."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % HELD_OUT_MODULUS == 0


@dataclass
class DomainCorpus:
    """Bytes per domain and split, the mixed items, and what they were made from."""

    train: dict[str, bytes]
    held_out: dict[str, bytes]
    mixed: dict[str, bytes]
    meta: dict = field(default_factory=dict)


def stdlib_files(root: Path | None = None) -> list[tuple[str, bytes]]:
    """(path relative to the stdlib folder, bytes) of every standard-library ``.py`` file,
    sorted by path (tests, site-packages and caches left out)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        out.append((rel.as_posix(), path.read_bytes().replace(b"\r\n", b"\n")))
    if not out:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    return out


def literature_works(cache_dir: Path) -> list[tuple[str, bytes]]:
    """(work stem, bytes) of the prepared Shakespeare works, sorted by name."""
    from sessions.data import prepare_shakespeare

    folder = prepare_shakespeare(Path(cache_dir), quiet=True) / "works"
    works = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not works:
        raise FileNotFoundError(f"{folder}: no works; run `engram data prepare` again "
                                "(the cache predates the per-work files)")
    return [(p.stem, p.read_bytes()) for p in works]


def _split(files: list[tuple[str, bytes]]) -> tuple[list, list]:
    train = [f for f in files if not is_held_out(f[0])]
    held = [f for f in files if is_held_out(f[0])]
    if not train or not held:
        raise ValueError(f"the split by file left {len(train)} train / {len(held)} held-out "
                         "files: too few files")
    return train, held


def _join(files: list[tuple[str, bytes]]) -> bytes:
    return b"\n".join(data.rstrip(b"\n") + b"\n" for _, data in files)


def build(cache_dir: Path = Path("cache"), seed: int = 0) -> DomainCorpus:
    """The corpus: deterministic in the prepared works, the interpreter's stdlib and seed."""
    lit_train, lit_held = _split(literature_works(cache_dir))
    code_train, code_held = _split(stdlib_files())
    arith = {split: synthetic.text("arithmetic", s, n).encode("ascii")
             for split, s, n in (("train", seed, ARITHMETIC_BYTES[0]),
                                 ("held_out", seed + HELD_OUT_SEED_OFFSET, ARITHMETIC_BYTES[1]))}
    verses = verse_lines(_join(lit_held).decode("utf-8", "replace"))
    rng = random.Random(f"mixed:{seed}")
    mixed = {"verse_code": verse_code(code_held, verses, rng, MIXED_BYTES),
             "prose_arithmetic": prose_arithmetic(rng, MIXED_BYTES),
             "arithmetic_code": arithmetic_code(rng, MIXED_BYTES)}
    train = {"literature": _join(lit_train), "code": _join(code_train),
             "arithmetic": arith["train"]}
    held = {"literature": _join(lit_held), "code": _join(code_held),
            "arithmetic": arith["held_out"]}
    meta = {"python": platform.python_version(), "stdlib": sysconfig.get_paths()["stdlib"],
            "seed": seed, "held_out_rule": f"sha256(name)[:8] % {HELD_OUT_MODULUS} == 0",
            "held_out_files": {"literature": [n for n, _ in lit_held],
                               "code": [n for n, _ in code_held]},
            "train_files": {"literature": len(lit_train), "code": len(code_train)},
            "bytes": {split: {k: len(v) for k, v in part.items()}
                      for split, part in (("train", train), ("held_out", held),
                                          ("mixed", mixed))},
            "sha256": {f"{split}/{k}": hashlib.sha256(v).hexdigest()[:16]
                       for split, part in (("train", train), ("held_out", held),
                                           ("mixed", mixed)) for k, v in part.items()}}
    return DomainCorpus(train, held, mixed, meta)


# ---- mixed items -------------------------------------------------------------------------
def verse_lines(text: str) -> list[str]:
    """Lines of verse from a play's text: 4+ words, capitalised, not a heading or a stage
    direction, printable ASCII."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if (len(line.split()) >= 4 and line[0].isupper() and not line.isupper()
                and "[" not in line and line.isascii() and line.isprintable()):
            out.append(line)
    if not out:
        raise ValueError("no verse lines in the held-out literature")
    return out


def versify(source: str, verses: list[str], rng: random.Random) -> str | None:
    """``source`` with every comment and string literal replaced by a verse line (the code
    tokens unchanged); ``None`` when it does not tokenize."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    edits = []
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            new = "# " + rng.choice(verses)
        elif tok.type == tokenize.STRING:
            triple = tok.string.lstrip("rbfuRBFU").startswith(('"""', "'''"))
            quote = '"""' if triple else '"'
            new = quote + rng.choice(verses).replace('"', "'").replace("\\", "/") + quote
        else:
            continue
        edits.append((starts[tok.start[0] - 1] + tok.start[1],
                      starts[tok.end[0] - 1] + tok.end[1], new))
    for a, b, new in reversed(edits):
        source = source[:a] + new + source[b:]
    return source


def verse_code(files: list[tuple[str, bytes]], verses: list[str], rng: random.Random,
               n_bytes: int) -> bytes:
    """Held-out code whose comments and string literals are verse lines (``versify``), the
    first ``n_bytes`` of the files in order."""
    pieces, size = [], 0
    for _, data in files:
        try:
            text = versify(data.decode("utf-8"), verses, rng)
        except UnicodeDecodeError:
            continue
        if text is None:
            continue
        pieces.append(text.encode("utf-8"))
        size += len(pieces[-1])
        if size >= n_bytes:
            break
    if size < n_bytes:
        raise ValueError(f"held-out code gave only {size} bytes of verse code")
    return b"".join(pieces)[:n_bytes]


_PEOPLE = ["Antonio", "Portia", "Bassanio", "Rosalind", "Orlando", "Viola", "Olivia",
           "Prospero", "Miranda", "Benedick", "Beatrice", "Falstaff", "Petruchio", "Helena"]
_GOODS = ["ducats", "crowns", "sheep", "arrows", "candles", "flagons of sack", "pounds"]
_WORDS = ["nought", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def prose_arithmetic(rng: random.Random, n_bytes: int) -> bytes:
    """Worked sums and products told as prose."""
    pieces, size = [], 0
    while size < n_bytes:
        a, b = rng.randint(10, 9999), rng.randint(10, 999)
        who, other, goods = rng.choice(_PEOPLE), rng.choice(_PEOPLE), rng.choice(_GOODS)
        if rng.random() < 0.5:
            text = [f"{who} hath {a} {goods}, and {other} giveth {b} more; how many hath "
                    f"{who} now?"]
            carry, da, db = 0, _digits(a), _digits(b)
            for i in range(max(len(da), len(db))):
                x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
                s = x + y + carry
                text.append(f"{_WORDS[x].capitalize()} and {_WORDS[y]} and {_WORDS[carry]} "
                            f"carried make {s}; set down {_WORDS[s % 10]}, carry "
                            f"{_WORDS[s // 10]}.")
                carry = s // 10
            text.append(f"So {who} hath {a + b} {goods}, good my lord.")
        else:
            b = rng.randint(2, 99)
            text = [f"{who} buyeth {b} {goods} of {other} at {a} apiece; what is the price?"]
            parts = [a * d * 10**p for p, d in enumerate(_digits(b))]
            for p, (d, part) in enumerate(zip(_digits(b), parts, strict=True)):
                text.append(f"{a} times {d}{'0' * p} is {part}.")
            text.append(f"These together, {' and '.join(map(str, parts))}, make {a * b}; "
                        f"so {who} payeth {a * b}.")
        pieces.append(" ".join(text) + "\n\n")
        size += len(pieces[-1])
    return "".join(pieces).encode("ascii")[:n_bytes]


def arithmetic_code(rng: random.Random, n_bytes: int) -> bytes:
    """Python functions whose docstrings, comments and asserts carry worked arithmetic."""
    pieces, size, n = [], 0, 0
    while size < n_bytes:
        a, b = rng.randint(10, 9999), rng.randint(10, 999)
        n += 1
        lines = [f"def worked_sum_{n}(a={a}, b={b}):", f'    """Q: {a} + {b} = ?"""',
                 "    digits, carry = [], 0"]
        carry, da, db = 0, _digits(a), _digits(b)
        for i in range(max(len(da), len(db))):
            x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
            s = x + y + carry
            lines.append(f"    digits.append({s % 10})  # {x} + {y} + {carry} = {s}, write "
                         f"{s % 10}, carry {s // 10}")
            carry = s // 10
        if carry:
            lines.append(f"    digits.append({carry})  # carry {carry}")
        lines += [f"    assert a + b == {a + b}  # A: {a + b}", f"    return {a + b}"]
        pieces.append("\n".join(lines) + "\n\n\n")
        size += len(pieces[-1])
    return "".join(pieces).encode("ascii")[:n_bytes]
