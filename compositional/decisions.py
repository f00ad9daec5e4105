"""PPO at the decision level (SMDP): the controller's transitions are its decisions.

From a rollout of the shared collector, per env, decision j at step t_j chose a skill that ran
until the next decision t_{j+1}. Its reward is the discounted sum of the env rewards in between,
R_j = sum_{t=t_j}^{t_{j+1}-1} gamma^(t - t_j) r_t, and the next decision's value is discounted
by gamma^(t_{j+1} - t_j) (the option's duration; Sutton, Precup & Singh 1999). Advantages are
trial-level (RL²): an episode boundary inside a trial is not terminal; the end of a trial is,
whether its last episode terminated or was cut by the time limit (the trial is over). The last
decision of a rollout whose segment is still running is not trained (its return is unknown);
its value bootstraps the decision before it.

The controller is recurrent, so the update replays each env's decision sequence from the
controller state at the rollout's start (``Rollout.memory_start``), zeroing it where a trial
starts: BPTT over the rollout's decisions (tens per env, not thousands of steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from compositional.controller import current_token
from rl import distributed
from rl.collect import Rollout
from rl.ppo import PPO_TERMS, PPOConfig, empty_step, explained_variance, minibatch_step


@dataclass
class Decisions:
    """Padded (N envs, M decisions, ...) decision data of one rollout."""

    x: torch.Tensor
    skill: torch.Tensor
    logp: torch.Tensor
    value: torch.Tensor
    adv: torch.Tensor
    ret: torch.Tensor
    train: torch.Tensor
    valid: torch.Tensor
    reset: torch.Tensor
    prev: torch.Tensor
    bias: torch.Tensor
    prior: torch.Tensor
    pi_a: torch.Tensor | None
    h0: torch.Tensor
    c0: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.train.sum())


def smdp_advantages(
    rewards: np.ndarray,
    values: np.ndarray,
    dec_steps: np.ndarray,
    trial_end: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decision-level GAE for one env.

    Args:
        rewards: (T,) env rewards of the rollout.
        values: (m,) the controller's value at each decision.
        dec_steps: (m,) increasing step indices of the decisions.
        trial_end: (T,) True where the step ends a trial.

    Returns:
        advantages (m,), returns (m,) and a (m,) mask of decisions whose segment finished
        (the others are not trained).
    """
    T, m = len(rewards), len(dec_steps)
    adv = np.zeros(m)
    done = np.zeros(m, dtype=bool)
    R = np.zeros(m)
    disc = np.zeros(m)
    term = np.zeros(m, dtype=bool)
    for j in range(m):
        t0 = dec_steps[j]
        t1 = dec_steps[j + 1] if j + 1 < m else T
        ends = np.flatnonzero(trial_end[t0:t1])
        if len(ends):  # a trial ends inside the segment: it stops there, terminal
            t1 = t0 + int(ends[0]) + 1
            term[j] = True
        g = gamma ** np.arange(t1 - t0)
        R[j] = float((g * rewards[t0:t1]).sum())
        disc[j] = gamma ** (t1 - t0)
        done[j] = j + 1 < m or term[j]
    next_adv = 0.0
    for j in reversed(range(m)):
        if not done[j]:
            next_adv = 0.0
            continue
        if term[j]:
            delta = R[j] - values[j]
            next_adv = delta
        else:
            delta = R[j] + disc[j] * values[j + 1] - values[j]
            next_adv = delta + disc[j] * lam * next_adv
        adv[j] = next_adv
    return adv, adv + values, done


def collect_decisions(ro: Rollout, gamma: float, lam: float, soft: bool) -> Decisions:
    """The rollout's decisions per env, padded, with SMDP advantages."""
    ex = ro.extras
    dec = (ex["decision"] & ro.valid).numpy()
    T, N = dec.shape
    trial_end = ro._trial_end().numpy() | ~ro.valid.numpy()
    rewards = ro.rewards.numpy()
    values = ex["dec_value"].numpy()
    per_env = [np.flatnonzero(dec[:, i]) for i in range(N)]
    M = max(1, max(len(s) for s in per_env))
    F, K = ex["ctrl_in"].shape[-1], ex["alpha"].shape[-1]
    out = {
        "x": torch.zeros(N, M, F),
        "skill": torch.zeros(N, M, dtype=torch.long),
        "logp": torch.zeros(N, M),
        "value": torch.zeros(N, M),
        "adv": torch.zeros(N, M),
        "ret": torch.zeros(N, M),
        "train": torch.zeros(N, M, dtype=torch.bool),
        "valid": torch.zeros(N, M, dtype=torch.bool),
        "reset": torch.zeros(N, M, dtype=torch.bool),
        "prev": torch.full((N, M), -1, dtype=torch.long),
        "bias": torch.zeros(N, M, K),
        "prior": torch.zeros(N, M, K),
    }
    pi_a = torch.zeros(N, M, K) if soft else None
    for i, steps in enumerate(per_env):
        m = len(steps)
        if m == 0:
            continue
        v = values[steps, i]
        adv, ret, ok = smdp_advantages(rewards[:, i], v, steps, trial_end[:, i], gamma, lam)
        st = torch.as_tensor(steps)
        out["x"][i, :m] = ex["ctrl_in"][st, i]
        out["skill"][i, :m] = ex["skill"][st, i]
        out["logp"][i, :m] = ex["dec_logp"][st, i]
        out["value"][i, :m] = torch.as_tensor(v, dtype=torch.float32)
        out["adv"][i, :m] = torch.as_tensor(adv, dtype=torch.float32)
        out["ret"][i, :m] = torch.as_tensor(ret, dtype=torch.float32)
        out["train"][i, :m] = torch.as_tensor(ok)
        out["valid"][i, :m] = True
        out["reset"][i, :m] = ro.trial_start[st, i]
        out["prev"][i, :m] = ex["dec_prev"][st, i]
        out["bias"][i, :m] = ex["bias"][st, i]
        out["prior"][i, :m] = ex["prior"][st, i]
        if soft:
            pi_a[i, :m] = ex["pi_a"][st, i]
    h0, c0 = ro.memory_start[0], ro.memory_start[1]
    return Decisions(**out, pi_a=pi_a, h0=h0.clone(), c0=c0.clone())


def replay(agent, D: Decisions, envs: torch.Tensor):
    """Re-run the controller over the decisions of ``envs``: logits (n, M, K), values (n, M).

    Each env's decisions are cut where a trial starts (the state is zeroed there); the pieces
    run as packed sequences through the LSTM in one call, the first piece of an env from the
    state it had at the rollout's start.
    """
    x = D.x[envs]
    n, M, F = x.shape
    reset = D.reset[envs]
    count = D.valid[envs].sum(1)
    pieces, h0, c0 = [], [], []
    for i in range(n):
        m = int(count[i])
        if m == 0:
            continue
        cuts = [0, *[j for j in range(1, m) if reset[i, j]], m]
        for a, b in zip(cuts[:-1], cuts[1:]):
            pieces.append((i, a, b))
            fresh = a > 0 or bool(reset[i, 0])
            h0.append(torch.zeros(agent.controller.hidden) if fresh else D.h0[envs[i]])
            c0.append(torch.zeros(agent.controller.hidden) if fresh else D.c0[envs[i]])
    L = max(b - a for _, a, b in pieces)
    seq = torch.zeros(len(pieces), L, F)
    for s, (i, a, b) in enumerate(pieces):
        seq[s, : b - a] = x[i, a:b]
    lengths = torch.tensor([b - a for _, a, b in pieces])
    hs_seq = agent.controller.sequences(seq, lengths, torch.stack(h0), torch.stack(c0))
    hs = torch.zeros(n, M, agent.controller.hidden)
    rows = torch.cat([torch.full((b - a,), i) for i, a, b in pieces])
    cols = torch.cat([torch.arange(a, b) for _, a, b in pieces])
    srcs = torch.cat([torch.full((b - a,), s) for s, (_, a, b) in enumerate(pieces)])
    offs = torch.cat([torch.arange(b - a) for _, a, b in pieces])
    hs = hs.index_put((rows, cols), hs_seq[srcs, offs])
    hs = hs.reshape(n * M, -1)
    T, K = agent.family.n_tokens, agent.composer.num_skills
    token = x[..., -T:].reshape(n * M, -1)
    # the belief tables at the decision's position, as ``decision_features`` laid them out
    paid = x[..., -T - 2 * K : -T - K].reshape(n * M, -1)
    tried = x[..., -T - K : -T].reshape(n * M, -1)
    # the graph's log-prior as the decision was taken with it (the graph is updated after
    # the controller's epochs; the state-conditioned graph needs the decision's observation)
    prior = (D.prior[envs] + D.bias[envs]).reshape(n * M, -1)
    logits = agent.composer.logits(hs, token, prior, paid, tried).reshape(n, M, -1)
    return logits, agent.controller.value(hs).reshape(n, M)


def _gathered(D: Decisions) -> tuple[torch.Tensor, ...]:
    """(train, adv, value, ret) of every rank's envs, (N_global, M_global), padded to the
    longest decision sequence of any rank: the layout one process holding all envs has."""
    if distributed.world()[1] == 1:
        return D.train, D.adv, D.value, D.ret
    M = max(distributed.gather_objects(int(D.x.shape[1])))

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, M - x.shape[1]))

    return tuple(distributed.gather_rows(pad(x)) for x in (D.train, D.adv, D.value, D.ret))


def update_controller(
    agent, D: Decisions, optimizer: torch.optim.Optimizer, cfg: PPOConfig, backward=None
) -> dict[str, float]:
    """PPO epochs over minibatches of envs (whole decision sequences).

    Under DDP (``rl.distributed``) the minibatches are drawn from the envs of all ranks (rank
    0's permutation, broadcast); advantages are normalised over the whole minibatch's
    decisions; each rank replays its own envs' sequences and scales its loss by its share of
    the minibatch's decisions, so the step is the one a single process holding every env
    takes (as RL²'s ``ppo_epochs``).
    """
    rank, size = distributed.world()
    n_local = D.x.shape[0]
    N = n_local * size
    params = [p for p in agent.decision_parameters() if p.requires_grad]
    g_train, g_adv, g_value, g_ret = _gathered(D)
    if not g_train.any():
        return {}
    flat = dataclasses.replace(cfg, norm_adv=False)  # normalised below, over the minibatch
    stats: dict[str, list[float]] = {}
    rows, shares = [], []
    mb_envs = max(1, N // cfg.num_minibatches)
    for _epoch in range(cfg.update_epochs):
        perm = torch.randperm(N) if rank == 0 else torch.empty(N, dtype=torch.long)
        perm = distributed.broadcast(perm)
        for start in range(0, N, mb_envs):
            g_envs = perm[start : start + mb_envs]
            g_mask = g_train[g_envs]
            if not g_mask.any():
                continue
            _, envs = distributed.local_part(g_envs, n_local, rank)
            mask = D.train[envs]
            adv = D.adv[envs][mask]
            sel = g_adv[g_envs][g_mask]
            if cfg.norm_adv and sel.numel() > 1:
                adv = (adv - sel.mean()) / (sel.std() + 1e-8)
            if not mask.any():  # DDP: this rank holds none of the minibatch's decisions
                empty_step(params, optimizer, cfg, backward)
                rows.append({})
                shares.append(0.0)
                continue
            logits, values = replay(agent, D, envs)
            logp_all = torch.log_softmax(logits, -1)
            if D.pi_a is not None:  # soft composer: the action's mixture probability
                new_logp = torch.logsumexp(logp_all + D.pi_a[envs].clamp_min(1e-12).log(), -1)
            else:
                new_logp = logp_all.gather(-1, D.skill[envs][..., None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            one: dict[str, list[float]] = {}
            minibatch_step(
                new_logp[mask], D.logp[envs][mask], adv, values[mask], D.value[envs][mask],
                D.ret[envs][mask], entropy[mask], params, optimizer, flat, one, backward,
                scale=distributed.minibatch_scale(int(mask.sum()), int(g_mask.sum()))
                if size > 1 else None,
            )  # fmt: skip
            for k, v in one.items():
                stats.setdefault(k, []).extend(v)
            rows.append({k: v[0] for k, v in one.items()})
            shares.append(int(mask.sum()) / int(g_mask.sum()))
    if size == 1:
        out = {k: float(np.mean(v)) for k, v in stats.items()}
    else:
        out = distributed.weighted_stats(rows, shares, PPO_TERMS)
    out["explained_variance"] = explained_variance(g_value[g_train], g_ret[g_train])
    return out


__all__ = ["Decisions", "collect_decisions", "current_token", "smdp_advantages"]
