"""dera-chat: chat with a realigned model, lam changed live.

    dera-chat --lam 1.5                       the default pair of models.toml
    dera-chat --pair smollm2-demo --lam 2
    dera-chat --ref sft.gguf --aligned dpo.gguf --lam 0.5
    echo "Write a haiku" | dera-chat --lam 2   one-shot: only the answer on stdout

The terminal loop lives here; the conversation itself (history, lam, settings,
answers) is a :class:`~dera_gguf.cli.chat_session.ChatSession`, whose answers are
plain ``DeRaLlama.create_chat_completion`` calls.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import threading
from typing import Callable, Dict, Optional, Tuple

import click

from ..blend import format_lam, parse_lams
from ..errors import ContextFullError, DeRaError
from ..sampling.settings import Sampling
from .chat_session import Answer, ChatSession
from .common import (
    initial_lam,
    lam_option,
    max_tokens_option,
    mode_option,
    model_options,
    reports_errors,
    sampling_options,
    speculative_option,
)

PROMPT = "you> "
QUIT = object()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options(draft=True)
@lam_option(
    "Realignment strength: 0 reference, 1 aligned, >1 stronger alignment; a comma list for "
    "several aligned models.  [default: the pair's lam, else 1.0]"
)
@mode_option()
@speculative_option("lookup", "model")
@click.option("--system", default=None, help="System prompt.")
@sampling_options()
@max_tokens_option("Tokens per answer.")
@click.option("--prompt", default=None, help="One-shot: answer this one message, print only the answer, exit.")
@click.option("--json", "as_json", is_flag=True, help="One-shot: print the OpenAI-shaped completion as JSON.")
@click.option(
    "--session",
    "session_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Go on from this saved session when it exists (/save writes one), and save the chat there on leaving.",
)
@reports_errors
def main(
    models,
    lam_text,
    mode,
    speculative,
    system,
    temperature,
    top_k,
    top_p,
    min_p,
    repeat_penalty,
    max_tokens,
    prompt,
    as_json,
    session_file,
):
    """Chat with a DeRa-realigned model; /help inside the chat lists the commands.

    Reads one prompt from --prompt or from a non-terminal stdin (one-shot mode), or
    else starts an interactive chat with streamed answers. With --seed every answer
    is sampled with that seed (reproducible from the history alone); without it each
    answer draws a fresh one.
    """
    lams = parse_lams(lam_text) if lam_text is not None else None  # refuse bad lam before loading
    one_shot_text = _one_shot_text(prompt, as_json)
    if session_file and one_shot_text is not None:
        raise DeRaError("--session goes with the interactive chat, not with --prompt, --json or a piped prompt")
    chosen = models.choose()
    if chosen.note:
        click.echo(chosen.note, err=True)
    lam = initial_lam(lams, chosen.pair, len(chosen.aligned))
    if one_shot_text is None:
        click.echo(f"loading {chosen.name} ...", err=True)
    llm = models.engine(chosen, lam, mode=mode, speculative=speculative)
    sampling = Sampling(temperature, top_k, top_p, min_p, repeat_penalty, max_tokens, models.seed)
    session = ChatSession(llm, lam=lam, mode=mode, system=system, sampling=sampling, session_file=session_file)
    if session_file and os.path.exists(session_file):
        _cmd_load(session, "")
    try:
        if one_shot_text is not None:
            _one_shot(session, one_shot_text, as_json)
        else:
            _leave_quietly_on_hangup()
            _interactive(session, chosen.name)
            if session_file:
                _cmd_save(session, "")
    except KeyboardInterrupt:  # Ctrl-C outside an answer in one-shot mode
        sys.exit(130)
    except OSError as e:
        if e.errno not in (errno.EIO, errno.EPIPE):
            raise
        # the terminal (EIO: as for SIGHUP) or the pipe went away: nobody is left to read an error
        _quit_quietly(128 + signal.SIGHUP if e.errno == errno.EIO else 1)
    except ContextFullError as e:
        raise ContextFullError(f"{e} (dera-chat: --n-ctx)") from None


# ------------------------------------------------------------------- set-up


def _one_shot_text(prompt: Optional[str], as_json: bool) -> Optional[str]:
    """The one-shot message: --prompt, else all of a non-terminal stdin; None: interactive."""
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()  # `echo text |` adds a newline the user did not type
    if prompt is None:
        if as_json:
            raise DeRaError("--json needs one-shot mode: give --prompt TEXT or pipe the prompt on stdin")
        return None
    if not prompt.strip():
        raise DeRaError("the prompt is empty (from --prompt or stdin)")
    return prompt


# ------------------------------------------------------------------ one-shot


def _one_shot(session: ChatSession, text: str, as_json: bool) -> None:
    """Print only the answer (streamed) or, with --json, the whole completion."""
    if as_json:
        click.echo(json.dumps(session.complete(text), ensure_ascii=False))
        return
    session.ask(text, on_text=_write)
    click.echo()


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


# --------------------------------------------------------------- interactive


def _interactive(session: ChatSession, name: str) -> None:
    """Read lines until Ctrl-D or /quit; slash commands, else a message to answer."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    click.echo(f"chatting with {name} at lam {format_lam(session.lam)}; /help for commands, Ctrl-D to leave", err=True)
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:  # Ctrl-D, or a terminal that is gone (then the newline fails: OSError, above)
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-D or /quit leaves)", err=True)
            continue
        if not line:
            continue
        try:
            if line.startswith("/"):
                if run_command(session, line) is QUIT:
                    return
            else:
                _answer(session, line)
        except ContextFullError as e:
            click.echo(f"error: {e} (dera-chat: /reset, or start again with a larger --n-ctx)", err=True)
        except DeRaError as e:  # a bad command argument, or llama.cpp failing on this history
            click.echo(f"error: {e}", err=True)


def _leave_quietly_on_hangup() -> None:
    """When the terminal goes away (SIGHUP: a closed window or tmux pane), end without a word.

    Python's default would be silent too, but an ignored SIGHUP (nohup) or a stream in
    progress would end in tracebacks written at a terminal that is gone.
    """
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda signum, frame: _quit_quietly(128 + signum))


def _quit_quietly(code: int) -> None:
    """Exit with ``code``, with the standard streams pointed at /dev/null (their terminal is gone)."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    raise SystemExit(code)


def _answer(session: ChatSession, text: str) -> None:
    with stop_on_ctrl_c() as should_stop:
        answer = session.ask(text, on_text=_write, should_stop=should_stop)
    _finish(answer)


def _finish(answer: Answer) -> None:
    """End the streamed answer's line and show the status line on stderr."""
    click.echo(" [interrupted]" if answer.interrupted else "")
    weights = " (weights)" if answer.mode == "weights" else ""
    status = (
        f"lam {format_lam(answer.lam)}{weights} · {answer.tokens} tokens · {answer.tokens_per_second:.1f} tok/s"
        + (" · interrupted" if answer.interrupted else "")
        + (" · drafts {}/{} passed".format(*answer.drafts) if answer.drafts is not None else "")
    )
    click.secho(status, err=True, dim=True)


@contextlib.contextmanager
def stop_on_ctrl_c():
    """While an answer streams, Ctrl-C sets a flag (checked between chunks) instead of raising.

    A KeyboardInterrupt raised inside llama-cpp-python could leave its state half
    updated; stopping between chunks ends the generator at a token boundary.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    flag = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        with _keep_output_on_ctrl_c():
            yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _keep_output_on_ctrl_c():
    """Set NOFLSH on the terminal meanwhile: by default Ctrl-C also discards output the
    terminal has not shown yet, so the screen could miss text the answer (and /history) has."""
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):  # stdin is not a terminal
        yield
        return
    attrs = list(saved)
    attrs[3] |= termios.NOFLSH
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):  # (a terminal that went away has nothing to restore)
            termios.tcsetattr(fd, termios.TCSANOW, saved)


# ------------------------------------------------------------ slash commands


def run_command(session: ChatSession, line: str):
    """Run one slash command; returns QUIT to leave the chat."""
    name, _, arg = line.partition(" ")
    entry = COMMANDS.get(name)
    if entry is None:
        raise DeRaError(f"unknown command {name}: /help lists the commands")
    return entry[0](session, arg.strip())


def _cmd_lam(session: ChatSession, arg: str):
    if arg:
        session.set_lam(parse_lams(arg))
    click.echo(f"lam {format_lam(session.lam)}", err=True)


def _cmd_mode(session: ChatSession, arg: str):
    if arg:
        session.set_mode(arg)
    note = " (the adapters at scale lam: an approximation of DeRa)" if session.mode == "weights" else ""
    click.echo(f"mode {session.mode}{note}", err=True)


def _cmd_sweep(session: ChatSession, arg: str):
    if not arg:
        raise DeRaError("give the lams to sweep, e.g. /sweep 0,0.5,1,2")
    lams = _sweep_lams(arg, session.lam)
    with stop_on_ctrl_c() as should_stop:
        session.sweep(
            lams,
            on_start=lambda lam: click.secho(f"--- lam {format_lam(lam)} ---", bold=True),
            on_text=_write,
            should_stop=should_stop,
            on_answer=_finish,
        )


def _sweep_lams(arg: str, current) -> list:
    """``0,0.5,1`` for one aligned model; ``0,1 0.5,0.5`` (one comma list each) for several."""
    if not isinstance(current, tuple):
        return parse_lams(",".join(re.split(r"[\s,]+", arg.strip())))
    groups = [tuple(parse_lams(group)) for group in arg.replace(";", " ").split()]
    for group in groups:
        if len(group) != len(current):
            raise DeRaError(
                f"each /sweep entry needs {len(current)} comma-separated lams (one per aligned "
                "model), entries separated by spaces, e.g. /sweep 0,0 0.5,0.5"
            )
    return groups


def _cmd_system(session: ChatSession, arg: str):
    session.set_system(arg)
    click.echo(f"system prompt set: {arg}" if arg else "system prompt cleared", err=True)


def _cmd_reset(session: ChatSession, arg: str):
    session.reset()
    click.echo("conversation cleared", err=True)


def _cmd_history(session: ChatSession, arg: str):
    labels = {"system": "system", "user": "you", "assistant": "assistant"}
    if session.system:
        click.echo(f"system: {session.system}")
    for i, message in enumerate(session.history):
        mark = " [interrupted]" if i in session.partial else ""
        click.echo(f"{labels.get(message['role'], message['role'])}: {message['content']}{mark}")
    if not session.history:
        click.echo("(no messages yet)", err=True)


def _cmd_save(session: ChatSession, arg: str):
    path = _session_path(arg, session)
    session.save(path)
    click.echo(f"saved the session in {path}", err=True)


def _cmd_load(session: ChatSession, arg: str):
    path = _session_path(arg, session)
    session.load(path)
    click.echo(f"loaded {path}: {len(session.history)} messages, lam {format_lam(session.lam)}", err=True)


def _session_path(arg: str, session: ChatSession) -> str:
    path = arg or session.session_file
    if not path:
        raise DeRaError("give a file name, e.g. /save chat.dera (or start dera-chat with --session FILE)")
    return os.path.expanduser(path)


def _cmd_help(session: ChatSession, arg: str):
    for name, (_, text) in COMMANDS.items():
        click.echo(f"  {name:<9} {text}")
    click.echo("  Ctrl-C stops an answer (kept, marked interrupted); Ctrl-D leaves.")


def _cmd_quit(session: ChatSession, arg: str):
    return QUIT


COMMANDS: Dict[str, Tuple[Callable, str]] = {
    "/lam": (_cmd_lam, "X: change lam for the following answers (comma list for several aligned models)"),
    "/mode": (_cmd_mode, "blend|weights: DeRa's blend, or the adapters at scale lam (LoRA pairs; an approximation)"),
    "/sweep": (_cmd_sweep, "0,0.5,1,2: answer the last message once per lam; the history is unchanged"),
    "/system": (_cmd_system, "TEXT: set the system prompt (no TEXT: clear it)"),
    "/reset": (_cmd_reset, "forget the conversation"),
    "/history": (_cmd_history, "show the conversation"),
    "/save": (_cmd_save, "FILE: save the conversation, lam, settings and the models' state (FILE: --session's)"),
    "/load": (_cmd_load, "FILE: go on from a saved session (of this pair), without recomputing it"),
    "/help": (_cmd_help, "this list"),
    "/quit": (_cmd_quit, "leave (Ctrl-D too)"),
}


if __name__ == "__main__":
    main()
