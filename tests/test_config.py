import pytest
import tomllib

from gossipdqn.config import Config, ConfigError, config_from_dict, config_to_toml, load_config


def test_defaults_round_trip_through_toml():
    cfg = load_config(None, ["learner.lr=3e-4", "network.hidden=[64, 64]", "env.id=Acrobot-v1"])
    assert cfg.learner.lr == 3e-4 and cfg.network.hidden == (64, 64)
    assert config_from_dict(tomllib.loads(config_to_toml(cfg))) == cfg


def test_shipped_configs_load():
    for name in ["cartpole", "acrobot", "lunarlander"]:
        assert isinstance(load_config(f"experiments/configs/{name}.toml"), Config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learner.lr=-1", "learner.lr: expected a value >= 0"),
        ("learner.lrr=1", "learner.lrr: unknown setting in [learner]"),
        ("colour=1", "colour: unknown setting in the top level"),
        ("learner.double=1", "learner.double: expected bool"),
        ("env.num_envs=2.5", "env.num_envs: expected int"),
        ("gossip.topology=star", "gossip.topology: expected one of ring"),
        ("actor.eps_start=1.5", "actor.eps_start: expected a value <= 1.0"),
        ("network.hidden=64", "network.hidden: expected a list of int"),
        ("learner=3", "learner: expected a table"),
        ("learner.device=tpu", "learner.device: expected auto, cpu, cuda"),
        ("nonsense", "expected section.key=value"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
