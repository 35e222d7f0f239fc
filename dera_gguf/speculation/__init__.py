"""Exact speculative decoding: draft sources, when to draft, what a verification costs.

:mod:`.verify` verifies drafts inside llama-cpp-python's ``generate()`` and decides when to draft;
:mod:`.sources` makes drafts (prompt lookup, one of the pair's models); :mod:`.small_model` a small
drafter model of the pair's family, whose vocabulary :mod:`.vocab` checks; :mod:`.pace` the size
rule from acceptance and cost; :mod:`.costs` the step costs measured on this machine.
"""
