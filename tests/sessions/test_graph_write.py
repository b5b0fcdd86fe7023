"""The write pass replayed from CUDA graphs (``sessions.graph_write``, GPU, marked ``gpu``).

* Replays give the eager no-grad forward's hidden states (dense, hierarchical, progressive):
  bitwise-close at a bucket-aligned shape, within 1e-3 for padded ones; a returned tensor
  does not change with the next replay (outputs are cloned); replays read the weights and
  buffers as they are now (an in-place update of every parameter and of the router biases
  shows), and a moved weight drops the graphs; a shape is captured once, on its second
  sighting, and every shape of a bucket shares its graph; without bf16 autocast nothing is
  captured (the eager pass, however often a shape comes).
* Training on episodes through the one trainer takes the replayed path (captures and replays
  counted against what the batch shapes predict) and gives the eager write pass's losses and
  validation (rel. 1e-4).
* A warmed-up memory training step (and the no-memory one) never synchronizes with the host.
CPU (always runs): the objective offers no graph off CUDA, and ``encode_traces`` uses a given
write pass only when no gradient flows through the backbone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sessions.experiment import load_experiment
from sessions.graph_write import GraphedWritePass
from sessions.objectives import EpisodeObjective
from sessions.pipeline import build_model
from sessions.trainer import Trainer

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml"


def _experiment(device: str, *overrides: str):
    return load_experiment(str(SMOKE), [f"train.device={device}", "train.batch_size=8",
                                        *overrides])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_no_graph_off_cuda_and_only_without_backbone_grad():
    exp = _experiment("cpu")
    objective = EpisodeObjective(exp, 0)
    torch.manual_seed(0)
    model = build_model(exp, "on")
    batch = objective.batch(0)
    assert objective.graphed_write_pass(model, batch.seg_idx) is None  # a CPU tensor
    calls = []

    def write_pass(idx):
        calls.append(idx.shape)
        return model.backbone(idx, stop_after_layer=model.write_layer).hidden

    with torch.no_grad():
        plain = model.encode_traces(batch.seg_idx, batch.seg_mask, backbone_grad=False)
        given = model.encode_traces(batch.seg_idx, batch.seg_mask, backbone_grad=False,
                                    write_pass=write_pass)
    assert calls == [batch.seg_idx.shape]
    torch.testing.assert_close(given.key_NK, plain.key_NK, rtol=0, atol=0)
    torch.testing.assert_close(given.hidden_NSD, plain.hidden_NSD, rtol=0, atol=0)
    traced = model.encode_traces(batch.seg_idx, batch.seg_mask, backbone_grad=True,
                                 write_pass=write_pass)  # gradient through the backbone
    assert len(calls) == 1 and traced.hidden_NSD.requires_grad


@pytest.mark.parametrize("kind", ["hierarchical", "dense", "progressive"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_write_pass_equals_eager(kind):
    exp = _experiment("cuda", f"model.ffn.kind={kind}", "model.ffn.bias_balancing=true")
    torch.manual_seed(0)
    model = build_model(exp, "on").cuda()
    backbone, layer = model.backbone, model.write_layer
    graphed = GraphedWritePass(backbone, layer)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def check(N: int, S: int, bound: float) -> float:
        idx = torch.randint(0, 256, (N, S), device="cuda", generator=gen)
        got = graphed(idx)
        want = backbone(idx, stop_after_layer=layer).hidden
        assert got.shape == want.shape == (N, S, backbone.cfg.d_model)
        err = _rel(got, want)
        assert err <= bound, (N, S, err, bound)
        return err

    # one autocast region per "step": its cast cache holds the weights as they were
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        check(64, 40, 0)  # first sighting of bucket (64, 40): eager
        assert (graphed.eager_calls, graphed.captures, graphed.replays) == (1, 0, 0)
        check(64, 40, 1e-6)  # second: captured, replayed at the eager shape
        check(50, 37, 1e-3)  # same bucket, padded: rounding of other shapes only
        check(60, 33, 1e-3)
        assert (graphed.eager_calls, graphed.captures, graphed.replays) == (1, 1, 3)
        check(20, 64, 0)  # a new bucket, seen once: eager
        assert graphed.eager_calls == 2 and len(graphed.graphs) == 1
        a = torch.randint(0, 256, (64, 40), device="cuda", generator=gen)
        first = graphed(a)
        kept = first.clone()
        graphed(torch.randint(0, 256, (64, 40), device="cuda", generator=gen))  # same graph
        assert torch.equal(first, kept)  # a returned tensor is the caller's, not the graph's
    with torch.no_grad():
        for p in backbone.parameters():  # an optimizer's in-place update: replays see it
            p.mul_(1.01)
        router = next(b.ffn.router for b in backbone.blocks if hasattr(b.ffn, "router")) \
            if kind != "dense" else None
        if router is not None:  # the bias-balancing update (a buffer, in place)
            router.bias_R += torch.linspace(-1, 1, router.bias_R.numel(), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        check(64, 40, 1e-6)
        assert graphed.captures == 1
    emb = backbone.tok_emb.weight
    emb.data = emb.data.clone()  # a moved weight: the graphs are dropped, re-captured
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        check(64, 40, 1e-6)
        assert graphed.captures == 2 and len(graphed.graphs) == 1
    with pytest.raises(RuntimeError, match="without autograd"):
        graphed(torch.zeros(4, 8, dtype=torch.long, device="cuda"))
    with torch.no_grad():  # no bf16 autocast: eager every time (fp32 runs the loop path)
        before = graphed.captures
        for _ in range(3):
            check(64, 40, 0)
        assert graphed.captures == before


def _expected_counts(graphed: GraphedWritePass, shapes, seq_len: int) -> tuple[int, int, int]:
    """(eager calls, captures, replays) the rule of ``GraphedWritePass`` gives for ``shapes``."""
    seen, graphs, counts = {}, set(), [0, 0, 0]
    for N, S in shapes:
        key = graphed.bucket(N, S, seq_len)
        if key not in graphs:
            seen[key] = seen.get(key, 0) + 1
            if seen[key] < 2:
                counts[0] += 1
                continue
            graphs.add(key)
            counts[1] += 1
        counts[2] += 1
    return tuple(counts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_replays_the_write_pass_with_eager_losses(tmp_path):
    steps = 6
    losses = {}
    for graph in (True, False):
        exp = _experiment("cuda", f"objective.graph_write={str(graph).lower()}")
        objective = EpisodeObjective(exp, exp.train.seed)
        torch.manual_seed(0)
        trainer = Trainer(build_model(exp, "on"), objective, exp.train, tmp_path / str(graph),
                          {}, progress=False)
        losses[graph] = [float(trainer._step(s)[0].loss.detach()) for s in range(steps)]
        graphed = objective._write_passes.get(trainer.model.backbone)
        if graph:  # the training steps' counts (validation, below, adds its own shape)
            shapes = [tuple(objective.batch(s).seg_idx.shape) for s in range(steps)]
            expected = _expected_counts(graphed, shapes, exp.model.seq_len)
            assert (graphed.eager_calls, graphed.captures, graphed.replays) == expected
            assert graphed.replays >= steps - 2, (shapes, expected)  # the fast path is taken
        else:
            assert graphed is None
        for _ in range(2):  # the second validation replays its shape
            losses[graph] += list(trainer._validate().values())
    for s, (a, b) in enumerate(zip(losses[True], losses[False], strict=True)):
        assert a == pytest.approx(b, rel=1e-4), (s, losses)


@pytest.mark.parametrize("arm", ["on", "off"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warm_episode_step_has_no_host_sync(tmp_path, arm):
    exp = _experiment("cuda")
    objective = EpisodeObjective(exp, exp.train.seed, 2)
    torch.manual_seed(0)
    trainer = Trainer(build_model(exp, arm), objective, exp.train, tmp_path, {},
                      progress=False)
    for _ in range(2):  # step 0's shape: eager, then captured
        trainer._step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = trainer._step(0)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss)
    if arm == "on":
        assert objective._write_passes[trainer.model.backbone].replays == 2
