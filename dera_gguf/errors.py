"""The one exception type of dera-gguf, and the subclasses callers may catch by type."""


class DeRaError(ValueError):
    """Bad input, an incompatible model pair, or a failure of llama.cpp during a call.

    The message says what is wrong, where, and what to do. It subclasses
    ``ValueError`` so code written for ``llama_cpp.Llama`` that catches
    ``ValueError`` keeps working.
    """


class ContextFullError(DeRaError):
    """The tokens of a call do not fit the context (``n_ctx``): a front can name its own remedy."""


class DecodeError(DeRaError):
    """llama.cpp failed during a call (``llama_decode`` returned an error, for example): not bad input."""


class Stopped(DeRaError):
    """A call ended before its next decode because the caller asked (:meth:`DeRaLlama.stopping`)."""
