"""The data pipeline: read and validate (``load_examples``), then tokenize with loss masks (``tokenize_examples``).

Importing this package is light: ``datasets``, ``transformers`` and ``pyarrow`` are imported only inside
the functions that need them.
"""

from .loading import load_examples, split_examples
from .masking import FALLBACK_CHAT_TEMPLATE, format_example
from .pipeline import tokenize_examples
from .settings import DataSettings, settings_problems
from .tokenizer import load_tokenizer
from .schema import (
    DATASET_TYPES,
    TRUNCATION_MODES,
    DataError,
    DataSummary,
    Example,
    LoadedData,
    Message,
    TokenizedData,
)

__all__ = [
    "DATASET_TYPES",
    "FALLBACK_CHAT_TEMPLATE",
    "TRUNCATION_MODES",
    "DataError",
    "DataSettings",
    "DataSummary",
    "Example",
    "LoadedData",
    "Message",
    "TokenizedData",
    "format_example",
    "load_tokenizer",
    "settings_problems",
    "load_examples",
    "split_examples",
    "tokenize_examples",
]
