"""Open WebUI in a real browser against dera-serve: a chat of three turns at one λ, then a fourth
after switching λ in Open WebUI's model menu; every request dera-serve saw must be answered 2xx.

    /work/owui-venv/bin/python scripts/openwebui_check.py --screenshot /tmp/owui.png

Needs (none of it is in this project's dependencies; scripts/ is not installed):

- Open WebUI and Playwright in a virtual environment of their own, the one that runs this script:
  ``python3 -m venv /work/owui-venv && /work/owui-venv/bin/pip install torch==2.13.0 &&
  /work/owui-venv/bin/pip install open-webui playwright`` (torch first: the CPU wheel on disk).
- Chromium from Debian (``apt-get install -y chromium``: /usr/bin/chromium); Playwright drives it,
  its own browser download (``playwright install``) is not needed.
- This checkout's dera-serve dependencies in another Python (``--dera-python``, default
  /work/venv/bin/python): the demo pair needs no download. ``--dera-root`` runs another source tree
  (e.g. ``git archive HEAD`` unpacked somewhere, to test what is committed).

It starts dera-serve (``--pair smollm2-demo``) and Open WebUI (offline, no login, no Ollama, no
embedding model) on free local ports, with their logs in ``--workdir``. Open WebUI reaches
dera-serve through a small recording proxy in this script, which writes every request's body and
the status it got to ``requests.jsonl`` (the bodies of refused requests are printed). The checks:
each turn gets an answer on the page from the model picked in the menu, and every line of
dera-serve's own access log is a 2xx. Times are from the click on send to the answer's action
buttons on the page (the answer done), and to Open WebUI idle again (its title, tag and
follow-up requests done too). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web
from playwright.sync_api import Page, sync_playwright

REPO = Path(__file__).resolve().parent.parent
PAIR = "smollm2-demo"
# (model picked in the menu, message): three turns at one λ, then λ switched in the menu
TURNS = [
    (f"{PAIR}@1.5", "Tell me about cats in two sentences."),
    (f"{PAIR}@1.5", "What do they like to eat?"),
    (f"{PAIR}@1.5", "And how long do they sleep?"),
    (f"{PAIR}@0.5", "Now tell me one thing about dogs."),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
# Open WebUI's background tasks, told apart by their prompt's wording (0.12.4)
TASK_NAMES = {"concise title": "title", "tags categorizing": "tags", "useful messages": "follow-ups"}
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


@dataclass
class Turn:
    """One message sent in the browser and what came back."""

    model: str
    message: str
    answer_s: float | None = None
    idle_s: float | None = None
    shown_model: str = ""
    answer: str = ""
    problems: list[str] = field(default_factory=list)


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    """A local TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, name: str) -> None:
    """Wait until ``url`` answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with status {proc.returncode} before it served {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{name} did not serve {url} within {timeout:.0f} s")


def start_dera_serve(python: str, root: Path, port: int, log: Path) -> subprocess.Popen:
    """dera-serve from the source tree ``root``, serving the demo pair; its uvicorn access log goes to ``log``."""
    cmd = [python, "-m", "dera_gguf.cli.serve", "--pair", PAIR, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)


def open_webui_env(api_url: str, data_dir: Path) -> dict[str, str]:
    """Settings for a single-user Open WebUI that never reaches the internet."""
    return {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "WEBUI_AUTH": "false",  # one user, no login page
        "WEBUI_SECRET_KEY": secrets.token_hex(32),  # else it writes .webui_secret_key into the cwd
        "OFFLINE_MODE": "true",  # no version check, no model downloads (sets HF_HUB_OFFLINE)
        "HF_HUB_OFFLINE": "1",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "RAG_EMBEDDING_MODEL": "",  # no sentence-transformers model to load at start
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
        "ENABLE_OLLAMA_API": "false",
        "OPENAI_API_BASE_URL": api_url,
        "OPENAI_API_KEY": "none",
        "ENABLE_PERSISTENT_CONFIG": "false",  # these settings win over what DATA_DIR holds
    }


def start_open_webui(exe: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``open-webui serve`` on 127.0.0.1:``port``, run in its data folder."""
    cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=env["DATA_DIR"], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, name: str) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop on SIGTERM: killed", file=sys.stderr)
        proc.kill()
        proc.wait()


# --- the recording proxy -----------------------------------------------------------------------


class RecordingProxy:
    """Forwards every request to dera-serve unchanged (streams too) and records method, path, body and
    status in a JSON-lines file, with how long the answer took and its tokens (the first 4 kB of a
    non-2xx answer instead)."""

    def __init__(self, target: str, record_path: Path):
        self.target = target
        self.record_path = record_path
        self.records: list[dict] = []
        self.loop = asyncio.new_event_loop()

    def start(self, port: int) -> None:
        """Serve on 127.0.0.1:``port`` from a thread of its own."""
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(port), self.loop).result(timeout=30)

    async def _serve(self, port: int) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        record = {"time": time.time(), "method": request.method, "path": request.path_qs, "body": _json_or_text(body)}
        url = self.target + request.path_qs
        async with self.session.request(request.method, url, headers=headers, data=body) as upstream:
            record["status"] = upstream.status
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            kept = b""
            try:
                async for chunk in upstream.content.iter_any():
                    kept += chunk[: 2**20 - len(kept)]
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                record["client_left"] = True
        record["seconds"] = time.time() - record["time"]
        if 200 <= upstream.status < 300:
            record["tokens"] = answer_tokens(kept)
        else:
            record["answer"] = _json_or_text(kept[:4096])
        self._keep(record)
        return response

    def _keep(self, record: dict) -> None:
        self.records.append(record)
        with self.record_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def answer_tokens(data: bytes) -> int | None:
    """Completion tokens of an answer: its usage, or for a stream the chunks that carry text."""
    if not data.startswith(b"data:"):
        answer = _json_or_text(data)
        return answer.get("usage", {}).get("completion_tokens") if isinstance(answer, dict) else None
    chunks = 0
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            chunks += bool(choices[0].get("delta", {}).get("content"))
    return chunks


def _json_or_text(data: bytes):
    """A body as JSON where it is JSON, else as text."""
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


# --- the browser -------------------------------------------------------------------------------


def open_chat(page: Page, url: str) -> None:
    """Load Open WebUI and close the release-notes dialog it shows a new user."""
    page.goto(url)
    page.locator("#model-selector-model-button").wait_for(timeout=120_000)
    try:
        page.get_by_text("Okay, Let's Go!").click(timeout=10_000)
    except Exception:  # no dialog this time
        pass


def pick_model(page: Page, model: str) -> None:
    """Choose ``model`` in the model menu (the menu above the chat or in the message bar)."""
    page.locator("#model-selector-model-button").click()
    page.locator(f'button[role="option"][data-value="{model}"]').click()
    shown = page.locator("#model-selector-model-button").inner_text().strip()
    if shown != model:
        raise RuntimeError(f"the model menu shows {shown!r} after picking {model!r}")


def send(page: Page, turn: Turn, index: int, timeout_s: float) -> None:
    """Type and send ``turn.message``; wait for answer number ``index`` (0-based) to finish on the page,
    then for Open WebUI to be idle (no Stop button: its background requests done)."""
    page.locator("#chat-input").click()
    page.keyboard.type(turn.message)
    answers = page.locator("div[id^='message-']:has(.chat-assistant)")
    done = answers.nth(index).locator("button[aria-label='Regenerate']")  # the answer's action buttons
    busy = page.locator("button[aria-label='Stop']").first
    start = time.monotonic()
    page.locator("#send-message-button").click()
    try:
        done.wait_for(state="attached", timeout=timeout_s * 1000)
        turn.answer_s = time.monotonic() - start
        busy.wait_for(state="hidden", timeout=timeout_s * 1000)
        turn.idle_s = time.monotonic() - start
    except Exception as e:  # Playwright's TimeoutError
        turn.problems.append(f"no answer on the page: {type(e).__name__}")
        return
    turn.shown_model = answers.nth(index).locator("#response-message-model-name").inner_text().strip()
    turn.answer = answers.nth(index).locator("#response-content-container").inner_text().strip()
    if not turn.answer:
        turn.problems.append("empty answer")
    if turn.shown_model != turn.model:
        turn.problems.append(f"answered by {turn.shown_model!r}, picked {turn.model!r}")


def chat_in_browser(url: str, screenshot: Path, timeout_s: float) -> list[Turn]:
    """Hold the chat of ``TURNS`` in headless Chromium; a screenshot of the page at the end. The empty
    profile folder goes through launch_persistent_context (Playwright refuses --user-data-dir in args)."""
    turns = [Turn(model, message) for model, message in TURNS]
    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path="/usr/bin/chromium",
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        page = browser.pages[0] if browser.pages else browser.new_page()
        open_chat(page, url)
        picked = None
        for i, turn in enumerate(turns):
            if turn.model != picked:
                pick_model(page, turn.model)
                picked = turn.model
            send(page, turn, i, timeout_s)
            print(f"turn {i + 1} ({turn.model}): answer {_secs(turn.answer_s)}, idle {_secs(turn.idle_s)}", flush=True)
            if turn.problems:
                break
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return turns


# --- the report --------------------------------------------------------------------------------


def access_log_counts(log: Path) -> Counter:
    """(method, path, status) of every request in a uvicorn access log."""
    counts = Counter()
    for line in log.read_text(errors="replace").splitlines():
        m = ACCESS_LINE.search(line)
        if m:
            counts[(m["method"], m["path"].split("?")[0], int(m["status"]))] += 1
    return counts


def request_kind(record: dict) -> str:
    """What a request was for: the chat's answer (streamed) or one of Open WebUI's background tasks."""
    body = record.get("body")
    if not isinstance(body, dict) or "messages" not in body:
        return f"{record['method']} {record['path']}"
    if body.get("stream"):
        return "answer"
    task = str(body["messages"][-1].get("content", ""))
    return next((name for key, name in TASK_NAMES.items() if key in task), "other task")


def print_summary(turns: list[Turn], counts: Counter, records: list[dict]) -> list[str]:
    """Print answer times, requests by route and status and the fields Open WebUI sent; return the failures."""
    failures = []
    streams = [r for r in records if request_kind(r) == "answer"] + [None] * len(turns)
    print("\nturns (seconds from send; tokens and seconds of the streamed answer at dera-serve):")
    for i, t in enumerate(turns, 1):
        r = streams[i - 1]
        served = "-" if r is None else f"{r.get('tokens')} tok in {r['seconds']:.2f} s"
        print(f"  {i}. {t.model:<17} answer {_secs(t.answer_s):>7}  idle {_secs(t.idle_s):>7}  ({served})")
        print(f"     {t.answer[:100]!r}")
        failures += [f"turn {i}: {p}" for p in t.problems]
        if t.answer_s is None and not t.problems:
            failures.append(f"turn {i}: not sent")
    print("\ndera-serve's access log (method, path, status):")
    for (method, path, status), n in sorted(counts.items()):
        print(f"  {n:4d}  {method} {path} {status}")
        if not 200 <= status < 300:
            failures.append(f"{n} × {method} {path} answered {status}")
    if not counts:
        failures.append("dera-serve's access log holds no request")
    print("\nrequests through the proxy (kind, model, status): count, seconds and tokens each")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        model = r["body"].get("model", "") if isinstance(r.get("body"), dict) else ""
        groups.setdefault((request_kind(r), model, r["status"]), []).append(r)
    for (kind, model, status), rs in sorted(groups.items()):
        secs = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        tokens = ", ".join(str(r.get("tokens")) for r in rs) if model else "-"
        print(f"  {len(rs):3d}  {kind:<14} {model:<17} {status}  s: {secs}  tok: {tokens}")
    print_fields(records)
    for r in records:
        if not 200 <= r["status"] < 300:
            print(f"\nREFUSED {r['method']} {r['path']} {r['status']}\n  body: {json.dumps(r['body'])}")
            print(f"  answer: {json.dumps(r.get('answer'))}")
    return failures


def print_fields(records: list[dict]) -> None:
    """The body fields Open WebUI sent, with how many requests had each (and the tools' size)."""
    bodies = [r["body"] for r in records if isinstance(r.get("body"), dict)]
    fields = Counter(k for b in bodies for k in b)
    print("\nfields Open WebUI sent (requests with it): " + ", ".join(f"{k} {n}" for k, n in sorted(fields.items())))
    tools = [b["tools"] for b in bodies if b.get("tools")]
    if tools:
        names = sorted({t.get("function", {}).get("name", "?") for ts in tools for t in ts})
        print(f"  tools: {max(map(len, tools))} function specs, {max(len(json.dumps(t)) for t in tools)} chars of JSON")
        print(f"  ({', '.join(names)})")


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f} s"


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screenshot", type=Path, required=True, help="PNG of the page at the end")
    parser.add_argument("--workdir", type=Path, help="logs and Open WebUI's data (default: a new temp folder)")
    parser.add_argument("--dera-python", default="/work/venv/bin/python", help="Python that runs dera-serve")
    parser.add_argument(
        "--dera-root", type=Path, default=REPO, help="source tree whose dera-serve runs (default: this checkout)"
    )
    parser.add_argument(
        "--open-webui", default=str(Path(sys.executable).parent / "open-webui"), help="the open-webui command"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds a turn may take")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="owui-check-"))
    (work / "owui-data").mkdir(parents=True, exist_ok=True)
    dera_port, proxy_port, owui_port = free_port(), free_port(), free_port()
    print(f"Open WebUI {version('open-webui')}; logs in {work}", flush=True)

    dera = start_dera_serve(args.dera_python, args.dera_root, dera_port, work / "dera-serve.log")
    owui = None
    try:
        wait_http(f"http://127.0.0.1:{dera_port}/v1/models", dera, 300, "dera-serve")
        proxy = RecordingProxy(f"http://127.0.0.1:{dera_port}", work / "requests.jsonl")
        proxy.start(proxy_port)
        env = open_webui_env(f"http://127.0.0.1:{proxy_port}/v1", work / "owui-data")
        owui = start_open_webui(args.open_webui, owui_port, env, work / "open-webui.log")
        started = time.monotonic()
        wait_http(f"http://127.0.0.1:{owui_port}/health", owui, 600, "Open WebUI")
        print(f"Open WebUI up after {time.monotonic() - started:.0f} s", flush=True)
        turns = chat_in_browser(f"http://127.0.0.1:{owui_port}/", args.screenshot, args.timeout)
    finally:
        if owui is not None:
            stop(owui, "Open WebUI")
        stop(dera, "dera-serve")
    failures = print_summary(turns, access_log_counts(work / "dera-serve.log"), proxy.records)
    print(f"\nscreenshot: {args.screenshot}")
    for f in failures:
        print(f"FAIL: {f}")
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
