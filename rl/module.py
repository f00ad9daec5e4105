"""Base LightningModule for every method: config, collector lifecycle, exact resume, logging.

One ``training_step`` is one rollout or meta-iteration (thousands of env steps), never one env
step: Lightning costs about 0.75 ms per step here. Each epoch is one iteration, so a checkpoint
taken at an epoch end resumes exactly: the collector state (tasks, episode seeds, actions since
the last reset, policy memory), the RNG states and the counters all live in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

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

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def env_steps(self) -> int:
        """Env steps taken in training so far (kept after the collector is closed)."""
        if self.collector is not None:
            self._env_steps = self.collector.env_steps
        return getattr(self, "_env_steps", 0)

    def setup(self, stage: str) -> None:
        if self.collector is None:
            self.collector = self.make_collector()

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            self._env_steps = self.collector.env_steps
            self.collector.envs.close()
            self.collector = None

    def train_dataloader(self):
        # a private generator: otherwise each epoch's iterator draws a seed from the global
        # torch RNG, at a point that differs between a fresh and a resumed run
        return DataLoader(_OneItem(), batch_size=None, generator=torch.Generator().manual_seed(0))

    def on_train_start(self) -> None:
        if self._resume_state is not None:
            st = self._resume_state
            self.collector.load_state_dict(st["collector"])
            set_rng_state(st["rng"])
            self._resume_state = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_state"] = {
            "method": self.method,
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "finished": bool(self.finished),
            "collector": None if self.collector is None else self.collector.state_dict(),
            "rng": rng_state(),
            "extra": self.extra_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        st = checkpoint.get("rl_state")
        if st is None or st.get("method") != self.method:
            found = None if st is None else st.get("method")
            raise ValueError(f"checkpoint holds method {found!r}; expected {self.method!r}")
        self.iteration = int(st["iteration"])
        self.finished = bool(st.get("finished", False))
        self._env_steps = int(st.get("env_steps", 0))
        self.load_extra_state(st.get("extra") or {})
        if st.get("collector") is not None:
            self._resume_state = {"collector": st["collector"], "rng": st["rng"]}

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
        if log_dir:
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
        scalars["charts/SPS"] = ro.valid.sum().item() / max(seconds, 1e-9)
        if eps:
            scalars["charts/episodic_return"] = float(np.mean([e.ret for e in eps]))
            scalars["charts/success"] = float(np.mean([e.success for e in eps]))
            scalars["charts/episodic_length"] = float(np.mean([e.length for e in eps]))
        scalars.update(extra or {})
        self.log_scalars(scalars)

    def recent_success(self, last: int = 5) -> float:
        vals = [h["charts/success"] for h in self.history[-last:] if "charts/success" in h]
        return float(np.mean(vals)) if vals else float("nan")

    def acting_policy(self) -> Any:
        raise NotImplementedError
