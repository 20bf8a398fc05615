"""The reward server protocol and its client.

    POST {url}   {"prompts": [str, ...], "responses": [str, ...]}
    200          {"scores": [float, ...]}          one number per response, in order

Anything else is an error that names the URL: a wrong count, a value that is not a number, a
body that is not JSON or has no "scores" list. NaN and inf are numbers here: they pass through
to the run's non-finite guard, which skips the update and counts it. The client batches
(``batch_size`` responses a request), sends up to ``concurrency`` requests at once, retries
connection errors, read timeouts and 5xx answers with exponential backoff (urllib3's ``Retry``),
and sends ``Authorization: Bearer <token>`` when the environment variable it is given is set.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry


class RewardServerError(RuntimeError):
    """The reward server could not be reached, or answered something that is not scores."""


def parse_scores(text: str, n: int, url: str) -> list[float]:
    """The scores of a 200 answer, or a ``RewardServerError`` naming ``url`` and what is wrong."""
    try:
        body = json.loads(text)  # Python's json reads NaN / Infinity: they reach the guard
    except ValueError as e:
        raise RewardServerError(f"{url}: the answer is not JSON ({e}): {text[:200]!r}") from None
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, list):
        raise RewardServerError(f'{url}: the answer has no "scores" list: {text[:200]!r}')
    if len(scores) != n:
        raise RewardServerError(f"{url}: {len(scores)} scores for {n} responses")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise RewardServerError(f"{url}: score {i} is not a number: {s!r}")
    return [float(s) for s in scores]


class RewardClient:
    """Scores texts on a reward server. ``token_env``: the name of an environment variable holding
    a bearer token (read at each request, never stored)."""

    def __init__(
        self,
        url: str,
        batch_size: int = 64,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 4,
        token_env: str = "",
    ):
        self.url, self.batch_size, self.timeout = url, batch_size, timeout
        self.concurrency, self.token_env, self.retries = concurrency, token_env, retries
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"POST", "GET"}),
            raise_on_status=False,  # the last 5xx answer comes back and is reported below
        )
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=max(concurrency, 1))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _headers(self) -> dict[str, str]:
        if not self.token_env:
            return {}
        token = os.environ.get(self.token_env)
        if not token:
            raise RewardServerError(
                f"{self.url}: the environment variable {self.token_env} (reward_token_env) is not set"
            )
        return {"Authorization": f"Bearer {token}"}

    def _post(self, prompts: list[str], responses: list[str], columns: dict) -> list[float]:
        body = {"prompts": prompts, "responses": responses}
        if columns:
            body["columns"] = columns
        try:
            r = self.session.post(
                self.url,
                json=body,
                headers=self._headers(),
                timeout=self.timeout,
            )
        except requests.RequestException as e:
            raise RewardServerError(
                f"{self.url}: no answer after {self.retries} retries "
                f"(timeout {self.timeout} s); last failure: {e}"
            ) from None
        if r.status_code != 200:
            raise RewardServerError(
                f"{self.url}: HTTP {r.status_code} (after up to {self.retries} retries for 5xx): "
                f"{r.text[:300]!r}"
            )
        return parse_scores(r.text, len(responses), self.url)

    def score(
        self, prompts: list[str], responses: list[str], columns: dict | None = None
    ) -> list[float]:
        """One float per response, in order; batches sent concurrently. ``columns``: the rows'
        other fields, sent as the optional "columns" object (docs/rewards.md)."""
        starts = range(0, len(responses), self.batch_size)
        b = self.batch_size
        parts = [
            (
                prompts[i : i + b],
                responses[i : i + b],
                {k: v[i : i + b] for k, v in (columns or {}).items()},
            )
            for i in starts
        ]
        if len(parts) <= 1 or self.concurrency <= 1:
            results = [self._post(*p) for p in parts]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(parts))) as pool:
                results = list(pool.map(lambda p: self._post(*p), parts))
        return [s for part in results for s in part]

    def health(self) -> bool:
        """GET {base}/health answers 200."""
        base = self.url.rsplit("/", 1)[0]
        try:
            return self.session.get(f"{base}/health", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False
