"""Sampling: the settings every front uses (:mod:`.settings`, the paper's defaults written once) and
llama.cpp's sampler chains applied to blended rows held in numpy (:mod:`.chains`)."""

from .chains import RowSampler, new_chain
from .settings import Sampling

__all__ = ["RowSampler", "Sampling", "new_chain"]
