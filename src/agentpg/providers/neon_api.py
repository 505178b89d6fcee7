"""A small, careful client for Neon's HTTP API v2: rate-limited, retrying, and silent about secrets.

Neon's responses carry connection URIs and role passwords, so nothing here ever logs or quotes a response
body: errors name the request (``what``), the HTTP status and Neon's error ``code``, plus Neon's ``message``
with anything URI-shaped cut out. The API key travels only in the ``Authorization`` header.

Published limits (https://neon.com/docs/reference/api/key-concepts, "Rate limiting"; also
https://api-docs.neon.tech/reference/api-rate-limiting): 700 requests per minute per account, bursts of
up to 40 requests per second per route; above that the API answers 429. Requests that conflict with an
operation still running on the project answer ``423 Locked`` (https://neon.com/docs/reference/api/operations).
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from agentpg.errors import ProviderError, ProviderUnavailable

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://console.neon.tech/api/v2"
#: Neon's published account-wide limit, and the burst our client allows itself (Neon tolerates 40/s).
PUBLISHED_REQUESTS_PER_MINUTE = 700
DEFAULT_BURST = 20

#: Statuses after which the same request may simply be sent again.
_RETRY_ALWAYS = frozenset({423, 429})
#: Statuses after which a request may or may not have been carried out (a POST must check before resending).
_RETRY_IF_IDEMPOTENT = frozenset({500, 502, 503, 504})

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


class AmbiguousRequest(ProviderUnavailable):
    """A non-idempotent request failed in a way that leaves open whether Neon carried it out."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; ``Retry-After`` wins when Neon sends it."""

    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_retry_after_s: float = 60.0

    def backoff(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Delay before retry number ``retry`` (1-based): half fixed, half random ("equal jitter")."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1))
        return float(ceiling / 2 + rng() * ceiling / 2)


class RateLimiter:
    """A token bucket that keeps any 60-second window under ``per_minute`` requests.

    A bucket of ``burst`` tokens refilled at ``(per_minute - burst) / 60`` per second can never release more
    than ``per_minute`` requests in a minute, nor more than about ``burst + rate`` in a second. Callers wait
    (outside the lock) for their token. The limit is per process: several agentpg processes sharing one Neon
    account share Neon's limit too, which is why 429 answers are still retried.
    """

    def __init__(self, per_minute: int = PUBLISHED_REQUESTS_PER_MINUTE, burst: int = DEFAULT_BURST, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if per_minute < 1 or not 1 <= burst < per_minute:
            raise ValueError("need per_minute >= 1 and 1 <= burst < per_minute")
        self.burst = burst
        self.rate = (per_minute - burst) / 60.0
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, waiting if there is none; return how long it waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= 1.0  # may go negative: a reservation the caller waits out
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


def _retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _site(base_url: str) -> str:
    """``host[:port]`` of the API (no scheme, path or userinfo): what error messages may name."""
    parts = urlsplit(base_url)
    return (parts.hostname or "?") + (f":{parts.port}" if parts.port else "")


class NeonApi:
    """Sync access to Neon's API v2. Thread-safe (one ``httpx.Client``, one rate limiter)."""

    def __init__(self, api_key: str, base_url: str = DEFAULT_BASE_URL, *, timeout_s: float = 30.0,
                 retry: RetryPolicy | None = None, limiter: RateLimiter | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        if not api_key:
            raise ProviderError("the Neon provider needs an API key (AGENTPG_NEON_API_KEY)")
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ProviderError("the Neon API base URL must be an http(s) URL")
        self.site = _site(base_url)
        self._key = api_key
        self._retry = retry or RetryPolicy()
        self._limiter = limiter or RateLimiter()
        self._sleep, self._rng = sleep, rng
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport, follow_redirects=False,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                     "User-Agent": "agentpg-neon-provider"})

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, what: str, params: Mapping[str, str | int] | None = None,
                json: Any = None, ok_missing: bool = False, idempotent: bool = True) -> dict[str, Any] | None:
        """Send one API request, retrying what may be retried; return the JSON body.

        ``what`` describes the request for error messages ("creating the Neon project of database …").
        ``ok_missing`` turns a 404 into ``None``. A non-``idempotent`` request is resent only after answers
        that prove it was not carried out (423, 429, a connection never made); otherwise
        :class:`AmbiguousRequest` lets the caller look before trying again.
        """
        attempts = max(1, self._retry.attempts)
        last = ""
        for attempt in range(1, attempts + 1):
            self._limiter.acquire()
            try:
                response = self._client.request(method, path, params=params, json=json)
            except httpx.TransportError as exc:
                safe = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                last = f"could not be reached ({type(exc).__name__})"
                if not (idempotent or safe):
                    raise AmbiguousRequest(f"{what}: the Neon API ({self.site}) {last}") from None
                self._pause(method, path, last, attempt, attempts, None)
                continue
            status = response.status_code
            if status < 300:
                return self._json(response, what)
            if status == 404 and ok_missing:
                return None
            if status in _RETRY_ALWAYS or status in _RETRY_IF_IDEMPOTENT:
                last = f"answered {status} {response.reason_phrase}"
                if status in _RETRY_IF_IDEMPOTENT and not idempotent:
                    raise AmbiguousRequest(f"{what}: the Neon API {last}")
                self._pause(method, path, last, attempt, attempts, _retry_after(response.headers.get("Retry-After")))
                continue
            raise self._refusal(response, what)
        raise ProviderUnavailable(f"{what}: the Neon API ({self.site}) {last}, {attempts} times in a row; "
                                  "giving up for now")

    def _pause(self, method: str, path: str, why: str, attempt: int, attempts: int,
               retry_after: float | None) -> None:
        if attempt >= attempts:
            return
        delay = self._retry.backoff(attempt, self._rng)
        if retry_after is not None:
            delay = min(retry_after, self._retry.max_retry_after_s) + self._rng() * self._retry.base_delay_s / 4
        log.warning("Neon API: %s %s %s; retry %d of %d in %.2f s", method, path.split("?", 1)[0], why,
                    attempt, attempts - 1, delay)
        self._sleep(delay)

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if not response.content:
            return {}
        try:
            body = response.json()
        except ValueError:
            raise ProviderError(f"{what}: the Neon API answered {response.status_code} with a body that is not "
                                "JSON") from None
        if not isinstance(body, dict):
            raise ProviderError(f"{what}: the Neon API answered {response.status_code} with unexpected JSON")
        return body

    def _refusal(self, response: httpx.Response, what: str) -> ProviderError:
        status = response.status_code
        if status in (401, 403):
            return ProviderError(f"{what}: the Neon API refused the API key ({status} {response.reason_phrase}); "
                                 "check AGENTPG_NEON_API_KEY and its permissions")
        code, message = "", ""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            code = str(body.get("code") or "")[:64]
            message = self._clean(str(body.get("message") or ""))
        detail = ": ".join(part for part in (code, message) if part)
        return ProviderError(f"{what}: the Neon API answered {status} {response.reason_phrase}"
                             + (f" ({detail})" if detail else ""))

    def _clean(self, text: str) -> str:
        """Neon's error message, safe to show: no URI, no key, one line, at most 200 characters."""
        text = _URI.sub("<uri>", text).replace(self._key, "<key>")
        return " ".join(text.split())[:200]
