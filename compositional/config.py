"""The compositional agent's settings (``CompositionalConfig``): library, controller, composer,
graph, phase-2 switches and the sections of the skills' and the controller's PPO; every check
of a bad value is here, one line each (``compositional.agent`` builds the agent from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from compositional.composer import check_composer_mode
from compositional.family import family_for
from compositional.graph import check_graph_mode
from envs.grid import PRIMITIVES
from primitives.option_training import OptionTrainingConfig
from primitives.options import check_positive_int
from primitives.outcome import DiscoveryConfig
from rl.config import BaseConfig
from rl.ppo import PPOConfig, ppo_section

PRIMITIVE_MODES = ("discovered", "supervised", "random-frozen")
#: default K on Meta-World (fixed-length motion skills; no outcome kinds to count)
MOTION_SKILLS = 8
#: the ``DiscoveryConfig`` settings the ``discovery`` section may set
DISCOVERY_KEYS = (
    "cut_reward", "reward_floor", "bc_coef", "bc_epochs", "ppo_epochs", "bc_balance", "relabel",
    "relabel_min_q", "disc_lr", "disc_steps", "disc_batch", "disc_buffer", "disc_balance",
    "start_skills", "grow_at", "max_steps", "draw", "draw_explore",
)  # fmt: skip
ON_OFF = ("on", "off")
FINETUNE_MODES = ("off", "on", "discovery")
BELIEF_EVIDENCE = ("terminated", "any")
INTERRUPT_MODES = ("off", "progress")


def _controller_ppo() -> PPOConfig:
    # minibatches are whole decision sequences of num_envs / num_minibatches envs; two large
    # ones keep the LSTM's backward efficient (a 92-step sequence batch of 16 costs ~the same
    # time as one of 32 here)
    return PPOConfig(
        num_steps=256, lr=1e-3, gamma=0.99, gae_lambda=0.95, ent_coef=0.01, num_minibatches=2
    )


@dataclass
class CompositionalConfig(BaseConfig):
    """The compositional agent (see the module docstring)."""

    primitives: str = "discovered"
    """skill library: 'discovered' (outcome-based discovery, no task reward: the method),
    'supervised' (one skill per primitive, trained on its completion: oracle skills),
    'random-frozen' (the floor)"""
    num_skills: int | None = None
    """K; None: 19 on CompoGrid (one per primitive, or per outcome kind when discovered), 8 on
    Meta-World"""
    t_max: int = 32
    """longest a skill runs before it is cut"""
    library_fraction: float = 0.3
    """share of the env-step budget spent on phase 1 (skills)"""
    library_checkpoint: str | None = None
    """a trained library (its ``library.*`` weights) instead of phase 1; its K, observation
    size and termination must match"""
    composer: str = "attention"
    """'attention' (pointer), 'uniform' (random skill), 'soft' (every-step mixture: ablation)"""
    graph: str = "learned"
    """'learned' feasibility prior over which skill can follow which (K x K counts), 'state'
    (P(a skill reaches its outcome | the state it starts from), a small network fitted on
    every segment; ``compositional.graph``), or 'none'"""
    inner_loop: str = "off"
    """'on': a per-trial skill bias adapted by one REINFORCE step after each episode"""
    inner_lr: float = 1.0
    """step size of the inner loop"""
    belief_evidence: str = "any"
    """which finished segments count as "tried here without pay" in the controller's belief
    tables: 'any' (every segment that was not paid) or 'terminated' (only a skill that ended
    by its own termination: a segment cut by ``t_max`` or by the episode's end is then no
    evidence against its skill). A segment that paid always counts as paid. 'terminated'
    measured level with 'any' (validation split, discovered skills, reward AUC 0.72 / 0.73
    against 0.74 / 0.70; results/TUNING.md), so the tables' rule stays"""
    belief_logits: str = "off"
    """'on': the composer adds the belief tables to the skill logits through two weights the
    controller's state gives (``PointerComposer``'s evidence pathway; zero at initialisation);
    'off': the tables reach the decision only as controller inputs. With discovery continued
    in phase 2, reward mode, 5 seeds: AUC 0.854 against 0.81 without it, P(better) = 0.55
    (RESULTS.md, reward mode)"""
    library_finetune: str = "off"
    """'on': in phase 2 each skill is also trained, by PPO on the task reward collected while
    it runs (its segment's return), with ``finetune_kl`` times KL(skill || its frozen phase-1
    copy) in the loss; 'discovery' (``primitives="discovered"`` on CompoGrid): phase 1's
    objective keeps training the library on the segments the controller runs — intrinsic
    outcome reward, relabelled imitation, the discriminator's replay (``Discovery.learn``), no
    task reward; with ``primitives="supervised"`` the same mode continues that library's
    phase-1 objective (PPO of each skill on the completion of its own primitive, not on the
    task's reward); 'off': the library stays frozen (the default)"""
    discovery_share: float = 0.0
    """with ``library_finetune="discovery"`` and discovered skills: the fraction of phase 2's
    rollouts that run phase 1's own discovery rollout (uniform skill chains in discovery's
    room, the same env steps as a controller rollout) instead of the controller's, so the
    library keeps learning from every skill and not only from the skills the controller
    picks; 0: every phase-2 rollout is the controller's"""
    skill_temperature: float = 1.0
    """phase 2 and evaluation: the acting skill draws its action from softmax(logits / T)
    (1: its own distribution; 0: its most probable action); the controller still samples
    which skill runs. Only with a frozen library (``library_finetune='off'``: fine-tuned
    skills learn from their own samples), a hard composer and discrete actions. Measured
    (validation split, discovered library, reward AUC, seeds 0 / 1; defaults 0.74 / 0.70):
    0.5 gave 0.69 / 0.71, greedy skills 0.47 / 0.48 (and 0.86 against 0.96 for the supervised
    library in instruction mode): a greedy skill loops where its argmax is wrong, so 1 stays
    (results/TUNING.md)"""
    interrupt: str = "off"
    """'progress': the active skill also ends when the task's progress advances (a sub-task
    was completed: in CompoGrid the step that pays 1 / L, visible in the observation's
    progress one-hot in both modes), so each segment serves one sub-task and the controller
    chooses the next skill right after a completion (option interruption, Sutton, Precup &
    Singh 1999); 'off': a skill runs until its termination, ``t_max`` or the episode's end.
    CompoGrid only (Meta-World's tasks report no sub-task progress)"""
    finetune_kl: float = 0.1
    """weight of the KL to the frozen skills when ``library_finetune='on'``"""
    hidden: int = 128
    """controller LSTM width"""
    key_dim: int = 32
    """composer key/query size"""
    library_hidden: int = 128
    """skill encoder width"""
    episodes_per_trial: int = 10
    """E: episodes per meta-training trial (the controller's memory spans them)"""
    num_envs: int = 64
    """parallel envs"""
    ppo: PPOConfig = field(default_factory=_controller_ppo)
    """PPO of the controller (decision level; num_steps = env steps per rollout)"""
    skills: OptionTrainingConfig = field(default_factory=OptionTrainingConfig)
    """phase-1 settings (num_steps, PPO of the skills; ``t_max`` above is used)"""
    discovery: dict = field(default_factory=dict)
    """``primitives="discovered"``: settings of ``primitives.outcome.DiscoveryConfig`` for
    phase 1 (one of ``DISCOVERY_KEYS``, e.g. ``{bc_coef: 3}``); budget, K, ``t_max``, envs,
    rollout length, widths, seed and PPO come from the fields above, except the skills' PPO
    epochs (``ppo_epochs``, 8 by default: ``skills.ppo`` is also the supervised library's and
    the fine-tuning's PPO)"""

    def __post_init__(self) -> None:
        self.ppo = ppo_section(self)
        if isinstance(self.skills, dict):
            self.skills = OptionTrainingConfig(**self.skills)
        super().__post_init__()  # after the sections are built: it reads the rollout length
        if self.primitives not in PRIMITIVE_MODES:
            raise ValueError(
                f"primitives={self.primitives!r}; allowed: {', '.join(PRIMITIVE_MODES)}"
            )
        check_composer_mode(self.composer)
        check_graph_mode(self.graph)
        if self.inner_loop not in ON_OFF:
            raise ValueError(f"inner_loop={self.inner_loop!r}; allowed: on, off")
        if self.library_finetune not in FINETUNE_MODES:
            raise ValueError(
                f"library_finetune={self.library_finetune!r}; allowed: {', '.join(FINETUNE_MODES)}"
            )
        if self.belief_logits not in ON_OFF:
            raise ValueError(f"belief_logits={self.belief_logits!r}; allowed: on, off")
        if self.belief_evidence not in BELIEF_EVIDENCE:
            raise ValueError(
                f"belief_evidence={self.belief_evidence!r}; allowed: {', '.join(BELIEF_EVIDENCE)}"
            )
        if self.interrupt not in INTERRUPT_MODES:
            raise ValueError(f"interrupt={self.interrupt!r}; allowed: {', '.join(INTERRUPT_MODES)}")
        kl = self.finetune_kl
        if isinstance(kl, bool) or not isinstance(kl, int | float) or not 0 <= kl < float("inf"):
            raise ValueError(f"finetune_kl={kl!r}; allowed: a finite number >= 0")
        T = self.skill_temperature
        if isinstance(T, bool) or not isinstance(T, int | float) or not 0 <= T < float("inf"):
            raise ValueError(f"skill_temperature={T!r}; allowed: a finite number >= 0")
        if T != 1 and (self.library_finetune != "off" or self.composer == "soft"):
            raise ValueError(
                f"skill_temperature={T!r} with library_finetune={self.library_finetune!r}, "
                f"composer={self.composer!r}; allowed: 1, or library_finetune 'off' with "
                "composer 'attention' or 'uniform' (trained or mixed skills act on their own "
                "distribution)"
            )
        if self.library_finetune != "off" and self.composer == "soft":
            raise ValueError(
                f"library_finetune={self.library_finetune!r} with composer='soft'; allowed: "
                "composer 'attention' or 'uniform' (a skill is fine-tuned on the steps it acts "
                "alone)"
            )
        if self.library_finetune == "discovery" and self.primitives == "random-frozen":
            raise ValueError(
                "library_finetune='discovery' with primitives='random-frozen'; allowed: "
                "primitives 'discovered' or 'supervised' (the objective continues phase 1's)"
            )
        if (
            self.library_finetune == "discovery"
            and self.library_checkpoint
            and self.primitives == "discovered"
        ):
            raise ValueError(
                "library_finetune='discovery' with a library_checkpoint; allowed: without one "
                "(the objective continues phase 1's discriminator and replay)"
            )
        share = self.discovery_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
            raise ValueError(f"discovery_share={share!r}; allowed: a number in [0, 1)")
        if share and (self.library_finetune != "discovery" or self.primitives != "discovered"):
            raise ValueError(
                f"discovery_share={share!r} with library_finetune={self.library_finetune!r}, "
                f"primitives={self.primitives!r}; allowed: 0, or library_finetune 'discovery' "
                "with primitives 'discovered' (the rollouts continue phase 1's discovery)"
            )
        if share and self.ppo.num_steps % self.skills.num_steps:
            raise ValueError(
                f"discovery_share={share!r} with ppo.num_steps={self.ppo.num_steps} and "
                f"skills.num_steps={self.skills.num_steps}; allowed: ppo.num_steps a multiple "
                "of skills.num_steps (a discovery turn takes a controller rollout's env steps)"
            )
        if self.library_finetune == "on" and self.primitives == "random-frozen":
            raise ValueError(
                "library_finetune='on' with primitives='random-frozen'; allowed: primitives "
                "'discovered' or 'supervised' (the floor stays frozen)"
            )
        if self.num_skills is not None:
            check_positive_int("num_skills", self.num_skills)
        check_positive_int("t_max", self.t_max)
        if not 0.0 <= float(self.library_fraction) < 1.0:
            raise ValueError(f"library_fraction={self.library_fraction}; allowed: [0, 1)")
        fam = family_for(self.env_id)
        bad = sorted(set(self.discovery) - set(DISCOVERY_KEYS))
        if bad:
            raise ValueError(
                f"discovery.{bad[0]}: not a discovery setting; allowed: {', '.join(DISCOVERY_KEYS)}"
            )
        try:  # its values, checked by name
            DiscoveryConfig(num_skills=self.K, **self.discovery)
        except TypeError:
            raise ValueError(
                f"discovery={self.discovery!r}; allowed: numbers for the numeric settings"
            ) from None
        if fam.continuous and self.primitives == "supervised":
            raise ValueError(
                f"primitives='supervised' on {self.env_id}; allowed there: discovered, "
                "random-frozen (Meta-World has no primitive completion events to train on)"
            )
        if fam.continuous and self.library_finetune == "discovery":
            raise ValueError(
                f"library_finetune='discovery' on {self.env_id}; allowed there: off, on "
                "(Meta-World's motion discovery runs in phase 1 only)"
            )
        if fam.continuous and self.skill_temperature != 1:
            raise ValueError(
                f"skill_temperature={self.skill_temperature!r} on {self.env_id}; allowed there: "
                "1 (Gaussian skills act on their own distribution)"
            )
        if fam.continuous and self.interrupt != "off":
            raise ValueError(
                f"interrupt={self.interrupt!r} on {self.env_id}; allowed there: off (its tasks "
                "report no sub-task progress to interrupt on)"
            )
        if fam.continuous and self.composer == "soft":
            raise ValueError(
                f"composer='soft' on {self.env_id}; allowed there: attention, uniform (the "
                "every-step mixture is built for discrete actions)"
            )

    def rollout_env_steps(self) -> int:
        """One controller rollout (phase 2, which every run reaches)."""
        return int(self.num_envs) * int(self.ppo.num_steps)

    @property
    def K(self) -> int:
        if self.num_skills is not None:
            return int(self.num_skills)
        if family_for(self.env_id).continuous:
            return MOTION_SKILLS
        # discovered: one skill per outcome kind (primitives.outcome: K = 19 covered 19/19)
        return len(PRIMITIVES)
