"""``train.data=domains``: the fixed split by file, labels that come from the data, mixed
items made from held-out sources only, and arithmetic that is right. Runs on the real
corpus (``cache/shakespeare``, prepared by ``engram data prepare``) and this interpreter's
standard library."""

from __future__ import annotations

import ast
import hashlib
import io
import platform
import random
import re
import tokenize
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc.config import TrainConfig
from sessions import data, domains

CACHE = Path(__file__).resolve().parents[2] / "cache"


@pytest.fixture(scope="module")
def corpus() -> domains.DomainCorpus:
    return domains.build(CACHE, seed=0)


@pytest.fixture(scope="module")
def streams():
    return data.build_streams("domains", CACHE, seed=0)


def test_split_by_file_is_fixed_disjoint_and_recorded(corpus):
    files = domains.stdlib_files()
    names = [n for n, _ in files]
    held = corpus.meta["held_out_files"]["code"]
    assert held == [n for n in names if int(hashlib.sha256(n.encode()).hexdigest()[:8], 16)
                    % 10 == 0]
    assert 0.03 < len(held) / len(names) < 0.2
    assert corpus.meta["train_files"]["code"] + len(held) == len(names)
    assert corpus.meta["python"] == platform.python_version()
    works = [n for n, _ in domains.literature_works(CACHE)]
    lit = corpus.meta["held_out_files"]["literature"]
    assert lit and set(lit) < set(works) and corpus.meta["train_files"]["literature"] == \
        len(works) - len(lit)
    # no held-out file's text is in the training text
    body = dict(files)
    for name in held:
        if len(body[name]) > 200:
            assert body[name].strip() not in corpus.train["code"], name
    for name, text in domains.literature_works(CACHE):
        if name in lit:
            assert text[1000:1400] not in corpus.train["literature"], name
    assert domains.build(CACHE, seed=0).meta["sha256"] == corpus.meta["sha256"]


def test_seed_changes_arithmetic_only(corpus):
    other = domains.build(CACHE, seed=1).meta["sha256"]
    for key, digest in corpus.meta["sha256"].items():
        same = not (key.endswith("arithmetic") or key.startswith("mixed/"))
        assert (other[key] == digest) == same, key


def test_streams_carry_their_domain_labels(streams):
    train, val = streams
    assert [(s.name, s.domain) for s in train] == [(n, d) for d, n in
                                                   enumerate(domains.DOMAIN_NAMES)]
    assert [s.name for s in val] == [*domains.DOMAIN_NAMES,
                                     *(f"mixed:{k}" for k in domains.MIXED_PAIRS)]
    assert all(s.domain == -1 for s in val[3:])


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10**6))
def test_every_sampled_sequence_is_from_its_labelled_domain(streams, step):
    train, _ = streams
    batch = data.Sampler(train, 6, 64, seed=3).batch(step)
    raw = {s.domain: bytes(s.data.numpy()) for s in train}
    for row, label in zip(batch.x, batch.domains, strict=True):
        window = bytes(row.to(torch.uint8).numpy())
        assert window in raw[int(label)]


def test_one_domain_data_has_no_label():
    """The collapse of issue 12: Shakespeare alone labelled every sequence with one domain."""
    train, val = data.build_streams("shakespeare", CACHE)
    assert [s.domain for s in train + val] == [-1, -1]
    assert [s.name for s in val] == ["shakespeare"]


def test_config_accepts_domains_and_names_the_kinds():
    assert TrainConfig(data="domains").data == "domains"
    with pytest.raises(ValueError, match="TrainConfig.data.*domains"):
        TrainConfig(data="prose")


def _tokens(source: str, keep: bool) -> list[tuple[int, str]]:
    """Code tokens (``keep``) or comments and strings (not ``keep``)."""
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if (t.type not in (tokenize.COMMENT, tokenize.STRING)) == keep]


def test_verse_code_keeps_the_code_and_puts_verse_in_comments_and_strings(corpus):
    held_lit = corpus.meta["held_out_files"]["literature"]
    verses = domains.verse_lines(b"".join(t for n, t in domains.literature_works(CACHE)
                                          if n in held_lit).decode("utf-8", "replace"))
    quoted = {v.replace('"', "'").replace("\\", "/") for v in verses}  # as a literal holds it
    held = set(corpus.meta["held_out_files"]["code"])
    checked = 0
    for name, raw in domains.stdlib_files():
        if name not in held or not 2000 < len(raw) < 40000:
            continue
        original = raw.decode()
        mixed = domains.versify(original, verses, random.Random(name))
        assert _tokens(mixed, True) == _tokens(original, True), name  # the code is unchanged
        replaced = _tokens(mixed, False)
        assert replaced and all(text[2:] in verses if kind == tokenize.COMMENT
                                else text.strip('"') in quoted for kind, text in replaced)
        ast.parse(mixed)  # still Python
        checked += 1
    assert checked >= 10
    assert corpus.mixed["verse_code"].decode().count("# ") > 30


def test_mixed_items_are_long_enough_and_blend_two_domains(corpus):
    assert set(corpus.mixed) == set(domains.MIXED_PAIRS)
    for name, raw in corpus.mixed.items():
        assert len(raw) == domains.MIXED_BYTES, name
    prose = corpus.mixed["prose_arithmetic"].decode()
    sums = re.findall(r"(\w+) hath (\d+) [\w ]+?, and \w+ giveth (\d+) more; .*? So \1 hath "
                      r"(\d+)", prose)
    assert len(sums) > 50
    assert all(int(a) + int(b) == int(s) for _, a, b, s in sums)
    code = corpus.mixed["arithmetic_code"].decode()
    complete = code[:code.rindex("\n\n\ndef ")]  # drop the cut-off last function
    namespace: dict = {}
    exec(compile(ast.parse(complete), "arithmetic_code", "exec"), namespace)  # noqa: S102
    funcs = [v for k, v in namespace.items() if k.startswith("worked_sum_")]
    assert len(funcs) > 100
    for f in funcs:
        a, b = f.__defaults__
        assert f() == a + b  # and its asserts held
