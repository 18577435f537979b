"""An OpenAI-compatible HTTP server on the first rank, over the engine (python -m pipeinfer.serve)."""
