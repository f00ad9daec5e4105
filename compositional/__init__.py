"""The compositional agent: options, a decision-level LSTM controller, a pointer composer and a
skill-feasibility graph (see ``compositional.agent``)."""

from compositional.composer import PointerComposer
from compositional.controller import DecisionController
from compositional.graph import SkillGraph

__all__ = ["DecisionController", "PointerComposer", "SkillGraph"]
