"""The outcome-discovery loop (``primitives.outcome``'s objective, run): chains of options in
a room, PPO on the intrinsic reward, relabelled imitation, the discriminator's replay.

``Discovery`` is the compositional agent's phase 1 (``discovered`` skills) and, through
``discover``, the standalone ``python -m experiments.discover``. Under Lightning DDP (the
agent's phase 1 on several processes) every update is the one a single process holding all
envs makes (``Discovery.step``).

Examples:
    >>> cfg = DiscoveryConfig(total_env_steps=2048, num_envs=8, num_steps=64, num_skills=4)
    >>> lib, disc, history = discover(cfg, log=None)
    >>> lib.num_skills, lib.termination
    (4, 'learned')
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from primitives.option_training import ChainPolicy, update_skills
from primitives.options import OptionLibrary
from primitives.outcome import (
    OUTCOME_DIM,
    ROOM,
    DiscoveryConfig,
    OutcomeDiscriminator,
    Segments,
    balance_weights,
    bc_loss,
    discovery_rewards,
    intrinsic_reward,
    main_outcome_of,
    relabel,
    relabel_assigned,
    relabelled_steps,
    terminated_segments,
    tmax_cuts,
)
from rl import distributed
from rl.collect import Collector, Rollout, make_vector_env, uniform_task_sampler
from rl.io import atomic_torch_save


class OutcomeReplay:
    """The most recent (outcome, skill) pairs, a ring of fixed capacity."""

    def __init__(self, capacity: int, dim: int = OUTCOME_DIM) -> None:
        self.feats = torch.zeros(capacity, dim)
        self.skill = torch.zeros(capacity, dtype=torch.long)
        self.n, self.at, self.cap = 0, 0, capacity

    def add(self, feats: torch.Tensor, skill: torch.Tensor) -> None:
        for f, k in zip(feats.split(self.cap), skill.split(self.cap)):
            idx = (self.at + torch.arange(f.shape[0])) % self.cap
            self.feats[idx], self.skill[idx] = f, k
            self.at = int((self.at + f.shape[0]) % self.cap)
            self.n = min(self.cap, self.n + f.shape[0])

    def load(self, st: dict) -> None:
        """Restore from the ``{"feats", "skill", "at"}`` of a training state."""
        n = int(st["feats"].shape[0])
        self.feats[:n], self.skill[:n] = st["feats"], st["skill"]
        self.n, self.at = n, int(st["at"])

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.n, (batch,), generator=gen)
        return self.feats[idx], self.skill[idx]


def _every_rank(seg: Segments, n_local: int) -> Segments:
    """Every DDP rank's terminated segments with global env indices, ordered by (step, env)
    as ``terminated_segments`` orders one process's (``seg`` itself on one process)."""
    rank, size = distributed.world()
    if size == 1:
        return seg
    env, end, skill, feats = distributed.gather_cat(
        seg.env + rank * n_local, seg.end, seg.skill, seg.feats
    )
    order = torch.argsort(end * n_local * size + env)
    return Segments(env[order], end[order], skill[order], feats[order])


def uniform_draw(active: list[int], generator: torch.Generator):
    """Chain draw: a skill uniformly among the ``active[0]`` active ones (a list so growth can
    change it in place)."""

    def draw(obs: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        return torch.randint(active[0], (obs.shape[0],), generator=generator)

    return draw


def value_draw(lib: OptionLibrary, active: list[int], generator: torch.Generator, explore: float):
    """Chain draw guided by the skills' own critics: with probability ``explore`` a skill
    uniformly among the active ones, otherwise uniformly among those whose value V(s, k) of
    the intrinsic reward is above chance (> 0: the skill expects to produce an outcome its
    discriminator gives it) — a learned analogue of the supervised library's feasible draw
    (``option_training.feasible_draw``), so chains spend their segments where a skill can
    succeed. No skill above chance: uniform."""

    def draw(obs: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        K = active[0]
        with torch.no_grad():
            ok = (lib.critic(obs)[:, :K] > 0).float()
        ok = torch.where(ok.sum(-1, keepdim=True) > 0, ok, torch.ones_like(ok))
        pick = torch.multinomial(ok, 1, generator=generator).squeeze(-1)
        uniform = torch.randint(K, (obs.shape[0],), generator=generator)
        coin = torch.rand(obs.shape[0], generator=generator) < explore
        return torch.where(coin, uniform, pick)

    return draw


def make_room(num_envs: int, size: int = 8, max_steps: int | None = None):
    """The vector env discovery runs on, and a task sampler that gives it the room."""
    kw = {"size": size, "composition": ROOM, "max_steps": max_steps}
    venv = make_vector_env("CompoGrid-v0", num_envs, kw)
    return venv, uniform_task_sampler([ROOM], False)


class DiscoveryLoop:
    """What the discovery loops share (``Discovery`` here, ``primitives.outcome_motion``'s on
    Meta-World): the discriminator's steps on the outcome replay and the training state. A
    loop has ``cfg`` (``disc_batch``, ``disc_steps``), ``disc``, ``disc_opt``, ``opt``,
    ``replay``, ``gen``, ``active`` and ``iteration``."""

    def _train_discriminator(self, K: int) -> float:
        """``disc_steps`` cross-entropy steps on replayed outcomes. Under DDP every rank holds
        the same replay and takes the same steps on rank 0's draws: the same discriminator."""
        if self.replay.n == 0:
            return float("nan")
        rank = distributed.world()[0]
        draws = None
        if rank == 0:
            draws = [self._draw_replay() for _ in range(self.cfg.disc_steps)]
        losses = []
        for idx in distributed.broadcast_object(draws):
            x, k = self.replay.feats[idx], self.replay.skill[idx]
            loss = F.cross_entropy(self.disc(x, K), k)
            self.disc_opt.zero_grad()
            loss.backward()
            self.disc_opt.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def _draw_replay(self) -> torch.Tensor:
        """Indices of one discriminator minibatch: uniform over the replay, or class-balanced
        (``disc_balance``: probability 1 / count of the outcome's skill)."""
        n, batch = self.replay.n, self.cfg.disc_batch
        if not self.cfg.disc_balance:
            return torch.randint(n, (batch,), generator=self.gen)
        skill = self.replay.skill[:n]
        count = torch.bincount(skill, minlength=int(skill.max()) + 1).double()
        return torch.multinomial(1.0 / count[skill], batch, replacement=True, generator=self.gen)

    def training_state(self) -> dict:
        """Everything beyond library and discriminator weights that training continues from
        (optimisers, the outcome replay, the generator, growth, counters): plain data."""
        r = self.replay
        return {
            "opt": self.opt.state_dict(),
            "disc_opt": self.disc_opt.state_dict(),
            "replay": {"feats": r.feats[: r.n].clone(), "skill": r.skill[: r.n].clone(),
                       "at": r.at},
            "gen": self.gen.get_state(),
            "active": self.active[0],
            "iteration": self.iteration,
        }  # fmt: skip

    def load_training_state(self, st: dict) -> None:
        self.opt.load_state_dict(st["opt"])
        self.disc_opt.load_state_dict(st["disc_opt"])
        self.replay.load(st["replay"])
        self.gen.set_state(st["gen"])
        self.active[0] = int(st.get("active", self.active[0]))
        self.iteration = int(st["iteration"])


class Discovery(DiscoveryLoop):
    """The discovery loop's state: library, discriminator, optimisers, collector."""

    def __init__(
        self,
        cfg: DiscoveryConfig,
        library: OptionLibrary | None = None,
        discriminator: OutcomeDiscriminator | None = None,
        room: bool = True,
    ) -> None:
        """``library`` / ``discriminator``: train these (the compositional agent's phase 1)
        instead of new ones; they must have ``cfg.num_skills`` skills. ``room=False``: no
        room and no collector of its own — ``learn`` trains on segments someone else
        collected (the agent's phase 2 with ``library_finetune="discovery"``); ``library``
        is then required."""
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.venv = self.collector = None
        if room:
            self.venv, sampler = make_room(cfg.num_envs, cfg.size, cfg.max_steps)
        if library is None:
            if not room:
                raise ValueError("Discovery(room=False) needs the library it trains")
            obs_dim = self.venv.single_observation_space.shape[0]
            n_act = int(self.venv.single_action_space.n)
            library = OptionLibrary(obs_dim, n_act, cfg.num_skills, cfg.hidden, "learned")
        self.lib = library
        self.disc = (
            discriminator
            if discriminator is not None
            else OutcomeDiscriminator(cfg.num_skills, cfg.hidden)
        )
        if self.lib.num_skills != cfg.num_skills or self.lib.termination != "learned":
            raise ValueError(
                f"library with K={self.lib.num_skills}, termination={self.lib.termination!r};"
                f" allowed: K={cfg.num_skills}, 'learned'"
            )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.active = [cfg.start_skills or cfg.num_skills]
        if room:
            draw = (
                uniform_draw(self.active, self.gen)
                if cfg.draw == "uniform"
                else value_draw(self.lib, self.active, self.gen, cfg.draw_explore)
            )
            self.policy = ChainPolicy(self.lib, cfg.t_max, draw, self.gen)
            self.collector = Collector(self.venv, self.policy, task_sampler=sampler, seed=cfg.seed)
        self.opt = torch.optim.Adam(self.lib.parameters(), lr=cfg.ppo.lr, eps=1e-5)
        epochs = cfg.ppo.update_epochs if cfg.ppo_epochs is None else cfg.ppo_epochs
        self.ppo = replace(cfg.ppo, update_epochs=epochs)  # the skills' PPO (``ppo_epochs``)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr)
        self.replay = OutcomeReplay(cfg.disc_buffer)
        self.iteration = 0

    def step(self, backward: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """One rollout: rewards from the current discriminator, PPO, relabelled imitation,
        then the discriminator's update (so the logged accuracy is on unseen outcomes).

        ``backward``: Lightning's ``manual_backward`` under DDP (the compositional agent's
        phase 1 on several processes). Each rank then collects its own envs and every update
        is the one a single process holding all envs makes: PPO over the union of the ranks'
        steps (``ppo_update``); the relabelling, its balance weights and the outcome replay
        over every rank's segments (gathered, in the 1-process order); the imitation's
        minibatches and the discriminator's samples drawn by rank 0 and broadcast; the
        discriminator's steps computed alike on every rank from the same replay.
        """
        return self.learn(self.collector.collect(self.cfg.num_steps), backward)

    def learn(self, ro: Rollout, backward=None) -> dict[str, float]:
        """``step``'s updates on the chain rollout ``ro`` (extras as ``ChainPolicy`` records
        them: skill, seg_start, seg_len, term, beta_on, beta_logp, start_state; the rollout's
        ``logp`` / ``values`` the acting skill's)."""
        cfg, K = self.cfg, self.active[0]
        seg = terminated_segments(ro)
        rewards, terminal = discovery_rewards(
            self.disc, ro, seg, K, cfg.t_max, cfg.cut_reward, cfg.reward_floor
        )
        self.last = (ro, terminal)  # the segments, for a caller that counts them (skill graph)
        every = _every_rank(seg, ro.obs.shape[1])
        counts = distributed.all_reduce_sum(
            torch.tensor([self.env_steps, tmax_cuts(ro, cfg.t_max).sum()]).double()
        )
        stats = {"env_steps": int(counts[0]), "active_skills": K}
        ppo = update_skills(self.lib, ro, rewards, terminal, self.opt, self.ppo, backward=backward)
        stats.update({f"ppo/{k}": v for k, v in ppo.items()})
        n_seg = int(every.env.numel())
        stats["segments_terminated"] = n_seg
        stats["segments_cut"] = int(counts[1])
        if n_seg:
            with torch.no_grad():
                pred = self.disc(every.feats, K).argmax(-1)
            stats["disc_acc_unseen"] = float((pred == every.skill).float().mean())
            r = intrinsic_reward(self.disc, every.feats, every.skill, K)
            floor = cfg.reward_floor
            stats["intrinsic_reward"] = float((r if floor is None else r.clamp(min=floor)).mean())
            if cfg.bc_coef > 0:
                stats.update(self._imitate(ro, every, K, backward))
            self.replay.add(every.feats, every.skill)
            # each skill named by what its recent segments mostly did (graphs, traces)
            rp = self.replay
            named = main_outcome_of(rp.feats[: rp.n], rp.skill[: rp.n], cfg.num_skills)
            self.lib.outcome_of.copy_(named)
        stats["disc_loss"] = self._train_discriminator(K)
        if cfg.start_skills and stats.get("disc_acc_unseen", 0.0) >= cfg.grow_at:
            self.active[0] = min(cfg.num_skills, int(1.5 * K) + 1)
        self.iteration += 1
        return stats

    @property
    def env_steps(self) -> int:
        """Env steps of its own room (0 without one)."""
        return 0 if self.collector is None else self.collector.env_steps

    def _imitate(self, ro: Rollout, every: Segments, K: int, backward=None) -> dict[str, float]:
        """Relabelled behaviour cloning: ``bc_epochs`` passes over the steps of this rollout's
        terminated segments, each in ``ppo.num_minibatches`` minibatches. ``every``: the
        segments of every rank's envs (global env indices); this rank imitates the steps of
        its own envs' segments."""
        rank, size = distributed.world()
        T, n_local = ro.actions.shape[:2]
        how = relabel if self.cfg.relabel == "argmax" else relabel_assigned
        k_star, q_star = how(self.disc, every.feats, K)
        keep = q_star >= self.cfg.relabel_min_q
        kept_all = Segments(every.env[keep], every.end[keep], every.skill[keep], every.feats[keep])
        mine = kept_all.env // n_local == rank
        kept = Segments(
            kept_all.env[mine] - rank * n_local, kept_all.end[mine], kept_all.skill[mine],
            kept_all.feats[mine],
        )  # fmt: skip
        target = relabelled_steps(ro, kept, k_star[keep][mine]).reshape(-1)
        weight = None
        if self.cfg.bc_balance:
            bal = balance_weights(kept_all.feats)[mine]
            weight = relabelled_steps(ro, kept, torch.arange(int(mine.sum()))).reshape(-1)
            weight = (
                torch.where(weight >= 0, bal[weight.clamp(min=0)], 0.0)
                if bal.numel()
                else torch.zeros(weight.shape)  # (DDP) no kept segment in this rank's envs
            )
        # the steps to imitate in the layout of one process holding all envs (T, N) flat
        g_target = distributed.gather_envs(target.reshape(T, n_local)).reshape(-1)
        idx = (g_target >= 0).nonzero().squeeze(-1)
        if idx.numel() == 0:
            return {"relabelled_steps": 0}
        draw = None
        if rank == 0:  # bc_epochs passes, each in a fresh order
            n = idx.numel()
            draw = torch.cat(
                [torch.randperm(n, generator=self.gen) for _ in range(self.cfg.bc_epochs)]
            )
        perm = idx[distributed.broadcast_object(draw)]
        params = list(self.lib.parameters())
        losses = []
        if size > 1:
            g_weight = None
            if weight is not None:
                g_weight = distributed.gather_envs(weight.reshape(T, n_local)).reshape(-1)
        for mb in perm.chunk(self.cfg.ppo.num_minibatches * self.cfg.bc_epochs):
            self.opt.zero_grad()
            if size == 1:
                loss = self.cfg.bc_coef * bc_loss(self.lib, ro, target, mb, weight)
                (backward or torch.Tensor.backward)(loss)
            else:  # this rank's part of the minibatch's weighted sum, over the whole's weight
                n_all = n_local * size
                own, envs = distributed.local_part(mb % n_all, n_local, rank)
                local = (mb[own] // n_all) * n_local + envs
                total = float(mb.numel() if g_weight is None else g_weight[mb].sum().clamp(1e-8))
                # (none of the minibatch on this rank: an empty sum, 0, over the parameters a
                # step of it would reach, so DDP touches the same ones as one process)
                loss = self.cfg.bc_coef * bc_loss(self.lib, ro, target, local, weight, total)
                backward(loss * size)  # DDP averages over the ranks
            nn.utils.clip_grad_norm_(params, self.cfg.ppo.max_grad_norm)
            self.opt.step()
            losses.append(float(loss.detach()))
        bc = distributed.all_reduce_sum(torch.tensor(losses, dtype=torch.float64))
        return {
            "relabelled_steps": int(idx.numel()),
            "relabel_changed": float((k_star[keep] != every.skill[keep]).float().mean()),
            "bc_loss": float(bc.mean()),
        }

    def state_dict(self) -> dict:
        """Plain tensors and numbers (loads with ``weights_only=True``)."""
        cfg = asdict(self.cfg)
        cfg["ppo"] = asdict(self.cfg.ppo)
        return {
            "library": self.lib.state_dict(),
            "discriminator": self.disc.state_dict(),
            "active_skills": self.active[0],
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "config": cfg,
            "obs_dim": self.lib.obs_dim,
            "n_actions": self.lib.n_actions,
        }


def discover(
    cfg: DiscoveryConfig,
    log: Callable[[dict], None] | None = print,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
) -> tuple[OptionLibrary, OutcomeDiscriminator, list[dict]]:
    """Run discovery for ``cfg.total_env_steps``; returns (library, discriminator, history).

    ``checkpoint``: path of the plain state dict written every ``checkpoint_every`` rollouts
    and at the end (``Discovery.state_dict``)."""
    run = Discovery(cfg)
    history: list[dict] = []
    t0 = time.perf_counter()
    while run.collector.env_steps < cfg.total_env_steps:
        stats = run.step()
        stats["wall_s"] = time.perf_counter() - t0
        history.append(stats)
        if log is not None:
            log(stats)
        if checkpoint is not None and run.iteration % checkpoint_every == 0:
            atomic_torch_save(run.state_dict(), checkpoint)
    if checkpoint is not None:
        atomic_torch_save(run.state_dict(), checkpoint)
    return run.lib, run.disc, history


def load_discovered(state: dict) -> tuple[OptionLibrary, OutcomeDiscriminator]:
    """Library and discriminator from ``Discovery.state_dict`` (as ``safe_torch_load`` gives
    it)."""
    cfg = state["config"]
    lib = OptionLibrary(
        state["obs_dim"], state["n_actions"], cfg["num_skills"], cfg["hidden"], "learned"
    )
    lib.load_state_dict(state["library"])
    disc = OutcomeDiscriminator(cfg["num_skills"], cfg["hidden"])
    disc.load_state_dict(state["discriminator"])
    return lib, disc
