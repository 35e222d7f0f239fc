"""dera-serve: DeRa-realigned models behind an OpenAI-compatible HTTP API, λ chosen per request.

    from dera_gguf.serve import Catalog, ServedPair, ServeSettings, create_app

Needs the ``serve`` extra (``pip install 'dera-gguf[serve]'``). The command is
``dera-serve`` (:mod:`dera_gguf.cli.serve`); the modules, one concept each:
:mod:`.app` (routes, API key, where a request goes), :mod:`.catalog` (pairs, ``PAIR@λ``
aliases, what a request asks), :mod:`.schema` (request bodies, call arguments, what a batch
honours), :mod:`.plan` (what a batched request decodes), :mod:`.shapes` (OpenAI shapes of
batched answers), :mod:`.choices` (several choices), :mod:`.parallel` (answers on slots),
:mod:`.engine_call` and :mod:`.echo` (one answer on the engine), :mod:`.logprobs`,
:mod:`.prompts` (several prompts in one request), :mod:`.tokenizer` (tokenizer routes),
:mod:`.stream` (SSE), :mod:`.wire` (plain JSON), :mod:`.errors` (OpenAI-shaped errors),
:mod:`.server` (uvicorn, SIGTERM / Ctrl-C).
"""

from .app import ServeSettings, create_app
from .catalog import Catalog, ServedPair

__all__ = ["Catalog", "ServedPair", "ServeSettings", "create_app"]
