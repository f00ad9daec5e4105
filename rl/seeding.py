"""One seed drives torch, numpy and every env; RNG states round-trip through checkpoints."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and make CPU kernels deterministic.

    The learner runs on one thread: results of some CPU kernels (e.g. the QR decomposition of
    orthogonal initialisation) depend on the thread count, and the two cores here are shared
    with the env workers anyway.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}; allowed: a non-negative integer")
    torch.set_num_threads(1)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict:
    """Global RNG states as checkpoint-safe (weights_only) values."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            np_state[2],
            np_state[3],
            np_state[4],
        ],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])


def generator_state(rng: np.random.Generator) -> dict:
    """A numpy Generator's state as plain Python values (ints fit ``weights_only``)."""
    s = rng.bit_generator.state
    return {
        "bit_generator": s["bit_generator"],
        "state": int(s["state"]["state"]),
        "inc": int(s["state"]["inc"]),
        "has_uint32": int(s["has_uint32"]),
        "uinteger": int(s["uinteger"]),
    }


def set_generator_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = {
        "bit_generator": state["bit_generator"],
        "state": {"state": state["state"], "inc": state["inc"]},
        "has_uint32": state["has_uint32"],
        "uinteger": state["uinteger"],
    }
