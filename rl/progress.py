"""A live progress bar over a run's env-step budget (``compo train`` on a terminal).

Lightning's own bar counts batches within an epoch; here an epoch is one iteration of one
batch, so that bar would restart at every iteration. This one counts env steps against
``total_env_steps``: steps done, steps per second, time remaining and the training success of
the last iterations. ``compo train`` shows it only when stdout and stderr are terminals and
``--quiet`` is not given, so CI logs and redirected output stay free of bar redraws.
"""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.callbacks import Callback
from tqdm import tqdm

from rl.module import RLModule


def show_progress(quiet: bool) -> bool:
    """Whether a live bar belongs on this output: not ``quiet``, and a terminal on both
    streams (the bar redraws on stderr; the summary goes to stdout)."""
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


class EnvStepsBar(Callback):
    """tqdm bar of env steps, updated at the end of every iteration (one ``training_step``)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: RLModule) -> None:
        total = int(pl_module.cfg.total_env_steps)
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError):
            width = 0
        # a terminal that reports no size (some ptys) would get no bar at all
        size = {"dynamic_ncols": True} if width else {"ncols": 100, "nrows": 24}
        self.bar = tqdm(
            total=total,
            initial=min(pl_module.env_steps, total),  # a resumed run starts where it stopped
            desc=pl_module.method,
            unit=" env steps",
            unit_scale=True,
            file=sys.stderr,
            **size,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: RLModule) -> None:
        if self.bar is None:
            return
        # the last iteration may overshoot the budget by part of a rollout
        self.bar.update(max(0, min(pl_module.env_steps, self.bar.total) - self.bar.n))
        sr = pl_module.recent_success()
        post = {"iter": pl_module.iteration}
        if sr == sr:  # NaN before the first finished episode
            post["success"] = f"{sr:.2f}"
        self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: RLModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: RLModule, exception: BaseException):
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
