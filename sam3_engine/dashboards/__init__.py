"""Concept-coverage analytics over a run's tables."""
