"""``engram bench architectures``: one real run of the ``test`` preset (every kind, both
matchings, two seeds, through the CLI) and the table generator checked against its saved
results file — every cell recomputed here from the raw rows, a changed result changes the
table, the committed table equals the committed results rendered; parameter figures equal
the accounting function and the counted tensors; collapse fails a comparison."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mhc import params
from mhc.config import FFNConfig, ModelConfig
from mhc.model import MHCModel
from sessions import arch_eval, arch_table, cli
from sessions.arch_run import base_run, plan
from sessions.bench_architectures import KINDS
from sessions.data import Batch

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "cache"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    results, table = tmp / "architectures_test.json", tmp / "table.md"
    code = cli.main(["bench", "architectures", "--preset", "test", "--quiet", "--out",
                     str(tmp / "runs"), "--results", str(results), "--table", str(table),
                     "--cache", str(CACHE)])
    return code, json.loads(results.read_text()), table.read_text(), results


def test_every_model_of_both_matchings_and_seeds_ran(bench):
    code, res, _, _ = bench
    names = {k if k == "dense" else f"{k}/{s}" for k, s in KINDS}
    for matching in ("active", "total"):
        for seed in (0, 1):
            rows = [r for r in res["runs"] if r["matching"] == matching and r["seed"] == seed]
            assert {r["model"] for r in rows} == names
    tokens = {r["train"]["tokens"] for r in res["runs"]}
    assert len(tokens) == 1  # equal tokens for every model
    failed = res["checks"]["collapsed"] + res["checks"]["level1_untrained"]
    assert code == (3 if failed else 0)
    assert res["env"]["git_sha"] and "load_avg_start" in res["env"]


def test_parameters_agree_with_accounting_and_counted_tensors(bench):
    _, res, _, _ = bench
    run = base_run("test")
    by_name = {(s.name, s.matching): s.cfg for s in plan(run)}
    for r in res["runs"]:
        want = params.count(by_name[(r["model"], r["matching"])])
        assert r["params"]["total"] == want.total == r["params"]["counted_total"]
        assert r["params"]["active"] == want.active == r["params"]["counted_active"]


@pytest.mark.parametrize("kind,sharing", [*KINDS, ("hierarchical", "lowrank")])
@pytest.mark.parametrize("tied", [True, False])
def test_counted_parameters_equal_the_accounting(kind, sharing, tied):
    ffn = FFNConfig(kind=kind, sharing=sharing, hidden=12, n_domains=3, n_components=4,
                    k1=2, k2=2, segment_len=8, lowrank_rank=3)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=32, tie_weights=tied, ffn=ffn)
    counted = arch_eval.counted_params(MHCModel(cfg))
    want = params.count(cfg)
    assert (counted["total"], counted["active"]) == (want.total, want.active)


def test_matchings_are_matched():
    specs = plan(base_run("cpu"))
    dense, standard = specs[0], specs[1]  # the active matching starts dense, flat_moe/none
    for s in specs:
        count = params.count(s.cfg)
        if s.matching == "total":
            assert abs(s.match_error) < 0.03, s.name
            assert count.total == pytest.approx(params.count(standard.cfg).total, rel=0.03)
        else:
            assert count.active == pytest.approx(params.count(dense.cfg).active, rel=0.05)


def _cells(table: str, heading: str) -> dict[str, list[str]]:
    """model -> its cells in the table under ``heading``."""
    section = table[table.index(heading):]
    rows = {}
    for line in section.splitlines()[4:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def _fmt(values, digits, pct=False):
    scale = 100 if pct else 1
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}" + ("%" if pct else "")


def test_table_cells_are_the_results(bench):
    """Each model row of the table, recomputed here from the raw results rows."""
    _, res, table, _ = bench
    for matching, heading in (("active", "### Matched on active"),
                              ("total", "### Matched on total")):
        cells = _cells(table, heading)
        rows = [r for r in res["runs"] if r["matching"] == matching]
        assert set(cells) == {r["model"] for r in rows}
        for name, c in cells.items():
            rs = [r for r in rows if r["model"] == name]
            assert c[2].split(" ")[0] == f"{rs[0]['params']['total']:,}"
            assert c[3] == f"{rs[0]['params']['active']:,}"
            for col, domain in ((5, "literature"), (6, "code"), (7, "arithmetic")):
                assert c[col] == _fmt([r["eval"]["bpb"][domain] for r in rs], 3)
            assert c[8] == _fmt([r["eval"]["mixed_bpb"] for r in rs], 3)
            assert c[9] == _fmt([r["eval"]["mixed_accuracy"] for r in rs], 1, pct=True)
            if rs[0]["kind"] == "dense":
                assert c[12] == "—"
            else:  # dead experts on every MoE row
                assert c[12] == _fmt([r["eval"]["balance"]["dead_experts"] for r in rs], 1)
                lat = [statistics.fmean(r["latency"]["cpu:torch"]["router_us_per_1k"])
                       + r["latency"]["cpu:torch"].get("encoder_us_per_1k", 0)
                       / len(r["latency"]["cpu:torch"]["router_us_per_1k"]) for r in rs]
                assert c[13] == _fmt(lat, 1)
            bad = any(arch_table.row_problems(r) for r in rs)
            assert c[-1] == ("FAILS" if bad else "ok")


def test_a_changed_result_changes_the_table(bench, tmp_path):
    _, res, table, _ = bench
    changed = json.loads(json.dumps(res))
    rows = [r for r in changed["runs"] if r["model"] == "dense" and r["matching"] == "active"]
    for r in rows:
        r["eval"]["bpb"]["code"] = 1.23456
    new = arch_table.render([changed])
    assert new != table
    assert _cells(new, "### Matched on active")["dense"][6] == "1.235 ± 0.000"
    assert arch_table.render([res]) == table  # and the same results give the same table


def test_claims_come_from_the_rows(bench):
    _, res, table, _ = bench
    act = arch_table.group(res, "active")
    h, f = act["hierarchical/base"], act["flat_moe/none"]
    line = next(x for x in table.splitlines() if x.startswith("| 25% fewer total")
                and "hierarchical/base" in x)
    a, b = h[0]["params"]["total"], f[0]["params"]["total"]
    if not (arch_table.row_problems(h[0]) or arch_table.row_problems(f[0])):
        assert f"({a / b - 1:+.1%})" in line
    for row in res["runs"]:
        if row["model"] == "progressive/base" and arch_table.row_problems(row):
            assert any("not compared: progressive/base" in x for x in table.splitlines())


def test_committed_table_is_the_committed_results_rendered():
    files = arch_table.results_files(ROOT / "benchmarks/results/architectures_cpu.json")
    if not files:
        pytest.skip("no committed architecture results yet")
    assert (ROOT / "docs/architecture_table.md").read_text() == arch_table.render(
        [json.loads(f.read_text()) for f in files])


def test_one_seed_claims_say_they_have_no_noise_estimate():
    """A trained or timed difference from one seed is not judged like one over seeds; parameter
    counts are exact and need no noise estimate."""
    res = json.loads((ROOT / "benchmarks/results/architectures_cpu.json").read_text())
    one = {**res, "runs": [r for r in res["runs"] if r["seed"] == 0]}
    lines = [x for x in arch_table.render([one]).splitlines() if x.startswith("| ")]
    trained = [x for x in lines if "mixed bits/byte" in x and "not compared" not in x]
    params = [x for x in lines if "sharing saves gate/up" in x]
    assert trained and params
    assert all("one seed, no noise estimate" in x for x in trained)
    assert not any("noise estimate" in x for x in params)
    both = arch_table.render([res])
    assert "one seed, no noise estimate" not in both


def _batch(cfg: ModelConfig, n: int = 6) -> Batch:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, cfg.seq_len + 1), generator=g)
    return Batch(x[:, :-1], x[:, 1:], torch.arange(n) % 3)


def _cfg(kind: str) -> ModelConfig:
    ffn = FFNConfig(kind=kind, hidden=16, n_domains=3, n_components=4, k1=1, k2=2,
                    segment_len=8)
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, ffn=ffn)


def test_a_collapsed_router_fails_and_a_healthy_one_passes():
    torch.manual_seed(0)
    collapsed = MHCModel(_cfg("progressive"))
    with torch.no_grad():  # the collapse: every segment in one domain
        collapsed.domain_encoder.out.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    healthy = MHCModel(_cfg("hierarchical"))
    cpu = torch.device("cpu")
    sets = {"literature": [_batch(collapsed.cfg)]}
    bad = arch_eval.evaluate(collapsed, sets, [_batch(collapsed.cfg)], ("literature",
                             "code", "arithmetic"), cpu)
    assert bad["balance"]["dead_experts"] == 2 * 8  # 8 of 12 experts idle in both layers
    assert any("domain 2 takes 100.0%" in r for r in bad["balance"]["collapse"])
    assert bad["level1"]["domain_share"] == [0.0, 0.0, 1.0]
    good = arch_eval.evaluate(healthy, sets, [_batch(healthy.cfg)], ("literature", "code",
                              "arithmetic"), cpu)
    assert good["balance"]["collapse"] == []
    row = {"model": "progressive/none", "matching": "active", "seed": 0, "eval": bad}
    assert arch_table.checks({"runs": [row]})["collapsed"]


def test_lm_loss_reaches_level_one_and_latency_is_measured():
    cpu = torch.device("cpu")
    models = {kind: MHCModel(_cfg(kind)) for kind in ("hierarchical", "progressive", "flat_moe")}
    models["dense"] = MHCModel(replace(_cfg("flat_moe"), ffn=replace(_cfg("flat_moe").ffn,
                                                                      kind="dense")))
    for kind in ("hierarchical", "progressive"):
        assert arch_eval.level1_grad_ratio(models[kind], _batch(models[kind].cfg), cpu) > \
            arch_eval.MIN_LEVEL1_GRAD_RATIO
    assert arch_eval.level1_grad_ratio(models["flat_moe"], _batch(_cfg("flat_moe")), cpu) is None
    lat = arch_eval.routing_latency(models, _batch(_cfg("flat_moe")), cpu, ["torch"], 2)
    assert set(lat) == {"hierarchical", "progressive", "flat_moe"}  # dense has no router
    for kind, per_backend in lat.items():
        row = per_backend["cpu:torch"]
        assert row["tokens"] == 6 * 32 and len(row["router_us_per_1k"]) == 2
        assert all(v > 0 for v in row["router_us_per_1k"] + row["router_permute_us_per_1k"])
        assert ("encoder_us_per_1k" in row) == (kind == "progressive")


def test_bad_arguments_are_clear_errors(capsys):
    assert cli.main(["bench", "architectures", "--preset", "test", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert cli.main(["bench", "architectures", "--preset", "test", "train.data=shakespeare",
                     "--results", "/nonexistent/x.json"]) == 2
    assert "train.data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "architectures", "--preset", "tpu"])
    assert re.search(r"invalid choice: 'tpu'", capsys.readouterr().err)
