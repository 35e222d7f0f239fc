"""The one exception type of dera-gguf."""


class DeRaError(ValueError):
    """Bad input or an incompatible model pair.

    The message says what is wrong, where, and what to do. It subclasses
    ``ValueError`` so code written for ``llama_cpp.Llama`` that catches
    ``ValueError`` keeps working.
    """
