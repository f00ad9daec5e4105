"""The configuration of MAML / FOMAML / Reptile (``baselines.maml``): its fields, defaults and
their one-line validation."""

from __future__ import annotations

from dataclasses import dataclass

from baselines.maml_core import BASELINES, SURROGATES
from rl.config import BaseConfig

ALGOS = ("maml", "fomaml", "reptile")
OUTER_OPTIMIZERS = ("adam", "trpo")


@dataclass
class MAMLConfig(BaseConfig):
    """MAML / FOMAML / Reptile. ``num_envs`` is derived: one env per task of the meta-batch."""

    algo: str = "maml"
    """'maml' (second order), 'fomaml' (first order) or 'reptile'"""
    meta_batch_size: int = 8
    """tasks per meta-iteration (= parallel envs)"""
    episodes_per_trial: int = 2
    """pre-update episodes per task (the same number of post-update episodes is collected)"""
    inner_steps: int = 1
    """K: policy-gradient steps of the inner loop (training and evaluation)"""
    inner_lr: float = 0.5
    """inner-loop step size alpha (plain gradient ascent on the surrogate)"""
    outer_lr: float = 1e-3
    """outer Adam learning rate (unused by TRPO)"""
    outer_optimizer: str = "adam"
    """outer optimiser of MAML/FOMAML: 'adam' or 'trpo' (Reptile has its own update)"""
    max_kl: float = 0.01
    """TRPO: trust region, mean KL(pi_phi_old || pi_phi_new) on the post-update states"""
    cg_iters: int = 10
    """TRPO: conjugate-gradient iterations for the natural gradient"""
    cg_damping: float = 0.1
    """TRPO: damping added to the Fisher-vector product (F + damping * I)"""
    ls_steps: int = 10
    """TRPO: backtracking line-search steps (step fractions 1, decay, decay^2, ...)"""
    ls_decay: float = 0.5
    """TRPO: backtracking factor of the line search"""
    reptile_eps: float = 0.1
    """Reptile's outer step size epsilon"""
    surrogate: str = "dice"
    """inner surrogate: 'dice' (DiCE + Mao et al. baseline) or 'lvc' (ProMP's LVC)"""
    baseline: str = "time"
    """per-task linear feature baseline: 'time' (1,t,t^2,t^3), 'linear' (+obs, obs^2), 'none'"""
    gamma: float = 0.99
    """discount"""
    normalize_adv: bool = True
    """standardise the outer loss's advantages over the meta-batch's post-update steps"""
    inner_normalize_adv: bool = True
    """standardise the inner step's advantages over the meta-batch's pre-update steps (ProMP,
    learn2learn); meta-test uses the moving average of those moments"""
    eval_adapt_episodes: int = 0
    """meta-test: episodes per adaptation step (fresh, sampled by the current parameters);
    0 = ``episodes_per_trial``, the number the inner step is trained with"""
    eval_reuse_episodes: bool = False
    """meta-test: also adapt on the trial's earlier episodes, importance-weighted"""
    hidden: int = 64
    """MLP width (two hidden layers)"""
    max_grad_norm: float = 1.0
    """global norm clip of the outer gradient (0 disables)"""

    def __post_init__(self) -> None:
        if int(self.meta_batch_size) < 1:
            raise ValueError(f"meta_batch_size={self.meta_batch_size}; allowed: an integer >= 1")
        # one env per task: the meta-batch *is* the vector env
        self.num_envs = int(self.meta_batch_size)
        super().__post_init__()
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r}; allowed: {', '.join(ALGOS)}")
        if int(self.inner_steps) < 1:
            raise ValueError(f"inner_steps={self.inner_steps}; allowed: an integer >= 1")
        if not self.inner_lr >= 0:
            raise ValueError(f"inner_lr={self.inner_lr}; allowed: a number >= 0")
        for k in ("outer_lr", "reptile_eps"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: a positive number")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"outer_optimizer={self.outer_optimizer!r}; allowed: {', '.join(OUTER_OPTIMIZERS)}"
            )
        if self.algo == "reptile" and self.outer_optimizer == "trpo":
            raise ValueError(
                "outer_optimizer='trpo' with algo='reptile'; allowed: 'adam' (Reptile's update "
                "theta += eps * (phi - theta) is not a gradient step on a surrogate)"
            )
        if not self.max_kl > 0:
            raise ValueError(f"max_kl={self.max_kl}; allowed: a positive number")
        if int(self.cg_iters) < 1:
            raise ValueError(f"cg_iters={self.cg_iters}; allowed: an integer >= 1")
        if not self.cg_damping >= 0:
            raise ValueError(f"cg_damping={self.cg_damping}; allowed: a number >= 0")
        if int(self.ls_steps) < 1:
            raise ValueError(f"ls_steps={self.ls_steps}; allowed: an integer >= 1")
        if not 0 < self.ls_decay < 1:
            raise ValueError(f"ls_decay={self.ls_decay}; allowed: a number in (0, 1)")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate={self.surrogate!r}; allowed: {', '.join(SURROGATES)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline={self.baseline!r}; allowed: {', '.join(BASELINES)}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma}; allowed: a number in [0, 1]")
        if int(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden}; allowed: an integer >= 1")
        if isinstance(self.eval_adapt_episodes, bool) or int(self.eval_adapt_episodes) < 0:
            raise ValueError(
                f"eval_adapt_episodes={self.eval_adapt_episodes!r}; allowed: an integer >= 0 "
                "(0 = episodes_per_trial)"
            )
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}; allowed: a number >= 0")
