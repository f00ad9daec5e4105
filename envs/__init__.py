"""Task families, compositions, train/held-out splits and gymnasium registration.

Importing ``envs`` registers ``CompoGrid-v0`` and ``CompoMetaWorld-v0``.
"""

from __future__ import annotations

import gymnasium as gym

from envs.core import Composition, Primitive, Split, Task, make_split


def register() -> None:
    """Register both task families with gymnasium (idempotent; entry points import lazily)."""
    if "CompoGrid-v0" not in gym.registry:
        gym.register(
            id="CompoGrid-v0",
            entry_point="envs.grid:CompoGridEnv",
            # gym.make_vec(..., vectorization_mode="vector_entry_point"): the batched CompoGrid
            vector_entry_point="envs.grid_batch:CompoGridVectorEnv",
        )
    if "CompoMetaWorld-v0" not in gym.registry:
        gym.register(id="CompoMetaWorld-v0", entry_point="envs.metaworld:CompoMetaWorldEnv")


register()

__all__ = ["Composition", "Primitive", "Split", "Task", "make_split", "register"]
