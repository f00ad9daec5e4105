"""The compositional agent (method ``compositional``): skill library + meta-controller + attention
composer + skill graph, meta-trained on train compositions (the seed document's Q10, built as
it means).

Phase 1 (a ``discovery_fraction`` share of the env-step budget, or a ``library_checkpoint``)
trains the ``SkillLibrary`` with DIAYN (``primitives="discovered"``) or on one primitive per
skill (``"supervised"``); ``"random-frozen"`` keeps a random, frozen library.

Phase 2 meta-trains on trials of E episodes of train compositions (fixed layout per trial).
Each step the policy

1. updates the LSTM controller with [enc(s_t), alpha_{t-1}, r_{t-1}, done_{t-1}];
2. ends the active skill k with probability beta_k(s_t) (graph ``learned``) or every
   ``skill_len`` steps (graph ``none``); on an end the next skill z_t is drawn from
   ``softmax(controller logits + A[k])``;
3. forms the composer weights alpha_t (``attention``: that softmax; ``hard``: one-hot of z_t;
   ``uniform``: 1/K) and acts from the alpha-weighted skills (see ``compositional.composer``).

The acting policy samples (switch, z_t, a_t) jointly, so its log-probability is
``log pi(a_t) + log p(switch) + switch * log p(z_t)``: PPO's ratio is then exact for the
hierarchical policy, and the termination heads and the adjacency logits get policy gradients.

Inner loop (``inner_loop="on"``): after each of a trial's first ``inner_episodes`` episodes,
the *fast* parameters of controller and composer (``fast_params="context"``: the controller's
output bias, the query bias and the skill keys; ``"full"``: also the two weight matrices) take
``inner_steps`` policy-gradient steps on that episode, as functional parameters
(``torch.func.functional_call``; the module's own parameters are never written), and the rest
of the trial acts with them (one adapted set per env, batched).
Outer loop: PPO (``rl.ppo.ppo_update``) over whole trials (RL²-style trial-level advantages)
updates library, controller, composer and graph. The outer gradient through the adaptation is
first-order (FOMAML-style: the adaptation offset is held fixed), which keeps PPO's minibatch
epochs cheap; the second-order variant lives in ``baselines.maml``. The LSTM is trained by
truncated BPTT from the hidden states stored while acting (``bptt_len``, default 1: one
recurrent step, the cheapest; 16 costs ~1.3x more time; the measured throughput against plain
PPO is the ``method_sps`` benchmark's ``compositional_paired_ratio_to_ppo`` row).

Per step the policy returns in ``StepOutput.extras``: ``skill`` (active skill), ``alpha`` (K
composer weights), ``termination`` (beta of the active skill at s_t) and ``switch``, so
``compo trace`` needs no second implementation of the policy. Collectors step under no_grad,
and there the policy runs ``act_fused``: the same maths with the layers that share an input
fused into one matrix each (tested against the module-by-module ``act`` to 1e-5).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from primitives.discovery import (
    PhiEncoder,
    SkillTrainer,
    SkillTrainingConfig,
    probe_env,
    save_heatmaps,
)
from primitives.library import SkillLibrary, check_num_skills
from primitives.library import inverse_cdf as _inverse_cdf
from rl.collect import Collector, Episode, Prev, StepOutput, make_vector_env, uniform_task_sampler
from rl.config import BaseConfig
from rl.gae import gae
from rl.io import safe_torch_load
from rl.module import RLModule
from rl.ppo import PPOConfig, ppo_update

from .composer import AttentionComposer, check_composer_mode
from .controller import MetaController
from .graph import SkillGraph, check_graph_mode

PRIMITIVE_MODES = ("discovered", "supervised", "random-frozen")
ON_OFF = ("on", "off")  # inner_loop, skill_credit
ADVANTAGE_MODES = ("trial", "episode")
#: parameters the inner loop adapts, per ``fast_params`` setting: ``context`` adapts the
#: controller's output bias, the query bias and the skill keys (a CAVIA-style context, Zintgraf
#: et al. 2019: cheap to batch per env); ``full`` adds the two weight matrices
FAST_PARAM_SETS = {
    "context": ("controller.proj.bias", "composer.query.bias", "composer.keys"),
    "full": (
        "controller.proj.weight",
        "controller.proj.bias",
        "composer.query.weight",
        "composer.query.bias",
        "composer.keys",
    ),
}
FAST_PARAMS = FAST_PARAM_SETS["full"]


@dataclass
class CompositionalConfig(BaseConfig):
    """Compositional agent: library + LSTM meta-controller + attention composer + skill graph."""

    episodes_per_trial: int = 2
    """E during meta-training (>= 2 lets the inner loop act on what it adapted)"""
    num_skills: int = 12
    """K: number of skills"""
    hidden: int = 64
    """width of library, controller encoder and LSTM"""
    key_dim: int = 32
    """size of the composer's queries and skill keys"""
    init_termination: float = 0.1
    """initial beta_k(s) of a freshly built library"""
    primitives: str = "discovered"
    """'discovered' (DIAYN), 'supervised' (one primitive per skill) or 'random-frozen'"""
    composer: str = "attention"
    """'attention' (soft), 'hard' (straight-through Gumbel-softmax) or 'uniform' (1/K)"""
    gumbel_tau: float = 1.0
    """temperature of the hard composer's straight-through gradient"""
    graph: str = "learned"
    """'learned' (adjacency logits + terminations) or 'none' (no prior, fixed-length skills)"""
    skill_len: int = 8
    """graph 'none': steps between re-selections"""
    inner_loop: str = "on"
    """'on': adapt controller output + composer on the trial's first episode(s); 'off'"""
    skill_credit: str = "off"
    """'on': the controller's LSTM also reads the trial's reward credited to each skill,
    C_k = sum over the trial so far of r_t * alpha_{t,k}, normalised to sum to 1 (zeros before
    the first reward), so that which skills paid earlier in the trial is an input rather than
    something the LSTM must carry across episodes by itself; 'off' (the issue's inputs)"""
    inner_lr: float = 0.5
    """inner-loop step size"""
    inner_steps: int = 1
    """inner-loop gradient steps per adapted episode"""
    inner_episodes: int = 1
    """adapt after each of the first this many episodes of a trial"""
    fast_params: str = "context"
    """what the inner loop adapts: 'context' (controller output bias, query bias, skill keys)
    or 'full' (also the controller output and query weights; about 1.4x slower training)"""
    library_checkpoint: str | None = None
    """a ``discovery`` checkpoint to load instead of phase 1 (its env steps count)"""
    discovery_fraction: float = 0.3
    """share of total_env_steps spent on phase 1 when the library is trained here"""
    discovery: SkillTrainingConfig = field(default_factory=SkillTrainingConfig)
    """phase-1 settings (discriminator, skills' PPO)"""
    library_lr: float = 1e-4
    """outer-loop learning rate of the library (small: keep the discovered skills)"""
    bptt_len: int = 1
    """outer-loop PPO: truncated-BPTT chunk length through the LSTM (chunks start from the
    states stored while acting); >= ppo.num_steps is full BPTT over the rollout"""
    advantage: str = "trial"
    """'trial' (RL²-style, returns span the trial) or 'episode'"""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(lr=2e-3))
    """outer-loop PPO hyper-parameters (lr 2e-3: at PPO's 5e-4 the joint (switch, skill,
    action) policy moved by approx_kl ~ 0.001 per update on CompoGrid, ~0.004 at 2e-3)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ppo, dict):
            self.ppo = PPOConfig(**self.ppo)
        if isinstance(self.discovery, dict):
            self.discovery = SkillTrainingConfig(**self.discovery)
        check_num_skills(self.num_skills)
        check_composer_mode(self.composer)
        check_graph_mode(self.graph)
        for name, allowed in (
            ("primitives", PRIMITIVE_MODES),
            ("inner_loop", ON_OFF),
            ("skill_credit", ON_OFF),
            ("advantage", ADVANTAGE_MODES),
            ("fast_params", tuple(FAST_PARAM_SETS)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in ("hidden", "key_dim", "skill_len", "bptt_len", "inner_steps", "inner_episodes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: an integer >= 1")
        if not 0.0 <= self.discovery_fraction < 1.0:
            raise ValueError(f"discovery_fraction={self.discovery_fraction}; allowed: [0, 1)")
        if self.inner_lr < 0 or self.library_lr < 0 or self.gumbel_tau <= 0:
            raise ValueError(
                f"inner_lr={self.inner_lr}, library_lr={self.library_lr}, "
                f"gumbel_tau={self.gumbel_tau}; allowed: lrs >= 0, tau > 0"
            )
        if self.library_checkpoint is not None and self.primitives == "random-frozen":
            raise ValueError(
                "primitives='random-frozen' takes no library_checkpoint; "
                "allowed: library_checkpoint=None, or primitives 'discovered'/'supervised'"
            )


def _a_major(w: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the skill head (k-major: row k * A + a) reordered a-major (row a * K + k)."""
    return w.reshape(k, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


class _FastPath(nn.Module):
    """h -> controller logits through the fast parameters (for ``functional_call``)."""

    def __init__(self, controller: MetaController, composer: AttentionComposer) -> None:
        super().__init__()
        self.controller = controller
        self.composer = composer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.composer.logits(self.controller.features(h))


class CompositionalPolicy:
    """The acting policy (``RolloutPolicy``) with per-env adapted fast parameters.

    Memory (a flat tuple, reset only at trial starts): LSTM (h, c), previous weights alpha,
    active skill (-1: none yet), steps since the last switch. Adapted parameters are kept as
    offsets ``table[fast_id[env]]`` from the meta-parameters (id 0 = no adaptation); the id
    used at each step is stored in ``extras["fast_id"]`` so the outer update sees them
    (``fast_id`` is replaced, never written in place, so stored ids stay as they were).
    """

    def __init__(self, agent: CompositionalAgent, inner: bool) -> None:
        self.agent = agent
        self.inner = inner
        self.table: list[torch.Tensor] = [torch.zeros(agent.fast_size)]
        self.fast_id = torch.zeros(0, dtype=torch.long)
        self.rows: list[dict[str, torch.Tensor]] = []
        self.row_base = 0
        self.ep_start: list[int] = []
        self._stacked: torch.Tensor | None = None
        # (acting weights, per-env fused weights of the adapted sets) for the current fast_id
        self._ctx: tuple | None = None

    # -- memory ------------------------------------------------------------------------------------
    def initial_memory(self, n: int) -> tuple:
        k, hdim = self.agent.k, self.agent.cfg.hidden
        self.fast_id = torch.zeros(n, dtype=torch.long)
        self._ctx = None
        self.ep_start = [self.row_base + len(self.rows)] * n
        return (
            torch.zeros(n, hdim),
            torch.zeros(n, hdim),
            torch.zeros(n, k * (2 if self.agent.cfg.skill_credit == "on" else 1)),
            torch.full((n,), -1, dtype=torch.long),
            torch.zeros(n, dtype=torch.long),
        )

    def reset_memory(self, memory: tuple, mask: torch.Tensor) -> tuple:
        h, c, pa, sk, st = (m.clone() for m in memory)
        h[mask] = 0.0
        c[mask] = 0.0
        pa[mask] = 0.0
        sk[mask] = -1
        st[mask] = 0
        self.fast_id = self.fast_id.masked_fill(mask, 0)
        self._ctx = None
        return h, c, pa, sk, st

    # -- acting ------------------------------------------------------------------------------------
    def _deltas(self, ids: torch.Tensor) -> torch.Tensor | None:
        if not bool((ids != 0).any()):
            return None
        if self._stacked is None or self._stacked.shape[0] != len(self.table):
            self._stacked = torch.stack(self.table)
        return self._stacked[ids]

    def _fused_weights(self) -> tuple[dict, dict | None]:
        """The agent's fused acting weights and, if any env acts adapted, the per-env fused
        weights of the adapted sets (kept until fast_id, the table or a parameter changes)."""
        ag = self.agent
        w = ag._packed()
        if self._ctx is None or self._ctx[0] is not w:
            deltas = self._deltas(self.fast_id)
            self._ctx = (w, None if deltas is None else ag.fused_fast_weights(deltas, w))
        return self._ctx

    def step(self, obs: torch.Tensor, memory: tuple, prev: Prev) -> StepOutput:
        ag = self.agent
        h, c, pa, sk, st = memory
        pa, credit = ag.skill_input(pa, prev.reward)
        start = (prev.done > 0) | (sk < 0)
        fast_id = self.fast_id
        if torch.is_grad_enabled():  # the reference path (module by module)
            enc = ag.controller.encode(obs)
            x = ag.controller.inputs(enc, pa, prev.reward, prev.done)
            h, c = ag.controller.step(x, (h, c))
            r = ag.act(obs, h, enc, sk, st, start, self._deltas(fast_id))
        else:  # collectors act under no_grad: the same maths with fused layers
            w, fast = self._fused_weights()
            h, c, r = ag.act_fused(obs, h, c, pa, prev, sk, st, start, w, fast)
        steps = (st + 1).masked_fill(r["switch"], 1)
        extras = {
            "skill": r["skill"],
            "alpha": r["alpha"],
            "termination": r["termination"],
            "switch": r["switch"],
            "prev_skill": sk,
            "start": start,
            "steps": st,
            "prev_alpha": pa,
            "fast_id": fast_id,
            "h_in": memory[0],
            "c_in": memory[1],
        }
        if self.inner:
            if bool(start.any()):
                for i in torch.nonzero(start).squeeze(-1).tolist():
                    self.ep_start[i] = self.row_base + len(self.rows)
            self.rows.append(
                {"h": h, "prev_skill": sk, "start": start, "steps": st,
                 "switch": r["switch"], "skill": r["skill"]}
            )  # fmt: skip
            if len(self.rows) > 4096:  # long episodes: drop rows of finished ones now
                self._drop_finished_rows()
        alpha = r["alpha"] if credit is None else torch.cat([r["alpha"], credit], 1)
        memory = (h, c, alpha, r["skill"], steps)
        return StepOutput(r["action"], r["logp"], r["value"], memory, extras)

    def _drop_finished_rows(self) -> None:
        """Forget recorded steps that precede every env's current episode."""
        cut = min(self.ep_start, default=self.row_base + len(self.rows)) - self.row_base
        if cut > 0:
            self.rows = self.rows[cut:]
            self.row_base += cut

    def bootstrap_value(self, obs: torch.Tensor, memory: tuple, prev: Prev) -> torch.Tensor:
        ag = self.agent
        h, c, pa, _, _ = memory
        pa, _ = ag.skill_input(pa, prev.reward)
        enc = ag.controller.encode(obs)
        h2, _ = ag.controller.step(ag.controller.inputs(enc, pa, prev.reward, prev.done), (h, c))
        return ag.controller.value(h2, enc)

    # -- inner loop ----------------------------------------------------------------------------------
    def adapt(self, i: int, ep: Episode) -> None:
        """Collector hook: adapt env ``i``'s fast parameters on its finished episode."""
        if ep.stats.episode_index >= self.agent.cfg.inner_episodes:
            return
        n = ep.obs.shape[0]
        lo = self.ep_start[i] - self.row_base
        # the hook runs right after the episode's last step: its steps are the last n rows
        if len(self.rows) - lo < n:
            raise RuntimeError(
                f"inner loop: {len(self.rows) - lo} recorded steps for an episode of {n}"
            )
        rows = self.rows[len(self.rows) - n :]
        trace = {k: torch.stack([r[k] for r in rows])[:, i] for k in rows[0]}
        delta = self.table[int(self.fast_id[i])]
        with torch.enable_grad():
            new = self.agent.adapt_fast(delta, ep, trace)
        self.table.append(new)
        self.fast_id = self.fast_id.clone()
        self.fast_id[i] = len(self.table) - 1
        self._ctx = None

    def prune(self) -> None:
        """Forget adapted parameter sets no env uses any more and recorded steps of finished
        episodes (between rollouts)."""
        used = sorted(set(self.fast_id.tolist()) | {0})
        remap = {old: new for new, old in enumerate(used)}
        self.table = [self.table[j] for j in used]
        self._stacked = self._ctx = None
        self.fast_id = torch.tensor([remap[int(j)] for j in self.fast_id], dtype=torch.long)
        self._drop_finished_rows()

    def state_dict(self) -> dict:
        """Plain tensors; the recorded steps of unfinished episodes are stacked per key (a
        list of per-step dicts would pickle thousands of small tensors per checkpoint)."""
        cut = min(self.ep_start, default=self.row_base + len(self.rows)) - self.row_base
        keep = self.rows[max(cut, 0) :]
        return {
            "table": torch.stack(self.table),
            "fast_id": self.fast_id.clone(),
            "rows": {k: torch.stack([r[k] for r in keep]) for k in keep[0]} if keep else {},
            "row_base": self.row_base + max(cut, 0),
            "ep_start": list(self.ep_start),
        }

    def load_state_dict(self, st: dict) -> None:
        self.table = list(st["table"])
        self._stacked = self._ctx = None
        self.fast_id = st["fast_id"].clone()
        rows = st["rows"]
        if isinstance(rows, dict):  # stacked per key (a list of per-step dicts before)
            n = len(next(iter(rows.values()))) if rows else 0
            rows = [{k: v[t] for k, v in rows.items()} for t in range(n)]
        self.rows = list(rows)
        self.row_base = int(st["row_base"])
        self.ep_start = list(st["ep_start"])


class CompositionalAgent(RLModule):
    """Method ``compositional`` (see the module docstring)."""

    method = "compositional"
    config_cls = CompositionalConfig

    # -- construction --------------------------------------------------------------------------------
    def build(self) -> None:
        cfg: CompositionalConfig = self.cfg
        self.k = cfg.num_skills
        self.train_set = cfg.train_compositions()
        env_kwargs = {**cfg.env_kwargs, "composition": self.train_set[0]}
        self.obs_dim, self.action_space, phi = probe_env(cfg.env_id, env_kwargs)
        self.library = SkillLibrary(
            self.obs_dim, self.action_space, self.k, cfg.hidden, cfg.init_termination
        )
        self.library_env_steps = 0
        # a reloaded compositional checkpoint holds the library itself, so a library file that
        # has since moved is only an error when training starts from scratch (see ``setup``)
        self._library_missing = False
        if cfg.library_checkpoint is not None:
            if Path(cfg.library_checkpoint).is_file():
                self.library_env_steps = self._load_library(cfg.library_checkpoint)
            else:
                self._library_missing = True
        if cfg.primitives == "random-frozen":
            self.library.requires_grad_(False)
        self.controller = MetaController(
            self.obs_dim, self.k, cfg.hidden, credit=cfg.skill_credit == "on"
        )
        self.composer = AttentionComposer(
            cfg.hidden, self.k, cfg.key_dim, cfg.composer, cfg.gumbel_tau
        )
        self.graph = SkillGraph(self.k, cfg.graph, cfg.skill_len)
        # not registered as a submodule: it only re-exposes controller + composer parameters
        object.__setattr__(self, "_fastpath", _FastPath(self.controller, self.composer))
        # the Parameter objects are stable (load_state_dict copies in place): look them up once
        self._fp_params = dict(self._fastpath.named_parameters())
        self.fast_names = FAST_PARAM_SETS[cfg.fast_params]
        self.fast_shapes = [(n, self._fp_params[n].shape) for n in self.fast_names]
        self._fast_slices, i = [], 0
        for n, shp in self.fast_shapes:
            m = int(np.prod(shp))
            self._fast_slices.append((n, tuple(shp), i, i + m))
            i += m
        self.fast_size = i
        self._pack: dict | None = None  # acting weights of ``_packed``
        # phase 1
        from envs import make_split

        self.discover = cfg.library_checkpoint is None and cfg.primitives != "random-frozen"
        self.skill_trainer = SkillTrainer(
            self.library, "diayn" if cfg.primitives == "discovered" else "supervised",
            PhiEncoder.for_env(cfg.env_id, cfg.env_kwargs, phi), cfg.discovery,
            env_id=cfg.env_id, env_kwargs=cfg.env_kwargs, num_envs=cfg.num_envs,
            vectorization=cfg.vectorization, seed=cfg.seed + 1, compositions=self.train_set,
            primitives=make_split(cfg.split_family, seed=cfg.split_seed).primitives,
        ) if cfg.primitives != "random-frozen" else None  # fmt: skip
        self.discriminator = (
            None if self.skill_trainer is None else self.skill_trainer.discriminator
        )
        self._plan_budget()
        self.disc_collector: Collector | None = None
        self._disc_steps = 0
        self._meta_steps = 0
        self._stash: dict | None = None
        self.policy: CompositionalPolicy | None = None

    def _plan_budget(self) -> None:
        """Iterations of phase 1 and phase 2 so that library + discovery + meta-training env
        steps add up to ``total_env_steps`` (the baselines' budget)."""
        cfg: CompositionalConfig = self.cfg
        per_disc = cfg.num_envs * cfg.discovery.ppo.num_steps
        disc_budget = (
            int(round(cfg.discovery_fraction * cfg.total_env_steps)) if self.discover else 0
        )
        self.n_disc = -(-disc_budget // per_disc) if disc_budget > 0 else 0
        meta_budget = cfg.total_env_steps - self.n_disc * per_disc - self.library_env_steps
        if meta_budget <= 0:
            raise ValueError(
                f"total_env_steps={cfg.total_env_steps} leaves no meta-training steps after "
                f"{self.n_disc * per_disc + self.library_env_steps} library steps; "
                "allowed: a larger total_env_steps or a smaller discovery_fraction"
            )
        self.n_meta = max(1, -(-meta_budget // (cfg.num_envs * cfg.ppo.num_steps)))

    def _load_library(self, path: str) -> int:
        """Load a ``discovery`` checkpoint's library; returns the env steps it was trained with."""
        cfg: CompositionalConfig = self.cfg
        ckpt = safe_torch_load(path)
        hp = ckpt.get("hyper_parameters") or {}
        if hp.get("method") != "discovery":
            raise ValueError(
                f"library_checkpoint {path!r} holds method {hp.get('method')!r}; "
                "allowed: a 'discovery' checkpoint"
            )
        lc = hp["config"]
        if int(lc["num_skills"]) != self.k:
            raise ValueError(
                f"library_checkpoint {path!r} has num_skills={lc['num_skills']} but "
                f"num_skills={self.k}; they must match"
            )
        if lc["env_id"] != cfg.env_id:
            raise ValueError(
                f"library_checkpoint {path!r} was trained on env_id={lc['env_id']!r}, "
                f"this agent uses {cfg.env_id!r}; they must match"
            )
        state = {
            k[len("library.") :]: v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("library.")
        }
        ck_obs = int(state["encoder.0.0.weight"].shape[1])
        if ck_obs != self.obs_dim:
            raise ValueError(
                f"library_checkpoint {path!r} has observation size {ck_obs} but the env "
                f"{cfg.env_id} with env_kwargs={cfg.env_kwargs} gives {self.obs_dim}; "
                "the observation spaces must match"
            )
        if int(lc["hidden"]) != cfg.hidden:
            raise ValueError(
                f"library_checkpoint {path!r} has hidden={lc['hidden']} but hidden={cfg.hidden}; "
                "they must match"
            )
        want = "diayn" if cfg.primitives == "discovered" else "supervised"
        if lc.get("objective", "diayn") != want:
            raise ValueError(
                f"library_checkpoint {path!r} was trained with objective={lc.get('objective')!r} "
                f"but primitives={cfg.primitives!r} needs {want!r}"
            )
        self.library.load_state_dict(state)
        rl_state = ckpt.get("rl_state") or {}
        extra = rl_state.get("extra") or {}
        if "env_steps" in extra:
            return int(extra["env_steps"])
        return int((rl_state.get("collector") or {}).get("env_steps", 0))

    # -- the policy maths ----------------------------------------------------------------------------
    def fast_params(self) -> dict[str, torch.Tensor]:
        """The meta-parameters the inner loop adapts (name -> Parameter)."""
        return {n: self._fp_params[n] for n in self.fast_names}

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = flat.shape[:-1]
        return {n: flat[..., a:b].reshape(*lead, *shp) for n, shp, a, b in self._fast_slices}

    def skill_input(
        self, pa: torch.Tensor, prev_reward: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LSTM's skill input from the memory's ``pa`` and the previous reward.

        Without skill credit ``pa`` is alpha_{t-1} and goes in as it is. With it, ``pa`` is
        [alpha_{t-1}, C] (C: reward credited per skill so far in the trial); r_{t-1} is
        credited to alpha_{t-1}, the weights that chose the action that earned it, and the
        input is [alpha_{t-1}, C / sum |C|] (zeros while C is 0).

        Returns:
            (the input, stored as ``extras["prev_alpha"]``; the updated raw C or None).
        """
        if self.cfg.skill_credit != "on":
            return pa, None
        k = self.k
        alpha = pa[:, :k]
        credit = torch.addcmul(pa[:, k:], alpha, prev_reward.float().unsqueeze(-1))
        total = credit.abs().sum(-1, keepdim=True)
        share = torch.where(total > 0, credit / total.clamp_min(1e-12), torch.zeros_like(credit))
        return torch.cat([alpha, share], 1), credit

    def ctrl_logits(self, h: torch.Tensor, deltas: torch.Tensor | None) -> torch.Tensor:
        """Controller logits over skills (B, K); ``deltas`` (B, P): per-row fast-parameter
        offsets (adapted parameters). The fast path's three layers are written as per-row
        products here (``vmap`` over ``functional_call`` gives the same numbers, see
        ``ctrl_logits_vmap`` and the tests, at ~5 ms per acting step)."""
        if deltas is None:
            return self._fastpath(h)
        p = dict(self._fp_params)
        for n, v in self._unflatten(deltas).items():
            p[n] = p[n].unsqueeze(0) + v

        def lin(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1) if w.dim() == 3 else x @ w.t()

        u = torch.tanh(lin(p["controller.proj.weight"], h) + p["controller.proj.bias"])
        q = lin(p["composer.query.weight"], u) + p["composer.query.bias"]
        keys = p["composer.keys"]
        # per-row keys (B, K, d): a broadcast product + sum over d costs less than a batch of
        # (K, d) x (d, 1) matrix products (~2.5x less with the backward pass)
        scores = (keys * q.unsqueeze(1)).sum(-1) if keys.dim() == 3 else q @ keys.t()
        return scores / math.sqrt(self.cfg.key_dim)

    def ctrl_logits_grouped(
        self, h: torch.Tensor, ids: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        """``ctrl_logits`` for rows using adapted set ``table[ids]``: one ``functional_call``
        per distinct set (a minibatch holds a few trials, so a few sets, rather than one weight
        matrix per row)."""
        if not bool((ids != 0).any()):
            return self._fastpath(h)
        base = self.fast_params()
        uniq, inv = torch.unique(ids, return_inverse=True)
        pieces, rows = [], []
        for j, u in enumerate(uniq.tolist()):
            r = torch.nonzero(inv == j).squeeze(-1)
            if u == 0:
                pieces.append(self._fastpath(h[r]))
            else:
                params = {n: base[n] + v for n, v in self._unflatten(table[u]).items()}
                pieces.append(functional_call(self._fastpath, params, (h[r],)))
            rows.append(r)
        return torch.cat(pieces)[torch.argsort(torch.cat(rows))]

    def ctrl_logits_vmap(self, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Reference for ``ctrl_logits``: ``functional_call`` per row under ``vmap``."""
        base = self.fast_params()
        params = {n: base[n].unsqueeze(0) + v for n, v in self._unflatten(deltas).items()}
        fp = self._fastpath
        return vmap(lambda p, x: functional_call(fp, p, (x,)))(params, h)

    def _core(self, obs, h, enc, prev_skill, steps, start, deltas, ids=None, table=None):
        if ids is not None and self.cfg.fast_params == "full":
            ctrl = self.ctrl_logits_grouped(h, ids, table)
        elif ids is not None:  # context: per-row offsets are small, batch them directly
            ctrl = self.ctrl_logits(h, table[ids] if bool((ids != 0).any()) else None)
        else:
            ctrl = self.ctrl_logits(h, deltas)
        sel = self.graph.next_skill_logits(ctrl, prev_skill, start)
        out, beta = self.library(obs)
        p_switch = self.graph.switch_prob(beta, prev_skill, steps, start)
        return sel, out, beta, p_switch

    def _joint(
        self, out, sel, p_switch, start, switch, skill, action=None, entropy=True, u=None,
        lsel_all=None, psel=None,
    ):  # fmt: skip
        """alpha, action, joint log-prob of (switch, skill, action) and entropy.

        The discrete case is written out (mixture probabilities, an inverse-CDF draw with the
        uniform ``u`` (B,) if given, ``gather``) rather than through ``Categorical`` objects:
        same distribution, a third of the acting time. ``lsel_all``: ``log_softmax(sel)`` and
        ``psel``: its ``exp`` if the caller has them.
        """
        if lsel_all is None:
            lsel_all = torch.log_softmax(sel, -1)
        if psel is None and (entropy or self.composer.mode == "attention"):
            psel = lsel_all.exp()
        if self.composer.mode == "attention":
            alpha = psel
        else:
            alpha = self.composer.weights(sel, skill)
        if self.library.head.discrete:
            # every skill's action probabilities as a (B, A, K) view: the same numbers as
            # softmax(out, -1), but torch's CPU softmax over a short last dim (A = 7 on
            # CompoGrid) is ~4x slower than over dim 1
            pk = torch.softmax(out.transpose(1, 2), 1)
            probs = torch.bmm(pk, alpha.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12)
            if action is None:
                u = torch.rand(probs.shape[0]) if u is None else u
                action = _inverse_cdf(probs, u)
            a_idx = action.long().view(-1, 1)
            if entropy:  # one log of every probability serves log-prob and entropy
                lprobs = probs.log()
                logp = lprobs.gather(1, a_idx).squeeze(1)
                ent_a = -(probs * lprobs).sum(-1)
            else:
                logp = probs.gather(1, a_idx).squeeze(1).log()
                ent_a = None
        else:
            dist = self.composer.mix(out, alpha, self.library.head, self.library.log_std)
            if action is None:
                action = dist.sample()
            logp = dist.log_prob(action)
            ent_a = dist.entropy() if entropy else None
        if self.graph.mode == "learned":
            p = p_switch.clamp(1e-6, 1 - 1e-6)
            lsw = torch.where(switch, p.log(), torch.log1p(-p))
            logp = logp + lsw.masked_fill(start, 0.0)
        lsel = lsel_all.gather(1, skill.view(-1, 1)).squeeze(1)
        logp = logp + lsel * switch  # the skill's log-prob counts where it was drawn
        if not entropy:
            return action, alpha, logp, None
        ent_sel = -(psel * lsel_all).sum(-1)
        return action, alpha, logp, ent_a + switch.float() * ent_sel

    def _sample(self, sel, out, beta, p_switch, prev_skill, start, value) -> dict:
        """Draw (switch, next skill, action) from the outputs of ``_core`` with three
        uniforms per env."""
        u = torch.rand(sel.shape[0], 3)
        switch = start | (u[:, 0] < p_switch)
        # the next skill ~ Categorical(softmax(sel)), which is also what the forward pass of
        # hard mode's straight-through Gumbel-softmax samples (Jang et al. 2017)
        lsel_all = torch.log_softmax(sel, -1)
        psel = lsel_all.exp()
        skill = torch.where(switch, _inverse_cdf(psel, u[:, 1]), prev_skill)
        action, alpha, logp, _ = self._joint(
            out, sel, p_switch, start, switch, skill, entropy=False, u=u[:, 2],
            lsel_all=lsel_all, psel=psel,
        )  # fmt: skip
        term = beta.gather(1, skill.view(-1, 1)).squeeze(1)
        return {
            "action": action,
            "logp": logp,
            "value": value,
            "skill": skill,
            "alpha": alpha.detach() if alpha.requires_grad else alpha,
            "termination": term,
            "switch": switch,
        }

    def act(self, obs, h, enc, prev_skill, steps, start, deltas) -> dict[str, torch.Tensor]:
        """One acting step given the controller's new hidden state ``h`` (the reference path,
        module by module; collectors use ``act_fused``)."""
        sel, out, beta, p_switch = self._core(obs, h, enc, prev_skill, steps, start, deltas)
        value = self.controller.value(h, enc)
        return self._sample(sel, out, beta, p_switch, prev_skill, start, value)

    # -- the fused acting path --------------------------------------------------------------------
    def _packed(self) -> dict[str, torch.Tensor]:
        """Acting weights with layers that share an input fused into one matrix: the two
        layers reading the observation (controller encoder, library layer 1), the LSTM's
        input and hidden matrices, the skill and termination heads, and the composer's query
        folded into its keys ((H, K): logits = u W_q^T k^T / sqrt(d)). Rebuilt when a module
        was replaced or a parameter's version counter moved (in-place writes:
        ``load_state_dict``, the discovery optimiser); the outer update's fused Adam does not
        move the counters, so ``_meta_step`` drops the cache itself. Never in the state dict."""
        mods = (self.controller, self.library, self.composer, self.graph)
        k = self.k
        cache = self._pack
        if (
            cache is not None
            and all(a is b for a, b in zip(cache["mods"], mods))
            and cache["versions"] == tuple(p._version for p in cache["params"])
        ):
            return cache
        ctrl, lib, comp, graph = mods
        c_in, l1, l2 = ctrl.encoder[0][0], lib.encoder[0][0], lib.encoder[0][2]
        lstm, v1, v2 = ctrl.lstm, ctrl.value_head[0], ctrl.value_head[2]
        params = [
            c_in.weight, c_in.bias, l1.weight, l1.bias, l2.weight, l2.bias,
            lib.skill_out.weight, lib.skill_out.bias, lib.termination.weight,
            lib.termination.bias, lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh,
            ctrl.proj.weight, ctrl.proj.bias, comp.query.weight, comp.query.bias, comp.keys,
            v1.weight, v1.bias, v2.weight, v2.bias, graph.adjacency_logits,
        ]  # fmt: skip
        scale = math.sqrt(comp.key_dim)
        with torch.no_grad():
            cache = {
                "w_in": torch.cat([c_in.weight, l1.weight]).t(),
                "b_in": torch.cat([c_in.bias, l1.bias]),
                "w_l2": l2.weight.detach().t(),
                "b_l2": l2.bias.detach(),
                # skill outputs reordered a-major ((A, K) per row): the per-skill softmax
                # over actions in _joint then reads memory with K, not A, as the unit stride
                "w_heads": torch.cat(
                    [_a_major(lib.skill_out.weight, k), lib.termination.weight]
                ).t(),
                "b_heads": torch.cat([_a_major(lib.skill_out.bias, k), lib.termination.bias]),
                "w_lstm": torch.cat([lstm.weight_ih, lstm.weight_hh], 1).t(),
                "b_lstm": lstm.bias_ih + lstm.bias_hh,
                "w_proj": ctrl.proj.weight.detach().t(),
                "b_proj": ctrl.proj.bias.detach(),
                "w_q": comp.query.weight.detach().t(),
                "b_q": comp.query.bias.detach(),
                "keys": comp.keys.detach() / scale,
                "w_uk": (comp.keys @ comp.query.weight).t() / scale,
                "b_uk": comp.keys @ comp.query.bias / scale,
                # graph prior rows with a zero row K for "no active skill" (episode starts)
                "adj": torch.cat([graph.adjacency_logits, torch.zeros(1, self.k)]),
                "w_v1": v1.weight.detach().t(),
                "b_v1": v1.bias.detach(),
                "w_v2": v2.weight.detach().t(),
                "b_v2": v2.bias.detach(),
            }
            # controller output and value hidden layer from [h, enc] in one product
            # (columns :H: proj, reading h only; H:: the value head's first layer)
            hdim = ctrl.proj.weight.shape[0]
            w_p = torch.cat([cache["w_proj"], cache["w_proj"].new_zeros(hdim, hdim)])
            cache["w_pv"] = torch.cat([w_p, cache["w_v1"]], 1)
            cache["b_pv"] = torch.cat([cache["b_proj"], cache["b_v1"]])
            # and their second layers block-diagonal: [u, v] -> [logits (K), value]
            cache["w_uv"] = torch.block_diag(cache["w_uk"], cache["w_v2"])
            cache["b_uv"] = torch.cat([cache["b_uk"], cache["b_v2"]])
        cache.update(mods=mods, params=params, versions=tuple(p._version for p in params))
        self._pack = cache
        return cache

    def fused_fast_weights(self, deltas: torch.Tensor, w: dict) -> dict:
        """Per-env fused acting weights of adapted fast parameters ``deltas`` (N, P) on top of
        the packed weights ``w`` (``context``: the biases and the scaled keys per env)."""
        if self.cfg.fast_params != "context":
            return {"deltas": deltas}
        per = self._unflatten(deltas)
        b_proj = w["b_proj"] + per["controller.proj.bias"]
        return {
            "b_pv": torch.cat([b_proj, w["b_v1"].expand(len(b_proj), -1)], 1),
            "b_q": w["b_q"] + per["composer.query.bias"],
            "keys": w["keys"] + per["composer.keys"] / math.sqrt(self.cfg.key_dim),
        }

    def act_fused(self, obs, h, c, prev_alpha, prev: Prev, prev_skill, steps, start, w, fast):
        """``controller.encode`` + ``controller.step`` + ``act`` with the fused weights ``w`` of
        ``_packed`` and ``fast`` of ``fused_fast_weights`` (None: no env adapted), no grad:
        the same distributions as the reference path up to float rounding (tested), in
        about half the time per step.

        Returns:
            (h, c, the dict of ``act``).
        """
        H, k = self.cfg.hidden, self.k
        z = torch.tanh(torch.addmm(w["b_in"], obs, w["w_in"]))
        enc, l1 = z[:, :H], z[:, H:]
        rd = torch.stack([prev.reward.float(), prev.done.float()], 1)
        gates = torch.addmm(w["b_lstm"], torch.cat([enc, prev_alpha, rd, h], 1), w["w_lstm"])
        sg = torch.sigmoid(gates)  # LSTM gates in torch's order i, f, g, o
        c = torch.addcmul(sg[:, H : 2 * H] * c, sg[:, :H], torch.tanh(gates[:, 2 * H : 3 * H]))
        h = sg[:, 3 * H :] * torch.tanh(c)
        lib_h = torch.tanh(torch.addmm(w["b_l2"], l1, w["w_l2"]))
        heads = torch.addmm(w["b_heads"], lib_h, w["w_heads"])
        n_out = self.library.head.n_out
        # (N, K, A) view of a contiguous a-major copy: _joint's softmax over actions then
        # runs on contiguous (N, A, K) memory (~3x faster than on the strided slice)
        out = heads[:, : k * n_out].contiguous().view(-1, n_out, k).transpose(1, 2)
        beta = torch.sigmoid(heads[:, k * n_out :])
        b_pv = w["b_pv"] if fast is None or "deltas" in fast else fast["b_pv"]
        uv = torch.tanh(torch.addmm(b_pv, torch.cat([h, enc], 1), w["w_pv"]))
        if fast is None:
            o = torch.addmm(w["b_uv"], uv, w["w_uv"])
            ctrl, value = o[:, :k], o[:, k]
        else:
            value = torch.addmm(w["b_v2"], uv[:, H:], w["w_v2"]).squeeze(-1)
            if "deltas" in fast:
                ctrl = self.ctrl_logits(h, fast["deltas"])
            else:
                q = torch.addmm(fast["b_q"], uv[:, :H], w["w_q"])
                ctrl = (fast["keys"] * q.unsqueeze(1)).sum(-1)
        if self.graph.mode == "learned":
            sel = ctrl + w["adj"].index_select(0, prev_skill.masked_fill(start, k))
            p_switch = beta.gather(1, prev_skill.clamp_min(0).view(-1, 1)).squeeze(1)
            p_switch = p_switch.masked_fill(start, 1.0)
        else:
            sel = self.graph.next_skill_logits(ctrl, prev_skill, start)
            p_switch = self.graph.switch_prob(beta, prev_skill, steps, start)
        return h, c, self._sample(sel, out, beta, p_switch, prev_skill, start, value)

    def adapt_fast(self, delta: torch.Tensor, ep: Episode, trace: dict) -> torch.Tensor:
        """Inner loop: ``inner_steps`` policy-gradient steps on one episode, on the fast
        parameters only (as functional parameters; meta-parameters untouched).

        Returns:
            the new flat offset of the fast parameters from the meta-parameters.
        """
        cfg: CompositionalConfig = self.cfg
        with torch.no_grad():
            out, beta = self.library(ep.obs)
            p_switch = self.graph.switch_prob(
                beta, trace["prev_skill"], trace["steps"], trace["start"]
            )
            # REINFORCE with the value baseline (episode returns-to-go), normalised; the
            # reversed loop runs on Python floats (a loop of one-element tensor ops costs
            # more than the rest of the inner step)
            ret, run = [], 0.0
            for r in reversed(ep.rewards.reshape(-1).tolist()):
                run = r + cfg.ppo.gamma * run
                ret.append(run)
            adv = torch.tensor(ret[::-1], dtype=torch.float32) - ep.values.reshape(-1)
            if adv.numel() > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        # the fast path's layers written out (as in ``ctrl_logits``; ``functional_call`` gives
        # the same numbers with more overhead than the inner step's maths)
        base = {n: self._fp_params[n].detach() for n in FAST_PARAMS}
        scale = math.sqrt(cfg.key_dim)
        for _ in range(cfg.inner_steps):
            d = delta.detach().requires_grad_(True)
            p = {**base}
            for n, v in self._unflatten(d).items():
                p[n] = base[n] + v
            u = torch.tanh(
                torch.addmm(p["controller.proj.bias"], trace["h"], p["controller.proj.weight"].t())
            )
            q = torch.addmm(p["composer.query.bias"], u, p["composer.query.weight"].t())
            ctrl = q @ p["composer.keys"].t() / scale
            sel = self.graph.next_skill_logits(ctrl, trace["prev_skill"], trace["start"])
            _, _, logp, _ = self._joint(
                out, sel, p_switch, trace["start"], trace["switch"], trace["skill"], ep.actions,
                entropy=False,
            )  # fmt: skip
            loss = -(logp * adv).mean()
            (g,) = torch.autograd.grad(loss, d)
            delta = (d - cfg.inner_lr * g).detach()
        return delta

    def skill_names(self) -> list[str] | None:
        """What each skill is, for plots: the primitive it was trained on (supervised library),
        else None (discovered and random skills have only their index)."""
        st = self.skill_trainer
        return list(st.primitives) if st is not None and st.primitives else None

    def mean_termination(self, n: int = 8) -> torch.Tensor:
        """Mean beta_k(s) over ``n`` start states of the train compositions (for graph plots)."""
        import envs  # noqa: F401

        cfg = self.cfg
        env = gym.make(
            cfg.env_id, disable_env_checker=True,
            **{**cfg.env_kwargs, "composition": self.train_set[0]},
        )  # fmt: skip
        try:
            obs = [env.reset(seed=s)[0] for s in range(n)]
        finally:
            env.close()
        with torch.no_grad():
            return self.library.beta(torch.as_tensor(np.stack(obs), dtype=torch.float32)).mean(0)

    # -- RLModule --------------------------------------------------------------------------------------
    @property
    def env_steps(self) -> int:
        """Every env step of this run: loaded library + discovery + meta-training."""
        meta = self._meta_steps if self.collector is None else self.collector.env_steps
        disc = self._disc_steps if self.disc_collector is None else self.disc_collector.env_steps
        return self.library_env_steps + disc + meta

    def make_collector(self) -> Collector:
        cfg: CompositionalConfig = self.cfg
        envs = make_vector_env(
            cfg.env_id, cfg.num_envs, {**cfg.env_kwargs, "composition": self.train_set[0]},
            vectorization=cfg.vectorization,
        )  # fmt: skip
        self.policy = CompositionalPolicy(self, inner=cfg.inner_loop == "on")
        return Collector(
            envs, self.policy, episodes_per_trial=cfg.episodes_per_trial,
            task_sampler=uniform_task_sampler(self.train_set, cfg.fixed_layout, cfg.train_layout_seeds()), seed=cfg.seed,
            on_episode_end=self.policy.adapt if cfg.inner_loop == "on" else None,
            hook_episodes=range(cfg.inner_episodes),
        )  # fmt: skip

    def setup(self, stage: str) -> None:
        resuming = self._trainer is not None and bool(getattr(self.trainer, "ckpt_path", None))
        if self._library_missing and not resuming:
            raise FileNotFoundError(
                f"library_checkpoint {self.cfg.library_checkpoint!r} does not exist"
            )
        super().setup(stage)
        if self.n_disc > 0 and self.disc_collector is None and self.iteration < self.n_disc:
            self.disc_collector = self.skill_trainer.make_collector()

    def teardown(self, stage: str) -> None:
        self._close_disc()
        if self.collector is not None:
            self._meta_steps = self.collector.env_steps
        super().teardown(stage)

    def _close_disc(self) -> None:
        if self.disc_collector is not None:
            self._disc_steps = self.disc_collector.env_steps
            self.disc_collector.envs.close()
            self.disc_collector = None

    def on_train_start(self) -> None:
        super().on_train_start()
        st, self._stash = self._stash, None
        if self.iteration >= self.n_disc:
            # setup() made this collector before the checkpoint was restored: it has counted
            # nothing, so keep the restored count of discovery steps (issue 14)
            disc_steps = self._disc_steps
            self._close_disc()
            self._disc_steps = disc_steps
        if st is None:
            return
        if st.get("disc_collector") is not None and self.disc_collector is not None:
            self.disc_collector.load_state_dict(st["disc_collector"])
        if st.get("policy") is not None and self.policy is not None:
            self.policy.load_state_dict(st["policy"])

    def extra_state(self) -> dict:
        return {
            "library_env_steps": int(self.library_env_steps),
            "env_steps": int(self.env_steps),
            "meta_steps": int(
                self._meta_steps if self.collector is None else self.collector.env_steps
            ),
            "disc_steps": self._disc_steps,
            "disc_collector": None
            if self.disc_collector is None
            else self.disc_collector.state_dict(),
            "skill_trainer": None
            if self.skill_trainer is None
            else self.skill_trainer.state_dict(),
            "policy": None if self.policy is None else self.policy.state_dict(),
        }

    def load_extra_state(self, state: dict) -> None:
        self._disc_steps = int(state.get("disc_steps", 0))
        self._meta_steps = int(state.get("meta_steps", 0))
        if int(state.get("library_env_steps", 0)) != self.library_env_steps:
            self.library_env_steps = int(state.get("library_env_steps", 0))
            self._plan_budget()
        if state.get("skill_trainer") is not None and self.skill_trainer is not None:
            self.skill_trainer.load_state_dict(state["skill_trainer"])
        self._stash = state

    def configure_optimizers(self):
        cfg: CompositionalConfig = self.cfg
        groups = [
            {
                "params": [
                    *self.controller.parameters(),
                    *self.composer.parameters(),
                    *(p for p in self.graph.parameters() if p.requires_grad),
                ],
                "lr": cfg.ppo.lr,
            }
        ]
        if cfg.primitives != "random-frozen":
            groups.append({"params": list(self.library.parameters()), "lr": cfg.library_lr})
        # fused: one kernel for all ~30 parameter tensors (a third of foreach's step time)
        opts = [torch.optim.Adam(groups, eps=1e-5, fused=True)]
        if self.skill_trainer is not None:
            opts.append(
                torch.optim.Adam(self.library.parameters(), lr=cfg.discovery.ppo.lr, eps=1e-5)
            )
            opts.append(torch.optim.Adam(self.discriminator.parameters(), lr=cfg.discovery.disc_lr))
        return opts

    def iterations(self) -> int:
        return self.n_disc + self.n_meta

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        if self.iteration < self.n_disc:
            self._discovery_step(opts[1], opts[2])
        else:
            self._meta_step(opts[0])

    def _discovery_step(self, lib_opt, disc_opt) -> None:
        t0 = time.perf_counter()
        n = self.n_disc
        frac = self.cfg.discovery.heatmap_fraction
        record = self.iteration >= n - max(1, int(round(frac * n)))
        ro, stats, charts = self.skill_trainer.iteration(
            self.disc_collector, lib_opt, disc_opt, self.manual_backward, record_visits=record
        )
        stats = {f"skills_{k}": v for k, v in stats.items()}
        self.log_iteration(
            ro, stats, time.perf_counter() - t0, extra={**charts, "charts/phase": 1.0}
        )
        if self.iteration >= self.n_disc:  # phase 1 done
            self._close_disc()
            root = getattr(self.trainer, "default_root_dir", None) if self._trainer else None
            st = self.skill_trainer
            if root and st.grid_size > 0 and st.visits.sum() > 0:
                save_heatmaps(st.visits, Path(root) / "heatmaps.png")

    def _meta_step(self, opt) -> None:
        cfg: CompositionalConfig = self.cfg
        t0 = time.perf_counter()
        self.policy.prune()
        ro = self.collector.collect(cfg.ppo.num_steps)
        if cfg.advantage == "trial":
            nv, cut = ro.trial_next_values(), ro.trial_cut()
        else:
            nv, cut = ro.next_values(), ro.episode_cut()
        adv, ret = gae(ro.rewards, ro.values, nv, cut, cfg.ppo.gamma, cfg.ppo.gae_lambda)
        T, N = ro.rewards.shape
        ex = ro.extras
        table = torch.stack(self.policy.table)
        flat = {k: v.reshape(T * N, *v.shape[2:]) for k, v in ex.items()}
        b_obs = ro.obs.reshape(T * N, -1)
        b_act = ro.actions.reshape(T * N, *ro.actions.shape[2:])
        ctrl = self.controller

        b_prev_r, b_prev_d = ro.prev_reward.reshape(-1), ro.prev_done.reshape(-1)
        # stored LSTM states, zeroed at trial starts (once here rather than per minibatch)
        keep = (~ro.trial_start.reshape(-1)).float().unsqueeze(-1)
        b_h0, b_c0 = flat["h_in"] * keep, flat["c_in"] * keep

        def evaluate(mb: torch.Tensor):
            obs = b_obs[mb]
            enc = ctrl.encode(ro.obs)
            x = ctrl.inputs(enc, ex["prev_alpha"], ro.prev_reward, ro.prev_done)
            hs = ctrl.unroll_chunked(x, ex["h_in"], ex["c_in"], ro.trial_start, cfg.bptt_len)
            h, e = hs.reshape(T * N, -1)[mb], enc.reshape(T * N, -1)[mb]
            sel, out, _, p_switch = self._core(
                obs, h, e, flat["prev_skill"][mb], flat["steps"][mb], flat["start"][mb],
                None, ids=flat["fast_id"][mb], table=table,
            )  # fmt: skip
            _, _, logp, ent = self._joint(
                out, sel, p_switch, flat["start"][mb], flat["switch"][mb], flat["skill"][mb],
                b_act[mb],
            )  # fmt: skip
            return logp, ent, ctrl.value(h, e)

        if cfg.bptt_len == 1:  # one recurrent step from the stored state, minibatch rows only
            evaluate = self._one_step_evaluator(
                flat, b_obs, b_act, b_prev_r, b_prev_d, b_h0, b_c0, table
            )
        params = [p for g in opt.param_groups for p in g["params"]]
        stats = ppo_update(
            ro, evaluate, params, opt, cfg.ppo, advantages=adv, returns=ret,
            backward=self.manual_backward,
        )  # fmt: skip
        self._pack = None  # fused Adam writes the parameters without bumping their versions
        alpha = ex["alpha"]
        charts = {
            "charts/phase": 2.0,
            "charts/switch_rate": float(ex["switch"].float().mean()),
            "charts/alpha_entropy": float(-(alpha * alpha.clamp_min(1e-12).log()).sum(-1).mean()),
            "charts/termination": float(ex["termination"].mean()),
            "charts/adapted_steps": float((ex["fast_id"] != 0).float().mean()),
        }
        for e_idx in range(cfg.episodes_per_trial):
            eps = [e.success for e in ro.episodes if e.episode_index == e_idx]
            if eps:
                charts[f"charts/success_ep{e_idx}"] = float(np.mean(eps))
        self.log_iteration(ro, stats, time.perf_counter() - t0, extra=charts)

    def _one_step_evaluator(self, flat, b_obs, b_act, prev_r, prev_d, h0, c0, table):
        """The outer update's ``evaluate`` for ``bptt_len == 1``: one LSTM step from the stored
        state, then ``_core`` + ``_joint`` + ``controller.value`` (the same maths). Built once
        per update: the per-row inputs sit in one float and one integer block (one
        ``index_select`` each per minibatch instead of a dozen indexings), the graph prior rows
        come from the prior with a zero row K appended (``index_select``, as in ``act_fused``),
        and in ``context`` mode every adapted set's keys are scored in one matmul and each row
        picks its set's K scores (rather than a (B, K, d) tensor of per-row keys)."""
        cfg: CompositionalConfig = self.cfg
        ctrl, k = self.controller, self.k
        n_tab = table.shape[0]
        ids = flat["fast_id"]
        # context mode with adapted sets: per-row bias offsets gathered once; the keys per set
        context = cfg.fast_params == "context" and 1 < n_tab <= 64
        discrete = self.library.head.discrete
        fcols = [b_obs, flat["prev_alpha"], prev_r.float().unsqueeze(-1)]
        fcols += [prev_d.float().unsqueeze(-1), h0, c0]
        if context:
            per = self._unflatten(table)
            fcols += [per["controller.proj.bias"][ids], per["composer.query.bias"][ids]]
            d_keys = per["composer.keys"]
        if not discrete:
            fcols.append(b_act.float())
        widths = [c.shape[1] for c in fcols]
        bounds = np.cumsum([0, *widths]).tolist()
        fblock = torch.cat(fcols, 1)
        learned = self.graph.mode == "learned"
        prev_skill, start = flat["prev_skill"], flat["start"]
        icols = [prev_skill, flat["steps"], start.long(), flat["switch"].long(), flat["skill"], ids]
        icols.append(prev_skill.masked_fill(start, k))  # the graph prior's row (K: none)
        if discrete:
            icols.append(b_act.long().reshape(-1))
        iblock = torch.stack(icols, 1)
        col = torch.arange(k)
        ctrl_fast = self._fastpath
        lib, graph = self.library, self.graph
        inv_sqrt_d = 1.0 / math.sqrt(cfg.key_dim)

        def evaluate(mb: torch.Tensor):
            f = fblock.index_select(0, mb)
            iv = iblock.index_select(0, mb)
            obs, pa, pr, pd, hb, cb = (f[:, bounds[j] : bounds[j + 1]] for j in range(6))
            prev_sk, steps, start_b = iv[:, 0], iv[:, 1], iv[:, 2].bool()
            switch, skill, ids_b = iv[:, 3].bool(), iv[:, 4], iv[:, 5]
            e = ctrl.encode(obs)
            h, _ = ctrl.step(torch.cat([e, pa, pr, pd], 1), (hb, cb))
            if context:
                b_p = f[:, bounds[6] : bounds[7]]
                b_q = f[:, bounds[7] : bounds[8]]
                cp, comp = ctrl.proj, self.composer
                u = torch.tanh(torch.addmm(cp.bias + b_p, h, cp.weight.t()))
                q = torch.addmm(comp.query.bias + b_q, u, comp.query.weight.t())
                keys = (comp.keys.unsqueeze(0) + d_keys).reshape(n_tab * k, -1)
                scores = (q @ keys.t()).gather(1, ids_b.unsqueeze(1) * k + col)
                ctrl_l = scores * inv_sqrt_d
            elif n_tab > 1:  # full fast parameters, or very many adapted sets
                if cfg.fast_params == "full":
                    ctrl_l = self.ctrl_logits_grouped(h, ids_b, table)
                else:
                    ctrl_l = self.ctrl_logits(h, table[ids_b])
            else:
                ctrl_l = ctrl_fast(h)
            if learned:
                adj = torch.cat([graph.adjacency_logits, graph.adjacency_logits.new_zeros(1, k)])
                sel = ctrl_l + adj.index_select(0, iv[:, 6])
            else:
                sel = graph.next_skill_logits(ctrl_l, prev_sk, start_b)
            out, beta = lib(obs)
            p_switch = graph.switch_prob(beta, prev_sk, steps, start_b)
            act = iv[:, 7] if discrete else f[:, bounds[-2] : bounds[-1]]
            _, _, logp, ent = self._joint(out, sel, p_switch, start_b, switch, skill, act)
            return logp, ent, ctrl.value(h, e)

        return evaluate

    # -- evaluation -------------------------------------------------------------------------------------
    @staticmethod
    def embedding_of_memory(memory: tuple) -> tuple:
        """The task embedding ``compo embed`` reads: the controller's LSTM state (h, c)."""
        return memory[0], memory[1]

    def trial_policy(self, envs):
        """Fresh memory and fresh (unadapted) fast parameters per call; with the inner loop on,
        the hook adapts after each of a trial's first ``inner_episodes`` episodes."""
        inner = self.cfg.inner_loop == "on"
        policy = CompositionalPolicy(self, inner=inner)
        return policy, (policy.adapt if inner else None)

    def acting_policy(self) -> CompositionalPolicy:
        return CompositionalPolicy(self, inner=False)
