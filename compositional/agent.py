"""The compositional agent (method ``compositional``): a library of options, an LSTM controller
that chooses among them at decision points, a pointer composer and a skill-feasibility graph.

Phase 1 (``library_fraction`` of the env-step budget; none with ``library_checkpoint`` or
``primitives="random-frozen"``) trains the ``OptionLibrary`` on chains of skills
(``primitives.option_training``): ``supervised`` (one skill per primitive, rewarded for
completing it: the oracle-skills library) or ``discovered`` (``primitives.outcome``: skills that
maximise the mutual information between skill and outcome, without task reward).

Phase 2 meta-trains controller and composer on trials of ``episodes_per_trial`` episodes of the
train compositions (fixed layout per trial), with the library frozen (or, with
``library_finetune="on"``, fine-tuned on the task reward its segments collect, by PPO with a KL
to a frozen copy of the phase-1 skills; or, with ``"discovery"``, trained further by phase 1's
own objective on the controller's own segments: discovery's reward-free one, or for the
supervised library its primitives' completion; ``discovery_share`` then gives a fraction of
phase 2's rollouts to discovery's own uniform skill chains in its room): the acting policy
(``compositional.policy``) runs the controller only when the active skill terminates and at
episode starts; PPO at the decision level (``compositional.decisions``: gamma^duration,
trial-level advantages). The graph counts every segment of both phases (with
``graph="state"`` it also fits its state-conditioned feasibility network on them, after each
update).

On Meta-World (``CompoMetaWorld-v0``; ``compositional.family``) skills are Gaussian options
of fixed length ``t_max`` (``termination="duration"``), discovered by
``primitives.outcome_motion`` from hand/gripper/object displacements; the controller reads
those displacements as the previous skill's outcome. ``supervised`` and ``soft`` need
CompoGrid's events and discrete actions and are refused there.

Switches (the ablations): ``composer`` attention / uniform / soft, ``graph`` learned / state / none,
``inner_loop`` on / off (a per-trial skill bias adapted by one REINFORCE step per episode),
``primitives`` discovered / supervised / random-frozen. The whole budget, phase 1 included,
counts against the same env-step budget as every baseline.

On Lightning DDP (``compo train --devices N``) each rank steps ``num_envs / N`` envs; every
update is the 1-process update over the union of the ranks' envs (skills: ``rl.ppo.ppo_update``;
discovery: ``primitives.outcome_training.Discovery``; controller: ``update_controller``), the graph
counts (and fits on) every rank's segments, and each rank acts on generators of its own.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from compositional.composer import PointerComposer
from compositional.config import CompositionalConfig
from compositional.controller import DecisionController, feature_dim
from compositional.decisions import collect_decisions, update_controller
from compositional.family import family_for
from compositional.graph import SkillGraph
from compositional.policy import SkillLevelPolicy
from envs.grid import PRIMITIVES
from envs.grid_events import outcomes
from primitives.option_training import (
    ChainPolicy,
    feasible_draw,
    supervised_rewards,
    update_skills,
)
from primitives.options import OptionLibrary
from primitives.outcome import DiscoveryConfig, OutcomeDiscriminator, tmax_cuts
from primitives.outcome_motion import MOTION_OUTCOME_DIM, MotionDiscovery, finished_segments
from primitives.outcome_training import Discovery
from rl import distributed
from rl.collect import Collector, make_vector_env, uniform_task_sampler
from rl.io import safe_torch_load
from rl.module import RLModule
from rl.seeding import set_rng_state


class CompositionalAgent(RLModule):
    """Options + decision-level controller + pointer composer + feasibility graph."""

    method = "compositional"
    config_cls = CompositionalConfig

    # -- construction -----------------------------------------------------------------------------
    def build(self) -> None:
        cfg: CompositionalConfig = self.cfg
        self.train_set = cfg.train_compositions()
        self.family = fam = family_for(cfg.env_id)
        probe = make_vector_env(cfg.env_id, 1, {**cfg.env_kwargs, "composition": self.train_set[0]})
        self.obs_dim = int(probe.single_observation_space.shape[0])
        space = probe.single_action_space
        n_actions = int(space.shape[0]) if fam.continuous else int(space.n)
        probe.close()
        K = cfg.K
        if cfg.primitives == "supervised" and K != len(PRIMITIVES):
            raise ValueError(
                f"num_skills={K} with primitives='supervised'; allowed: {len(PRIMITIVES)} "
                "(one skill per primitive)"
            )
        supervised = cfg.primitives == "supervised"
        termination = "event" if supervised else "learned"
        self.library = OptionLibrary(
            self.obs_dim, n_actions, K, cfg.library_hidden,
            termination="duration" if fam.continuous else termination,
            event_of=list(range(K)) if supervised else None, continuous=fam.continuous,
        )  # fmt: skip
        self.feature_dim = feature_dim(self.obs_dim, K, fam.outcome_dim, fam.n_tokens)
        self.controller = DecisionController(self.feature_dim, cfg.hidden)
        instruction = cfg.env_kwargs.get("task_info", "reward") == "instruction"
        self.composer = PointerComposer(
            cfg.hidden, K, fam.n_tokens, cfg.key_dim, cfg.composer, instruction,
            evidence=cfg.belief_logits == "on",
        )  # fmt: skip
        self.graph = SkillGraph(K, cfg.graph, obs_dim=self.obs_dim)
        if cfg.library_finetune == "on":  # the KL's reference: the library phase 2 starts from
            self.frozen_library = copy.deepcopy(self.library).requires_grad_(False)
        if cfg.primitives == "discovered":  # part of the checkpoint: discovery state
            in_dim = {"in_dim": MOTION_OUTCOME_DIM} if fam.continuous else {}
            self.discriminator = OutcomeDiscriminator(K, cfg.library_hidden, **in_dim)
        self.discovery: Discovery | None = None
        self._discovery_state: dict | None = None
        if cfg.library_checkpoint:
            self._load_library(cfg.library_checkpoint)
        budget = int(cfg.total_env_steps)
        phase1 = 0
        if cfg.primitives != "random-frozen" and not cfg.library_checkpoint:
            phase1 = int(budget * float(cfg.library_fraction))
        chunk1 = cfg.num_envs * cfg.skills.num_steps
        self.phase1_iters = -(-phase1 // chunk1) if phase1 else 0
        rest = max(budget - self.phase1_iters * chunk1, 1)
        self.phase2_iters = -(-rest // (cfg.num_envs * cfg.ppo.num_steps))
        self._phase = None  # which collector is open: 1 or 2
        self.act_gen = torch.Generator().manual_seed(int(cfg.seed) + 17)

    def _load_library(self, path: str) -> None:
        ckpt = safe_torch_load(path)
        state = ckpt.get("state_dict", ckpt)
        lib = {k[len("library.") :]: v for k, v in state.items() if k.startswith("library.")}
        if not lib and isinstance(state.get("library"), dict):  # primitives.outcome's file
            lib = dict(state["library"])
        if not lib:
            lib = dict(state)
        mine = self.library.state_dict()
        for k, v in mine.items():
            if k not in lib or tuple(lib[k].shape) != tuple(v.shape):
                got = None if k not in lib else tuple(lib[k].shape)
                raise ValueError(
                    f"library_checkpoint {path!r} does not match this agent: {k} has shape "
                    f"{got}, expected {tuple(v.shape)} (K={self.library.num_skills}, "
                    f"obs_dim={self.obs_dim}, termination={self.library.termination!r})"
                )
        self.library.load_state_dict({k: lib[k] for k in mine})

    def iterations(self) -> int:
        return self.phase1_iters + self.phase2_iters

    def phase(self) -> int:
        return 1 if self.iteration < self.phase1_iters else 2

    def decision_parameters(self):
        return [*self.controller.parameters(), *self.composer.parameters()]

    def configure_optimizers(self):
        lib = torch.optim.Adam(self.library.parameters(), lr=self.cfg.skills.ppo.lr, eps=1e-5)
        ctl = torch.optim.Adam(self.decision_parameters(), lr=self.cfg.ppo.lr, eps=1e-5)
        if self.graph.net is None:
            return [lib, ctl]
        return [lib, ctl, torch.optim.Adam(self.graph.net.parameters(), lr=1e-3)]

    def skill_names(self) -> list[str | None]:
        """What each skill stands for or mostly produces (None: not measured)."""
        return self.library.skill_names([str(p) for p in PRIMITIVES])

    # -- collectors -------------------------------------------------------------------------------
    def make_collector(self) -> Collector:
        cfg: CompositionalConfig = self.cfg
        self._phase = self.phase()
        kwargs = {**cfg.env_kwargs, "composition": self.train_set[0]}
        n = self.num_local_envs  # all of them on one process
        envs = make_vector_env(cfg.env_id, n, kwargs, vectorization=cfg.vectorization)
        if self._phase == 1 and cfg.primitives == "discovered":
            dcfg = self._discovery_config(n)
            if self.family.continuous:  # the train tasks, a fresh goal every episode
                sampler = uniform_task_sampler(self.train_set, False)
                self.discovery = MotionDiscovery(
                    dcfg, self.library, self.discriminator, envs, sampler
                )
            else:
                envs.close()  # in its own room (primitives.outcome_training.make_room)
                self.discovery = Discovery(dcfg, self.library, self.discriminator)
            if self._discovery_state is not None:
                self.discovery.load_training_state(self._discovery_state)
                self._discovery_state = None
            return self.discovery.collector
        if self._phase == 1:
            # skills see no task reward: fresh layouts every episode, one-episode "trials"
            sampler = uniform_task_sampler(self.train_set, False)
            policy = ChainPolicy(
                self.library, cfg.t_max, feasible_draw(self.library, self.act_gen), self.act_gen
            )
            return Collector(envs, policy, task_sampler=sampler, seed=cfg.seed)
        if (
            cfg.library_finetune == "discovery"
            and cfg.primitives == "discovered"
            and self.discovery is None
        ):  # resumed in phase 2: the objective's state without phase 1's room
            self.discovery = Discovery(
                self._discovery_config(n), self.library, self.discriminator,
                room=bool(cfg.discovery_share),
            )  # fmt: skip
            if self.discovery.collector is not None and self.world_size > 1:
                self.discovery.collector.shard(*self._world)
            if self._discovery_state is not None:
                self.discovery.load_training_state(self._discovery_state)
                self._discovery_state = None
        sampler = uniform_task_sampler(self.train_set, cfg.fixed_layout, cfg.train_layout_seeds())
        return Collector(
            envs, SkillLevelPolicy(self, self.act_gen), episodes_per_trial=cfg.episodes_per_trial,
            task_sampler=sampler, seed=cfg.seed + 1,
        )  # fmt: skip

    def _discovery_config(self, n: int) -> DiscoveryConfig:
        """Phase 1's discovery settings (``n``: this process's envs)."""
        cfg: CompositionalConfig = self.cfg
        return DiscoveryConfig(
            num_skills=self.library.num_skills, t_max=cfg.t_max, num_envs=n,
            num_steps=cfg.skills.num_steps, size=int(cfg.env_kwargs.get("size", 8)),
            hidden=cfg.library_hidden, seed=int(cfg.seed), ppo=cfg.skills.ppo,
            total_env_steps=max(1, self.phase1_iters * cfg.num_envs * cfg.skills.num_steps),
            **cfg.discovery,
        )  # fmt: skip

    def _discovering(self) -> bool:
        """The discovery objective trains the library now (phase 1, or phase 2 with
        ``library_finetune="discovery"``)."""
        return self.discovery is not None and (
            self._phase == 1 or self.cfg.library_finetune == "discovery"
        )

    def _ensure_phase_collector(self) -> None:
        if self._phase != self.phase():
            old = self.collector
            steps = self.env_steps if old is None else old.env_steps  # this process's
            if old is not None and not (self._room_open() and old is self.discovery.collector):
                old.envs.close()  # (phase 1's room stays open for discovery's phase-2 turns)
            self.collector = self.make_collector()
            self.collector.env_steps = steps
            if self.world_size > 1:
                self.collector.shard(*self._world)

    def _room_turn(self) -> bool:
        """This phase-2 iteration runs discovery in its room instead of the controller: the
        j-th phase-2 iteration does when floor((j + 1) * share) > floor(j * share), so the
        turns are spread evenly and the schedule is a function of the iteration alone."""
        share = float(self.cfg.discovery_share)
        j = self.iteration - self.phase1_iters
        return bool(share) and int((j + 1) * share) > int(j * share)

    def on_train_start(self) -> None:
        # setup() runs before the checkpoint is restored, so a run resumed in phase 2 was given
        # phase 1's collector: build the right one before its state is loaded
        restored = getattr(self, "_env_steps", 0)
        self._ensure_phase_collector()
        if self._resume_state is not None and self._saved_phase != self.phase():
            # written by phase 1's last iteration: phase 2 starts with a fresh collector, as
            # in the uninterrupted run; the random state and the step count carry over
            set_rng_state(self._resume_state["rng"])
            self.load_local_state(self._resume_state.get("local") or {})
            if self._room_open():  # the room is phase 1's collector: it continues
                self.discovery.collector.load_state_dict(self._resume_state["collector"])
            self.collector.env_steps = self._env_steps = restored
            if self.world_size > 1:  # this rank's own count; ``restored`` is the run's
                self.collector.env_steps = int(self._resume_state["collector"]["env_steps"])
            self._resume_state = None
        super().on_train_start()

    def extra_state(self) -> dict:
        out = {"act_gen": self.act_gen.get_state(), "phase": int(self._phase or self.phase())}
        if self._discovering():
            out["discovery"] = self.discovery.training_state()
        return out

    def local_state(self) -> dict:
        out = {"act_gen": self.act_gen.get_state()}
        if self._discovering():
            out["discovery_gen"] = self.discovery.gen.get_state()
        if self._room_open() and self._phase == 2:  # (in phase 1 it is the run's collector)
            out["discovery_room"] = self.discovery.collector.state_dict()
        return out

    def load_local_state(self, state: dict) -> None:
        if "act_gen" in state:
            self.act_gen.set_state(state["act_gen"])
        if "discovery_gen" in state and self.discovery is not None:
            self.discovery.gen.set_state(state["discovery_gen"])
        if "discovery_room" in state and self._room_open():
            self.discovery.collector.load_state_dict(state["discovery_room"])

    def _room_open(self) -> bool:
        """Discovery's room is open and serves phase 2's turns (``discovery_share``)."""
        return bool(self.cfg.discovery_share) and (
            self.discovery is not None and self.discovery.collector is not None
        )

    def reseed_local(self, seed: int) -> None:
        self.act_gen.manual_seed(seed)
        if self.discovery is not None:
            self.discovery.gen.manual_seed(distributed.derived_seed(seed, 1))

    def load_extra_state(self, state: dict) -> None:
        if "act_gen" in state:
            self.act_gen.set_state(state["act_gen"])
        self._saved_phase = int(state.get("phase", self.phase()))
        self._discovery_state = state.get("discovery")
        if self._discovery_state is not None and self.discovery is not None:
            self.discovery.load_training_state(self._discovery_state)
            self._discovery_state = None

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        self._ensure_phase_collector()
        t0 = time.perf_counter()
        lib_opt, ctl_opt, *graph_opt = self.optimizers()
        self._graph_opt = graph_opt[0] if graph_opt else None
        if self.phase() == 1 and self.cfg.primitives == "discovered":
            self._discovery_turn(1, t0)  # no task reward: skills x outcomes MI
            return
        if self.phase() == 2 and self._room_turn():
            self._discovery_turn(2, t0)
            return
        if self.phase() == 1:
            cfg = self.cfg.skills
            ro = self.collector.collect(cfg.num_steps)
            rewards, terminal = supervised_rewards(self.library, ro)
            stats = update_skills(
                self.library, ro, rewards, terminal, lib_opt, cfg.ppo, backward=self.manual_backward
            )
            graph_stats = self._count_chain_segments(ro, rewards, terminal)
            seg = ro.extras["seg_start"].sum().item()
            extra = {
                "charts/phase": 1.0,
                "skills/segment_success": float(rewards.sum()) / max(seg, 1),
                **graph_stats,
            }
            self.log_iteration(
                ro, {f"skills_{k}": v for k, v in stats.items()}, time.perf_counter() - t0, extra
            )
            return
        cfg = self.cfg
        if cfg.library_finetune == "on" and self.iteration == self.phase1_iters:
            self.frozen_library.load_state_dict(self.library.state_dict())
        ro = self.collector.collect(cfg.ppo.num_steps)
        D = collect_decisions(ro, cfg.ppo.gamma, cfg.ppo.gae_lambda, cfg.composer == "soft")
        stats = update_controller(self, D, ctl_opt, cfg.ppo, backward=self.manual_backward)
        if cfg.library_finetune == "on":
            stats |= self._finetune_library(ro, lib_opt)
        elif cfg.library_finetune == "discovery" and cfg.primitives == "supervised":
            stats |= self._continue_supervised(ro, lib_opt)  # completion, not task reward
        elif cfg.library_finetune == "discovery":  # no task reward reaches the skills
            learned = self.discovery.learn(ro, backward=self.manual_backward)
            stats |= {f"discovery_{k}": float(v) for k, v in learned.items() if k != "env_steps"}
        ex = ro.extras
        ends = ex["seg_end"] & ro.valid
        # after the update: the prior the decisions were taken with stays fixed; every rank's
        # segments (the counts are sums: the same on every rank as on one process)
        seg = distributed.gather_cat(
            ex["seg_prev"][ends], ex["seg_skill"][ends], ex["seg_ok"][ends]
        )
        if seg[0].numel():
            self.graph.update(*seg)
        graph_stats = {}
        if self.graph.net is not None:
            graph_stats = self._fit_state_graph(*self._phase2_state_segments(ro))
        self.last_rollouts = (ro,)  # read by rl.diagnostics.MetaRLDiagnostics
        n_dec, n_eps, steps, starts = distributed.all_reduce_sum(  # every rank's
            torch.tensor(
                [D.count, len(ro.episodes), ro.num_steps, int(ex["decision"].sum())],
                dtype=torch.float64,
            )
        ).tolist()
        extra = {
            "charts/phase": 2.0,
            "charts/decisions_per_episode": n_dec / max(n_eps, 1),
            "charts/mean_segment_length": steps / max(starts, 1),
            **graph_stats,
        }
        self.log_iteration(ro, stats, time.perf_counter() - t0, extra)

    def _discovery_turn(self, phase: int, t0: float) -> None:
        """Discovery's own rollouts in its room: phase 1, and phase 2's turns with
        ``discovery_share`` (as many rollouts as make a controller rollout's env steps, added
        to the run's count). The graph counts their segments in both."""
        rounds = 1 if phase == 1 else self.cfg.ppo.num_steps // self.cfg.skills.num_steps
        room = self.discovery.collector
        before = room.env_steps
        graph_stats = {}
        for _ in range(rounds):
            stats = self.discovery.step(backward=self.manual_backward)
            ro, terminal = self.discovery.last
            # its termination fired (a t_max cut is terminal for the skills' PPO, no success)
            ok = terminal & ~tmax_cuts(ro, self.cfg.t_max)
            if self.family.continuous:  # a finished Meta-World segment succeeds if it moved
                _, feats = finished_segments(ro, self.cfg.t_max)  # the object (as in phase 2)
                ok = terminal & self.family.moved(feats[..., 7:].reshape(-1, 7)).view_as(terminal)
            events = None if self.family.continuous else outcomes(ro.obs, ro.next_obs)[1]
            graph_stats = self._count_chain_segments(ro, ok.float(), terminal, events)
        if phase == 2:  # the room's steps count against the budget like the controller's
            self.collector.env_steps += room.env_steps - before
        self.iteration += 1
        self.log_scalars(
            {"charts/phase": float(phase), **({"charts/discovery_turn": 1.0} if phase == 2 else {}),
             "charts/SPS": rounds * self.cfg.num_envs * self.cfg.skills.num_steps
             / max(time.perf_counter() - t0, 1e-9),
             **{f"discovery/{k}": float(v) for k, v in stats.items()}, **graph_stats}
        )  # fmt: skip

    def _finetune_library(self, ro, optimizer) -> dict[str, float]:
        """One PPO update of the acting skills on the task reward of their segments, with the
        KL to the frozen phase-1 skills. A segment that ended by the skill's termination or
        by the env's termination is terminal for the skill; one cut by ``t_max``, the time
        limit or the rollout's end bootstraps from V(s', k)."""
        ended = ro.extras["beta_end"]  # at step t: the skill of step t-1 terminated
        terminal = ro.terminated.clone()
        terminal[:-1] |= ended[1:]
        stats = update_skills(
            self.library, ro, ro.rewards, terminal, optimizer, self.cfg.skills.ppo,
            backward=self.manual_backward, kl_to=(self.frozen_library, float(self.cfg.finetune_kl)),
        )  # fmt: skip
        return {f"skills_{k}": v for k, v in stats.items()}

    def _continue_supervised(self, ro, optimizer) -> dict[str, float]:
        """Phase 1's update of the oracle-skills library on the controller's segments: PPO of
        each skill on the completion of its own primitive (``supervised_rewards``: 1 on the
        step that completes it; terminal when completed or infeasible), whatever the task."""
        rewards, terminal = supervised_rewards(self.library, ro)
        stats = update_skills(
            self.library, ro, rewards, terminal, optimizer, self.cfg.skills.ppo,
            backward=self.manual_backward,
        )  # fmt: skip
        return {f"skills_{k}": v for k, v in stats.items()}

    def _count_chain_segments(self, ro, rewards, terminal, events=None) -> dict[str, float]:
        """Phase-1 segments for the graph: (previous skill in the episode, skill, succeeded).
        Success: ``rewards > 0`` (supervised: completed its primitive; Meta-World: moved the
        object; discovered: its own termination fired, not a ``t_max`` cut), or with
        ``events`` ((T, N, 19) object events of the rollout's steps; discovered skills on
        CompoGrid) the segment caused its skill's main outcome when that is measured and the
        segment started in this rollout, as phase 2 counts them. The
        state-conditioned graph also gets each segment's start observation (segments that
        started in an earlier rollout are counted but not fitted); returns its fit's stats."""
        skill = ro.extras["skill"].numpy()
        start = ro.extras["seg_start"].numpy()
        ep_end = (ro.terminated | ro.truncated).numpy()
        ok = rewards.numpy() > 0
        terminal = terminal.numpy()
        outcome_of = self.library.outcome_of.numpy()
        events = None if events is None else events.numpy()
        T, N = skill.shape
        end = np.zeros((T, N), dtype=bool)
        end[:-1] = start[1:]
        end |= terminal
        prevs, skills, oks, at = [], [], [], []
        for i in range(N):
            prev = -1
            starts = np.flatnonzero(start[:, i])
            for t in np.flatnonzero(end[:, i]):
                if ep_end[t, i] and not terminal[t, i]:
                    prev = -1  # cut by the episode's end: not an outcome of the skill
                    continue
                j = np.searchsorted(starts, t, side="right") - 1  # the segment's first step
                at.append((int(starts[j]), i) if j >= 0 else None)
                main = -1 if events is None or j < 0 else int(outcome_of[skill[t, i]])
                prevs.append(prev)
                skills.append(skill[t, i])
                oks.append(events[starts[j] : t + 1, i, main].any() if main >= 0 else ok[t, i])
                prev = -1 if ep_end[t, i] else int(skill[t, i])
        # every rank's segments, as one process holding all envs counts them
        seg = distributed.gather_cat(
            torch.tensor(prevs, dtype=torch.long), torch.tensor(skills, dtype=torch.long),
            torch.tensor(oks, dtype=torch.bool),
        )  # fmt: skip
        if seg[0].numel():
            self.graph.update(*seg)
        if self.graph.net is None:
            return {}
        keep = [n for n, a in enumerate(at) if a is not None]
        steps = torch.tensor([at[n] for n in keep], dtype=torch.long).reshape(-1, 2)
        obs = self.family.task_free(ro.obs[steps[:, 0], steps[:, 1]])
        keep = torch.tensor(keep, dtype=torch.long)
        return self._fit_state_graph(
            obs, torch.tensor(skills, dtype=torch.long)[keep], torch.tensor(oks)[keep]
        )

    def _phase2_state_segments(self, ro):
        """(start observations, skills, success) of the phase-2 segments that ended as their
        skill ends (``seg_label``): a segment runs from one decision of its env to the next."""
        ex = ro.extras
        dec = ex["decision"] & ro.valid
        label = ex["seg_label"] & ro.valid
        obs, skills, oks = [], [], []
        for i in range(dec.shape[1]):
            steps = torch.nonzero(dec[:, i]).squeeze(-1)
            first, nxt = steps[:-1], steps[1:]
            keep = label[nxt, i]
            obs.append(ro.obs[first[keep], i])
            skills.append(ex["skill"][first[keep], i])
            oks.append(ex["seg_ok"][nxt[keep], i])
        return self.family.task_free(torch.cat(obs)), torch.cat(skills), torch.cat(oks)

    def _fit_state_graph(self, obs, skill, ok) -> dict[str, float]:
        """``graph="state"``: fit f(s) on every rank's segments (the same full batch on every
        rank, so the step is one process's)."""
        obs, skill, ok = distributed.gather_cat(obs, skill, ok)
        if not len(skill):
            return {}
        return self.graph.fit_states(obs, skill, ok, self._graph_opt, self.manual_backward)

    @staticmethod
    def embedding_of_memory(memory):
        """The task embedding ``compo embed`` reads: the controller's LSTM state (h, c)."""
        return memory[0], memory[1]

    # -- evaluation -------------------------------------------------------------------------------
    def trial_policy(self, envs):
        """The shared protocol's hook: the skill-level policy; it adapts through its memory."""
        gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,)).item()))
        return SkillLevelPolicy(self, gen), None
