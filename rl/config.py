"""Typed configs: nested dataclasses <-> plain dicts (YAML), unknown keys rejected by name."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass
class DiagnosticsConfig:
    """Meta-RL diagnostics during training (``rl.diagnostics.MetaRLDiagnostics``)."""

    enabled: bool = True
    """log the ``diagnostics/*`` scalars every iteration and warn on the conditions below"""
    slope_threshold: float = 0.01
    """adaptation slope of the return (per episode of a trial) below which it counts as flat"""
    slope_patience: int = 20
    """consecutive flat iterations before the one-line warning"""
    meta_grad_threshold: float = 1e-5
    """meta-gradient norm below which the warning says it vanished"""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"diagnostics.enabled={self.enabled!r}; allowed: true, false")
        if isinstance(self.slope_patience, bool) or int(self.slope_patience) < 1:
            raise ValueError(
                f"diagnostics.slope_patience={self.slope_patience!r}; allowed: an integer >= 1"
            )
        if not self.meta_grad_threshold >= 0:
            raise ValueError(
                f"diagnostics.meta_grad_threshold={self.meta_grad_threshold!r}; allowed: a "
                "number >= 0"
            )
        if not math.isfinite(self.slope_threshold):
            raise ValueError(
                f"diagnostics.slope_threshold={self.slope_threshold!r}; allowed: a finite number"
            )


def check_env(env_id: str, env_kwargs: dict) -> None:
    """One-line ``ValueError`` for an env id that is not a registered task family, or an env
    keyword its constructor does not take (gymnasium would fail only at the first env)."""
    import inspect

    import gymnasium as gym

    import envs  # noqa: F401  (registers the task families)

    families = sorted(k for k in gym.registry if k.startswith("Compo"))
    if env_id not in families:
        raise ValueError(f"env_id={env_id!r}; allowed: {', '.join(families)}")
    if not isinstance(env_kwargs, dict):
        raise ValueError(f"env_kwargs={env_kwargs!r}; allowed: a mapping")
    creator = gym.envs.registration.load_env_creator(gym.registry[env_id].entry_point)
    params = inspect.signature(creator).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(env_kwargs) - set(params) - {"composition"})
    if unknown:
        allowed = ", ".join(k for k in params if k not in ("self", "composition"))
        raise ValueError(f"env_kwargs.{unknown[0]}: unknown to {env_id}; allowed: {allowed}")


#: upper bounds of the shared counts: beyond them a run exhausts the machine (memory for
#: num_envs, years for the budget) instead of failing fast
LIMITS = {"episodes_per_trial": 10_000, "num_envs": 4096, "total_env_steps": 10**11}


@dataclasses.dataclass
class BaseConfig:
    """Fields every method shares, so runs are set up under the same conditions."""

    env_id: str = "CompoGrid-v0"
    """registered env id (CompoGrid-v0 or CompoMetaWorld-v0)"""
    env_kwargs: dict = dataclasses.field(default_factory=lambda: {"task_info": "reward", "size": 8})
    """env keyword arguments (the composition comes from the task)"""
    compositions: list | None = None
    """compositions to train on; None: the train side of the split below"""
    split_family: str = "grid"
    """task family of the split (see envs.make_split)"""
    split_seed: int = 0
    """seed of the split"""
    fixed_layout: bool = True
    """one layout/goal seed per trial (meta-RL); False draws a new one every episode"""
    episodes_per_trial: int = 1
    """E: episodes per trial during training (memory persists over them)"""
    num_envs: int = 8
    """parallel envs"""
    vectorization: str = "auto"
    """'batched' (array-programmed envs: CompoGrid), 'sync' or 'async' (per-env gymnasium
    copies), or 'auto': batched where it exists, else sync"""
    total_env_steps: int = 300_000
    """meta-training env-step budget"""
    seed: int = 0
    """seed of torch, numpy and the envs"""
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    """meta-RL diagnostics during training (adaptation slope, gradient norms, entropies)"""

    def __post_init__(self) -> None:
        if isinstance(self.diagnostics, dict):
            self.diagnostics = config_from_dict(DiagnosticsConfig, self.diagnostics, "diagnostics.")
        if not isinstance(self.diagnostics, DiagnosticsConfig):
            raise ValueError(
                f"diagnostics={self.diagnostics!r}; allowed: a mapping with keys enabled, "
                "slope_threshold, slope_patience, meta_grad_threshold"
            )
        check_env(self.env_id, self.env_kwargs)
        for k, top in LIMITS.items():
            if not 1 <= int(getattr(self, k)) <= top:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: an integer in [1, {top:.0e}]")
        if int(self.seed) < 0:
            raise ValueError(f"seed={self.seed}; allowed: an integer >= 0")
        if self.compositions is not None and not self.compositions:
            raise ValueError("compositions=[]; allowed: a non-empty list, or null (the split's)")
        need = self.rollout_env_steps()
        if self.total_env_steps < need:
            raise ValueError(
                f"total_env_steps={self.total_env_steps} is less than one rollout ({need} env "
                "steps); allowed: at least one rollout"
            )
        from rl.collect import resolve_vectorization

        resolve_vectorization(self.env_id, self.vectorization)

    def rollout_env_steps(self) -> int:
        """Env steps of one training rollout: the smallest budget that trains at all (a
        method with fixed-length rollouts says how long they are)."""
        return int(self.num_envs)

    def train_layout_seeds(self) -> list[int] | None:
        """Layout/goal seeds the split reserves for training (Meta-World), else None."""
        if self.compositions:
            return None
        from envs import make_split

        seeds = make_split(self.split_family, seed=self.split_seed).meta.get("train_layout_seeds")
        return None if seeds is None else [int(s) for s in seeds]

    def train_compositions(self) -> list[str]:
        """The compositions meta-training draws from."""
        if self.compositions:
            return [str(c) for c in self.compositions]
        from envs import make_split

        return [str(c) for c in make_split(self.split_family, seed=self.split_seed).train]


def config_from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict; a key it does not know raises ``ValueError``."""
    if data is not None and not isinstance(data, dict):
        raise ValueError(
            f"config {where.rstrip('.') or cls.__name__}={data!r}; allowed: a mapping of "
            f"{cls.__name__} keys"
        )
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key {where + unknown[0]!r} for {cls.__name__}; allowed: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            # the keys a user leaves out keep the *field's* default (e.g. the compositional
            # controller's own PPO settings), not the section class's
            default = _field_default(fields[name])
            if dataclasses.is_dataclass(default):
                value = merge(config_to_dict(default), value)
            kwargs[name] = config_from_dict(hint, value, where=f"{where}{name}.")
        elif dataclasses.is_dataclass(hint) and dataclasses.is_dataclass(value):
            kwargs[name] = value
        elif dataclasses.is_dataclass(hint):  # e.g. --set ppo=5
            raise ValueError(
                f"config key {where + name!r}={value!r}; allowed: a mapping of {hint.__name__} keys"
            )
        else:
            kwargs[name] = _coerce(f"{where}{name}", hint, value)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


#: what a field of each kind accepts (numbers: ``_coerce`` converts and checks them)
KINDS = {dict: "a mapping", list: "a list", str: "a string", bool: "true or false"}


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Numbers for numeric fields (and 'on'/'off' for str fields YAML read as booleans): YAML reads ``1e-3`` (no dot) as the string '1e-3', and an
    integer where a float is declared is harmless; anything else that is not a number for an
    ``int``/``float`` field is refused by name."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if hint is str and isinstance(value, bool):
        # YAML 1.1 (PyYAML, also for --set values) reads on/off/yes/no as booleans; the only
        # str fields with such values are on/off switches (e.g. ``inner_loop``), so give the
        # word back; any other field then refuses 'on'/'off' by name in its own check
        return "on" if value else "off"
    plain = [a for a in args if a is not type(None)] if args else [hint]
    kind = (typing.get_origin(plain[0]) or plain[0]) if len(plain) == 1 else None
    if kind in KINDS and not isinstance(value, (kind, tuple) if kind is list else kind):
        raise ValueError(f"config key {key!r}={value!r}; allowed: {KINDS[kind]}")
    numeric = [t for t in (args or (hint,)) if t in (int, float)]
    if not numeric or (args and len(plain) != 1):
        return value
    want = numeric[0]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"config key {key!r}={value!r}; allowed: a number ({want.__name__})")
    if isinstance(value, str):
        try:
            value = float(value) if want is float else int(value)
        except ValueError:
            raise ValueError(
                f"config key {key!r}={value!r}; allowed: a number ({want.__name__})"
            ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key {key!r}={value!r}; allowed: a finite number")
    if want is float and isinstance(value, int):
        return float(value)
    if want is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"config key {key!r}={value!r}; allowed: an integer")
        return int(value)
    return value


def config_to_dict(cfg: Any) -> dict:
    """Plain (YAML/JSON/checkpoint-safe) dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def merge(base: dict, override: dict) -> dict:
    """Recursive dict update (override wins)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
