"""Skill library and skill discovery (DIAYN, supervised primitives)."""

from primitives.discovery import DiscoveryModule, SkillPolicy, save_heatmaps
from primitives.library import SkillLibrary

__all__ = ["DiscoveryModule", "SkillLibrary", "SkillPolicy", "save_heatmaps"]
