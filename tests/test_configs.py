"""Every experiment config that RESULTS.md names must still validate against the current code:
the held-out / ablation config itself and each method's training config (the check
``compo heldout`` runs before writing anything), so a renamed or removed option shows up here
rather than as a failure hours into a re-run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from experiments.ablate import ablation_config
from experiments.heldout import HeldoutConfig, method_run_config
from experiments.registry import method_class
from rl.config import config_from_dict

# held-out and ablation tables (maml_goto_adaptation.yaml is a MAML training config, checked
# by tests/test_maml.py)
CONFIGS = sorted(
    p for p in Path("experiments/configs").glob("*.yaml") if not p.stem.startswith("maml_goto")
)


def test_configs_are_found():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    cfg = (
        ablation_config(raw)
        if path.stem.startswith("ablate")
        else config_from_dict(HeldoutConfig, raw)
    )
    specs = cfg.method_specs()
    for spec in specs:
        cls = method_class(spec["method"])
        config_from_dict(cls.config_cls, method_run_config(cfg, spec, cfg.seeds[0]))


def test_a_config_with_an_unknown_option_fails_by_name(tmp_path):
    raw = yaml.safe_load(Path("experiments/configs/ablate_grid.yaml").read_text())
    raw["base"] = {"composer": "maybe"}
    cfg = ablation_config(raw)
    spec = cfg.method_specs()[0]
    with pytest.raises(ValueError, match="composer='maybe'"):
        config_from_dict(method_class("compositional").config_cls, method_run_config(cfg, spec, 0))


def test_a_partial_nested_section_keeps_the_fields_own_defaults():
    """``--set ppo.lr=...`` changes one key; the section's other keys stay the *field's*
    defaults (the compositional controller's PPO differs from ``PPOConfig()``)."""
    from compositional.config import CompositionalConfig
    from rl.config import config_from_dict

    default = CompositionalConfig().ppo
    cfg = config_from_dict(CompositionalConfig, {"ppo": {"lr": 0.002}})
    assert cfg.ppo.lr == 0.002
    assert (cfg.ppo.num_steps, cfg.ppo.num_minibatches) == (
        default.num_steps,
        default.num_minibatches,
    )
    assert (default.num_steps, default.num_minibatches) != (128, 4)  # not PPOConfig()'s


@pytest.mark.parametrize(
    "build",
    [
        lambda: __import__("primitives.option_training", fromlist=["x"]).OptionTrainingConfig,
        lambda: __import__("primitives.outcome", fromlist=["x"]).DiscoveryConfig,
        lambda: __import__("primitives.discovery", fromlist=["x"]).SkillTrainingConfig,
        lambda: __import__("baselines.rl2", fromlist=["x"]).RL2Config,
        lambda: __import__("compositional.agent", fromlist=["x"]).CompositionalConfig,
    ],
    ids=["skills", "outcome-discovery", "diayn", "rl2", "controller"],
)
def test_a_ppo_section_given_as_a_dict_keeps_its_owners_defaults(build):
    """Built directly (not through ``config_from_dict``), a partial ``ppo`` dict overrides the
    keys it names over the owner's own PPO defaults (e.g. the skills' lr 1e-3 and gamma 0.95),
    not ``PPOConfig()``'s; an unknown key is one line."""
    cls = build()
    default = cls().ppo
    cfg = cls(ppo={"ent_coef": 0.003})
    assert cfg.ppo.ent_coef == 0.003
    assert dataclasses.replace(cfg.ppo, ent_coef=default.ent_coef) == default
    with pytest.raises(ValueError, match="unknown config key 'ppo.bogus'") as e:
        cls(ppo={"bogus": 1})
    assert "\n" not in str(e.value)


def test_the_skills_ppo_section_defaults_differ_from_ppoconfig():
    from primitives.option_training import OptionTrainingConfig
    from rl.ppo import PPOConfig

    ppo = OptionTrainingConfig(ppo={"update_epochs": 8}).ppo
    assert (ppo.lr, ppo.gamma, ppo.update_epochs) == (1e-3, 0.95, 8)
    assert (PPOConfig().lr, PPOConfig().gamma) != (1e-3, 0.95)
