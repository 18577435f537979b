"""A rank's stage, built from its plan: only its own tensors read (stage), quantized as they are
read (quantize), streamed in when offloaded (streamer), and the KV cache it runs with (kvcache)."""


class LoadError(RuntimeError):
    """The checkpoint cannot be loaded as configured; the message says why and how to fix it."""
