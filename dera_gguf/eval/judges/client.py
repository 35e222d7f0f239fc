"""One judge request: an OpenAI-compatible chat completion at temperature 0, retried, rate-limited.

Any server of ``POST {url}/chat/completions`` will do: a hosted model (OpenAI and the many APIs
shaped like it), llama.cpp's ``llama-server``, llama-cpp-python's server, or dera-serve. A request
that times out, cannot connect, or gets a 408, 409, 425, 429 or 5xx answer, or an answer that is not a
chat completion, is tried again after a back-off that doubles (a ``Retry-After`` header, when there
is one, is honoured); other refusals (a wrong key, model or address) are not. What comes back is
the reply's text, or why there is none: never an exception, so a failing judge marks its
questions and the sweep goes on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import httpx

RETRIED_STATUS = {408, 409, 425, 429}
MAX_WAIT = 60.0  # seconds: the longest back-off or Retry-After honoured between tries


@dataclass(frozen=True)
class Endpoint:
    """Where the judge is and how it is asked.

    Args:
        url: the API's base address, up to ``/v1`` (``http://127.0.0.1:8080/v1``); requests go to
            ``{url}/chat/completions``.
        model: the ``model`` field of the request (a local server with one model may ignore it).
        key: sent as ``Authorization: Bearer KEY`` (None: no such header, as local servers want).
        max_tokens: the longest reply asked for.
        timeout: seconds one try may take.
    """

    url: str
    model: str
    key: Optional[str] = None
    max_tokens: int = 512
    timeout: float = 120.0

    def body(self, prompt: str) -> dict:
        """The request for ``prompt``: one user message, temperature 0, not streamed."""
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "stream": False,
        }


class Reply(NamedTuple):
    """A judge's answer: its text, or ``error`` saying why there is none; ``tries`` requests were made."""

    text: Optional[str]
    error: Optional[str]
    tries: int


class RateLimit:
    """At most ``rpm`` requests started per minute, across threads: each waits for its turn."""

    def __init__(self, rpm: Optional[float], clock: Callable[[], float] = time.monotonic):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.clock = clock
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self.lock:
            now = self.clock()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            stop.wait(start - now)


class JudgeClient:
    """Asks ``endpoint`` one prompt at a time per calling thread (it is shared by a pool of them).

    Args:
        retries: further tries after a failed one (see the module docstring for what is retried).
        backoff: seconds before the first retry; doubled for each next one (at most ``MAX_WAIT``).
        rpm: requests per minute at most (None: no limit), every try counted.
    """

    def __init__(self, endpoint: Endpoint, retries: int = 3, backoff: float = 1.0, rpm: Optional[float] = None):
        self.endpoint, self.retries, self.backoff = endpoint, retries, backoff
        self.limit = RateLimit(rpm)
        self.stop = threading.Event()  # set: no new try starts (the sweep is over or interrupted)
        headers = {"Authorization": f"Bearer {endpoint.key}"} if endpoint.key else {}
        self.http = httpx.Client(base_url=endpoint.url.rstrip("/"), headers=headers, timeout=endpoint.timeout)

    def close(self) -> None:
        self.stop.set()
        self.http.close()

    def ask(self, prompt: str) -> Reply:
        """The judge's reply to ``prompt``, tried up to ``1 + retries`` times."""
        error = "not asked (the sweep stopped)"
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                return Reply(None, error, attempt)
            self.limit.wait(self.stop)
            text, error, wait = self._try(prompt)
            if text is not None:
                return Reply(text, None, attempt + 1)
            if wait is None or attempt == self.retries:
                return Reply(None, error, attempt + 1)
            self.stop.wait(min(wait if wait > 0 else self.backoff * 2**attempt, MAX_WAIT))
        return Reply(None, error, self.retries + 1)

    def _try(self, prompt: str) -> tuple:
        """One request: ``(text, None, None)``, or ``(None, why, seconds to wait or 0 for the back-off)`` when
        it may be tried again, or ``(None, why, None)`` when it may not."""
        try:
            response = self.http.post("/chat/completions", json=self.endpoint.body(prompt))
        except httpx.TimeoutException:
            return None, f"no answer within {self.endpoint.timeout:g} s", 0.0
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}", 0.0
        status = response.status_code
        if status >= 400:
            detail = f"HTTP {status}: {response.text[:300]}"
            if status in RETRIED_STATUS or status >= 500:
                return None, detail, retry_after(response)
            return None, detail, None
        try:
            text = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"not a chat completion (HTTP {status}): {response.text[:300]!r}", 0.0
        if not isinstance(text, str):
            return None, f"the completion's content is {type(text).__name__}, not text", 0.0
        return text, None, None


def retry_after(response: httpx.Response) -> float:
    """The seconds a ``Retry-After`` header asks for (0: none given, use the back-off)."""
    try:
        return max(float(response.headers.get("retry-after", 0)), 0.0)
    except ValueError:
        return 0.0
