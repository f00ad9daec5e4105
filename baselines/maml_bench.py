"""Benchmark hooks of MAML: the cost of a meta-iteration and the memory of its second-order
graph (``benchmarks/bench_maml.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from baselines.maml_core import EpisodeBatch

if TYPE_CHECKING:
    from baselines.maml import MAMLModule


def graph_saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` and add up the bytes of the tensors autograd saves for backward (the memory
    a second-order graph costs), via ``torch.autograd.graph.saved_tensors_hooks``."""
    total = 0
    seen: set[tuple[int, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def meta_iteration_cost(module: MAMLModule, iterations: int = 3, warmup: int = 1) -> dict:
    """Time ``iterations`` meta-iterations of ``module`` (after ``warmup``) and measure the
    autograd memory of its meta-loss on the last batch.

    Returns:
        ``{"method", "seconds_per_iteration", "phase_seconds": {...}, "graph_saved_MB",
        "env_steps_per_iteration"}``.
    """
    for _ in range(warmup):
        module.meta_step()
    rows = []
    steps0 = module.env_steps
    for _ in range(iterations):
        rows.append(module.meta_step())
    steps = (module.env_steps - steps0) / max(iterations, 1)
    # the graph of one meta-loss on fresh episodes (theta-shared pre and post batches)
    col = module.collector
    tasks = [col.task_sampler(col.rng) for _ in range(module.cfg.meta_batch_size)]
    module._acting.params = None
    pre = EpisodeBatch.from_rollout(col.collect_trials(tasks), module.cfg.episodes_per_trial)
    post = EpisodeBatch.from_rollout(col.collect_trials(tasks), module.cfg.episodes_per_trial)
    if module.cfg.algo == "reptile":
        saved = 0
    else:
        _, saved = graph_saved_bytes(lambda: module.meta_loss(pre, post)[0])
    phases = {
        k.removeprefix("time/"): float(np.mean([r[k] for r in rows]))
        for k in rows[0]
        if k.startswith("time/")
    }
    return {
        "method": module.method,
        "seconds_per_iteration": phases["meta_iteration_s"],
        "phase_seconds": phases,
        "graph_saved_MB": saved / 2**20,
        "env_steps_per_iteration": steps,
    }
