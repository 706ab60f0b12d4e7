from __future__ import annotations

from pathlib import Path

import pytest

from configs import load_config
from configs.loader import apply_overrides, flatten, list_presets
from configs.schema import Config, config_from_dict
from strnet.errors import ConfigError


@pytest.mark.parametrize("name", ["demo", "cpu", "paper"])
def test_presets_load_and_round_trip(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_presets_exist() -> None:
    assert {"demo", "cpu", "paper"} <= set(list_presets())


def test_paper_preset_is_the_published_recipe() -> None:
    cfg = load_config("paper")
    assert (cfg.model.backbone, cfg.preprocess.size, cfg.train.batch_size, cfg.train.epochs) == (
        "resnet50",
        512,
        32,
        100,
    )
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip) == (1e-4, 1e-4, 1.0)
    assert (cfg.train.plateau_factor, cfg.train.plateau_patience, cfg.train.early_stop_patience) == (0.5, 20, 30)
    assert (cfg.loss.severity, cfg.loss.t_score, cfg.loss.warmup_epochs) == (0.3, 0.1, 5)
    assert cfg.threshold.min_sensitivity == 0.86 and cfg.seed == 42
    assert cfg.preprocess.clip_percentiles == (1.0, 99.0) and (cfg.preprocess.mean, cfg.preprocess.std) == (0.5, 0.25)


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config("demo", ["train.epochs=3", "preprocess.size=64", "data.manifests=[a.csv, b.csv]"])
    assert cfg.train.epochs == 3 and cfg.preprocess.size == 64
    assert cfg.data.manifests == ("a.csv", "b.csv")


def test_an_unquoted_on_or_off_in_yaml_is_the_choice_it_spells(tmp_path: Path) -> None:
    """YAML 1.1 reads ``image: off`` as false; where the choices are on/off that is what the writer meant, and
    elsewhere a boolean is still refused."""
    preset = tmp_path / "p.yaml"
    preset.write_text("name: p\ntscore: {image: off}\n")
    assert load_config(preset).tscore.image == "off"
    preset.write_text("name: p\ntscore: {image: on}\n")
    assert load_config(preset).tscore.image == "on"
    assert load_config("cpu").tscore.image == "off"
    with pytest.raises(ConfigError, match=r"train\.precision: True is not one of"):
        load_config("demo", ["train.precision=true"])


def test_unknown_key_is_rejected_with_its_full_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) epoch"):
        load_config("demo", ["train.epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {backbone: resnet50, dropuot: 0.1}\n")
    with pytest.raises(ConfigError, match="dropuot"):
        load_config(bad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.lr=[1]", "train.lr: expected a number"),
        ("train.channels_last=1", "expected true/false"),
        ("train.precision=fp8", "not one of"),
        ("preprocess.clip_percentiles=[1, 2, 3]", "expected 2 values"),
        ("threshold.min_sensitivity=1.5", "min_sensitivity"),
        ("threshold.histogram_bins=7", "histogram_bins=7: every grid threshold must fall on a bin edge"),
        ("train.min_epochs=-1", "train.min_epochs"),
        ("federation.keep_optimizer_state=maybe", "expected true/false"),
        ("federation.strategy=fedsgd", "not one of"),
        ("federation.server_momentum=1.5", "server_momentum"),
        ("federation.local_steps=-1", "local_steps >= 0"),
        ("federation.batchnorm=local", "not one of"),
        ("federation.early_stop_patience=-2", "patience in rounds must be >= 0"),
        ("train.balance=site", "not one of"),
        ("tscore.steps_per_round=0", "tscore: rounds >= 0, steps_per_round >= 1"),
        ("ood.margin=0", "ood: quantile in"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_trainable_stages_reach_the_built_model_and_bad_counts_name_the_key() -> None:
    from configs.schema import build_model

    cfg = load_config("demo", ["model.backbone=tiny", "model.weights=none", "model.trainable_stages=2"])
    frozen = [n for n, p in build_model(cfg).named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.blocks.0.", "backbone.blocks.1.")) for n in frozen)
    with pytest.raises(ConfigError, match=r"model\.trainable_stages=9 is outside 0\.\.4"):
        build_model(load_config("demo", ["model.backbone=tiny", "model.weights=none", "model.trainable_stages=9"]))


def test_a_round_is_steps_or_epochs_not_both() -> None:
    with pytest.raises(ConfigError, match="local_steps=2 with local_epochs=3: a round is either"):
        load_config("demo", ["federation.local_steps=2", "federation.local_epochs=3"])
    fed = load_config("demo", ["federation.local_steps=2", "federation.local_epochs=1"]).federated_train()
    assert fed.max_steps_per_epoch == 2


def test_pooled_batchnorm_needs_batchnorm_layers_the_sites_share() -> None:
    with pytest.raises(ConfigError, match="batchnorm=pooled with strategy=fedbn: FedBN keeps each site's"):
        load_config("demo", ["federation.strategy=fedbn", "federation.batchnorm=pooled"])
    with pytest.raises(ConfigError, match=r"model\.norm=group has none"):
        load_config("demo", ["model.norm=group", "federation.batchnorm=pooled"])
    assert load_config("demo", ["federation.strategy=fedprox", "federation.batchnorm=pooled"]).federation.batchnorm == (
        "pooled"
    )


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_federation_sites_and_quorum() -> None:
    sites = "federation.sites=[{name: a, manifest: a.csv}, {name: b, manifest: b.csv}, {name: h, role: external}]"
    cfg = load_config("demo", [sites, "federation.quorum=2"])
    assert [s.role for s in cfg.federation.sites] == ["train", "train", "external"]
    with pytest.raises(ConfigError, match="quorum"):
        load_config("demo", [sites, "federation.quorum=3"])
    with pytest.raises(ConfigError, match="duplicate site names"):
        load_config("demo", ["federation.sites=[{name: a}, {name: a}]", "federation.quorum=1"])


def test_flatten_and_apply_overrides() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    data: dict = {"a": {"b": 1}}
    apply_overrides(data, ["a.c=2", "x.y=hello"])
    assert data == {"a": {"b": 1, "c": 2}, "x": {"y": "hello"}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def makefile_variable(name: str) -> list[str]:
    """A ``NAME := a b \\`` variable of the repository's Makefile, continuation lines joined, as its words."""
    text = (Path(__file__).parents[1] / "Makefile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith(f"{name} :="):
            return line.split(":=", 1)[1].split()
    raise AssertionError(f"Makefile: no variable {name}")


@pytest.mark.parametrize("norm", ["group", "frozen"])
def test_make_real_data_dp_overrides_load_on_the_cpu_preset(norm: str) -> None:
    """`make real-data-dp` layers its overrides on the `cpu` preset: a preset change that DP-SGD refuses (an
    ensemble, pooled BatchNorm statistics) must be undone there, or the target fails at its first line."""
    cfg = load_config("cpu", [*makefile_variable("DP"), f"model.norm={norm}"])
    assert cfg.privacy.dp.enabled and cfg.model.members == 1 and cfg.federation.batchnorm == "batch"


def test_the_cpu_federation_trains_under_pooled_batchnorm_statistics() -> None:
    """The preset's choice (docs/real-data.md, "BatchNorm under pooled statistics, again"), and the clear refusal a
    run gets where pooled statistics cannot exist."""
    assert load_config("cpu").federation.batchnorm == "pooled"
    with pytest.raises(ConfigError, match=r"federation\.batchnorm=pooled needs BatchNorm layers.*model\.norm=frozen"):
        load_config("cpu", ["model.norm=frozen"])
    with pytest.raises(ConfigError, match=r"federation\.batchnorm=pooled with strategy=fedbn"):
        load_config("cpu", ["federation.strategy=fedbn"])
