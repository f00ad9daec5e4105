"""Scale-out on Lightning DDP: ranks, shards of the envs, and the collectives the PPO update
needs.

``compo train --devices N --strategy ddp [--num-nodes M]`` runs ``W = N x M`` processes (gloo
on CPU). Each rank steps ``num_envs / W`` envs of its own (``Collector.shard``) and the PPO
epochs run over the *union* of the ranks' rollouts:

- the minibatch permutation is drawn once (rank 0's torch RNG, as a 1-process run draws it)
  and broadcast, so every rank knows the global minibatch and takes the part its envs hold;
- advantages are normalised with the global minibatch's mean and std (the advantages of all
  ranks are gathered: they are one float per step);
- each rank's loss is its part's mean times ``m_local * W / m`` (``minibatch_scale``), and DDP
  averages the gradients over the ``W`` ranks, so the step is the gradient of the mean over the
  whole minibatch, as in a 1-process run; a rank holding no step of a minibatch still takes
  part in the gradient all-reduce with a zero loss;
- gradients are all-reduced by DDP inside Lightning's ``manual_backward`` (its
  ``pre_backward`` prepares the reducer for every backward of a manual-optimisation step).

MAML, FOMAML and Reptile (``baselines.maml``) shard the *meta-batch of tasks* instead: each
rank adapts ``meta_batch_size / W`` tasks on its own envs; the pooled baseline and advantage
moments are computed from every rank's episodes (``gather_rows``), and the outer step is the
1-process step: the Adam step's gradient by DDP's all-reduce inside ``manual_backward``, the
TRPO step's gradient, Fisher-vector products and line-search values by ``all_reduce_sum``
(TRPO differentiates with ``torch.autograd.grad``, which DDP's reducer does not see), and
Reptile's mean adapted parameters likewise.

PEARL (``baselines.pearl``) shards both: each rank runs ``num_envs / W`` of the iteration's
trials (rank 0 draws the pool tasks and broadcasts them) and every rank stores every rank's
transitions, so the replay and context buffers are the same on every rank and in the
checkpoint; each SAC + encoder update's draws (tasks, context and replay rows, z's noise) are
rank 0's, broadcast, and each rank computes the loss of ``meta_batch / W`` of its tasks; DDP
averages the gradients over the ranks (the KL, summed over the meta-batch's tasks, is scaled
by ``W``).

The compositional agent (``compositional.agent``) and the DIAYN library (method ``discovery``)
follow the same rules for each of their updates (skills' PPO, relabelled imitation,
discriminator, controller): every update is the 1-process update over the union of the ranks'
envs. Every method runs on more than one process; ``RLModule.shard_sizes`` names the sizes a
method splits over the ranks.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

#: methods whose training steps back-propagate losses over different parts of the module
#: (skills, discriminator, controller; DDP then needs ``find_unused_parameters``)
PARTIAL_BACKWARD_METHODS = ("compositional", "discovery")
#: ``compo train --strategy`` choices: ``auto`` is one process when ``devices x num_nodes`` is 1
#: and DDP otherwise
STRATEGIES = ("auto", "ddp")


def world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launch_rank(devices: int) -> int:
    """This process's global rank as its launcher set it, before any process group exists:
    SLURM's ``SLURM_PROCID``, torchrun's ``RANK``, or Lightning's own launcher
    (``NODE_RANK x devices + LOCAL_RANK``; both unset in the process the user started)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect():
        return int(os.environ["SLURM_PROCID"])
    if TorchElasticEnvironment.detect():
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))


def check_distributed(
    sizes: dict[str, int],
    devices: int,
    num_nodes: int = 1,
    strategy: str = "auto",
) -> int:
    """Validate a run's process layout; return its world size. ``sizes`` are the settings the
    method splits over the ranks (``RLModule.shard_sizes``: ``num_envs``, MAML's
    ``meta_batch_size``, PEARL's ``meta_batch``...). One-line ``ValueError`` for a layout
    those sizes cannot shard."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    cores = os.cpu_count() or 1
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= cores:
        raise ValueError(f"--devices {devices!r}; allowed: an integer from 1 to {cores} (cores)")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"--num-nodes {num_nodes!r}; allowed: an integer >= 1")
    size = devices * num_nodes
    for what, n in sizes.items():
        if int(n) % size:
            raise ValueError(
                f"{what}={n} on {size} processes; allowed: a multiple of {size} (each "
                f"process takes {what} / processes of them)"
            )
    return size


def derived_seed(*keys: int) -> int:
    """A seed for another stream of the same run (e.g. ``(seed, rank)``), independent of
    ``keys[0]``'s own stream (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def reseed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (a rank's own action stream)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- collectives (no-ops on one process) ---------------------------------------------------------
def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere) concatenated along ``dim`` in rank order."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def gather_envs(x: torch.Tensor) -> torch.Tensor:
    """(T, n, ...) of every rank -> (T, n x W, ...) in rank order: the 1-process layout, where
    rank r's envs are columns ``[r n, (r+1) n)``."""
    return _gather(x, 1)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) of every rank (same shape everywhere) -> (n x W, ...) in rank order."""
    return _gather(x, 0)


def gather_cat(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's tensors of any length along dim 0 (e.g. the segments a rank's envs
    finished), each concatenated over the ranks in rank order."""
    if world()[1] == 1:
        return xs
    parts = gather_objects(xs)
    return tuple(torch.cat([p[j] for p in parts]) for j in range(len(xs)))


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (same shape and dtype everywhere)."""
    if world()[1] > 1:
        dist.broadcast(x, src=0)
    return x


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` (plain data and tensors, between our own processes) on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks (float64 sums of counters stay exact)."""
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (plain data; picklable between our own processes), in rank order."""
    _, size = world()
    if size == 1:
        return [obj]
    out: list = [None] * size
    dist.all_gather_object(out, obj)
    return out


# -- minibatches of the union of the ranks' rollouts ------------------------------------------------
def local_part(
    global_envs: torch.Tensor, n_local: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of global env indices, the mask of those rank ``rank`` holds and their local indices."""
    mine = (global_envs // n_local) == rank
    return mine, global_envs[mine] - rank * n_local


def minibatch_scale(m_local: int, m_global: int) -> float:
    """Factor of a rank's mean loss over its ``m_local`` of ``m_global`` minibatch items so that
    DDP's gradient average over the ranks is the gradient of the mean over all items."""
    return m_local * world()[1] / max(m_global, 1)


def zero_loss(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """A zero loss touching every parameter: a rank with no item in a minibatch still joins
    DDP's gradient all-reduce (every parameter must get a gradient)."""
    return sum((p * 0).sum() for p in params if p.requires_grad)


def weighted_stats(
    rows: list[dict[str, float]], weights: list[float], keys: tuple[str, ...]
) -> dict[str, float]:
    """This rank's loss terms per minibatch (``keys``; a minibatch it holds nothing of: no
    entry), weighted by its share of each minibatch, summed over the ranks and averaged over
    the minibatches: the 1-process mean over minibatches of each term."""
    local = torch.tensor(
        [[r.get(k, 0.0) * w for k in keys] for r, w in zip(rows, weights)], dtype=torch.float64
    ).reshape(len(rows), len(keys))
    total = all_reduce_sum(local)
    return {k: float(total[:, j].mean()) for j, k in enumerate(keys)}
