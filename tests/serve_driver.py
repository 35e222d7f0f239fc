"""Drive a real dera-serve process: start it on a free local port, read SSE, stop it with a signal.

The server runs this worktree's code (``cli_env``: PYTHONPATH at the repository root) in
a subprocess; its output goes to a file (a pipe nobody reads could fill and stall it).
Every wait here is bounded.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import httpx
from chat_driver import ROOT

START_TIMEOUT = 60.0  # seconds for the process to answer /v1/models (imports and model loads)


def tiny_pair(folder: Path) -> List[Path]:
    """A reference and an aligned tiny random llama (seeds 1 and 2, printable vocabulary) in ``folder``."""
    from test_chat import printable_vocab
    from tiny_models import write_tiny_llama

    return [write_tiny_llama(folder / f"{n}.gguf", seed=s, vocab=printable_vocab()) for n, s in [("r", 1), ("a", 2)]]


def pair_toml(folder: Path, paths: List[Path], name: str = "tiny", template: Optional[str] = None) -> Path:
    """A models.toml in ``folder`` naming the pair ``paths`` (reference, aligned) ``name`` (with its own
    chat ``template`` if given)."""
    toml = folder / "models.toml"
    entry = f'[pairs.{name}]\nreference = {{ path = "{paths[0]}" }}\naligned = [{{ path = "{paths[1]}" }}]\n'
    if template is not None:
        entry += f"chat_template = '''{template}'''\n"
    toml.write_text(entry)
    return toml


def tiny_server(tmp_path_factory, paths: List[Path], *args: str, template: Optional[str] = None):
    """dera-serve (a :class:`ServerProcess`) on the tiny pair ``paths``, named ``tiny``, with ``args``;
    a generator for a pytest fixture: stopped with SIGTERM after, its exit status checked."""
    from chat_driver import cli_env

    toml = pair_toml(tmp_path_factory.mktemp("pairs"), paths, template=template)
    proc = ServerProcess(["--pair", "tiny", *args], cli_env(toml), tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    assert proc.stop(signal.SIGTERM) == 0, proc.log()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m dera_gguf.cli.serve ARGS`` on 127.0.0.1 and a free port."""

    def __init__(self, args: List[str], env: dict, log_path: Path, api_key: Optional[str] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        key = ["--api-key", api_key] if api_key else []
        command = [sys.executable, "-m", "dera_gguf.cli.serve", *args, *key, "--host", "127.0.0.1"]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)], env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dera-serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v1/models", headers=self.headers, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"dera-serve did not answer within {START_TIMEOUT} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status (killed after ``timeout`` seconds)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


def sse_json(lines: Iterator[str]) -> List[object]:
    """Every event of a stream: decoded JSON, or the literal ``"[DONE]"``."""
    return [d if d == "[DONE]" else json.loads(d) for d in sse_data(lines)]


def chunk_text(chunks: List[object], chat: bool = True) -> str:
    """The text of streamed chunks (chat deltas or completion texts)."""
    out = []
    for c in chunks:
        if isinstance(c, dict) and c.get("choices"):
            choice = c["choices"][0]
            out.append((choice.get("delta", {}).get("content") if chat else choice.get("text")) or "")
    return "".join(out)


def finish_reason(chunks: List[object]) -> Optional[str]:
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if isinstance(c, dict) and c.get("choices")]
    return next((r for r in reversed(reasons) if r), None)
