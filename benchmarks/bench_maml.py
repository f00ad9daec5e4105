"""``maml_vs_fomaml``: cost of MAML's second-order meta-gradient against first-order MAML.

Two measurements, both with meta-batch 8 on CompoGrid (the split's train compositions, one
layout per trial, 2 pre- and 2 post-update episodes per task):

1. **Whole meta-iteration** (``MAMLModule.meta_step``: pre-update trials, inner step,
   post-update trials, outer update): median wall seconds, MAML and FOMAML iterations
   interleaved so drifting machine load hits both alike. Episode lengths differ between the
   two (their policies diverge), so env steps per iteration are in the notes.
2. **Outer update alone on identical data**: the same pre/post episode batches and the same
   ``theta`` for both; median seconds of ``meta_loss`` + ``backward`` (where second order
   costs), and the memory of the graph: bytes of the tensors autograd saves for backward
   (``baselines.maml.graph_saved_bytes``, via ``torch.autograd.graph.saved_tensors_hooks``).
   tracemalloc is not used: it only sees Python's allocators, not torch's CPU tensor memory.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks import Row, load_note

NAME = "maml_vs_fomaml"


def build(meta_batch: int, quick: bool, seed: int = 0):
    """MAML and FOMAML modules with identical config, seed and initial parameters."""
    from baselines.maml import FOMAMLModule, MAMLModule

    cfg: dict = {"meta_batch_size": meta_batch, "seed": seed}
    if quick:
        # short episodes keep the smoke test fast
        cfg["env_kwargs"] = {"task_info": "reward", "size": 8, "max_steps": 16}
    maml, fomaml = MAMLModule(cfg), FOMAMLModule(cfg)
    fomaml.net.load_state_dict(maml.net.state_dict())
    return maml, fomaml


def outer_update_seconds(module, pre, post, repeats: int) -> list[float]:
    """Seconds of ``meta_loss(pre, post)`` + ``backward`` (gradients cleared each time)."""
    times = []
    for _ in range(repeats):
        module.net.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = module.meta_loss(pre, post)
        loss.backward()
        times.append(time.perf_counter() - t0)
    module.net.zero_grad(set_to_none=True)
    return times


def run(quick: bool = False, **_: object) -> list[Row]:
    """Measure both modules in the same run."""
    from baselines.maml import EpisodeBatch, graph_saved_bytes

    meta_batch, iters, upd_repeats = (2, 2, 3) if quick else (8, 6, 15)
    t0 = time.perf_counter()
    maml, fomaml = build(meta_batch, quick)
    mods = {"maml": maml, "fomaml": fomaml}
    rows_by: dict[str, list[dict]] = {k: [] for k in mods}
    steps_by: dict[str, list[int]] = {k: [] for k in mods}
    try:
        for m in mods.values():  # warm-up: collector creation, first vmap/functional_call
            m.meta_step()
        for _ in range(iters):
            for k, m in mods.items():
                s0 = m.env_steps
                rows_by[k].append(m.meta_step())
                steps_by[k].append(m.env_steps - s0)

        # identical data and parameters for the outer-update comparison
        maml.net.load_state_dict(fomaml.net.state_dict())
        col = fomaml.collector
        tasks = [col.task_sampler(col.rng) for _ in range(meta_batch)]
        fomaml._acting.params = None
        pre = EpisodeBatch.from_rollout(col.collect_trials(tasks), fomaml.cfg.episodes_per_trial)
        post = EpisodeBatch.from_rollout(col.collect_trials(tasks), fomaml.cfg.episodes_per_trial)
        for m in mods.values():  # warm-up
            outer_update_seconds(m, pre, post, 1)
        upd: dict[str, list[float]] = {k: [] for k in mods}
        for _ in range(upd_repeats):
            for k, m in mods.items():
                upd[k] += outer_update_seconds(m, pre, post, 1)
        saved = {
            k: graph_saved_bytes(lambda m=m: m.meta_loss(pre, post)[0])[1] / 2**20
            for k, m in mods.items()
        }
    finally:
        for m in mods.values():
            if m.collector is not None:
                m.collector.envs.close()
                m.collector = None
    it_s = {k: statistics.median(r["time/meta_iteration_s"] for r in v) for k, v in rows_by.items()}
    up_in = {k: statistics.median(r["time/update_s"] for r in v) for k, v in rows_by.items()}
    steps = {k: float(np.median(v)) for k, v in steps_by.items()}
    upd_s = {k: statistics.median(v) for k, v in upd.items()}
    shape = f"(tasks, episodes, T) pre {tuple(pre.rewards.shape)}, post {tuple(post.rewards.shape)}"
    print(f"[{NAME}] done in {time.perf_counter() - t0:.1f} s")
    common = f"meta_batch {meta_batch}, inner_steps 1, DiCE surrogate; {load_note()}"
    return [
        Row(
            NAME, "seconds_per_meta_iteration", it_s["maml"], it_s["fomaml"], "<=1.5",
            f"value=MAML (second order), reference=FOMAML; median of {iters} meta_step() each "
            f"(interleaved, after 1 warm-up); median env steps/iteration MAML {steps['maml']:.0f}"
            f", FOMAML {steps['fomaml']:.0f}; outer-update phase inside the iteration MAML "
            f"{up_in['maml']:.3f} s vs FOMAML {up_in['fomaml']:.3f} s; {common}",
        ),
        Row(
            NAME, "outer_update_seconds_same_data", upd_s["maml"], upd_s["fomaml"], "",
            f"value=MAML, reference=FOMAML; meta_loss + backward on identical episodes and "
            f"theta, median of {upd_repeats} (interleaved); {shape}; {common}",
        ),
        Row(
            NAME, "graph_saved_MB", saved["maml"], saved["fomaml"], "",
            f"value=MAML, reference=FOMAML; autograd saved-tensor memory of one meta-loss "
            f"forward (graph_saved_bytes via saved_tensors_hooks, unique storages) on identical "
            f"data; not tracemalloc (it does not see torch tensor memory); {shape}; {common}",
        ),
    ]  # fmt: skip
