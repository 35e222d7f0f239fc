"""A loopback stand-in for the Hugging Face hub's file endpoint, for download tests.

It answers ``HEAD`` and ``GET /{org}/{name}/resolve/{revision}/{file}`` as the hub does for an
LFS file (``X-Repo-Commit``, a sha256 ``ETag``, ``Content-Length``, HTTP ranges), and the hub's
error codes for unknown repos, files and gated repos, so huggingface_hub talks to it through
``HF_ENDPOINT`` exactly as to the real hub. Nothing leaves the machine. Each repository is also
served as a dataset (``/datasets/{org}/{name}/resolve/...``), with the API calls that
``snapshot_download`` makes first: the revision's commit and the file tree.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

COMMIT = "c0ffee" + "0" * 34
_PATH = re.compile(r"^/(?:datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/(?:models|datasets)/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|tree)/(?P<rev>[^/]+)")


@dataclass
class FakeHub:
    """Files by ``(repo, file)``; ``delay`` seconds between ``chunk``-byte pieces (to interrupt a download)."""

    files: Dict[Tuple[str, str], bytes]
    delay: float = 0.0
    chunk: int = 4096
    claimed_size: Optional[int] = None  # a size to announce instead of the real one
    gated: Tuple[str, ...] = ()
    corrupt: bool = False  # announce the sha256 of other bytes than those sent
    requests: List[Tuple[str, str, dict]] = field(default_factory=list)  # (method, path, headers)

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def gets(self) -> List[Tuple[str, Optional[str]]]:
        """The GET requests so far: (path, Range header)."""
        return [(path, headers.get("range")) for method, path, headers in self.requests if method == "GET"]

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}))
        repos = {repo for repo, _ in self.files}
        api = _API.match(handler.path.split("?")[0])
        if api is not None:
            return self._api(handler, api, repos)
        match = _PATH.match(handler.path.split("?")[0])
        if match is None or match["repo"] not in repos:
            return _error(handler, 404, "RepoNotFound")
        if match["repo"] in self.gated:
            return _error(handler, 403, "GatedRepo")
        data = self.files.get((match["repo"], match["file"]))
        if data is None:
            return _error(handler, 404, "EntryNotFound")
        start = _range_start(handler.headers.get("Range"))
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(data + b"x" * self.corrupt).hexdigest()}"')
        handler.send_header("Accept-Ranges", "bytes")
        size = self.claimed_size if self.claimed_size is not None and not body else len(data)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(size - start))
        handler.end_headers()
        if body:
            self._send(handler, data[start:])

    def _api(self, handler: BaseHTTPRequestHandler, match: re.Match, repos: set) -> None:
        """A repository's revision (its commit, its files) or its file tree, as the hub's API answers them."""
        if match["repo"] not in repos:
            return _error(handler, 404, "RepoNotFound")
        files = sorted((f, data) for (repo, f), data in self.files.items() if repo == match["repo"])
        if match["what"] == "revision":
            answer = {"id": match["repo"], "sha": COMMIT, "siblings": [{"rfilename": f} for f, _ in files]}
        else:
            answer = [
                {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": f}
                for f, data in files
            ]
        body = json.dumps(answer).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _send(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        try:
            for i in range(0, len(data), self.chunk):
                handler.wfile.write(data[i : i + self.chunk])
                handler.wfile.flush()
                if self.delay:
                    time.sleep(self.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (an interrupted download)


def _range_start(header: Optional[str]) -> int:
    match = re.match(r"bytes=(\d+)-$", header or "")
    return int(match.group(1)) if match else 0


def _error(handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
    handler.send_response(status)
    handler.send_header("X-Error-Code", code)
    handler.send_header("Content-Length", "0")
    handler.end_headers()
