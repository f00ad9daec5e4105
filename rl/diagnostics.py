"""Meta-RL diagnostics during training: the seed's ``MetaRLDiagnostics`` (Q9) as a Lightning
callback, on by default (``diagnostics`` in every method's config, ``rl.config``).

Every iteration ``MetaRLDiagnostics`` reads what the method exposes and adds these scalars to
the row the method logs through its ``log_scalars`` (x = env steps; ``train_log.jsonl`` keeps
one row per iteration: at ``on_train_start`` the callback registers itself as the module's
``diagnostics_callback``, which ``log_scalars`` asks for the iteration's scalars):

- ``diagnostics/adaptation_slope_return`` and ``diagnostics/adaptation_slope_success``: the
  least-squares slope of the episode return (success) over the episode index within a trial,
  pooled over the iteration's finished episodes; only where trials have more than one
  episode (RL², PEARL, the compositional agent in phase 2; MAML/FOMAML/Reptile, whose
  pre-update episodes are indices 0..M-1 and post-update episodes M..2M-1, as on their
  adaptation curve).
- ``diagnostics/inner_grad_norm``: the inner loop's gradient norm, mean over tasks (MAML
  family: ``inner_grad_norm`` below; the compositional agent with ``inner_loop=on``: the norm of
  its per-episode REINFORCE step on the skill bias).
- ``diagnostics/meta_grad_norm``: the outer gradient's norm before clipping (MAML, FOMAML;
  TRPO: the policy gradient its natural step starts from; Reptile: its pseudo-gradient
  ``theta - mean_i phi_i``).
- ``diagnostics/entropy_policy`` (RL², PEARL, MAML family), ``diagnostics/entropy_controller``
  and ``diagnostics/entropy_skills`` (compositional): the mean entropy of the acting
  distributions over the iteration's steps (the controller's: at its decisions). These are the
  policies *as they acted*; ``losses/loss_entropy`` is the PPO term during the update.
- Decisions per episode (compositional) are ``charts/decisions_per_episode``, logged by the
  agent itself (one name per quantity).

What a method exposes in its ``training_step`` before it logs (the callback reads, then clears it):
``last_rollouts``, the iteration's ``Rollout``s in trial order (a later one continues the
trials of the one before: MAML's post-update episodes), and, for gradient methods,
``grad_norms`` (``{"inner": ..., "meta": ...}``). Entropies come from the policies' per-step
``extras``: ``entropy`` (the acting distribution's), ``alpha`` at ``decision`` steps (the
composer's categorical), ``skill_entropy``; the compositional inner loop's step norm from
``inner_grad_norm`` (NaN where no inner step happened). A policy without ``entropy`` extras
falls back on ``-log pi(a|s)`` of the sampled actions, an unbiased estimate.

Warnings (one line on the ``rl.diagnostics`` logger, at most once per run each, as the seed's
prints; logging rather than ``warnings``, whose registry would silence the same line in the
next run of one process, e.g. the next seed of ``compo heldout``):

- the return slope stayed below ``slope_threshold`` (0.01 per episode) for ``slope_patience``
  (20) consecutive iterations in which the slope was measured. Iterations whose episode-0
  success is already >= ``SATURATED`` do not count (no room to adapt: solved zero-shot);
- the meta-gradient norm fell below ``meta_grad_threshold`` (1e-5) in an iteration whose
  returns varied within each of its rollouts (MAML: the pre- and the post-update episodes).
  A batch whose episodes all returned the same has no learning signal and a zero gradient by
  construction (standardised advantages; Reptile: no inner step), which is not a vanishing
  meta-gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

#: episode-0 success at or above which a slope below the threshold is not a warning
SATURATED = 0.95


# -- the measurements ------------------------------------------------------------------------------
def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` over ``x`` (``np.polyfit(x, y, 1)[0]``); NaN when ``x``
    has fewer than two distinct values.

    Examples:
        >>> slope([0, 1, 2], [0.0, 0.5, 1.0])
        0.5
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"slope of {len(y)} values over {len(x)} positions")
    if len(np.unique(x)) < 2:
        return float("nan")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def episode_points(rollouts: Sequence) -> list[tuple[int, float, float]]:
    """(episode index within the trial, return, success) of every finished episode of
    ``rollouts``; a later rollout continues the trials of the one before, so its indices are
    shifted past the earlier one's largest."""
    points: list[tuple[int, float, float]] = []
    offset = 0
    for ro in rollouts:
        eps = ro.episodes
        points += [(offset + e.episode_index, float(e.ret), float(e.success)) for e in eps]
        if eps:
            offset += max(e.episode_index for e in eps) + 1
    return points


def adaptation_slopes(points: Iterable[tuple[int, float, float]]) -> dict[str, float]:
    """``{"return": ..., "success": ...}``: slopes over the episode index (NaN: one index)."""
    pts = list(points)
    idx = [p[0] for p in pts]
    return {"return": slope(idx, [p[1] for p in pts]), "success": slope(idx, [p[2] for p in pts])}


def grad_norm(grads: Iterable[torch.Tensor | None]) -> float:
    """Global L2 norm of a set of gradients (``None`` entries, unused parameters, skipped)."""
    sq = [g.detach().double().pow(2).sum() for g in grads if g is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def inner_grad_norm(
    theta: Mapping[str, torch.Tensor], phi: Mapping[str, torch.Tensor], lr: float, steps: int = 1
) -> torch.Tensor:
    """(N,) per-task inner-loop gradient norms from the adapted parameters: ``||phi_i -
    theta|| / (lr * steps)``, the norm of the mean gradient of the ``steps`` inner
    policy-gradient steps ``phi <- phi + lr * g`` (the exact gradient norm for one step).

    Args:
        theta: the parameters adaptation started from, unstacked or stacked (leading dim N).
        phi: stacked adapted parameters (leading dim N = tasks).
    """
    if not lr > 0:
        return torch.full((next(iter(phi.values())).shape[0],), float("nan"))
    sq = 0.0
    for k, p in phi.items():
        t = theta[k].detach()
        d = (p.detach() - (t if t.dim() == p.dim() else t.unsqueeze(0))).double()
        sq = sq + d.reshape(d.shape[0], -1).pow(2).sum(1)
    return (sq.sqrt() / (lr * steps)).float()


def _mean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)] if x.is_floating_point() else x
    return float(x.float().mean()) if x.numel() else float("nan")


def rollout_entropies(rollouts: Sequence) -> dict[str, float]:
    """Mean entropies of the acting distributions over the rollouts' valid steps:
    ``policy`` (``extras["entropy"]``, else ``-logp``), ``controller`` (the composer's
    ``alpha`` at decisions) and ``skills`` (``extras["skill_entropy"]``), where present."""
    out: dict[str, list[torch.Tensor]] = {}
    for ro in rollouts:
        ex, valid = ro.extras, ro.valid
        if "alpha" in ex and "decision" in ex:
            at = ex["decision"] & valid
            a = ex["alpha"][at].clamp_min(1e-12)
            out.setdefault("controller", []).append(-(a * a.log()).sum(-1))
            if "skill_entropy" in ex:
                out.setdefault("skills", []).append(ex["skill_entropy"][valid])
        elif "entropy" in ex:
            out.setdefault("policy", []).append(ex["entropy"][valid])
        else:
            out.setdefault("policy", []).append(-ro.logp[valid])
    return {k: _mean(torch.cat(v)) for k, v in out.items()}


def rollout_inner_grad_norm(rollouts: Sequence) -> float | None:
    """Mean of the per-step ``inner_grad_norm`` extras (NaN where no inner step happened);
    None when no rollout records them."""
    vals = [
        ro.extras["inner_grad_norm"][ro.valid] for ro in rollouts if "inner_grad_norm" in ro.extras
    ]
    return _mean(torch.cat(vals)) if vals else None


def iteration_diagnostics(rollouts: Sequence, grad_norms: Mapping[str, float] | None) -> dict:
    """Every ``diagnostics/*`` scalar of one iteration (see the module docstring)."""
    out: dict[str, float] = {}
    slopes = adaptation_slopes(episode_points(rollouts))
    for k, v in slopes.items():
        if not math.isnan(v):
            out[f"diagnostics/adaptation_slope_{k}"] = v
    for k, v in rollout_entropies(rollouts).items():
        if not math.isnan(v):
            out[f"diagnostics/entropy_{k}"] = v
    norms = dict(grad_norms or {})
    inner = rollout_inner_grad_norm(rollouts)
    if inner is not None and "inner" not in norms:
        norms["inner"] = inner
    for k, v in norms.items():
        if v is not None and not math.isnan(v):
            out[f"diagnostics/{k}_grad_norm"] = float(v)
    return out


# -- the callback ------------------------------------------------------------------------------------
class MetaRLDiagnostics(Callback):
    """Adds the ``diagnostics/*`` scalars to every iteration's row and warns once per condition
    (see the module docstring). Its counters live in checkpoints, so a resumed run warns as
    the uninterrupted one would.

    Args:
        slope_threshold: return slope (per episode) below which adaptation is flat.
        slope_patience: consecutive measured iterations of flat adaptation before the warning.
        meta_grad_threshold: meta-gradient norm below which it has vanished.
    """

    def __init__(
        self,
        slope_threshold: float = 0.01,
        slope_patience: int = 20,
        meta_grad_threshold: float = 1e-5,
    ) -> None:
        self.slope_threshold = float(slope_threshold)
        self.slope_patience = int(slope_patience)
        self.meta_grad_threshold = float(meta_grad_threshold)
        self.flat_iterations = 0
        self.warned: dict[str, bool] = {"slope": False, "meta_grad": False}

    # Lightning stores this in checkpoint["callbacks"] (plain data: weights_only-safe)
    def state_dict(self) -> dict:
        return {"flat_iterations": self.flat_iterations, "warned": dict(self.warned)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.flat_iterations = int(state_dict.get("flat_iterations", 0))
        self.warned.update({k: bool(v) for k, v in (state_dict.get("warned") or {}).items()})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.diagnostics_callback = self

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.diagnostics_callback = None

    def scalars_for(self, pl_module: L.LightningModule) -> dict[str, float]:
        """The ``diagnostics/*`` scalars of the iteration ``pl_module`` is logging (empty when it
        exposed nothing, e.g. the compositional agent's phase 1); checks the warnings."""
        rollouts = tuple(getattr(pl_module, "last_rollouts", None) or ())
        grad_norms = getattr(pl_module, "grad_norms", None)
        # read once: the rollouts are released, and a second log call adds nothing
        pl_module.last_rollouts = ()
        pl_module.grad_norms = None
        if not rollouts and not grad_norms:
            return {}
        scalars = iteration_diagnostics(rollouts, grad_norms)
        # every stage's returns varied (MAML: pre- and post-update), else no signal reached it
        signal = bool(rollouts) and all(len({e.ret for e in ro.episodes}) > 1 for ro in rollouts)
        self.check(scalars, episode_points(rollouts), signal, getattr(pl_module, "iteration", None))
        return scalars

    def check(
        self,
        scalars: Mapping[str, float],
        points: Sequence[tuple[int, float, float]],
        signal: bool,
        iteration: int | None = None,
    ) -> None:
        """Update the counters with one iteration's ``diagnostics/*`` scalars and warn where a
        condition holds.

        Args:
            points: the iteration's (episode index, return, success) (``episode_points``).
            signal: the returns varied within every rollout of the iteration.
        """
        at = "" if iteration is None else f" (iteration {iteration})"
        s = scalars.get("diagnostics/adaptation_slope_return")
        first = [p[2] for p in points if p[0] == 0]
        saturated = bool(first) and float(np.mean(first)) >= SATURATED
        if s is not None and not saturated:
            self.flat_iterations = self.flat_iterations + 1 if s < self.slope_threshold else 0
            if self.flat_iterations >= self.slope_patience and not self.warned["slope"]:
                self.warned["slope"] = True
                self._warn(
                    f"adaptation not improving: return slope over the episodes of a trial "
                    f"below {self.slope_threshold:g} per episode for {self.flat_iterations} "
                    f"iterations (last {s:.4f}){at}"
                )
        g = scalars.get("diagnostics/meta_grad_norm")
        if g is not None and g < self.meta_grad_threshold and signal:
            if not self.warned["meta_grad"]:
                self.warned["meta_grad"] = True
                self._warn(
                    f"vanishing meta-gradient: norm {g:.2e} < {self.meta_grad_threshold:g} "
                    f"although the episodes' returns varied{at}"
                )

    @staticmethod
    def _warn(message: str) -> None:
        log.warning("meta-RL diagnostics: %s", message)


def diagnostics_callbacks(module: L.LightningModule) -> list[Callback]:
    """The diagnostics callbacks for ``module`` as its config asks (none when disabled)."""
    cfg = getattr(getattr(module, "cfg", None), "diagnostics", None)
    if cfg is None or not cfg.enabled:
        return []
    return [MetaRLDiagnostics(cfg.slope_threshold, cfg.slope_patience, cfg.meta_grad_threshold)]
