"""PEARL (Rakelly et al. 2019): probabilistic task embeddings for off-policy meta-RL.

A permutation-invariant context encoder maps a set of transitions (s, a, r, s') of one task to
a Gaussian posterior q(z | c) over a latent task variable z; each transition gives a Gaussian
factor and the factors are multiplied (product of Gaussians, PEARL sec. 4.1; mean pooling as
in the seed document's Q5 is an option). The actor pi(a | s, z) and twin critics Q(s, a, z)
are trained with SAC (discrete SAC on CompoGrid, tanh-squashed Gaussian on Meta-World); the
encoder learns from the critics' Bellman error plus ``kl_weight * KL(q(z|c) || N(0, I))``
(PEARL eq. 3 and sec. 4.2), never from the actor loss.

Data (PEARL alg. 1): a fixed pool of training tasks (composition, layout seed) is drawn once
from ``cfg.seed``. Each training iteration runs one trial of ``episodes_per_trial`` episodes on
``num_envs`` pool tasks through the shared ``Collector``: episode 0 acts with z from the
prior, every later episode with z from the posterior given the trial's earlier episodes. All
transitions go to the task's replay buffer; the prior-z episode joins the task's context
buffer, a ring of its recent prior-z episodes (PEARL's encoder buffer holds only recent prior-z
data, because the encoder must learn to infer the task from exploratory data, as at test time).
Then ``updates_per_env_step`` x (steps collected) SAC + encoder updates (oyster's ratio, 0.5, by
default) run over meta-batches of tasks; each draws the task's context as distinct transitions
of that ring, and the KL term is summed over the meta-batch's tasks, both as in oyster. At
meta-test the same policy and episode hook give posterior sampling: z ~ prior for episode 0,
then z ~ q(z | episodes so far); actions are the policy's argmax / mean (oyster evaluates
deterministically). Checkpoints hold only the buffers' filled rows.

On Lightning DDP (``compo train --devices N``) each rank runs ``num_envs / N`` of an
iteration's trials, every rank stores every rank's transitions, and each update's meta-batch is
split over the ranks (``rl.distributed``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from baselines.pearl_buffers import TaskBuffers
from baselines.pearl_nets import (
    AGGREGATIONS,
    ContextEncoder,
    PEARLNets,
    kl_to_standard_normal,
    pearl_losses,
)
from envs.core import Task
from rl import distributed
from rl.collect import Collector, Episode, Prev, StepOutput, make_vector_env
from rl.config import BaseConfig
from rl.module import RLModule
from rl.protocol import heldout_tasks
from rl.sac import soft_update

# --- acting policy -------------------------------------------------------------------------------


class PEARLPolicy:
    """Rollout policy that acts with a per-env z and does posterior sampling over a trial.

    State lives here, keyed by env index: z (N, latent) and the context (transition features of
    the trial's finished episodes). ``reset_memory`` at a trial start clears the context and
    draws z from the prior; ``on_episode_end`` (the collector hook) appends the episode to the
    env's context and redraws z ~ q(z | context) (PEARL alg. 2, posterior sampling).
    """

    def __init__(
        self, nets: PEARLNets, *, greedy: bool = False, generator: torch.Generator | None = None
    ) -> None:
        self.nets = nets
        self.greedy = greedy
        self.generator = generator
        self.z = torch.zeros(0, nets.latent_dim)
        self.context: list[list[torch.Tensor]] = []

    def initial_memory(self, n: int) -> torch.Tensor:
        self.context = [[] for _ in range(n)]
        self.z = self._prior(n)
        return self.z.clone()

    def _prior(self, n: int) -> torch.Tensor:
        return torch.randn((n, self.nets.latent_dim), generator=self.generator)

    def reset_memory(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(mask).squeeze(-1)
        for i in idx.tolist():
            self.context[i] = []
        self.z[idx] = self._prior(len(idx))
        return self.z.clone()

    def step(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> StepOutput:
        action, logp, entropy = self.nets.act(
            obs, self.z, greedy=self.greedy, generator=self.generator, with_entropy=True
        )
        n = obs.shape[0]
        extras = {"z": self.z.clone(), "entropy": entropy}  # entropy: for rl.diagnostics
        return StepOutput(action, logp, torch.zeros(n), self.z.clone(), extras)

    def bootstrap_value(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> torch.Tensor:
        return torch.zeros(obs.shape[0])  # SAC learns from replay; no on-policy bootstrap

    @torch.no_grad()
    def on_episode_end(self, i: int, ep: Episode) -> None:
        self.context[i].append(self.nets.features(ep.obs, ep.actions, ep.rewards, ep.next_obs))
        ctx = torch.cat(self.context[i])[None]
        mu, var = self.nets.encoder(ctx)
        self.z[i] = self.nets.sample_z(mu, var, self.generator)[0]


# --- config and module -------------------------------------------------------------------------


@dataclass
class PEARLConfig(BaseConfig):
    """PEARL: context encoder + SAC over a fixed pool of training tasks."""

    episodes_per_trial: int = 2
    """E of a training trial: episode 0 with z ~ prior, later ones with z ~ posterior"""
    latent_dim: int = 5
    """size of z (PEARL uses 5)"""
    aggregation: str = "product"
    """'product' of Gaussian factors (PEARL sec. 4.1) or 'mean' pooling (seed Q5)"""
    kl_weight: float = 0.1
    """beta: weight of KL(q(z|c) || N(0, I)) in the encoder loss (PEARL kl_lambda)"""
    hidden: int = 128
    """actor/critic MLP width"""
    encoder_hidden: int = 128
    """context-encoder MLP width"""
    num_train_tasks: int = 32
    """size of the task pool (composition, layout seed) drawn once from ``seed``"""
    pool_layouts: str = "fixed"
    """with fixed-layout trials: 'fixed' — a pool task is one (composition, layout) pair, as
    oyster's tasks are fixed parameter draws; 'per_trial' — a pool task is a composition and
    every trial draws a fresh layout (kept for the trial's episodes), so PEARL sees as many
    layouts as the on-policy methods and z has only the composition to encode (a pool of 32
    fixed pairs scored ~0.0 on *train* compositions with new layouts while training success on
    its own 32 was 0.37: it memorised layouts)"""
    meta_batch: int = 4
    """tasks per gradient step"""
    updates_per_env_step: float = 0.5
    """SAC + encoder updates per env step collected (the fraction carries over between
    iterations). 0.5 is oyster's default (2000 updates per iteration on 5 tasks x (400 prior-z
    + 400 posterior-z) steps). It is the costly part of PEARL here: one update (meta_batch 4 x
    batch_size 128, hidden 128) takes ~25 ms on one busy core against ~0.6 ms per collected
    CompoGrid step, so at 0.5 PEARL spends ~13 ms per env step, roughly 20x what collection
    costs; lower it for small-budget runs (issue 12)"""
    num_grad_steps: int | None = None
    """fixed updates per iteration instead of ``updates_per_env_step`` (None: use the ratio;
    before issue 12 the only option, 40, about 0.03 per env step)"""
    batch_size: int = 128
    """replay transitions per task per gradient step"""
    context_batch: int = 64
    """context transitions per task per gradient step: distinct ones, drawn without
    replacement from the task's context buffer (fewer if it holds fewer)"""
    replay_capacity: int = 2000
    """replay-buffer transitions per task"""
    context_capacity: int = 400
    """context-buffer transitions per task: a ring of the task's most recent prior-z episodes
    (oyster's encoder buffer holds the last ``num_steps_prior`` = 400 prior-z steps)"""
    lr: float = 3e-4
    """Adam learning rate (all networks, as in PEARL)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    reward_scale: float = 10.0
    """multiplies rewards in the Bellman target (PEARL tunes it per env; 5 in most of its
    MuJoCo configs). 10 because at 1 the entropy bonus outweighs CompoGrid's sparse terminal
    reward: with time-limit truncations bootstrapped, never finishing collects
    ~alpha * H / (1 - gamma) (about 17 at the start: alpha 0.1, H 1.7, gamma 0.99) against 1 for
    finishing, and training success fell from 0.19 to 0.00 within 40k steps on the single
    task goto(red ball) (0.69-0.94 with 10; RESULTS.md)"""
    autotune_alpha: bool = True
    """learn the entropy temperature; False keeps ``alpha`` fixed"""
    alpha: float = 0.1
    """initial (or fixed) entropy temperature"""
    target_entropy_scale: float = 0.5
    """discrete target entropy = scale * log(|A|); continuous uses -dim(A)"""
    eval_greedy: bool = True
    """meta-test acts with argmax / tanh(mean) instead of sampling, as oyster evaluates
    (``eval_deterministic``); z is sampled from the prior / posterior either way"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.latent_dim) < 1:
            raise ValueError(f"latent_dim={self.latent_dim}; allowed: an integer >= 1")
        if self.pool_layouts not in ("fixed", "per_trial"):
            raise ValueError(f"pool_layouts={self.pool_layouts!r}; allowed: 'fixed', 'per_trial'")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}; allowed: 'product', 'mean'")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight={self.kl_weight}; allowed: a number >= 0")
        for k in (
            "hidden", "encoder_hidden", "num_train_tasks", "meta_batch", "batch_size",
            "context_batch", "replay_capacity", "context_capacity",
        ):  # fmt: skip
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: an integer >= 1")
        if self.num_grad_steps is not None and int(self.num_grad_steps) < 0:
            raise ValueError(
                f"num_grad_steps={self.num_grad_steps}; allowed: an integer >= 0 or null"
            )
        if not self.updates_per_env_step >= 0:
            raise ValueError(
                f"updates_per_env_step={self.updates_per_env_step}; allowed: a number >= 0"
            )
        for k in ("lr", "alpha", "reward_scale"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: a positive number")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma}; allowed: a number in [0, 1]")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau={self.tau}; allowed: a number in (0, 1]")
        if not 0 < self.target_entropy_scale <= 1:
            raise ValueError(
                f"target_entropy_scale={self.target_entropy_scale}; allowed: a number in (0, 1]"
            )


class PEARLModule(RLModule):
    """PEARL as a LightningModule: one ``training_step`` = one meta-iteration (collect one
    trial on ``num_envs`` pool tasks, then ``num_grad_steps`` updates).

    Budget: an iteration's env steps vary with episode lengths (``collect_trials`` runs every
    env until all trials end), so ``iterations()`` is an upper bound and training stops at the
    end of the first iteration that reaches ``total_env_steps``.
    """

    method = "pearl"
    config_cls = PEARLConfig

    def build(self) -> None:
        cfg: PEARLConfig = self.cfg
        train_set = cfg.train_compositions()
        # the task pool: (composition, layout seed) pairs drawn once, so per-task buffers are
        # well defined; with fixed_layout=False a task is its composition (new layout per episode)
        pool = heldout_tasks(
            train_set, cfg.num_train_tasks, seed=cfg.seed, layout_seeds=cfg.train_layout_seeds()
        )
        if not cfg.fixed_layout:
            pool = [Task(t.composition, None) for t in pool]
        self._layouts = cfg.train_layout_seeds()  # per_trial draws from these (None: any)
        self.task_pool: list[Task] = pool
        probe = make_vector_env(cfg.env_id, 1, {**cfg.env_kwargs, "composition": train_set[0]})
        obs_dim = int(probe.single_observation_space.shape[0])
        space = probe.single_action_space
        probe.close()
        self.nets = PEARLNets(
            obs_dim, space, latent_dim=cfg.latent_dim, hidden=cfg.hidden,
            encoder_hidden=cfg.encoder_hidden, aggregation=cfg.aggregation, init_alpha=cfg.alpha,
        )  # fmt: skip
        if not cfg.autotune_alpha:
            self.nets.log_alpha.requires_grad_(False)
        if self.nets.discrete:
            self.target_entropy = cfg.target_entropy_scale * math.log(self.nets.n_actions)
            act_shape, act_dtype = (), torch.long
        else:
            self.target_entropy = -float(self.nets.n_actions)  # SAC's -dim(A) heuristic
            act_shape, act_dtype = (self.nets.n_actions,), torch.float32
        K = cfg.num_train_tasks
        self.replay = TaskBuffers(K, cfg.replay_capacity, obs_dim, act_shape, act_dtype)
        self.context_buffer = TaskBuffers(K, cfg.context_capacity, obs_dim, act_shape, act_dtype)
        self._eval_calls = 0
        # updates owed but not yet run (the fraction of updates_per_env_step x env steps)
        self._update_credit = 0.0

    def make_collector(self) -> Collector:
        cfg: PEARLConfig = self.cfg
        envs = make_vector_env(
            cfg.env_id, self.num_local_envs,
            {**cfg.env_kwargs, "composition": self.task_pool[0].composition},
            vectorization=cfg.vectorization,
        )  # fmt: skip
        policy = PEARLPolicy(self.nets)
        return Collector(
            envs, policy, episodes_per_trial=cfg.episodes_per_trial, seed=cfg.seed,
            on_episode_end=policy.on_episode_end,
        )  # fmt: skip

    def configure_optimizers(self):
        # one Adam over everything: pearl_losses routes each term's gradient to its own
        # parameters, so this equals PEARL's separate optimisers with a shared learning rate
        params = [p for p in self.nets.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.cfg.lr)

    def shard_sizes(self) -> dict[str, int]:
        return {"num_envs": int(self.cfg.num_envs), "meta_batch": int(self.cfg.meta_batch)}

    def iterations(self) -> int:
        cfg = self.cfg
        # upper bound (every episode >= 1 step); training_step stops at the budget
        return max(1, -(-cfg.total_env_steps // (cfg.num_envs * cfg.episodes_per_trial)))

    # -- data -------------------------------------------------------------------------------------
    def _store(self, ro, task_ids: list[int]) -> None:
        """Valid steps of env i go to task_ids[i]'s replay; its prior-z episode (index 0) goes
        to the task's context buffer, a ring of its recent exploratory episodes (PEARL alg. 1;
        oyster refills it with ~400 prior-z steps per visit, we add one episode per visit, so
        keeping the previous ones is what gives a context of several episodes). Under DDP
        every rank stores every rank's envs, in the 1-process env order."""
        rows = []
        for i, k in enumerate(task_ids):
            v = ro.valid[:, i]
            data = {
                "obs": ro.obs[v, i], "actions": ro.actions[v, i], "rewards": ro.rewards[v, i],
                "next_obs": ro.next_obs[v, i], "terminated": ro.terminated[v, i],
            }  # fmt: skip
            rows.append((k, data, ro.episode_index[v, i] == 0))
        for k, data, prior in (r for part in distributed.gather_objects(rows) for r in part):
            self.replay.add(k, data)
            self.context_buffer.add(k, {f: x[prior] for f, x in data.items()})

    def sample_meta_batch(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Context features (K, M, F) with their mask (K, M), a replay batch (K, B, ...) and
        the (K, latent) noise of z, of ``meta_batch`` tasks drawn uniformly from the tasks that
        have data. Under DDP rank 0 draws for the whole meta-batch and broadcasts; each rank
        gets its share of the tasks (K = meta_batch / ranks)."""
        cfg: PEARLConfig = self.cfg
        rank, size = distributed.world()
        draws = None
        if rank == 0:
            have = torch.nonzero(self.replay.size > 0).squeeze(-1)
            tasks = have[torch.randint(len(have), (cfg.meta_batch,))]
            cidx, mask = self.context_buffer.draw_distinct(tasks, cfg.context_batch)
            ridx = self.replay.draw(tasks, cfg.batch_size)
            draws = (tasks, cidx, mask, ridx, torch.randn(cfg.meta_batch, cfg.latent_dim))
        k = cfg.meta_batch // size
        tasks, cidx, mask, ridx, noise = (
            x[rank * k : (rank + 1) * k] for x in distributed.broadcast_object(draws)
        )
        c = self.context_buffer.take(tasks, cidx)
        ctx = self.nets.features(c["obs"], c["actions"], c["rewards"], c["next_obs"])
        return ctx, mask, self.replay.take(tasks, ridx), noise

    def num_updates(self, env_steps: int) -> int:
        """Updates to run after collecting ``env_steps`` steps: ``num_grad_steps`` if set, else
        ``updates_per_env_step * env_steps`` with the fraction carried to the next call."""
        cfg: PEARLConfig = self.cfg
        if cfg.num_grad_steps is not None:
            return int(cfg.num_grad_steps)
        self._update_credit += cfg.updates_per_env_step * env_steps
        n = int(math.floor(self._update_credit + 1e-9))
        self._update_credit -= n
        return n

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        cfg: PEARLConfig = self.cfg
        t0 = time.perf_counter()
        rank, size = distributed.world()
        draws = None
        if rank == 0:  # under DDP rank 0 draws the iteration's tasks; each rank runs its share
            n, P = cfg.num_envs, len(self.task_pool)
            ids = torch.randperm(P)[:n] if P >= n else torch.randint(P, (n,))
            draws = [(int(k), self._trial_task(int(k))) for k in ids]
        n = self.num_local_envs
        mine = distributed.broadcast_object(draws)[rank * n : (rank + 1) * n]
        ro = self.collector.collect_trials([t for _, t in mine])
        self._store(ro, [k for k, _ in mine])
        steps = distributed.all_reduce_sum(torch.tensor([ro.num_steps], dtype=torch.float64))
        updates = self.num_updates(int(steps[0]))
        opt = self.optimizers()
        sums: dict[str, float] = {}
        for _ in range(updates):
            ctx, mask, rb, noise = self.sample_meta_batch()
            terms = pearl_losses(
                self.nets, ctx, rb, gamma=cfg.gamma, kl_weight=cfg.kl_weight,
                target_entropy=self.target_entropy, reward_scale=cfg.reward_scale,
                context_mask=mask, z_noise=noise, meta_batch_shards=size,
            )  # fmt: skip
            opt.zero_grad()
            self.manual_backward(terms["loss"])
            opt.step()
            soft_update(self.nets.q1_target, self.nets.q1, cfg.tau)
            soft_update(self.nets.q2_target, self.nets.q2, cfg.tau)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        stats = {k: v / max(1, updates) for k, v in sums.items()}
        self.last_rollouts = (ro,)  # read by rl.diagnostics.MetaRLDiagnostics
        self._log(ro, stats, time.perf_counter() - t0, updates)
        if self.env_steps >= cfg.total_env_steps and self._trainer is not None:
            self.trainer.should_stop = True

    def _trial_task(self, k: int) -> Task:
        """Pool task ``k`` as this trial plays it: with ``pool_layouts='per_trial'`` a fresh
        layout (the global torch RNG: checkpointed, so a resumed run draws the same ones)."""
        t = self.task_pool[k]
        if self.cfg.pool_layouts == "fixed" or t.layout_seed is None:
            return t
        if self._layouts is not None:
            return Task(
                t.composition, int(self._layouts[int(torch.randint(len(self._layouts), ()))])
            )
        return Task(t.composition, int(torch.randint(2**31 - 1, ())))

    def _log(self, ro, losses: dict[str, float], seconds: float, updates: int) -> None:
        """``log_iteration``'s signals plus success of the prior-z episode (0) and of the last
        posterior-z episode, the adaptation signal of PEARL, and the updates run."""
        extra = {"charts/updates": float(updates)}
        last = self.cfg.episodes_per_trial - 1
        for name, idx in (("prior", 0), ("posterior", last)):
            s = [e.success for e in ro.episodes if e.episode_index == idx]
            if s and (name == "prior" or last > 0):
                extra[f"charts/success_{name}"] = float(np.mean(s))
        self.log_iteration(ro, losses, seconds, extra=extra)

    # -- checkpoint state -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            "replay": self.replay.state_dict(),
            "context": self.context_buffer.state_dict(),
            "eval_calls": self._eval_calls,
            "update_credit": self._update_credit,
        }

    def load_extra_state(self, state: dict) -> None:
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
            self.context_buffer.load_state_dict(state["context"])
            self._eval_calls = int(state.get("eval_calls", 0))
            self._update_credit = float(state.get("update_credit", 0.0))

    # -- evaluation -------------------------------------------------------------------------------
    def acting_policy(self) -> PEARLPolicy:
        return PEARLPolicy(self.nets)

    def trial_policy(self, envs):
        """Meta-test: z ~ prior for episode 0, then after each episode the hook adds it to the
        env's context and redraws z from the posterior (PEARL alg. 2). A generator seeded from
        ``seed`` and the call count makes evaluation independent of the global RNG."""
        self._eval_calls += 1
        gen = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + self._eval_calls)
        policy = PEARLPolicy(self.nets, greedy=self.cfg.eval_greedy, generator=gen)
        return policy, policy.on_episode_end


__all__ = [
    "ContextEncoder",
    "PEARLConfig",
    "PEARLModule",
    "PEARLNets",
    "PEARLPolicy",
    "TaskBuffers",
    "kl_to_standard_normal",
    "pearl_losses",
]
