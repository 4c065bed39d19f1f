"""Exceptions that carry a message a user can act on."""


class RetrieverError(Exception):
    """Base class: every error raised on purpose by this library."""


class UnknownFamilyError(RetrieverError):
    """The model's architecture is not in the family registry."""


class AdapterMismatchError(RetrieverError):
    """An adapter was trained for a different base model or family."""


class MissingDependencyError(RetrieverError):
    """An optional package (bitsandbytes, faiss, ...) is needed but absent."""


class ImageDecodeError(RetrieverError):
    """An image file could not be opened or decoded."""


class IndexMismatchError(RetrieverError):
    """A tile index was built by a different retriever than the live one."""


class CorruptIndexError(RetrieverError):
    """An index folder is incomplete, truncated or inconsistent."""


class DataFormatError(RetrieverError):
    """A dataset or tile source does not have the expected layout."""


class EmptySelectionError(RetrieverError, ValueError):
    """A spatial filter selects no tile."""


class ReasonInterrupted(RetrieverError):
    """A reason stopped between two tokens because a more urgent call (a search) needed the shared model."""
