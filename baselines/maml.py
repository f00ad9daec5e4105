"""MAML for RL with a correct second-order meta-gradient; FOMAML and Reptile as options.

Model-agnostic meta-learning (Finn et al. 2017) meta-learns policy parameters ``theta`` such that
K policy-gradient steps on a task's first episodes (the *pre-update* episodes) give adapted
parameters ``phi_i`` that do well on that task (the *post-update* episodes).

What this file does, and why:

* **Functional parameters.** The policy is a feed-forward MLP (``MAMLPolicyNet``: an
  ActorCritic-like actor, with a state-independent log-std on Box spaces through
  ``rl.nets.ActionHead``). Parameters are plain dicts of tensors evaluated with
  ``torch.func.functional_call``; one task's parameters are a slice of a *stacked* dict
  (leading dim = tasks), so the inner step of all tasks of a meta-batch runs as one batched
  computation (``torch.func.vmap`` over tasks). Nothing on the differentiable path writes
  ``.data`` or deep-copies (the seed's pseudo-code did, which silently cut the second-order
  path; see DESIGN.md).
* **Inner surrogate (meta-gradient correctness).** In RL the inner objective is an expectation
  over the pre-update episodes, whose distribution depends on ``theta``. The meta-gradient
  ``d/dtheta J_outer(theta + a * grad J_inner(theta))`` therefore needs an *unbiased Hessian* of
  ``J_inner`` (ProMP, Rothfuss et al. 2019, sec. 4-5, "formulation II"). The usual
  ``sum logpi * A`` surrogate gets the gradient right but its Hessian misses the
  ``E[R grad logpi grad logpi^T]`` term that comes from the sampling distribution. We use
  DiCE (Foerster et al. 2018), the "magic box" ``[x] = exp(x - stop_grad(x))``, with the
  variance-reducing baseline of Mao et al. 2019 ("A baseline for any order gradient
  estimation in stochastic computation graphs"): every order of derivative is unbiased.
  ProMP's low-variance curvature surrogate LVC (eq. 10 there: per-step likelihood ratio times
  the advantage; unbiased gradient, biased but low-variance Hessian) is the option
  ``surrogate="lvc"``. ``tests/test_maml.py`` checks the meta-gradient against the exact
  gradient of ``J(theta + a * grad J(theta))`` on an enumerable MDP.
* **Outer loss.** The post-update episodes are drawn from ``pi_phi_i``; their score-function
  loss ``-sum gamma^t log pi_phi(a_t|s_t) A_t`` evaluated with the adapted ``phi_i(theta)`` and
  differentiated back to ``theta`` through the inner steps (``create_graph=True``). Collection
  runs without grad, so the inner steps are *recomputed* with graph from the stored
  pre-update episodes. The outer optimiser is Adam by default.
* **TRPO outer step** (``outer_optimizer="trpo"``; ``trpo_step``). Finn et al. 2017 (sec. 5.3)
  meta-train their RL experiments with TRPO (Schulman et al. 2015) as the outer optimiser,
  and so do ProMP (Rothfuss et al. 2019), garage's and learn2learn's MAML-TRPO and the
  Meta-World baselines. The outer objective is TRPO's importance-weighted surrogate of the
  post-update episodes, ``mean_i E[pi_phi_i(theta)(a|s) / pi_phi_i(theta_old)(a|s) A]``,
  maximised subject to ``mean KL(pi_phi(theta_old) || pi_phi(theta)) <= max_kl`` on the
  post-update states, both differentiated through the inner adaptation (second order for
  MAML, identity Jacobian for FOMAML). The natural gradient is solved by conjugate gradient
  on Fisher-vector products (Hessian-vector products of that KL, by double
  back-propagation through the adaptation: ``J^T F J v``) with damping, scaled to the trust
  region, then backtracked until the surrogate improves within the KL bound; if no fraction
  does, theta is kept (logged as ``trpo/accepted = 0``). The accepted step is applied as an
  SGD step of rate 1 on the pseudo-gradient ``theta - theta_new``, so Lightning checkpoints
  and resumes it like any optimiser step (TRPO itself keeps no state across iterations).
  Reptile has no surrogate to constrain and rejects ``trpo``.
* **Baseline.** A linear feature baseline fitted by ridge regression (garage's
  ``LinearFeatureBaseline``, Duan et al. 2016) *across the meta-batch*: one fit on all tasks'
  pre-update episodes (and one on the post-update episodes), not one per task. garage and
  ProMP fit per task on 10-40 episodes; with our 1-4 a per-task cubic in t interpolates a
  sparse terminal reward and cancels the inner signal (issue 12: one successful episode moved
  phi by 1.5e-3 instead of 5.6). A learned value function would also avoid that, but it
  adds a network, a loss and a learning rate to a baseline whose point is to be the
  reference recipe; the pooled linear fit keeps the recipe and cannot fit one task's
  episodes away. Default features are time only (1, t, t^2, t^3): CompoGrid observations
  have 125 dims, so garage's observation features (``baseline="linear"``: obs, obs^2) would
  nearly interpolate even a pooled batch. The baseline never depends on ``theta``, so every
  estimator stays unbiased.
* **Advantage normalisation.** The inner step uses advantages standardised over the
  meta-batch's pre-update steps (``inner_normalize_adv``; ProMP's and learn2learn's inner
  loops standardise theirs), fed to DiCE in its advantage form (``dice_advantage_objective``)
  or to LVC; the outer advantages likewise over the post-update steps (``normalize_adv``).
  Pooled for the reason above: standardising one task's 1-4 episodes turns fit residuals
  into unit-size signal.
* **FOMAML** (Finn et al. 2017, sec. 5.2): the inner gradient is taken without graph, so the
  outer gradient at ``phi`` is applied to ``theta`` unchanged. **Reptile** (Nichol et al.
  2018): ``theta += eps * (mean_i phi_i - theta)``, applied as an SGD step of learning rate
  ``eps`` on the pseudo-gradient ``theta - mean_i phi_i`` (the same update, and resumable as an
  ordinary optimiser state).
* **Meta-batch.** One vector env with one env per task (``num_envs = meta_batch_size``);
  pre-update episodes come from ``Collector.collect_trials`` with ``theta``; post-update
  episodes from the same collector with a policy acting with each env's own ``phi_i``.
* **Meta-test adaptation** (``trial_policy``), as in Finn et al. 2017 (sec. 5.3), ProMP and
  garage's ``MetaEvaluator``: the trial's episodes come in batches of ``M`` (``eval_adapt_episodes``,
  default the training ``episodes_per_trial``, so the inner step sees what it saw in training).
  Episodes 0..M-1 act with ``theta``; when a batch is complete, the env's parameters take the
  training inner step (K steps of ``adapt``) *from their current value* on that batch of fresh
  episodes, which they sampled themselves; the next batch acts with the result. With
  ``eval_reuse_episodes`` every earlier episode of the trial joins the batch, importance-weighted
  by ``pi_current / pi_sampler`` (the log-probabilities the collector stored while acting).
  One task cannot fit a baseline or advantage moments on its own (see above), so meta-test
  uses moving averages (rate ``STAT_RATE``) of the pooled fits of training's pre-update
  batches; they are saved in checkpoints.

  On the adaptation curve, episodes 0..M-1 therefore all show theta (zero-shot); the
  first adapted episode is M.

``meta_step()`` runs one meta-iteration outside Lightning (benchmarks: see
``meta_iteration_cost``). The maths lives in ``baselines.maml_core``, the TRPO step in
``baselines.maml_trpo``, the benchmark hooks in ``baselines.maml_bench``; this module re-exports
them, so ``from baselines.maml import ...`` keeps working.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from baselines.maml_bench import graph_saved_bytes, meta_iteration_cost
from baselines.maml_config import MAMLConfig
from baselines.maml_core import (
    BASELINES,
    SURROGATES,
    EpisodeBatch,
    MAMLPolicyNet,
    Params,
    PerEnvPolicy,
    adapt,
    advantage_moments,
    advantages_to_go,
    baseline_values,
    dice_advantage_objective,
    dice_objective,
    discounted_to_go,
    fit_baseline,
    inner_objective,
    linear_baseline,
    lvc_objective,
    magic_box,
    outer_advantages,
    outer_loss,
    policy_dist,
    stack_params,
    standardise,
)
from baselines.maml_trpo import (
    conjugate_gradient,
    fisher_vector_product,
    mean_kl,
    trpo_step,
    trpo_surrogate,
)
from rl import distributed
from rl.collect import Collector, Episode, make_vector_env, uniform_task_sampler
from rl.diagnostics import grad_norm, inner_grad_norm
from rl.module import RLModule

log = logging.getLogger(__name__)

STAT_RATE = 0.1
"""rate of the moving averages of the inner baseline and advantage moments that meta-test
adaptation uses (about the last 10 meta-iterations)"""


# --- module -------------------------------------------------------------------------------------


def gather_batch(batch: EpisodeBatch) -> EpisodeBatch:
    """Every DDP rank's tasks in one batch (rank order, padded to the longest episode), the
    batch a 1-process run of the whole meta-batch builds; ``batch`` itself on one process."""
    if distributed.world()[1] == 1:
        return batch
    T = max(distributed.gather_objects(int(batch.rewards.shape[2])))
    pad = T - batch.rewards.shape[2]

    def padded(x: torch.Tensor) -> torch.Tensor:  # (N, M, t, ...) -> (N, M, T, ...), zeros
        return torch.cat([x, x.new_zeros((*x.shape[:2], pad, *x.shape[3:]))], dim=2)

    n, m = batch.weights.shape
    return EpisodeBatch(
        obs=distributed.gather_rows(padded(batch.obs)),
        actions=distributed.gather_rows(padded(batch.actions)),
        rewards=distributed.gather_rows(padded(batch.rewards)),
        mask=distributed.gather_rows(padded(batch.mask)),
        time=torch.arange(T, dtype=torch.float32).expand(n * distributed.world()[1], m, T).clone(),
        weights=distributed.gather_rows(batch.weights),
    )


class MAMLModule(RLModule):
    """MAML (``algo`` from the config; the subclasses pin it). One ``training_step`` = one
    meta-iteration: pre-update trials with theta, K inner steps per task, post-update trials
    with each phi_i, one outer update."""

    method = "maml"
    config_cls = MAMLConfig
    algo: str = "maml"  # each class pins the config's ``algo`` (= its method name)

    def __init__(self, config: dict | None = None) -> None:
        config = dict(config or {})
        if config.get("algo", self.algo) != self.algo:
            raise ValueError(
                f"algo={config['algo']!r} contradicts method {self.method!r}; allowed: {self.algo!r}"
            )
        config["algo"] = self.algo
        super().__init__(config)

    def build(self) -> None:
        cfg: MAMLConfig = self.cfg
        self.train_set = cfg.train_compositions()
        probe = make_vector_env(cfg.env_id, 1, {**cfg.env_kwargs, "composition": self.train_set[0]})
        obs_dim = probe.single_observation_space.shape[0]
        self.action_space = probe.single_action_space
        probe.close()
        self.net = MAMLPolicyNet(obs_dim, self.action_space, cfg.hidden)
        self._acting = PerEnvPolicy(self.net)
        self._standalone_opt: torch.optim.Optimizer | None = None
        # TRPO line-search outcomes so far (logged; kept in checkpoints)
        self.trpo_accepted = 0
        self.trpo_rejected = 0
        # moving averages of the pooled inner-step baseline coefficients and advantage moments
        # (mean, std) of training's pre-update batches: meta-test adapts one task at a time and
        # cannot fit either on its own episodes (kept in checkpoints)
        self.eval_baseline: torch.Tensor | None = None
        self.eval_adv_moments: tuple[float, float] | None = None

    def make_collector(self) -> Collector:
        cfg: MAMLConfig = self.cfg
        envs = make_vector_env(
            cfg.env_id, self.num_local_envs, {**cfg.env_kwargs, "composition": self.train_set[0]},
            vectorization=cfg.vectorization,
        )  # fmt: skip
        sampler = uniform_task_sampler(self.train_set, cfg.fixed_layout, cfg.train_layout_seeds())
        return Collector(
            envs, self._acting, episodes_per_trial=cfg.episodes_per_trial,
            task_sampler=sampler, seed=cfg.seed,
        )  # fmt: skip

    def configure_optimizers(self):
        if self.cfg.algo == "reptile":
            # theta - eps * (theta - mean phi) == theta + eps * (mean phi - theta)
            return torch.optim.SGD(self.net.parameters(), lr=self.cfg.reptile_eps)
        if self.cfg.outer_optimizer == "trpo":
            # TRPO's step is found by the line search (``trpo_step``); it is applied as an SGD
            # step of rate 1 on the pseudo-gradient ``-step``, so Lightning counts it (its
            # checkpointing keys on optimizer steps) and TRPO keeps no state beyond theta.
            return torch.optim.SGD(self.net.parameters(), lr=1.0)
        return torch.optim.Adam(self.net.parameters(), lr=self.cfg.outer_lr)

    def extra_state(self) -> dict:
        return {
            "trpo_accepted": self.trpo_accepted,
            "trpo_rejected": self.trpo_rejected,
            "eval_baseline": None if self.eval_baseline is None else self.eval_baseline.clone(),
            "eval_adv_moments": None
            if self.eval_adv_moments is None
            else list(self.eval_adv_moments),
        }

    def load_extra_state(self, state: dict) -> None:
        self.trpo_accepted = int(state.get("trpo_accepted", 0))
        self.trpo_rejected = int(state.get("trpo_rejected", 0))
        # absent in checkpoints written before issue 12: meta-test then adapts without them
        b = state.get("eval_baseline")
        self.eval_baseline = None if b is None else torch.as_tensor(b, dtype=torch.float64)
        mo = state.get("eval_adv_moments")
        self.eval_adv_moments = None if mo is None else (float(mo[0]), float(mo[1]))

    def shard_sizes(self) -> dict[str, int]:
        return {"meta_batch_size": int(self.cfg.meta_batch_size)}  # one env per task

    def iterations(self) -> int:
        """Upper bound on meta-iterations (every episode takes >= 1 step); training stops as
        soon as ``total_env_steps`` is reached (episode lengths vary)."""
        cfg: MAMLConfig = self.cfg
        return max(1, -(-cfg.total_env_steps // (2 * cfg.meta_batch_size * cfg.episodes_per_trial)))

    # -- the maths, bound to this module's config ------------------------------------------------
    def _values(self, batch: EpisodeBatch) -> torch.Tensor:
        """The baseline fitted across ``batch`` (all its tasks pooled), evaluated on it."""
        return linear_baseline(batch, self.cfg.gamma, self.cfg.baseline)

    def inner_signal(
        self, batch: EpisodeBatch, update_eval_stats: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, advantages) for the inner step on a meta-batch of pre-update episodes: the
        baseline fitted across the meta-batch and, with ``inner_normalize_adv``, the advantages
        standardised over its steps (None otherwise: ``adapt`` derives them from the values).
        ``update_eval_stats`` folds this batch's fit and moments into the moving averages that
        meta-test adaptation uses."""
        cfg: MAMLConfig = self.cfg
        coef = fit_baseline(batch, cfg.gamma, cfg.baseline)
        values = baseline_values(coef, batch, cfg.baseline)
        raw = advantages_to_go(batch, cfg.gamma, values)
        mean, std = advantage_moments(raw, batch.mask)
        adv = standardise(raw, batch.mask, mean, std) if cfg.inner_normalize_adv else None
        if update_eval_stats:
            if coef is not None:
                self.eval_baseline = (
                    coef.clone() if self.eval_baseline is None
                    else (1 - STAT_RATE) * self.eval_baseline + STAT_RATE * coef
                )  # fmt: skip
            if std > 1e-8:  # a batch without any return spread says nothing about the scale
                old = self.eval_adv_moments
                self.eval_adv_moments = (mean, std) if old is None else (
                    (1 - STAT_RATE) * old[0] + STAT_RATE * mean,
                    (1 - STAT_RATE) * old[1] + STAT_RATE * std,
                )  # fmt: skip
        return values, adv

    def outer_signal(self, batch: EpisodeBatch) -> torch.Tensor:
        """Advantages of a meta-batch of post-update episodes: the baseline fitted across it and,
        with ``normalize_adv``, standardised over its steps (``outer_advantages``)."""
        cfg: MAMLConfig = self.cfg
        return outer_advantages(
            batch, gamma=cfg.gamma, values=self._values(batch), normalize_adv=cfg.normalize_adv
        )

    def eval_signal(self, batch: EpisodeBatch) -> torch.Tensor:
        """Advantages of one task's meta-test batch, with training's moving-average baseline
        and moments (raw ``gamma^t (G_t - V)`` before any training batch has been seen)."""
        cfg: MAMLConfig = self.cfg
        values = baseline_values(self.eval_baseline, batch, cfg.baseline)
        raw = advantages_to_go(batch, cfg.gamma, values)
        if not cfg.inner_normalize_adv or self.eval_adv_moments is None:
            return raw
        return standardise(raw, batch.mask, *self.eval_adv_moments)

    def adapt(
        self,
        params: Params,
        batch: EpisodeBatch,
        create_graph: bool | None = None,
        values: torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
        behaviour_logp: torch.Tensor | None = None,
    ) -> Params:
        """``adapt(params, episodes) -> params`` with this config's K, alpha and surrogate;
        ``create_graph`` defaults to True for MAML only. Without ``values`` and
        ``advantages``, both come from ``inner_signal(batch)``."""
        cfg: MAMLConfig = self.cfg
        if create_graph is None:
            create_graph = cfg.algo == "maml"
        if values is None and advantages is None:
            values, advantages = self.inner_signal(batch)
        return adapt(
            self.net, params, batch, steps=cfg.inner_steps, lr=cfg.inner_lr, gamma=cfg.gamma,
            surrogate=cfg.surrogate, values=values, create_graph=create_graph,
            advantages=advantages, behaviour_logp=behaviour_logp,
        )  # fmt: skip

    def meta_loss(
        self,
        pre: EpisodeBatch,
        post: EpisodeBatch,
        signal: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        post_adv: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Params]:
        """Outer loss (mean over tasks) of the adapted parameters, with graph back to theta
        (second order for MAML, identity Jacobian for FOMAML). ``signal``: ``inner_signal(pre)``
        and ``post_adv``: ``self.outer_signal(post)``, if already computed."""
        theta = self.net.params()
        values, adv = self.inner_signal(pre) if signal is None else signal
        phi = self.adapt(stack_params(theta, pre.obs.shape[0]), pre, values=values, advantages=adv)
        post_adv = self.outer_signal(post) if post_adv is None else post_adv
        loss = outer_loss(self.net, phi, post, gamma=self.cfg.gamma, advantages=post_adv).mean()
        return loss, phi

    def trpo_update(
        self,
        pre: EpisodeBatch,
        post: EpisodeBatch,
        signal: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        post_adv: torch.Tensor | None = None,
    ) -> tuple[Params | None, dict]:
        """The TRPO outer step (``trpo_step``) with this config; counts accepted and rejected
        line searches. Returns the new theta (None: keep theta) and the logged scalars. Under
        DDP ``pre`` and ``post`` hold this rank's tasks and the step is the whole meta-batch's
        (``trpo_step``'s ``reduce``)."""
        cfg: MAMLConfig = self.cfg
        values_pre, adv_pre = self.inner_signal(pre) if signal is None else signal
        new_theta, stats = trpo_step(
            self.net, self.net.params(), post,
            lambda p, graph: self.adapt(
                p, pre, create_graph=graph, values=values_pre, advantages=adv_pre
            ),
            advantages=self.outer_signal(post) if post_adv is None else post_adv,
            create_graph=cfg.algo == "maml", max_kl=cfg.max_kl, cg_iters=cfg.cg_iters,
            damping=cfg.cg_damping, ls_steps=cfg.ls_steps, ls_decay=cfg.ls_decay,
            reduce=distributed.all_reduce_sum if self.world_size > 1 else None,
        )  # fmt: skip
        if new_theta is None:
            self.trpo_rejected += 1
            log.info(
                "TRPO: no step of the line search improved the surrogate within max_kl=%g "
                "(%d tries); theta kept", cfg.max_kl, int(stats["trpo/ls_tries"]),
            )  # fmt: skip
        else:
            self.trpo_accepted += 1
        stats["trpo/rejected_total"] = float(self.trpo_rejected)
        return new_theta, stats

    def _my_tasks(self) -> slice:
        """This DDP rank's rows of the meta-batch (all of them on one process)."""
        rank, size = getattr(self, "_world", (0, 1))
        n = self.cfg.meta_batch_size // size
        return slice(rank * n, (rank + 1) * n)

    # -- one meta-iteration ------------------------------------------------------------------------
    def meta_step(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> dict[str, float]:
        """One meta-iteration; usable outside Lightning (creates the collector and an optimiser
        on first use). Returns the logged scalars."""
        cfg: MAMLConfig = self.cfg
        if self.collector is None:
            self.collector = self.make_collector()
        if optimizer is None:
            if self._standalone_opt is None:
                self._standalone_opt = self.configure_optimizers()
            optimizer = self._standalone_opt
        backward = backward or torch.Tensor.backward
        col = self.collector
        steps0 = col.env_steps
        t0 = time.perf_counter()
        # the meta-batch's tasks, drawn alike on every DDP rank; this rank's envs run its share
        mine = self._my_tasks()
        tasks = [col.task_sampler(col.rng) for _ in range(cfg.meta_batch_size)][mine]

        # 1. pre-update trials with theta (shared by every env)
        self._acting.params = None
        ro_pre = col.collect_trials(tasks)
        pre = gather_batch(EpisodeBatch.from_rollout(ro_pre, cfg.episodes_per_trial))
        t1 = time.perf_counter()

        # 2. adapt per task (no graph: only to act), 3. post-update trials with phi_i; the
        #    baseline and advantage moments are pooled over every rank's tasks, then each rank
        #    keeps its own
        values, adv = self.inner_signal(pre, update_eval_stats=True)
        signal = (values[mine], None if adv is None else adv[mine])
        pre = pre.rows(mine)
        with torch.enable_grad():
            theta = {k: v.detach() for k, v in self.net.params().items()}
            theta = {k: v.requires_grad_() for k, v in theta.items()}
            phi_act = self.adapt(
                stack_params(theta, len(tasks)), pre, create_graph=False,
                values=signal[0], advantages=signal[1],
            )  # fmt: skip
        self._acting.params = {k: v.detach() for k, v in phi_act.items()}
        inner_norm = float(inner_grad_norm(theta, phi_act, cfg.inner_lr, cfg.inner_steps).mean())
        t2 = time.perf_counter()
        ro_post = col.collect_trials(tasks)
        self._acting.params = None
        post = gather_batch(EpisodeBatch.from_rollout(ro_post, cfg.episodes_per_trial))
        post_adv = self.outer_signal(post)[mine]
        post = post.rows(mine)
        t3 = time.perf_counter()

        # 4. outer update: recompute the inner steps with graph from the stored pre-update
        #    episodes (collection ran without grad) and differentiate the outer loss to theta
        optimizer.zero_grad()
        extra: dict[str, float] = {}
        if cfg.algo == "reptile":
            phi_mean = {  # over every rank's tasks
                k: distributed.all_reduce_sum(v.detach().sum(0)) / cfg.meta_batch_size
                for k, v in phi_act.items()
            }
            for k, p in self.net.named_parameters():
                p.grad = (p.detach() - phi_mean[k]).clone()
            meta_norm = grad_norm(p.grad for p in self.net.parameters())
            loss = outer_loss(
                self.net, phi_act, post, gamma=cfg.gamma, advantages=post_adv
            ).mean().detach()  # fmt: skip
        elif cfg.outer_optimizer == "trpo":
            new_theta, trpo_stats = self.trpo_update(pre, post, signal, post_adv)
            extra.update(trpo_stats)
            meta_norm = trpo_stats["trpo/grad_norm"]
            loss = -torch.tensor(trpo_stats["trpo/surrogate_before"])
            # theta + step as an SGD step of rate 1 (zero pseudo-gradient: keep theta)
            for k, p in self.net.named_parameters():
                p.grad = torch.zeros_like(p) if new_theta is None else p.detach() - new_theta[k]
        else:
            # under DDP each rank's loss is the mean over its tasks, and DDP's gradient average
            # over the ranks (equal shares) makes the mean over the meta-batch
            loss, _ = self.meta_loss(pre, post, signal, post_adv)
            backward(loss)
            meta_norm = grad_norm(p.grad for p in self.net.parameters())  # before clipping
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
        optimizer.step()
        # what rl.diagnostics.MetaRLDiagnostics reads after the iteration
        self.last_rollouts = (ro_pre, ro_post)
        self.grad_norms = {"inner": inner_norm, "meta": meta_norm}
        t4 = time.perf_counter()

        pre_eps, post_eps = ro_pre.episodes, ro_post.episodes
        secs = t4 - t0
        # every rank's env steps (the ranks step in lockstep: each waits at the collectives)
        steps = float(distributed.all_reduce_sum(torch.tensor([float(col.env_steps - steps0)]))[0])
        return {
            "losses/outer_loss": float(loss.detach()),
            "charts/pre_return": float(np.mean([e.ret for e in pre_eps])),
            "charts/post_return": float(np.mean([e.ret for e in post_eps])),
            "charts/pre_success": float(np.mean([e.success for e in pre_eps])),
            "charts/post_success": float(np.mean([e.success for e in post_eps])),
            "charts/success": float(np.mean([e.success for e in post_eps])),
            "charts/SPS": steps / max(secs, 1e-9),
            "time/collect_pre_s": t1 - t0,
            "time/adapt_s": t2 - t1,
            "time/collect_post_s": t3 - t2,
            "time/update_s": t4 - t3,
            "time/meta_iteration_s": secs,
            **extra,
        }

    def training_step(self, batch, batch_idx):
        stats = self.meta_step(self.optimizers(), self.manual_backward)
        self.iteration += 1
        self.log_scalars(stats)
        if self.env_steps >= self.cfg.total_env_steps and self._trainer is not None:
            self.trainer.should_stop = True

    # -- evaluation ----------------------------------------------------------------------------------
    def trial_policy(self, envs: gym.vector.VectorEnv):
        """Meta-test adaptation on fresh episodes (see the module docstring): every env starts
        at theta; each time it completes ``M`` more episodes, its parameters take the inner
        step from their current value on those episodes (plus, with ``eval_reuse_episodes``,
        the trial's earlier ones, importance-weighted)."""
        cfg: MAMLConfig = self.cfg
        n = envs.num_envs
        per_step = cfg.eval_adapt_episodes or cfg.episodes_per_trial
        theta = {k: v.detach().clone() for k, v in self.net.params().items()}
        policy = PerEnvPolicy(
            self.net, {k: v.unsqueeze(0).repeat(n, *[1] * v.dim()) for k, v in theta.items()}
        )
        fresh: list[list[Episode]] = [[] for _ in range(n)]
        used: list[list[Episode]] = [[] for _ in range(n)]

        def hook(i: int, ep: Episode) -> None:
            fresh[i].append(ep)
            if len(fresh[i]) < per_step:
                return
            episodes = used[i] + fresh[i] if cfg.eval_reuse_episodes else fresh[i]
            batch = EpisodeBatch.from_episodes([episodes])
            behaviour = None
            if len(episodes) > len(fresh[i]):
                # reused episodes were sampled by earlier parameters: weight by the stored
                # log-probabilities of the policy that acted
                behaviour = torch.zeros_like(batch.rewards)
                for m, e in enumerate(episodes):
                    behaviour[0, m, : e.logp.shape[0]] = e.logp
            with torch.enable_grad():
                start = {k: v[i].clone().requires_grad_() for k, v in policy.params.items()}
                phi = self.adapt(
                    stack_params(start, 1), batch, create_graph=False,
                    advantages=self.eval_signal(batch), behaviour_logp=behaviour,
                )  # fmt: skip
            with torch.no_grad():
                for k, v in phi.items():
                    policy.params[k][i] = v[0]
            used[i] += fresh[i]
            fresh[i] = []

        return policy, hook

    def acting_policy(self) -> PerEnvPolicy:
        return PerEnvPolicy(self.net)


class FOMAMLModule(MAMLModule):
    """First-order MAML: the outer gradient at phi is applied to theta (no second order)."""

    method = "fomaml"
    algo = "fomaml"


class ReptileModule(MAMLModule):
    """Reptile: theta += eps * (mean_i phi_i - theta)."""

    method = "reptile"
    algo = "reptile"


__all__ = [
    "BASELINES",
    "SURROGATES",
    "EpisodeBatch",
    "FOMAMLModule",
    "MAMLConfig",
    "MAMLModule",
    "MAMLPolicyNet",
    "PerEnvPolicy",
    "ReptileModule",
    "adapt",
    "advantage_moments",
    "advantages_to_go",
    "baseline_values",
    "conjugate_gradient",
    "dice_advantage_objective",
    "dice_objective",
    "discounted_to_go",
    "fisher_vector_product",
    "fit_baseline",
    "graph_saved_bytes",
    "inner_objective",
    "linear_baseline",
    "lvc_objective",
    "magic_box",
    "mean_kl",
    "meta_iteration_cost",
    "outer_advantages",
    "outer_loss",
    "policy_dist",
    "stack_params",
    "standardise",
    "trpo_step",
    "trpo_surrogate",
]
