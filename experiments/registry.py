"""Method name -> LightningModule class (imported lazily: layers only point downwards)."""

from __future__ import annotations

import importlib

#: every method reachable as ``compo train --method NAME`` and inside ``compo heldout``
METHODS: dict[str, str] = {
    "ppo": "rl.ppo:PPOModule",
    "maml": "baselines.maml:MAMLModule",
    "fomaml": "baselines.maml:FOMAMLModule",
    "reptile": "baselines.maml:ReptileModule",
    "rl2": "baselines.rl2:RL2Module",
    "pearl": "baselines.pearl:PEARLModule",
    "discovery": "primitives.discovery:DiscoveryModule",
    "compositional": "compositional.agent:CompositionalAgent",
}


def method_class(name: str) -> type:
    """The module class of method ``name``; one clear error for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    mod, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


class _Registry(dict):
    def __missing__(self, key: str) -> type:
        return method_class(key)

    def __contains__(self, key: object) -> bool:
        return key in METHODS


REGISTRY = _Registry()
