"""Judges for the dera-eval judge tests: llama-cpp-python's own server with a real small model, a
recording proxy in front of it, and a scripted judge that answers what a test tells it to.

Every server listens on 127.0.0.1 at a free port; every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import httpx
from serve_driver import free_port

START_TIMEOUT = 90.0


class LlamaCppServer:
    """``python -m llama_cpp.server --model MODEL`` (llama-cpp-python's own server), one thread, greedy when
    asked at temperature 0."""

    def __init__(self, model: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048"]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama_cpp.server did not start in time")

    def ask(self, body: dict) -> str:
        """The reply text to one chat completion request."""
        response = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=300)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)


class _Server:
    """A threading HTTP server on a free local port whose POSTs go to ``self.post(handler, body)``."""

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                owner.post(self, self.rfile.read(length))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def post(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        raise NotImplementedError


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json") -> None:
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away


def completion(text: str) -> bytes:
    """A chat completion whose reply is ``text``, as an OpenAI-compatible server sends it."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()


class RecordingProxy(_Server):
    """Forwards every request to ``target`` and records it: ``forwarded`` holds (request body, response body).

    With ``hold_at=n``, the n-th request (1-based) is held: not forwarded, its client left waiting until
    :meth:`release`, then answered 502; ``held`` is set when it arrives.
    """

    def __init__(self, target: str, hold_at: Optional[int] = None):
        self.target, self.hold_at = target, hold_at
        self.forwarded: List[Tuple[dict, dict]] = []
        self.seen = 0
        self.lock = threading.Lock()
        self.held = threading.Event()
        self.released = threading.Event()
        self.start()

    def post(self, handler, body: bytes) -> None:
        with self.lock:
            self.seen += 1
            hold = self.seen == self.hold_at
        if hold:
            self.held.set()
            self.released.wait(timeout=120)
            return send(handler, 502, b"held by the test")
        with self.lock:  # one at a time, in the order they came: the server's own order
            headers = {"Content-Type": "application/json"}
            response = httpx.post(self.target + "/v1/chat/completions", content=body, headers=headers, timeout=300)
            self.forwarded.append((json.loads(body), response.json()))
        send(handler, response.status_code, response.content)

    def release(self) -> None:
        self.released.set()


class ScriptedJudge(_Server):
    """Answers each request with ``script(prompt, n)`` -> (HTTP status, body bytes), n counting that prompt's
    requests from 1; records (arrival time, prompt)."""

    def __init__(self, script: Callable[[str, int], Tuple[int, bytes]]):
        self.script = script
        self.arrivals: List[Tuple[float, str]] = []
        self.lock = threading.Lock()
        self.start()

    def post(self, handler, body: bytes) -> None:
        prompt = json.loads(body)["messages"][0]["content"]
        with self.lock:
            self.arrivals.append((time.monotonic(), prompt))
            n = sum(p == prompt for _, p in self.arrivals)
        status, answer = self.script(prompt, n)
        send(handler, status, answer)
