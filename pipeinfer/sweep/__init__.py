"""Sweeps over config keys: python -m pipeinfer.sweep sweep.json (see __main__.py)."""
