"""What a judge is asked about a sweep's samples, and what its verdicts make of each sample.

A question is one judge request: single-answer grading asks one per (row, λ, sample, turn);
pairwise asks two per (row, λ, sample, turn) and baseline λ, the answers shown in both orders
(λ's first, then the baseline's first), so that a judge's liking for the first or the second place
cancels out. Each question's key names the judge (a hash of its settings and prompt text) and
what is judged, so a resumed run asks only what it lacks and another prompt asks anew.

Outcomes, per sample: single, the mean of its turns' grades; pairwise, per turn a win when both
orders prefer λ's answer, a loss when both prefer the baseline's, else a tie, and the sample's
win / tie / loss shares over its turns. A sample with a question that failed (no reply, or a
reply without a grade or verdict) has no outcome and counts as failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..data import Row
from .prompts import JudgePrompt, pairwise_values, single_values

# a judgment's status: a grade or verdict read; a reply without one; no reply at all (asked again next run)
OK, UNRATED, ERROR = "ok", "unrated", "error"

Exchange = Tuple[str, str]  # (role, text)


@dataclass(frozen=True)
class Question:
    """One judge request: its key, what it judges (``about``: row, line, λ, sample, turn, ...) and its text."""

    key: str
    about: Dict[str, Any]
    prompt: str


def lam_name(lam: float) -> str:
    """How a λ appears in metric names: ``win_rate_vs_1``, ``win_rate_vs_0.5``."""
    return f"{float(lam):g}"


def turns_of(row: Row, record: Mapping[str, Any]) -> List[Tuple[List[Exchange], str, str]]:
    """``(history, question, answer)`` per turn of a sample: a row of turns turn by turn (its own answers in
    the history); a row of messages, its last user message after the messages before it; a prompt, alone."""
    if row.turns is not None:
        answers = record["responses"]
        out = []
        for t, (question, answer) in enumerate(zip(row.turns, answers)):
            history = [x for u, a in zip(row.turns[:t], answers[:t]) for x in (("user", u), ("assistant", a))]
            out.append((history, question, answer))
        return out
    if row.messages is not None:
        users = [i for i, m in enumerate(row.messages) if m["role"] == "user"]
        last = users[-1] if users else len(row.messages) - 1
        history = [(m["role"], m["content"]) for m in row.messages[:last]]
        return [(history, row.messages[last]["content"], record["response"])]
    return [([], row.prompt or "", record["response"])]


def single_questions(judge: str, prompt: JudgePrompt, row: Row, record: Mapping[str, Any]) -> List[Question]:
    """The grading questions of one sample, one per turn."""
    out = []
    for t, (history, question, answer) in enumerate(turns_of(row, record)):
        about = about_of(record, t)
        text = prompt.render(single_values(history, question, answer))
        out.append(Question(key_of(judge, about), about, text))
    return out


def pairwise_questions(
    judge: str, prompt: JudgePrompt, row: Row, record: Mapping[str, Any], base: Mapping[str, Any]
) -> List[Question]:
    """The questions comparing one sample with the baseline's sample of the same row and number: per turn,
    λ's answer as A, then as B. A question names the λ of A and of B, so that λ 0 against baseline 1 and
    λ 1 against baseline 0 ask the same two questions once."""
    out = []
    mine, theirs = turns_of(row, record), turns_of(row, base)
    for t, ((history, question, answer), (base_history, _, base_answer)) in enumerate(zip(mine, theirs)):
        for (lam_a, a), (lam_b, b) in [
            ((record["lam"], (history, answer)), (base["lam"], (base_history, base_answer))),
            ((base["lam"], (base_history, base_answer)), (record["lam"], (history, answer))),
        ]:
            about = {**about_of(record, t), "lam_a": float(lam_a), "lam_b": float(lam_b)}
            del about["lam"]
            values = pairwise_values(a[0], b[0], question, a[1], b[1])
            out.append(Question(key_of(judge, about), about, prompt.render(values)))
    return out


def about_of(record: Mapping[str, Any], turn: int) -> Dict[str, Any]:
    return {
        "row": record["row"],
        "line": record["line"],
        "lam": float(record["lam"]),
        "sample": record["sample"],
        "turn": turn,
    }


def key_of(judge: str, about: Mapping[str, Any]) -> str:
    """A question's key: the judge, the row, λ (or the λ of A and of B), the sample and the turn."""
    lams = (
        [repr(float(about["lam"]))]
        if "lam" in about
        else [f"A{float(about['lam_a'])!r}", f"B{float(about['lam_b'])!r}"]
    )
    return "|".join([judge, about["row"], *lams, str(about["sample"]), f"t{about['turn']}"])


# ------------------------------------------------------------------ outcomes


def single_outcome(judgments: List[Optional[Mapping[str, Any]]]) -> Dict[str, Any]:
    """A sample's grade from its turns' judgments (None: not judged yet)."""
    status = combined([j["status"] if j else None for j in judgments])
    ratings = [j["score"] if j and j["status"] == OK else None for j in judgments]
    rating = sum(ratings) / len(ratings) if status == OK else None
    return {"rating": rating, "turn_ratings": ratings, "judge_status": status}


def pairwise_outcome(
    judgments: List[Tuple[Optional[Mapping[str, Any]], Optional[Mapping[str, Any]]]], suffix: str
) -> Dict[str, Any]:
    """A sample's win / tie / loss shares against one baseline from its turns' pairs of judgments
    (λ's answer first, then second)."""
    status = combined([j["status"] if j else None for pair in judgments for j in pair])
    games = []
    for first, second in judgments:
        if status != OK:
            break
        a = {"A": 1, "B": -1, "tie": 0}[first["score"]]  # λ's answer was A
        b = {"A": -1, "B": 1, "tie": 0}[second["score"]]  # λ's answer was B
        games.append(1 if a == b == 1 else -1 if a == b == -1 else 0)
    shares = {}
    for name, value in (("win", 1), ("tie", 0), ("loss", -1)):
        shares[f"{name}_vs_{suffix}"] = sum(g == value for g in games) / len(games) if games else None
    return {**shares, f"judge_status_vs_{suffix}": status}


def combined(statuses: List[Optional[str]]) -> Optional[str]:
    """A sample's status from its judgments': failed if one failed, pending if one is missing, else ok."""
    if any(s in (UNRATED, ERROR) for s in statuses):
        return "failed"
    if any(s is None for s in statuses):
        return None
    return OK
