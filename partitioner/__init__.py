"""Partitioner: cost model and plan search for mixed fleets. Pure Python + numpy, no process groups.

    from partitioner import search, FleetSpec, IslandSpec, ChipModel, ModelSpec, TrainSpec
    result = search(fleet, model, train, profile=None, top=2)
    result.best            # a Plan (partitioner.plan), see docs/plan-format.md
"""

from partitioner.inputs import ChipModel, FleetSpec, InfeasibleError, IslandSpec, ModelSpec, TrainSpec
from partitioner.plan import Plan, PlanError
from partitioner.profile import ProfileDB, ProfileError
from partitioner.search import SearchResult, search

__all__ = ["ChipModel", "FleetSpec", "InfeasibleError", "IslandSpec", "ModelSpec", "Plan", "PlanError",
           "ProfileDB", "ProfileError", "SearchResult", "TrainSpec", "search"]
