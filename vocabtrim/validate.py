"""Checks of the model, pool and sampling settings that several stages take, in one place.

A check raises ``SettingError`` naming the setting by its config field (``temperature must be >= 0, got
-1``); the CLI names it by its flag instead (``--temperature must be >= 0, got -1``, ``vocabtrim.cli``).
Every stage runs these on the driver, before Ray starts, and the engine's config objects run them again
when built from Python.
"""

from __future__ import annotations

from vocabtrim.errors import UserError

MAX_GAMMA = 64  # the most draft tokens a step may take


class SettingError(UserError):
    """A bad value of one setting: ``setting`` (a config field name) and ``rule`` (what is wrong with it)."""

    def __init__(self, setting: str, rule: str):
        super().__init__(setting, rule)
        self.setting, self.rule = setting, rule

    def __str__(self) -> str:
        return f"{self.setting} {self.rule}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(setting: str, value, low) -> None:
    """``value`` is a number >= ``low``."""
    if not (_number(value) and value >= low):
        raise SettingError(setting, f"must be >= {low}, got {value}")


def above(setting: str, value, low) -> None:
    """``value`` is a number > ``low``."""
    if not (_number(value) and value > low):
        raise SettingError(setting, f"must be > {low}, got {value}")


def between(setting: str, value, low, high) -> None:
    """``low <= value <= high``."""
    if not (_number(value) and low <= value <= high):
        raise SettingError(setting, f"must be between {low} and {high}, got {value}")


def one_of(setting: str, value, choices) -> None:
    if value not in choices:
        raise SettingError(setting, f"must be one of {', '.join(choices)}, got {value!r}")


def temperature(value: float, setting: str = "temperature") -> None:
    """A sampling temperature: 0 is greedy."""
    at_least(setting, value, 0)


def sampling(temp: float, top_p: float = 1.0, top_k: int = 0) -> None:
    """Temperature ``temp`` >= 0 (0: greedy); top-p in (0, 1] (1: off); top-k >= 0 (0: off)."""
    temperature(temp)
    if not (_number(top_p) and 0 < top_p <= 1):
        raise SettingError("top_p", f"must be in (0, 1], got {top_p}")
    at_least("top_k", top_k, 0)


def pool(workers: int, gpus_per_worker: float, cpus_per_worker: float | None = None) -> None:
    """An actor pool: at least one worker, no negative GPUs, a positive CPU share when one is given."""
    at_least("workers", workers, 1)
    at_least("gpus_per_worker", gpus_per_worker, 0)
    if cpus_per_worker is not None:
        above("cpus_per_worker", cpus_per_worker, 0)


def drafter_layers(value: int | None, total: int | None = None) -> None:
    """``--drafter-layers``: None (the whole drafter), or 1 to the model's ``total`` decoder layers."""
    if value is None:
        return
    if total is None:
        at_least("drafter_layers", value, 1)
    else:
        between("drafter_layers", value, 1, total)


def gamma(value) -> int | None:
    """Draft tokens per step as the engine takes it: None for "auto", else a number 0..MAX_GAMMA."""
    if value is None or str(value) == "auto":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SettingError("gamma", f"must be 'auto' or a number, got {value!r}") from None
    if not 0 <= number <= MAX_GAMMA:
        raise SettingError("gamma", f"must be 'auto' or between 0 and {MAX_GAMMA}, got {number}")
    return number


def max_gamma(value: int) -> None:
    between("max_gamma", value, 0, MAX_GAMMA)


def trim(top_k: int | None, coverage: float | None, vocab_size: int | None = None) -> None:
    """How a head is trimmed: exactly one of ``top_k`` (1 to ``vocab_size`` when known) and ``coverage`` (in (0, 1])."""
    if (top_k is None) == (coverage is None):
        raise UserError("pass exactly one of --top-k K or --coverage C")
    if top_k is not None:
        if vocab_size is None:
            at_least("top_k", top_k, 1)
        elif not (_number(top_k) and 1 <= top_k <= vocab_size):
            raise SettingError("top_k", f"must be between 1 and the drafter's vocabulary size {vocab_size}, got {top_k}")
    elif not (_number(coverage) and 0 < coverage <= 1):
        raise SettingError("coverage", f"must be in (0, 1], got {coverage}")
