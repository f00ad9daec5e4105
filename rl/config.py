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
        for k in ("episodes_per_trial", "num_envs", "total_env_steps"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: an integer >= 1")
        from rl.collect import resolve_vectorization

        resolve_vectorization(self.env_id, self.vectorization)

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
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ValueError(
            f"config {where or cls.__name__} must be a mapping, got {type(data).__name__}"
        )
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
        else:
            kwargs[name] = _coerce(f"{where}{name}", hint, value)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


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
    numeric = [t for t in (args or (hint,)) if t in (int, float)]
    if not numeric or (args and len([a for a in args if a is not type(None)]) != 1):
        return value
    want = numeric[0]
    if isinstance(value, bool):
        raise ValueError(f"config key {key!r}={value!r}; allowed: a number ({want.__name__})")
    if isinstance(value, str):
        try:
            value = float(value) if want is float else int(value)
        except ValueError:
            raise ValueError(
                f"config key {key!r}={value!r}; allowed: a number ({want.__name__})"
            ) from None
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
