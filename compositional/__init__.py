"""The compositional agent: LSTM meta-controller, attention composer, skill graph."""

from compositional.agent import CompositionalAgent
from compositional.composer import AttentionComposer
from compositional.controller import MetaController
from compositional.graph import SkillGraph, write_graph

__all__ = ["AttentionComposer", "CompositionalAgent", "MetaController", "SkillGraph", "write_graph"]
