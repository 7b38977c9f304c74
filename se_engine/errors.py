"""Exceptions the engine raises for bad input; each message names the offending value."""


class SEEngineError(Exception):
    """Base class of every error raised by se_engine for bad input or bad state."""


class UnknownModelError(SEEngineError, ValueError):
    """A model argument that is neither a built-in name, a local directory nor a .gguf file."""


class ModelSourceError(SEEngineError, RuntimeError):
    """A model's files could not be fetched, assembled, verified or converted."""


class UnsupportedModelError(SEEngineError, ValueError):
    """A checkpoint whose architecture the chosen runner does not implement."""


class VocabularyMismatchError(SEEngineError, ValueError):
    """Models that must share a vocabulary do not."""


class CacheOverflowError(SEEngineError, ValueError):
    """A forward that would write past the KV cache's max_len."""
