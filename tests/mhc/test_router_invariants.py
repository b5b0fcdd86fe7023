"""Router invariants (hypothesis), on the torch reference through the ops seam and on the
model's Router module: weights non-negative and summing to 1 (two_level: each picked domain's
weights sum to its p(g)), ids in range and distinct,
every chosen component inside a chosen domain, hierarchical with one domain == flat, and
progressive with a forced domain == hierarchical with the same forced domain."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.routing import reference as ref
from kernels.routing.reference import GateSpec
from mhc.config import FFNConfig, ModelConfig
from mhc.model import MHCModel


@st.composite
def specs(draw, kinds=("flat", "group_limited", "two_level")):
    kind = draw(st.sampled_from(kinds))
    G = draw(st.integers(1, 6))
    C = draw(st.integers(1, 7))
    k1 = draw(st.integers(1, G))
    k2 = draw(st.integers(1, C))
    return GateSpec(kind, G, C, k1, k2)


@st.composite
def spec_and_logits(draw, kinds=("flat", "group_limited", "two_level")):
    spec = draw(specs(kinds))
    T = draw(st.integers(0, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 10.0]))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, spec.n_router_outputs, generator=g) * scale
    if draw(st.booleans()):  # exact ties
        logits = logits.round()
    return spec, logits


@given(spec_and_logits())
def test_weights_and_ids_are_valid(case):
    spec, logits = case
    weights, ids = ref.gate(logits, spec)
    T = logits.shape[0]
    assert weights.shape == ids.shape == (T, spec.top_k)
    assert (weights >= 0).all()
    if T:
        expected = torch.ones(T)
        if spec.kind == "two_level":  # renormalized within level 2: sums to Σ p(picked g)
            p_TG = torch.softmax(logits[:, : spec.n_groups], -1)
            expected = p_TG.gather(1, ids[:, :: spec.k2] // spec.n_components).sum(-1)
            per_domain = weights.view(T, spec.k1, spec.k2).sum(-1)
            p_picked = p_TG.gather(1, ids[:, :: spec.k2] // spec.n_components)
            torch.testing.assert_close(per_domain, p_picked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights.sum(-1), expected, atol=1e-5, rtol=0)
    assert ((ids >= 0) & (ids < spec.n_experts)).all()
    for row in ids.tolist():
        assert len(set(row)) == len(row), f"duplicate expert in {row}"


@given(spec_and_logits(kinds=("two_level", "group_limited")))
def test_chosen_components_lie_in_chosen_domains(case):
    spec, logits = case
    _, ids = ref.gate(logits, spec)
    domains_of_picks = ids // spec.n_components
    for row in domains_of_picks.tolist():
        assert len(set(row)) <= spec.k1
    if spec.kind == "two_level" and logits.shape[0]:
        probs = torch.softmax(logits[:, : spec.n_groups], -1)
        top = ref.topk_lowest_index_ties(probs, spec.k1)[1]
        for picks, chosen in zip(domains_of_picks.tolist(), top.tolist(), strict=True):
            assert set(picks) == set(chosen)


@given(spec_and_logits(kinds=("two_level",)), st.integers(0, 2**31 - 1))
def test_forced_domains_are_respected(case, seed):
    spec, logits = case
    T = logits.shape[0]
    g = torch.Generator().manual_seed(seed)
    forced = torch.stack([torch.randperm(spec.n_groups, generator=g)[: spec.k1]
                          for _ in range(T)]) if T else torch.zeros(0, spec.k1, dtype=torch.long)
    _, ids = ref.gate(logits, spec, forced_groups_TK1=forced)
    assert (ids.view(T, spec.k1, spec.k2) // spec.n_components == forced[:, :, None]).all()


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 9), st.integers(0, 10**6))
def test_two_level_with_one_domain_equals_flat(C, k, T, seed):
    k = min(k, C)
    g = torch.Generator().manual_seed(seed)
    comp = torch.randn(T, C, generator=g)
    two = GateSpec("two_level", 1, C, 1, k)
    flat = GateSpec("flat", 1, C, 1, k)
    w2, i2 = ref.gate(torch.cat([torch.randn(T, 1, generator=g), comp], 1), two)
    wf, i_f = ref.gate(comp, flat)
    assert torch.equal(i2, i_f)
    torch.testing.assert_close(w2, wf)


def test_bias_changes_selection_not_weight_formula():
    spec = GateSpec("flat", 1, 4, 1, 1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    w, ids = ref.gate(logits, spec, bias_R=bias)
    assert ids.item() == 3 and w.item() == 1.0  # renormalised single pick


def test_tie_rule_lowest_index_wins():
    spec = GateSpec("two_level", 3, 4, 2, 2)
    logits = torch.zeros(1, spec.n_router_outputs)  # every score equal
    _, ids = ref.gate(logits, spec)
    assert ids.tolist() == [[0, 1, 4, 5]]


def _tiny(kind, **ffn):
    base = dict(kind=kind, hidden=16, n_domains=3, n_components=4, k1=1, k2=2,
                segment_len=8, aux_loss_coef=0.0, z_loss_coef=0.0)
    base.update(ffn)
    return ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=16, ffn=FFNConfig(**base))


def test_model_hierarchical_one_domain_equals_flat_moe():
    torch.manual_seed(0)
    hier = MHCModel(_tiny("hierarchical", n_domains=1, n_components=6, k2=3))
    flat = MHCModel(_tiny("flat_moe", n_domains=1, n_components=6, k2=3))
    state = hier.state_dict()
    for i in range(2):  # drop the (single) domain column of each router
        key = f"blocks.{i}.ffn.router.weight_DR"
        state[key] = state[key][:, 1:]
        state[f"blocks.{i}.ffn.router.bias_R"] = state[f"blocks.{i}.ffn.router.bias_R"][1:]
    flat.load_state_dict(state)
    idx = torch.randint(0, 256, (3, 16))
    torch.testing.assert_close(hier(idx).logits, flat(idx).logits, atol=1e-6, rtol=1e-5)


def test_model_progressive_forced_equals_hierarchical_forced():
    """Same forced domain and the same p(domain) (uniform: zero level-1 weights in both), so
    the two kinds compute the same thing; p(domain) scales the output, so it must match."""
    torch.manual_seed(1)
    hier = MHCModel(_tiny("hierarchical"))
    prog = MHCModel(_tiny("progressive"))
    state = {k: v for k, v in hier.state_dict().items()}
    for i in range(2):  # progressive projects only the E component logits
        key = f"blocks.{i}.ffn.router.weight_DR"
        state[key] = state[key][:, 3:]
        hier.blocks[i].ffn.router.weight_DR.data[:, :3] = 0.0
    missing, unexpected = prog.load_state_dict(state, strict=False)
    assert all(k.startswith("domain_encoder") for k in missing) and not unexpected
    prog.domain_encoder.out.weight.data.zero_()
    prog.domain_encoder.out.bias.data.zero_()
    idx = torch.randint(0, 256, (4, 16))
    forced = torch.tensor([0, 2, 1, 2])
    a = hier(idx, forced_domains=forced)
    b = prog(idx, forced_domains=forced)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-5)
    # and the forcing is real: another domain gives other logits
    c = prog(idx, forced_domains=(forced + 1) % 3)
    assert not torch.allclose(b.logits, c.logits)
