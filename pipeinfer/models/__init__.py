"""The models the runner knows: the table of module names per family (families), the demo's trained
checkpoint (pretrained: python -m pipeinfer.models.pretrained), tiny random models for tests and
benchmarks (tiny: python -m pipeinfer.models.tiny)."""
