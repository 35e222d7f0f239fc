"""A pair's llama.cpp contexts and what runs on them: the loaded weights, the lockstep of one sequence,
the realignment in effect, threads, saved states.

:mod:`.weights` checks a pair's files and loads them once; :mod:`.contexts` drives one llama.cpp
context (decode, rows, what its KV cache holds, read from llama.cpp); :mod:`.pair` is the pair's
runtime (its contexts, the realignment, drafting); :mod:`.calls` the per-call realignment of
DeRaLlama; :mod:`.threads` how the contexts share the CPU; :mod:`.states` saved states;
:mod:`.prompts` llama-cpp-python's prompt rules; :mod:`.bytefallback` text llama.cpp can tokenize.
"""
