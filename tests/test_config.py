"""Config precedence (defaults < YAML < overrides) and config errors that name the key."""

import pytest

from rlhfkit.config import (
    ConfigError,
    PPOConfig,
    RMConfig,
    SFTConfig,
    from_dict,
    load_config,
    to_dict,
)


def test_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  epochs: 3\nmodel:\n  lora:\n    r: 4\n")
    cfg = load_config(SFTConfig, f, ["train.epochs=5", "model.lora.target_modules=q_proj,v_proj"])
    assert cfg.train.lr == 1e-4  # YAML over default (and YAML 1.1's string "1e-4" becomes a float)
    assert cfg.train.epochs == 5  # override over YAML
    assert cfg.model.lora.r == 4 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.batch_size == SFTConfig().train.batch_size  # default kept
    assert from_dict(SFTConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        (["trian.lr=1"], "unknown config key 'trian'"),
        (["train.lr=-1"], "train.lr: -1.0 must be > 0"),
        (["train.lr=abc"], "train.lr: expected a number"),
        (["train.epochs=1.5"], "train.epochs: expected an integer"),
        (
            ["train.schedule=step"],
            "train.schedule: 'step' is not one of ['cosine', 'linear', 'constant']",
        ),
        (["model.lora.enabled=maybe"], "model.lora.enabled: expected true/false"),
        (["data.eval_fraction=0.95"], "data.eval_fraction: 0.95 must be <= 0.9"),
        (["train"], "is not of the form key.sub=value"),
        (["train.lr=.nan"], "train.lr: nan is not a finite number"),
        (["train.max_grad_norm=.inf"], "train.max_grad_norm: inf is not a finite number"),
        ([".lr=1"], "empty key"),
        (["train=3"], "train: expected a mapping"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, overrides)
    assert message in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epoch: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: unknown config key 'train.epoch'; did you mean 'train.epochs'",
    ):
        load_config(SFTConfig, f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SFTConfig, f)
    f.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, f)
    f.write_text("a: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(
        ConfigError, match="not valid YAML"
    ):  # safe_load: configs cannot execute code
        load_config(SFTConfig, f)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(RMConfig, tmp_path / "missing.yaml")


def test_config_reference_doc_is_current():
    from pathlib import Path

    from rlhfkit.config import reference_markdown

    doc = Path(__file__).parent.parent / "docs" / "config.md"
    assert doc.read_text() == reference_markdown(), (
        "regenerate docs/config.md (see reference_markdown)"
    )


def test_section_defaults_survive_partial_override():
    from rlhfkit.config import PPOConfig

    cfg = load_config(PPOConfig, None, ["critic.weight_decay=0.1"])
    assert cfg.critic.lr == PPOConfig().critic.lr == 1e-5 and cfg.critic.weight_decay == 0.1


def test_unsupported_parallel_combinations_are_config_errors():
    base = ["model.name_or_path=x", "reward_fn=a:b"]
    with pytest.raises(ConfigError, match="run.parallel"):
        load_config(PPOConfig, None, [*base, "run.parallel=fsdp", "model.lora.enabled=true"])
    with pytest.raises(ConfigError, match="rollout.compile"):
        load_config(PPOConfig, None, [*base, "run.parallel=fsdp", "rollout.compile=true"])
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(SFTConfig, None, ["train.parallel=fsdp", "model.lora.enabled=true"])
    cfg = load_config(PPOConfig, None, [*base, "run.parallel=fsdp", "shared_trunk=true"])
    assert cfg.run.parallel == "fsdp" and cfg.shared_trunk


def test_every_shipped_config_loads_to_its_snapshot():
    """Issue 32: config.py became a package; every config in configs/ must load to the values it
    had before the move (tests/data/config_snapshot.json, taken on the single-file loader; a
    deliberate change of a default regenerates it and says so in the commit)."""
    import json
    from pathlib import Path

    import rlhfkit.config as config

    root = Path(__file__).parent.parent
    snapshot = json.loads((root / "tests" / "data" / "config_snapshot.json").read_text())
    shipped = sorted(str(p.relative_to(root)) for p in (root / "configs").rglob("*.yaml"))
    assert shipped == sorted(snapshot)  # a new config gets a snapshot too
    for path, want in snapshot.items():
        cls = getattr(config, want["class"])
        got = config.to_dict(config.load_config(cls, root / path, want["overrides"]))
        assert got == want["values"], path
