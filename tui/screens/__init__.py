"""Screens pushed over the planner (the explainer)."""
