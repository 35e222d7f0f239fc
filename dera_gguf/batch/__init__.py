"""Running sequences decoded together: one record per sequence, one step for all.

:class:`~dera_gguf.batch.sequence.Sequence` is the record of one running sequence (its
prompt, mixing weights, sampler chain, bias, stop rule, budget, and the KV cells it holds
in the pair's contexts). :class:`~dera_gguf.batch.generator.BatchGenerator` steps all of
them: one llama.cpp batch per model, each sequence's rows blended at its own weights,
biased, sampled by its own chain, emitted. Who runs where and when is decided apart
(:mod:`~dera_gguf.batch.scheduler`), as in vLLM's scheduler beside its executor. Several
choices of one request, dera-serve's slots and dera-eval generate all run on this.
"""
