"""The engine: requests in on the first rank, results out as they finish (engine.py)."""

from pipeinfer.engine.engine import Engine, StartError

__all__ = ["Engine", "StartError"]
