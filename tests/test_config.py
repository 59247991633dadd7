"""Configs from YAML and key=value overrides: typed values, clear errors, and no other crash under fuzzing."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffpolicy.agents import AGENTS, ONLINE_AGENTS, agent_class
from diffpolicy.config import ConfigError, load_config, parse_overrides
from diffpolicy.images import ImagePretrainConfig


def test_yaml_then_overrides_with_types(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("family: rf\nsteps: 500\nchannel_mults: [1, 2, 2]\nlr: 1e-3\n")
    cfg = load_config(ImagePretrainConfig, f, ["steps=7", "class_conditional=false", "lr=3e-4", "shift=1"])
    assert (cfg.family, cfg.steps, cfg.channel_mults, cfg.lr) == ("rf", 7, (1, 2, 2), 3e-4)
    assert cfg.class_conditional is False and cfg.shift == 1
    assert load_config(ImagePretrainConfig, overrides=["channel_mults=1,2"]).channel_mults == (1, 2)


@pytest.mark.parametrize("overrides,message", [
    (["stpes=5"], "unknown ImagePretrainConfig key 'stpes'; did you mean 'steps'"),
    (["steps=five"], "steps must be int"),
    (["steps=2.5"], "steps must be int"),
    (["bf16=maybe"], "bf16 must be true or false"),
    (["steps"], "is not key=value"),
])
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ImagePretrainConfig, overrides=overrides)


def test_bad_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(ImagePretrainConfig, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(ImagePretrainConfig, tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(ImagePretrainConfig, tmp_path / "missing.yaml")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_fuzzed_overrides_give_a_config_or_a_config_error(items):
    try:
        cfg = load_config(ImagePretrainConfig, overrides=items)
    except ConfigError:
        return
    assert isinstance(cfg, ImagePretrainConfig)
    assert parse_overrides(items).keys() <= set(ImagePretrainConfig.__dataclass_fields__)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_yaml_gives_a_config_or_a_config_error(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("yaml") / "c.yaml"
    f.write_text(text)
    try:
        load_config(ImagePretrainConfig, f)
    except ConfigError:
        pass


def test_sections_route_keys_and_name_the_closest_one(tmp_path):
    from diffpolicy.agents.diffusion_ql import DiffusionQLConfig
    from diffpolicy.agents.trainer import TrainConfig
    from diffpolicy.config import load_sections

    sections = {"agent": DiffusionQLConfig, "train": TrainConfig}
    (tmp_path / "c.yaml").write_text("agent:\n  hidden: 64\ntrain:\n  steps: 7\nbatch_size: 32\n")
    out = load_sections(sections, tmp_path / "c.yaml", ["train.seed=3", "lr=1e-4", "steps=9"])
    assert out["agent"].hidden == 64 and out["agent"].lr == 1e-4
    assert (out["train"].steps, out["train"].seed, out["train"].batch_size) == (9, 3, 32)  # the command line wins
    with pytest.raises(ConfigError, match="did you mean 'hidden'"):
        load_sections(sections, None, ["hiden=3"])
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        load_sections(sections, None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="unknown key 'ffoo'"):
        load_sections(sections, None, ["ffoo=1"])
    (tmp_path / "bad.yaml").write_text("agent:\n  hidden: [1\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_sections(sections, tmp_path / "bad.yaml")



@pytest.mark.parametrize("name", [*AGENTS, *ONLINE_AGENTS])
def test_every_agent_config_reads_back_from_its_config_json(name):
    """``load_agent`` rebuilds an agent from the JSON its run wrote: every field must read back as itself
    (a bare ``tuple`` annotation once read Diffusion Policy's Adam betas as ints)."""
    import dataclasses
    import json

    cls = agent_class(name).config_class
    written = json.loads(json.dumps(dataclasses.asdict(cls()), default=str))
    assert load_config(cls, **written) == cls()
