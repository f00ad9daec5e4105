"""Base LightningModule for every method: config, collector lifecycle, exact resume, logging.

One ``training_step`` is one rollout or meta-iteration (thousands of env steps), never one env
step: Lightning costs about 0.75 ms per step here. Each epoch is one iteration, so a checkpoint
taken at an epoch end resumes exactly: the collector state (tasks, episode seeds, actions since
the last reset, policy memory), the RNG states and the counters all live in the checkpoint.

Under DDP (``rl.distributed``) every rank holds a shard of the envs: the checkpoint (written
by rank 0) holds every rank's collector and RNG states, so a run resumes exactly under the same
number of processes; under another number, parameters, optimiser, iteration and env-step
counters continue and each rank starts fresh trials from streams derived from the seed, the
iteration and its rank (the episodes running at the checkpoint are dropped). Env steps are
summed over the ranks; logged means are means over all ranks' episodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from rl import distributed
from rl.collect import Collector, Rollout
from rl.config import config_from_dict, config_to_dict
from rl.io import append_jsonl
from rl.seeding import rng_state, seed_everything, set_rng_state


class _OneItem(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return i


class RLModule(L.LightningModule):
    """Subclasses set ``method`` and ``config_cls`` and implement ``build``, ``make_collector``,
    ``configure_optimizers``, ``iterations`` and ``training_step``."""

    method: str = "base"
    config_cls: type = object

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        self.cfg = config_from_dict(self.config_cls, config or {})
        self.save_hyperparameters({"method": self.method, "config": config_to_dict(self.cfg)})
        self.automatic_optimization = False
        seed_everything(int(self.cfg.seed))
        self.collector: Collector | None = None
        self.iteration = 0
        self._resume_state: dict | None = None
        self.history: list[dict] = []
        # set by rl.train's checkpoint callback when the run has reached its budget: a
        # finished run resumed with the same config has nothing left to train
        self.finished = False
        self.build()

    # -- to implement ------------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def make_collector(self) -> Collector:
        raise NotImplementedError

    def iterations(self) -> int:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Method-specific training state beyond parameters and optimisers (replay buffers...)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def local_state(self) -> dict:
        """This process's own training state beyond its collector and the global RNGs (a
        method's private generators): under DDP every rank's is in the checkpoint."""
        return {}

    def load_local_state(self, state: dict) -> None:
        pass

    def reseed_local(self, seed: int) -> None:
        """Give the method's private acting generators a stream of their own, derived from
        ``seed`` (a DDP rank > 0 at the start; every rank resumed under another number of
        processes), as ``distributed.reseed`` does for the global ones."""

    def shard_sizes(self) -> dict[str, int]:
        """Settings this method splits over DDP ranks (each a multiple of the world size)."""
        return {"num_envs": int(self.cfg.num_envs)}

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Processes of the run (DDP ranks); 1 outside ``fit`` or without DDP."""
        return getattr(self, "_world", (0, 1))[1]

    @property
    def num_local_envs(self) -> int:
        """Envs this process steps: ``num_envs`` split over the DDP ranks."""
        return int(self.cfg.num_envs) // self.world_size

    @property
    def env_steps(self) -> int:
        """Env steps taken in training so far, summed over DDP ranks (kept after the collector
        is closed)."""
        if self.collector is not None and self.world_size == 1:
            self._env_steps = self.collector.env_steps
        return getattr(self, "_env_steps", 0)

    def setup(self, stage: str) -> None:
        self._world = distributed.world()
        if self.collector is None:
            self.collector = self.make_collector()
            rank, size = self._world
            if size > 1:
                self.collector.shard(rank, size)
                if rank > 0:  # rank 0 acts on the seed's own stream, every other on its own
                    distributed.reseed(distributed.derived_seed(int(self.cfg.seed), rank))
                    self.reseed_local(distributed.derived_seed(int(self.cfg.seed), rank, 1))

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            if self.world_size == 1:
                self._env_steps = self.collector.env_steps
            self.collector.envs.close()
            self.collector = None

    def _sync_env_steps(self) -> None:
        """Add every rank's env steps since the last call to the run's count (DDP; all ranks
        call it once per iteration)."""
        local = self.collector.env_steps
        delta = torch.tensor([local - self._local_steps], dtype=torch.float64)
        self._local_steps = local
        self._env_steps = getattr(self, "_env_steps", 0) + int(distributed.all_reduce_sum(delta))

    def train_dataloader(self):
        # a private generator: otherwise each epoch's iterator draws a seed from the global
        # torch RNG, at a point that differs between a fresh and a resumed run
        return DataLoader(_OneItem(), batch_size=None, generator=torch.Generator().manual_seed(0))

    def on_train_start(self) -> None:
        rank, size = self._world
        st = self._resume_state
        if st is not None and "collector" in st:
            self.collector.load_state_dict(st["collector"])
            set_rng_state(st["rng"])
            self.load_local_state(st.get("local") or {})
        elif st is not None:  # a checkpoint of another number of processes: fresh trials
            seed = int(self.cfg.seed)
            distributed.reseed(distributed.derived_seed(seed, self.iteration, rank, size))
            self.reseed_local(distributed.derived_seed(seed, self.iteration, rank, size, 1))
            self.collector.shard(rank, size, distributed.derived_seed(seed, self.iteration))
            if size == 1:
                self.collector.env_steps = getattr(self, "_env_steps", 0)
        self._resume_state = None
        self._local_steps = self.collector.env_steps

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # called on every rank (Lightning writes on rank 0): rank 0's states at the top level,
        # as a 1-process run has them, and every rank's under "ranks"
        local = {
            "collector": None if self.collector is None else self.collector.state_dict(),
            "rng": rng_state(),
            "local": self.local_state(),
        }
        checkpoint["rl_state"] = {
            "method": self.method,
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "finished": bool(self.finished),
            **local,
            "extra": self.extra_state(),
        }
        if self.world_size > 1:
            checkpoint["rl_state"]["world_size"] = self.world_size
            checkpoint["rl_state"]["ranks"] = distributed.gather_objects(local)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        st = checkpoint.get("rl_state")
        if st is None or st.get("method") != self.method:
            found = None if st is None else st.get("method")
            raise ValueError(f"checkpoint holds method {found!r}; expected {self.method!r}")
        self.iteration = int(st["iteration"])
        self.finished = bool(st.get("finished", False))
        self._env_steps = int(st.get("env_steps", 0))
        self.load_extra_state(st.get("extra") or {})
        rank, size = distributed.world()
        if int(st.get("world_size", 1)) != size:
            self._resume_state = {}  # another number of processes: fresh trials, see on_train_start
        elif size > 1:
            local = st["ranks"][rank]
            self._resume_state = local if local.get("collector") is not None else None
        elif st.get("collector") is not None:
            self._resume_state = {
                "collector": st["collector"],
                "rng": st["rng"],
                "local": st.get("local") or {},
            }

    # -- logging ------------------------------------------------------------------------------------
    def log_scalars(self, scalars: dict[str, float]) -> None:
        """Send namespaced scalars to every Lightning logger of the run (TensorBoard, CSV...)
        at x = env steps, and keep a history row.

        ``logger.log_metrics(step=env steps)`` rather than ``self.log``: Lightning's own step is
        the optimiser-step count, which differs between methods (one iteration takes one
        meta-step or hundreds of minibatch steps), and the protocol compares methods at equal
        env steps. Each logger saves after every iteration, so a killed run's logs reach its
        last iteration, as ``train_log.jsonl`` does.
        """
        diagnostics = getattr(self, "diagnostics_callback", None)  # rl.diagnostics
        if diagnostics is not None:
            scalars = {**scalars, **diagnostics.scalars_for(self)}
        if self.world_size > 1:
            scalars = _mean_over_ranks(scalars)
            self._sync_env_steps()
        step = self.env_steps
        row = {
            "iteration": self.iteration,
            "env_steps": step,
            **{k: float(v) for k, v in scalars.items()},
        }
        self.history.append(row)
        finite = {k: float(v) for k, v in scalars.items() if v == v}  # NaN: nothing to plot
        for logger in self.loggers if finite else ():
            logger.log_metrics(finite, step=step)
            logger.save()
        log_dir = (
            getattr(self.trainer, "default_root_dir", None) if self._trainer is not None else None
        )
        if log_dir and distributed.world()[0] == 0:
            # one write per row, so a kill never leaves half a line (rl.train trims the rows
            # after the checkpoint on resume)
            append_jsonl(Path(log_dir) / "train_log.jsonl", row)

    def log_iteration(
        self,
        ro: Rollout,
        losses: dict[str, float],
        seconds: float,
        extra: dict[str, float] | None = None,
    ) -> None:
        """The four PPO health signals, returns, success and steps per second, plus a method's
        ``extra`` namespaced scalars in the same row."""
        self.iteration += 1
        eps = ro.episodes
        scalars = {f"losses/{k}": v for k, v in losses.items() if k != "loss"}
        ends = [(e.ret, e.success, e.length) for e in eps]
        steps = ro.valid.sum().item()
        if self.world_size > 1:  # every rank's episodes and steps, over the slowest rank's time
            parts = distributed.gather_objects((steps, seconds, ends))
            steps, seconds = sum(p[0] for p in parts), max(p[1] for p in parts)
            ends = [e for p in parts for e in p[2]]
        scalars["charts/SPS"] = steps / max(seconds, 1e-9)
        if ends:
            rets, succ, lens = zip(*ends)
            scalars["charts/episodic_return"] = float(np.mean(rets))
            scalars["charts/success"] = float(np.mean(succ))
            scalars["charts/episodic_length"] = float(np.mean(lens))
        scalars.update(extra or {})
        self.log_scalars(scalars)

    def recent_success(self, last: int = 5) -> float:
        vals = [h["charts/success"] for h in self.history[-last:] if "charts/success" in h]
        return float(np.mean(vals)) if vals else float("nan")

    def acting_policy(self) -> Any:
        raise NotImplementedError


def _mean_over_ranks(scalars: dict[str, float]) -> dict[str, float]:
    """Every rank's scalars -> one row: per key, the mean over the ranks that have a finite
    value (a value all ranks share, such as a reduced loss, is kept as it is)."""
    rows = distributed.gather_objects({k: float(v) for k, v in scalars.items()})
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        vals = [r[k] for r in rows if k in r and r[k] == r[k]]
        if not vals:
            out[k] = float("nan")
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
        else:
            out[k] = float(np.mean(vals))
    return out
