"""dera-serve: DeRa-realigned models behind an OpenAI-compatible HTTP API, λ chosen per request.

    from dera_gguf.serve import Catalog, ServedPair, ServeSettings, create_app

Needs the ``serve`` extra (``pip install 'dera-gguf[serve]'``). The command is
``dera-serve`` (:mod:`dera_gguf.cli.serve`); the modules, one concept each:
:mod:`.catalog` (pairs, ``PAIR@λ`` aliases, a request's λ), :mod:`.schema` (request
bodies and the engine call), :mod:`.stream` (SSE), :mod:`.errors` (OpenAI-shaped
errors), :mod:`.app` (routes, API key, one request at a time per pair), :mod:`.server`
(uvicorn, and how SIGTERM / Ctrl-C stop it).
"""

from .app import ServeSettings, create_app
from .catalog import Catalog, ServedPair

__all__ = ["Catalog", "ServedPair", "ServeSettings", "create_app"]
