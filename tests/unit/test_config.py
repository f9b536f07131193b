import pytest

from stts_dist.config import ConfigError, load_config


def test_default_job_loads():
    cfg = load_config("jobs/default.yaml")
    assert cfg.model.stts.method == "scorer"
    assert cfg.model.stts.prune_ratio == 0.5


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.stts.prune_ration'.*'model.stts.prune_ratio'"):
        load_config(None, ["model.stts.prune_ration=0.3"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train.stpes.*train.steps"):
        load_config(p)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"wrong type for config key 'train.batch_size'"):
        load_config(None, ["train.batch_size=many"])


@pytest.mark.parametrize("ov, match", [
    ("model.stts.prune_ratio=1.0", "must be in \\[0, 1\\)"),
    ("model.stts.prune_ratio=-0.1", "must be in \\[0, 1\\)"),
    ("model.stts.method=tome", "not one of"),
    ("model.vit.image_size=60", "divisible by model.vit.patch_size"),
    ("model.stts.prune_at=5", "prune_at"),
    ("data.tasks=[count,colour]", "unknown \\['colour'\\]; the moving-digits tasks are"),
    ("model.vit.pos_embed_init=learned", "pos_embed_init='learned' must be normal or sincos"),
])
def test_semantic_errors(ov, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [ov])


def test_ratio_incompatible_with_frames():
    with pytest.raises(ConfigError, match="first frame"):
        load_config(None, ["data.num_frames=2", "model.stts.prune_ratio=0.8"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("jobs/does_not_exist.yaml")


def test_values_are_never_evaluated(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: ${oc.env:HOME}\n")
    cfg = load_config(p)
    # interpolations are kept as text in the resolved YAML we store; no custom resolvers exist
    from omegaconf import OmegaConf
    assert "${oc.env:HOME}" in OmegaConf.to_yaml(cfg)
