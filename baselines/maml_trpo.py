"""The TRPO outer step of MAML-TRPO (Finn et al. 2017, sec. 5.3; ProMP; garage; learn2learn):
natural gradient through the inner adaptation by conjugate gradient on Fisher-vector products,
then a backtracking line search within the KL trust region.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from baselines.maml_core import (
    EpisodeBatch,
    MAMLPolicyNet,
    Params,
    _log_probs,
    policy_dist,
    stack_params,
)


def conjugate_gradient(
    avp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given only ``avp(v) = A v``
    (Hestenes & Stiefel 1952; the TRPO natural-gradient solve, Schulman et al. 2015, app. C).
    Starts at x = 0 and stops after ``iters`` iterations or when ``|r|^2 < residual_tol``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < residual_tol:
            break
        ap = avp(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def mean_kl(
    net: MAMLPolicyNet,
    old_params: Params,
    new_params: Params,
    batch: EpisodeBatch,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the valid steps of ``batch`` (all tasks) of ``KL(pi_old(.|s) || pi_new(.|s))``,
    each task with its own stacked parameters; differentiable in ``new_params``. ``steps``
    replaces the divisor (the valid steps of every rank's tasks: this rank's share of the mean
    over the whole meta-batch)."""
    old = policy_dist(net, {k: v.detach() for k, v in old_params.items()}, batch.obs)
    new = policy_dist(net, new_params, batch.obs)
    kl = torch.distributions.kl_divergence(old, new)
    return (kl * batch.mask).sum() / (batch.mask.sum().clamp_min(1) if steps is None else steps)


def fisher_vector_product(
    kl: torch.Tensor, params: Sequence[torch.Tensor], damping: float = 0.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> (H + damping I) v`` with ``H`` the Hessian of the scalar ``kl`` w.r.t. ``params``
    (flattened and concatenated), by double back-propagation (Pearlmutter 1994). At the
    old parameters the KL's gradient vanishes, so ``H`` is the Fisher information of the
    policy *as a function of* ``params``: through the inner adaptation when ``kl`` was
    computed from ``phi(theta)`` (``J^T F J``, as in ProMP / garage's MAML-TRPO)."""
    grads = torch.autograd.grad(kl, list(params), create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad @ v, list(params), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    return fvp


def trpo_surrogate(
    net: MAMLPolicyNet,
    params: Params,
    batch: EpisodeBatch,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    """TRPO's importance-weighted surrogate (Schulman et al. 2015, eq. 14), per task (N,):
    ``sum_m w_m sum_t pi_params(a_t|s_t) / pi_old(a_t|s_t) A_t``, to maximise. At
    ``params`` = old its gradient is minus ``outer_loss``'s."""
    logp = _log_probs(net, params, batch)
    ratio = torch.exp((logp - old_logp.detach()) * batch.mask)
    return (batch.weights * (ratio * advantages * batch.mask).sum(-1)).sum(-1)


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def trpo_step(
    net: MAMLPolicyNet,
    theta: Params,
    post: EpisodeBatch,
    adapt_fn: Callable[[Params, bool], Params],
    *,
    advantages: torch.Tensor,
    create_graph: bool,
    max_kl: float,
    cg_iters: int,
    damping: float,
    ls_steps: int,
    ls_decay: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Params | None, dict[str, float]]:
    """One TRPO step on the meta-parameters (the MAML-TRPO outer step of Finn et al. 2017,
    sec. 5.3, as in ProMP, Rothfuss et al. 2019, and garage / learn2learn).

    Maximise ``L(theta) = mean_i trpo_surrogate(phi_i(theta))`` on the post-update episodes
    (sampled by ``phi_i(theta_old)``) subject to ``mean KL(pi_phi(theta_old) || pi_phi(theta))
    <= max_kl`` on their states. ``phi(theta) = adapt_fn(stack_params(theta, N), create_graph)``
    recomputes the inner steps from the pre-update episodes: with ``create_graph`` (MAML) both
    the gradient and the KL's Hessian go through the adaptation (second order); without it
    (FOMAML) ``d phi / d theta = I``. Natural gradient ``s = (H + damping I)^-1 g`` by
    ``cg_iters`` conjugate-gradient iterations of Fisher-vector products, full step
    ``sqrt(2 max_kl / s^T (H + damping I) s) s``, then backtracking by ``ls_decay`` for up to
    ``ls_steps`` fractions: the first that improves ``L`` and satisfies the KL bound is taken.

    Args:
        theta: the current meta-parameters (unstacked; read, never modified).
        adapt_fn: ``(stacked params, create_graph) -> stacked adapted params``.
        advantages: (N, M, T) advantages of ``post`` (see ``outer_advantages``).
        reduce: the sum over DDP ranks (``rl.distributed.all_reduce_sum``) when ``post`` holds
            this rank's tasks of a meta-batch spread over ranks: the surrogate, its gradient,
            every Fisher-vector product and the line search's values are then the whole
            meta-batch's, the same on every rank, so every rank takes the same step.

    Returns:
        ``(new theta, stats)``; new theta is None when no step was accepted (keep theta).
    """
    N = post.obs.shape[0]
    keys = list(theta)
    total = reduce or (lambda x: x)
    # the whole meta-batch's task count and valid steps (this rank's, on one process)
    n_tasks = total(torch.tensor(float(N)))
    n_steps = total(post.mask.sum()).clamp_min(1)

    def surrogate(params: Params) -> torch.Tensor:  # this rank's share of the mean over tasks
        return trpo_surrogate(net, params, post, old_logp, advantages).sum() / n_tasks

    with torch.enable_grad():
        th = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
        phi = adapt_fn(stack_params(th, N), create_graph)
        phi_old = {k: v.detach() for k, v in phi.items()}
        with torch.no_grad():
            old_logp = _log_probs(net, phi_old, post)
        surr = surrogate(phi)
        g = total(_flat(torch.autograd.grad(surr, [th[k] for k in keys], retain_graph=True)))
        kl = mean_kl(net, phi_old, phi, post, n_steps)
        local_fvp = fisher_vector_product(kl, [th[k] for k in keys])

        def fvp(v: torch.Tensor) -> torch.Tensor:
            return total(local_fvp(v)) + damping * v

        s = conjugate_gradient(fvp, g, cg_iters)
        shs = float(s @ fvp(s))
    surr0 = float(total(surr.detach()))
    stats = {
        "trpo/surrogate_before": surr0,
        "trpo/grad_norm": float(g.norm()),
        "trpo/accepted": 0.0,
        "trpo/step_fraction": 0.0,
        "trpo/kl": 0.0,
        "trpo/surrogate_gain": 0.0,
        "trpo/ls_tries": 0.0,
    }
    if not (shs > 0 and np.isfinite(shs)):
        return None, stats  # zero gradient (e.g. no advantage signal): nothing to step
    full = (2 * max_kl / shs) ** 0.5 * s.detach()
    sizes = [v.numel() for v in th.values()]
    full_step = dict(zip(keys, (c.reshape(th[k].shape) for k, c in zip(keys, full.split(sizes)))))
    frac = 1.0
    for j in range(ls_steps):
        cand = {k: theta[k].detach() + frac * full_step[k] for k in keys}
        with torch.enable_grad():
            start = {k: v.clone().requires_grad_() for k, v in cand.items()}
            phi_new = {k: v.detach() for k, v in adapt_fn(stack_params(start, N), False).items()}
        with torch.no_grad():
            surr_new = float(total(surrogate(phi_new)))
            kl_new = float(total(mean_kl(net, phi_old, phi_new, post, n_steps)))
        stats["trpo/ls_tries"] = float(j + 1)
        if kl_new <= max_kl and surr_new > surr0 and np.isfinite(surr_new):
            stats.update({
                "trpo/accepted": 1.0, "trpo/step_fraction": frac, "trpo/kl": kl_new,
                "trpo/surrogate_gain": surr_new - surr0,
            })  # fmt: skip
            return cand, stats
        frac *= ls_decay
    return None, stats
