"""Is it the discriminator or the skills? A post-hoc probe of a ``discovery`` checkpoint.

``python -m experiments.disc_probe CHECKPOINT [--steps N] [--epochs E] [--out FILE.json]``

Rolls the library's skills out on fresh random layouts (a new skill per episode, as in
training), then reports

* ``online_accuracy``: the checkpoint's own discriminator q(k | phi(s')) on these states (the
  quantity logged as ``charts/disc_accuracy`` during training);
* ``probe_accuracy``: a fresh discriminator (same inputs, wider, trained to convergence) fitted on
  the episodes of all but ``--test-envs`` of the envs and scored on the episodes of the others.
  The split is by env, hence by episode: states of one episode are strongly correlated (same
  layout, same start), and a per-state split would score memorised episodes, not skills;
* ``probe_train_accuracy``: the same probe on its own training states (the gap to
  ``probe_accuracy`` is what a per-state split would have hidden);
* per skill: share of steps, share of states carrying an object, with the door open, and the
  mean agent cell.

If ``probe_accuracy`` is close to ``online_accuracy`` the online discriminator is not what holds
the I(K; S) estimate down: the skills' state distributions overlap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn


def split_by_env(phi_encoder, ro, test_envs: int):
    """Discriminator data of a skill rollout ``ro`` (T steps x N envs): raw next-state phi
    (T, N, .), encoded inputs and skill labels per row (env-minor), and the row indices of the
    first N - ``test_envs`` envs (fit) and of the others (held-out). A split by env is a split by
    episode: states of one episode share layout and start, a per-state split would score
    memorised episodes."""
    from primitives.discovery import next_phi

    phi = next_phi(ro)
    x = phi_encoder(phi).reshape(-1, phi_encoder.dim)
    k = ro.extras["skill"].reshape(-1)
    T, N = ro.rewards.shape
    env_of = torch.arange(N).repeat(T)
    tr = torch.nonzero(env_of < N - test_envs).squeeze(-1)
    te = torch.nonzero(env_of >= N - test_envs).squeeze(-1)
    return phi, x, k, tr, te


def fit_discriminator(
    x: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, num_skills: int, hidden: int, epochs: int
):
    """A fresh ``Discriminator`` fitted on rows ``rows`` of inputs ``x`` and skills ``k`` (Adam,
    lr 1e-3, minibatches of 512, ``epochs`` passes)."""
    from primitives.discovery import Discriminator

    disc = Discriminator(x.shape[-1], num_skills, hidden)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in rows[torch.randperm(rows.numel())].split(512):
            loss = nn.functional.cross_entropy(disc(x[idx]), k[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return disc


def probe(
    checkpoint: str | Path,
    steps: int = 1024,
    test_envs: int = 2,
    epochs: int = 200,
    hidden: int = 128,
    seed: int = 0,
) -> dict:
    """Probe a ``discovery`` checkpoint (see the module docstring); returns the report dict."""
    from experiments.registry import REGISTRY
    from rl.seeding import seed_everything
    from rl.train import load_module

    if steps < 1 or epochs < 1 or hidden < 1:
        raise ValueError(f"steps={steps}, epochs={epochs}, hidden={hidden}; allowed: integers >= 1")
    module = load_module(checkpoint, REGISTRY, expected="discovery")
    if module.cfg.objective != "diayn":
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds objective={module.cfg.objective!r}; "
            "allowed: 'diayn' (a supervised library has no discriminator)"
        )
    n_envs = module.cfg.num_envs
    if not 1 <= test_envs < n_envs:
        raise ValueError(f"test_envs={test_envs}; allowed: 1 .. num_envs - 1 = {n_envs - 1}")
    seed_everything(seed)
    col = module.make_collector()
    try:
        with torch.no_grad():
            ro = col.collect(steps)
    finally:
        col.envs.close()
    phi, x, k, tr, te = split_by_env(module.trainer_.phi_encoder, ro, test_envs)
    K = module.library.num_skills
    with torch.no_grad():
        online = float((module.discriminator(x).argmax(-1) == k).float().mean())
    fresh = fit_discriminator(x, k, tr, K, hidden, epochs)
    with torch.no_grad():
        pred = fresh(x).argmax(-1)
    flat_phi = phi.reshape(-1, phi.shape[-1]).float()
    skills = []
    for s in range(K):
        p = flat_phi[k == s]
        n = int(p.shape[0])
        skills.append(
            {
                "skill": s,
                "share_of_steps": n / max(1, k.numel()),
                "carrying": float((p[:, 2] > 0).float().mean()) if n else None,
                "door_open": float(p[:, -1].mean()) if n else None,
                "mean_cell": p[:, :2].mean(0).tolist() if n else None,
            }
        )
    return {
        "checkpoint": str(checkpoint),
        "env_steps_of_checkpoint": int(module.env_steps),
        "probe_steps": int(k.numel()),
        "num_skills": K,
        "chance": 1.0 / K,
        "online_accuracy": online,
        "probe_accuracy": float((pred[te] == k[te]).float().mean()),
        "probe_train_accuracy": float((pred[tr] == k[tr]).float().mean()),
        "test_envs": test_envs,
        "skills": skills,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a discovery checkpoint (.ckpt)")
    p.add_argument("--steps", type=int, default=1024, help="vector steps of the probe rollout")
    p.add_argument("--test-envs", type=int, default=2, help="envs whose episodes are held out")
    p.add_argument("--epochs", type=int, default=200, help="passes of the fresh discriminator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    a = p.parse_args(argv)
    if not Path(a.checkpoint).is_file():
        raise SystemExit(f"disc_probe: error: checkpoint {a.checkpoint!r} does not exist")
    try:
        rep = probe(a.checkpoint, a.steps, a.test_envs, a.epochs, seed=a.seed)
    except ValueError as e:
        raise SystemExit(f"disc_probe: error: {e}") from None
    print(
        f"K={rep['num_skills']} (chance {rep['chance']:.2f}), {rep['probe_steps']} probe states: "
        f"online discriminator {rep['online_accuracy']:.3f}, fresh probe held-out episodes "
        f"{rep['probe_accuracy']:.3f} (its training episodes {rep['probe_train_accuracy']:.3f})"
    )
    if a.out is not None:
        from rl.io import atomic_write_bytes

        atomic_write_bytes(a.out, (json.dumps(rep, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
