"""Partitioner: cost model and plan search for mixed fleets. Pure Python, no process groups."""
