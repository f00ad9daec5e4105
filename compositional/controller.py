"""The LSTM meta-controller, stepped at decision points only (SMDP, call-and-return).

It steps when the active skill terminates and at every episode start, never in between. Its
input at a decision (``decision_features``):

- the observation at that moment;
- the previous skill (one-hot), the outcome it produced (CompoGrid: the object events of its
  segment, ``envs.grid_events``; Meta-World: its hand/gripper/object displacement,
  ``compositional.family``), the reward collected while it ran, its duration / ``t_max``, and
  whether an episode boundary cut it;
- per-skill statistics of the trial so far at the current sub-task position: "paid here" and
  "tried here without pay" — a belief state, which a plain LSTM does not learn on its own at
  these budgets (../shared/notes/controller-at-decision-level.md: 0.16 vs 1.00 held-out
  success by episode 9 in the abstract problem);
- the current sub-task's instruction token (``task_info="instruction"``; zeros otherwise).

Its state persists over the episodes of a trial and is reset between trials: RL² at the skill
level, where a trial is tens of decisions rather than thousands of steps.
"""

from __future__ import annotations

import torch
from torch import nn

from envs.grid import MAX_LEN, PRIMITIVES
from envs.grid_events import FRONT_AT, N_ENT, NUM_PRIMITIVES
from rl.nets import mlp

#: where CompoGridEnv's observation keeps the progress one-hot and the instruction tokens
PROGRESS_AT = FRONT_AT + N_ENT + 2
INSTR_AT = PROGRESS_AT + MAX_LEN + 1


def progress_of(obs: torch.Tensor) -> torch.Tensor:
    """(B,) number of completed sub-tasks, read off the observation's one-hot."""
    return obs[:, PROGRESS_AT : PROGRESS_AT + MAX_LEN + 1].argmax(-1)


def current_token(obs: torch.Tensor) -> torch.Tensor:
    """(B, 19) one-hot token of the current sub-task (zeros without instructions or when all
    sub-tasks are done)."""
    pos = progress_of(obs)
    tokens = obs[:, INSTR_AT : INSTR_AT + MAX_LEN * len(PRIMITIVES)].reshape(
        -1, MAX_LEN, len(PRIMITIVES)
    )
    out = tokens[torch.arange(obs.shape[0]), pos.clamp(max=MAX_LEN - 1)]
    return torch.where((pos < MAX_LEN)[:, None], out, torch.zeros_like(out))


def feature_dim(
    obs_dim: int, num_skills: int, outcome_dim: int = NUM_PRIMITIVES, n_tokens: int = NUM_PRIMITIVES
) -> int:
    """Controller input size (outcome and token sizes: the family's, ``compositional.family``)."""
    return obs_dim + num_skills + outcome_dim + 3 + 2 * num_skills + n_tokens


def decision_features(
    obs: torch.Tensor,
    prev_skill: torch.Tensor,
    outcome: torch.Tensor,
    seg_reward: torch.Tensor,
    seg_frac: torch.Tensor,
    boundary: torch.Tensor,
    paid: torch.Tensor,
    tried: torch.Tensor,
    num_skills: int,
    token: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, feature_dim) controller input (see the module docstring); ``token``: the current
    instruction token (None: CompoGrid's, read off ``obs``)."""
    prev = torch.zeros(obs.shape[0], num_skills)
    has = prev_skill >= 0
    prev[has, prev_skill[has]] = 1.0
    return torch.cat(
        [
            obs,
            prev,
            outcome.float(),
            seg_reward[:, None],
            seg_frac[:, None],
            boundary.float()[:, None],
            paid,
            tried,
            current_token(obs) if token is None else token,
        ],
        -1,
    )


class DecisionController(nn.Module):
    """An input layer, an LSTM cell over decisions and a value head.

    Examples:
        >>> c = DecisionController(10, hidden=8)
        >>> h, cell = c.initial(2)
        >>> h, cell = c(torch.zeros(2, 10), h, cell)
        >>> tuple(c.value(h).shape)
        (2,)
    """

    def __init__(self, in_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.hidden = int(hidden)
        self.inp = nn.Sequential(mlp([in_dim, hidden]), nn.Tanh())
        # one nn.LSTM for acting (a step) and for the update (whole sequences: the fused
        # kernel's backward is ~5x faster than a loop of LSTMCell steps)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.value_head = mlp([hidden, 1], out_gain=1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written while the controller was an LSTMCell (same parameters)
        for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            old = f"{prefix}lstm.{k}"
            if old in state_dict:
                state_dict[f"{old}_l0"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def initial(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(n, self.hidden), torch.zeros(n, self.hidden)

    def forward(self, x, h, c) -> tuple[torch.Tensor, torch.Tensor]:
        """One decision for a batch: input (n, in_dim), state (n, hidden) x 2 (the LSTM's own
        weights as one cell: nn.LSTM's per-call set-up costs more than the step itself)."""
        m = self.lstm
        return torch.lstm_cell(
            self.inp(x), (h, c), m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0
        )

    def sequences(self, x: torch.Tensor, lengths: torch.Tensor, h0, c0) -> torch.Tensor:
        """Hidden states (S, L, hidden) of S padded decision sequences (S, L, in_dim) of the
        given lengths, each from its own initial state."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.inp(x), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed, (h0[None], c0[None]))
        hs, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return hs

    def value(self, h: torch.Tensor) -> torch.Tensor:
        return self.value_head(h).squeeze(-1)
