"""se_engine: fast, exact LLM ensembles by speculative ensemble decoding."""

from .errors import (CacheOverflowError, ModelSourceError, SEEngineError, UnknownModelError,
                     UnsupportedModelError, VocabularyMismatchError)
from .nested import NestedDrafter
from .runner import LoadedModel, Runner, check_same_vocabulary, load_model
from .sources import BUILTIN_MODELS, TINY_MODELS, resolve

__all__ = [
    "BUILTIN_MODELS", "TINY_MODELS", "CacheOverflowError", "LoadedModel", "ModelSourceError", "NestedDrafter",
    "Runner", "SEEngineError", "UnknownModelError", "UnsupportedModelError", "VocabularyMismatchError",
    "check_same_vocabulary", "load_model", "resolve",
]
