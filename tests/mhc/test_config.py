"""Bad configs fail at construction, naming the field; YAML and overrides map onto the same
dataclasses."""

import pytest

from mhc import presets
from mhc.config import FFNConfig, ModelConfig, TrainConfig
from mhc.model import MHCModel


@pytest.mark.parametrize("kwargs,field", [
    (dict(kind="mixture"), "FFNConfig.kind"),
    (dict(k1=5, n_domains=4), "FFNConfig.k1"),
    (dict(k2=5, n_components=4), "FFNConfig.k2"),
    (dict(kind="flat_moe", k1=1, k2=9, n_components=4), "FFNConfig.k2"),
    (dict(sharing="some"), "FFNConfig.sharing"),
    (dict(hidden=0), "FFNConfig.hidden"),
    (dict(sharing="lowrank", lowrank_rank=64, hidden=32), "FFNConfig.lowrank_rank"),
    (dict(aux_loss_coef=-1.0), "FFNConfig.aux_loss_coef"),
])
def test_bad_ffn_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        FFNConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(d_model=100, n_heads=3), "ModelConfig.d_model"),
    (dict(d_model=12, n_heads=4), "ModelConfig.n_heads"),
    (dict(n_layers=0), "ModelConfig.n_layers"),
    (dict(seq_len=100, ffn=FFNConfig(kind="progressive", segment_len=32)), "ModelConfig.seq_len"),
])
def test_bad_model_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(lr=0), "TrainConfig.lr"), (dict(steps=0), "TrainConfig.steps"),
    (dict(data="wiki"), "TrainConfig.data"), (dict(device="tpu"), "TrainConfig.device"),
])
def test_bad_train_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TrainConfig(**kwargs)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"config\.model\.ffn: unknown field\(s\) \['experts'\]"):
        presets.build({"model": {"ffn": {"experts": 8}}})
    with pytest.raises(ValueError, match="not a field"):
        presets.load("tiny", ["nonsense=1"])
    with pytest.raises(ValueError, match="key=value"):
        presets.load("tiny", ["kind"])


def test_overrides_and_yaml(tmp_path):
    run = presets.load("tiny", ["model.ffn.kind=flat_moe", "steps=7", "k2=1"])
    assert run.model.ffn.kind == "flat_moe" and run.train.steps == 7 and run.model.ffn.k2 == 1
    path = tmp_path / "x.yaml"
    path.write_text("preset: debug\nmodel:\n  ffn:\n    kind: progressive\ntrain:\n  lr: 0.01\n")
    run = presets.load(str(path), ["seed=3"])
    assert run.model.ffn.kind == "progressive" and run.model.d_model == 32
    assert run.train.lr == 0.01 and run.train.seed == 3


@pytest.mark.parametrize("path", ["configs/tiny.yaml", "configs/small.yaml",
                                  "configs/debug.yaml"])
def test_shipped_yaml_files_match_presets(path):
    name = path.split("/")[-1].removesuffix(".yaml")
    assert presets.to_plain(presets.load(path)) == presets.to_plain(presets.load(name))


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_build_models(name):
    run = presets.load(name)
    if name == "small":
        return  # ~100M parameters: construction is checked by accounting instead
    MHCModel(run.model)


def test_override_values_are_typed():
    run = presets.load("tiny", ["train.lr=3e-3", "model.ffn.bias_balancing=true", "lr=1"])
    assert run.train.lr == 1.0 and isinstance(run.train.lr, float)
    with pytest.raises(ValueError, match="TrainConfig.steps: expected int"):
        presets.load("tiny", ["train.steps=many"])
    with pytest.raises(ValueError, match="FFNConfig.bias_balancing: expected bool"):
        presets.load("tiny", ["model.ffn.bias_balancing=3"])
