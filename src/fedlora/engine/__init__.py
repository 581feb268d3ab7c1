"""Engines run the rounds: :mod:`fedlora.engine.simulation` (in-process, the default)."""
