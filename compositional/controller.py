"""The LSTM meta-controller (the recurrent part of the compositional agent).

Input per step: an encoding of the observation, the previous composer weights alpha_{t-1}
(K), the previous reward and the previous done flag, as in RL² (Duan et al. 2016; Wang et al.
2016) but with skill weights in place of the previous primitive action. The hidden state
persists over the episodes of a trial and is reset only at trial starts (``reset_memory``), so
the controller can infer the hidden composition from reward and carry it across episodes.
"""

from __future__ import annotations

import torch
from torch import nn

from rl.nets import mlp


class MetaController(nn.Module):
    """LSTM over [obs encoding, previous skill weights, previous reward, previous done].

    Args:
        obs_dim: observation size.
        num_skills: K (size of the previous-weights input).
        hidden: encoder and LSTM width.
        credit: also read the trial's per-skill reward credit (K more inputs; see
            ``CompositionalConfig.skill_credit``).

    Attributes:
        proj: the controller's output layer h -> u (adapted by the inner loop together with the
            composer; the LSTM itself is meta-learned only in the outer loop).

    Examples:
        >>> c = MetaController(5, num_skills=3, hidden=8)
        >>> h, cell = c.initial_state(2)
        >>> x = c.inputs(c.encode(torch.zeros(2, 5)), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2))
        >>> h, cell = c.step(x, (h, cell))
        >>> tuple(c.features(h).shape)
        (2, 8)
    """

    def __init__(
        self, obs_dim: int, num_skills: int, hidden: int = 64, credit: bool = False
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.num_skills = num_skills
        self.encoder = nn.Sequential(mlp([obs_dim, hidden]), nn.Tanh())
        self.lstm = nn.LSTMCell(hidden + num_skills * (2 if credit else 1) + 2, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.value_head = mlp([2 * hidden, hidden, 1], out_gain=1.0)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(obs)

    @staticmethod
    def inputs(
        enc: torch.Tensor,
        prev_alpha: torch.Tensor,
        prev_reward: torch.Tensor,
        prev_done: torch.Tensor,
    ) -> torch.Tensor:
        """The LSTM input [enc, alpha_{t-1}, r_{t-1}, done_{t-1}] (any leading shape;
        ``prev_alpha`` carries the skill credit after alpha_{t-1} when it is on)."""
        return torch.cat(
            [enc, prev_alpha, prev_reward.unsqueeze(-1).float(), prev_done.unsqueeze(-1).float()],
            dim=-1,
        )

    def initial_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(n, self.hidden)
        return z, z.clone()

    def step(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lstm(x, state)

    def unroll(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        reset: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states (T, N, H) over a (T, N, D) input; the state is zeroed before every step
        where ``reset`` (T, N) is True (trial starts), so gradients never cross a trial."""
        h, c = state
        out = []
        for t in range(x.shape[0]):
            keep = (~reset[t]).float().unsqueeze(-1)
            h, c = self.lstm(x[t], (h * keep, c * keep))
            out.append(h)
        return torch.stack(out)

    def unroll_chunked(
        self,
        x: torch.Tensor,
        h_in: torch.Tensor,
        c_in: torch.Tensor,
        reset: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        """Truncated BPTT: hidden states (T, N, H) recomputed in chunks of ``chunk`` steps that
        start from the states stored while acting (``h_in``/``c_in``: (T, N, H), the state
        before each step), all chunks in parallel (stored-state recurrent replay, as in R2D2,
        Kapturowski et al. 2019). ``chunk >= T`` is full BPTT from the rollout's first state."""
        T, N = x.shape[:2]
        L = min(chunk, T)
        n_c = -(-T // L)
        pad = n_c * L - T
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            reset = torch.cat([reset, reset.new_ones(pad, N)])
        # (n_c * L, N, .) -> (L, n_c * N, .): chunk c of env n is column c * N + n
        xs = x.reshape(n_c, L, N, -1).transpose(0, 1).reshape(L, n_c * N, -1)
        rs = reset.reshape(n_c, L, N).transpose(0, 1).reshape(L, n_c * N)
        h0 = h_in[::L].reshape(n_c * N, -1)
        c0 = c_in[::L].reshape(n_c * N, -1)
        hs = self.unroll(xs, (h0, c0), rs)
        return hs.reshape(L, n_c, N, -1).transpose(0, 1).reshape(n_c * L, N, -1)[:T]

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The controller's output u = tanh(proj(h)) the composer queries with."""
        return torch.tanh(self.proj(h))

    def value(self, h: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """Trial-level value V(h_t, s_t) for the outer PPO."""
        return self.value_head(torch.cat([h, enc], dim=-1)).squeeze(-1)
