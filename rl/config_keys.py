"""Config keys as a user meets them: documented, printable, and never silently overridden.

Each config dataclass documents a field with a string literal right under it (the attribute
docstring convention of ``rl.config.BaseConfig``, as in CleanRL's ``Args``); ``key_docs``
reads those strings from the class source, so the config files stay plain dataclasses. A field
may instead carry ``dataclasses.field(metadata={"help": ...})``.

``print_config`` writes a method's whole config as a YAML file a run can be started from
(``compo train --method M --print-config > my.yaml``), each key under a comment with its type,
its default and its description.

``resolve_user_keys`` applies the one rule between keys: a default never beats a key the user
set, and two user-set keys that contradict each other are an error naming both.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from rl.config import config_from_dict, config_to_dict


@dataclass(frozen=True)
class ConfigKey:
    """One key of a config: dotted name (``ppo.lr``), type, default value and description."""

    name: str
    type: str
    default: Any
    help: str


@cache
def key_docs(cls: type) -> dict[str, str]:
    """Field name -> its one-line description, for ``cls`` and the dataclasses it inherits from
    (a subclass's docstring of a redeclared field wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined where no source is kept (e.g. a REPL)
            continue
        body = ast.parse(source).body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = " ".join(str(f.metadata["help"]).split())
    return docs


def type_name(hint: Any) -> str:
    """``int``, ``list | None``, ``PPOConfig``...: a type as written in the config class."""
    if hint is type(None):
        return "None"
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def config_keys(cfg: Any, prefix: str = "") -> list[ConfigKey]:
    """Every key of config instance ``cfg`` (nested dataclasses as dotted keys), in field order,
    with the defaults of ``type(cfg)`` (a nested config's defaults are those its parent's
    ``default_factory`` gives, e.g. the compositional controller's own PPO settings)."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    docs = key_docs(cls)
    defaults = _defaults(cls) if not prefix else cfg
    out: list[ConfigKey] = []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(config_keys(value, f"{prefix}{f.name}."))
            continue
        out.append(
            ConfigKey(prefix + f.name, type_name(hints[f.name]), value, docs.get(f.name, ""))
        )
    return out


@cache
def _defaults(cls: type) -> Any:
    return cls()


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def print_config(cls: type, user: dict | None = None, method: str | None = None) -> str:
    """``cls``'s config with the user's keys applied, as a commented YAML file that replays it.

    Examples:
        >>> from rl.ppo import PPOModuleConfig
        >>> text = print_config(PPOModuleConfig, {"total_env_steps": 512}, "ppo")
        >>> yaml.safe_load(text)["total_env_steps"]
        512
    """
    cfg = config_from_dict(cls, user or {})
    values = config_to_dict(cfg)
    lines = [f"method: {method}"] if method else []
    section: list[str] = []
    for key in config_keys(cfg):
        parts = key.name.split(".")
        head = parts[:-1]
        common = 0
        while common < min(len(head), len(section)) and head[common] == section[common]:
            common += 1
        for depth in range(common, len(head)):  # open the nested sections this key is in
            lines.append(f"{'  ' * depth}{head[depth]}:")
        section = head
        value = values
        for p in parts:
            value = value[p]
        indent = "  " * (len(parts) - 1)
        note = key.type
        if value != key.default:
            note += f", default {_yaml_value(key.default)}"
        lines.append(f"{indent}# {note}: {key.help}" if key.help else f"{indent}# {note}")
        lines.append(f"{indent}{parts[-1]}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def resolve_user_keys(cls: type, user: dict) -> dict:
    """``user`` (the keys the user set: config file, ``--set``, ``--composition``) with the
    defaults that would override one of them removed; a contradiction between two user-set keys
    raises a one-line ``ValueError`` naming both.

    ``compositions`` names the train compositions directly, ``split_family``/``split_seed`` name
    them through a split. A method whose default ``compositions`` is a list (plain PPO) would
    otherwise train on that list whatever split the user chose: so a user-set split with no
    user-set ``compositions`` trains on the split's train side. Both set: the compositions must
    belong to that family (the split's held-out side is what ``compo eval`` measures).
    """
    out = dict(user)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    split_keys = [k for k in ("split_family", "split_seed") if k in user]
    if "compositions" not in fields or not split_keys:
        return out
    if "compositions" not in user:
        if getattr(_defaults(cls), "compositions", None) is not None:
            out["compositions"] = None
        return out
    if not user["compositions"] or "split_family" not in user:
        return out
    from envs import Composition, make_split

    family = user["split_family"]
    known = set(make_split(family, seed=int(user.get("split_seed", 0))).primitives)
    for text in user["compositions"]:
        missing = [p for p in Composition.parse(text).primitives if p not in known]
        if missing:
            raise ValueError(
                f"compositions={[str(c) for c in user['compositions']]!r} and "
                f"split_family={family!r} conflict: {str(missing[0])!r} is no primitive of that "
                "family; set one of them"
            )
    return out
