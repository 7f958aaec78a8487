"""Waiting and retrying, one way (tenacity): a condition polled until a deadline, and an action
retried with exponential backoff while a predicate says the failure is worth another try."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import Retrying, retry_if_exception, retry_if_result, stop_after_attempt, stop_after_delay, wait_exponential, wait_fixed

T = TypeVar("T")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `condition` every `interval` seconds until it holds or `timeout` passes; whether it held."""
    if condition():
        return True
    poll = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(interval), retry=retry_if_result(lambda held: not held),
                    retry_error_callback=lambda state: state.outcome.result())
    return bool(poll(condition))


def retry(action: Callable[[], T], worth_retrying: Callable[[BaseException], bool], attempts: int = 3,
          backoff: float = 1.0) -> T:
    """Run `action`; while it fails with an error `worth_retrying` accepts, wait backoff, 2*backoff, ...
    and try again, `attempts` times in all. Any other error, or the last one, is raised as it is."""
    policy = Retrying(stop=stop_after_attempt(attempts), wait=wait_exponential(multiplier=backoff, min=backoff),
                      retry=retry_if_exception(worth_retrying), reraise=True)
    return policy(action)
