"""Rewards for generated responses: the paper's length reward (eq. 10) or any callable.

A reward is ``f(prompt, response) -> float``; ``prompt`` is the text the models saw
(a chat prompt rendered with the template), ``response`` the decoded reply. The length
reward also receives the response's token count through :class:`LengthReward`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

from ..errors import DeRaError

Reward = Callable[[str, str], float]


@dataclass(frozen=True)
class LengthReward:
    """Eq. (10): 0 when the response has between lmin and lmax tokens (inclusive), else -1."""

    lmin: int = 20
    lmax: int = 60

    def __post_init__(self):
        if not 0 <= self.lmin <= self.lmax:
            raise DeRaError(f"the length reward needs 0 <= lmin <= lmax, got lmin {self.lmin}, lmax {self.lmax}")

    def of_length(self, n_tokens: int) -> float:
        return 0.0 if self.lmin <= n_tokens <= self.lmax else -1.0

    def describe(self) -> str:
        return f"length[{self.lmin},{self.lmax}]"


def load_reward(spec: str, lmin: int = 20, lmax: int = 60):
    """``"length"`` -> :class:`LengthReward`; ``"module:function"`` -> that callable."""
    if spec == "length":
        return LengthReward(lmin, lmax)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DeRaError(f"--reward {spec!r}: give 'length' or 'module:function' (e.g. myrewards:score)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DeRaError(f"--reward {spec}: cannot import {module_name} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DeRaError(f"--reward {spec}: {module_name} has no callable {attr}")
    return fn


def describe_reward(reward) -> str:
    """What run.json records about the reward (so a resume with another reward is refused)."""
    if isinstance(reward, LengthReward):
        return reward.describe()
    return f"{getattr(reward, '__module__', '?')}:{getattr(reward, '__qualname__', repr(reward))}"


def reward_of(reward, prompt: str, response: str, n_tokens: int, where: str) -> float:
    """Call the reward and check it gave a finite number."""
    if isinstance(reward, LengthReward):
        return reward.of_length(n_tokens)
    try:
        value = reward(prompt, response)
    except Exception as e:
        raise DeRaError(f"the reward function failed on {where}: {type(e).__name__}: {e}") from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DeRaError(f"the reward function returned {value!r} on {where}: it must return a float") from None
    if not math.isfinite(value):
        raise DeRaError(f"the reward function returned {value} on {where}: it must be finite")
    return value
