"""ElevenLabs text to speech over HTTP, on the engine's one shared ``httpx.AsyncClient``.

``POST {api_url}/text-to-speech/{voice_id}?output_format=…`` with the ``xi-api-key`` header
and the JSON body of ElevenLabs' OpenAPI document (``text``, ``model_id``,
``voice_settings``, ``seed``, ``pronunciation_dictionary_locators``, and for long text
``previous_request_ids`` or ``previous_text``/``next_text``); the answer is the MP3 itself,
with the ``request-id`` header that names it for stitching.

- **Concurrency:** at most ``max_concurrency`` requests are in flight, and never more than
  ``account_concurrency`` (the account's limit, when known); a request waiting out a
  backoff does not hold a slot. ElevenLabs counts concurrency per account, so instances
  sharing one overrun it together: with ``adaptive_concurrency`` (the default) the limit
  adapts (:class:`~core.voice.concurrency.AdaptiveLimit`): a 429 for concurrency
  (``too_many_concurrent_requests``, or ``concurrent_limit_exceeded`` in ElevenLabs' newer
  error shape) halves it, down to 1, and :data:`GROW_AFTER` successes at the limit raise it
  by one again, so the fleet settles within the account's limit. The refused request is
  retried like any 429. Other faults (``system_busy``, 5xx) leave the limit alone.
- **Faults** (:mod:`core.voice.elevenlabs_faults`): 429, 5xx and connection errors
  (including a connection dropped in the middle of the audio) are retried here, as long as
  the request's :class:`~core.retry_budget.RetryBudget` grants it (capped exponential
  backoff and jitter honouring ``Retry-After``, waiting through the injected ``sleep``);
  then ``ElevenLabsUnavailableError`` (retryable). Each HTTP request is reported to the
  budget, so the consume loop's retries and these share one bound. A read timeout is
  ``ElevenLabsTimeoutError`` at once (retryable, but a hang costs a whole timeout, so only
  the caller's outer retries try again). 400/401/404/422 are permanent; quota exhaustion is
  ``QUOTA_EXCEEDED``. Every error carries ``attempts`` (the request's so far).
- **Budget:** :meth:`ElevenLabsBackend.with_budget` gives a view of the backend that
  spends a request's budget; a call without one gets a budget of its own from
  ``retry`` (the RETRY_* settings).
- **Long text:** split at sentence boundaries within the model's limit
  (:mod:`core.voice.models`, :mod:`core.voice.chunking`) and joined into one MP3
  (:func:`core.voice.mp3join.join_mp3`). On models that take request stitching the parts
  are requested one after the other, each with the ``request-id`` of up to
  :data:`MAX_STITCHED` parts before it as ``previous_request_ids`` and the start of the
  next part as ``next_text`` (a part whose answer had no ``request-id`` is followed by one
  that gets ``previous_text`` instead). On the others (``eleven_v3``) they are requested
  concurrently, each with its neighbours as ``previous_text``/``next_text``. Every part
  carries the same ``seed`` and dictionaries.
- **One file per call:** the file is written once, after every part's body arrived whole.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from core.backoff import Backoff
from core.retry_budget import RetryBudget
from core.voice.backend import VoiceSettings
from core.voice.chunking import context, split_text
from core.voice.concurrency import AdaptiveLimit
from core.voice.dictionaries import locators
from core.voice.elevenlabs_faults import (
    ElevenLabsError,
    ElevenLabsTimeoutError,
    ElevenLabsUnavailableError,
    error_for_response,
)
from core.voice.models import model_facts
from core.voice.mp3join import join_mp3
from schemas.errors import InternalError

__all__ = ["GROW_AFTER", "MAX_STITCHED", "ElevenLabsBackend", "Subscription"]

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

_T = TypeVar("_T")

MAX_STITCHED = 3  # ElevenLabs: "A maximum of 3 request_ids can be send."

GROW_AFTER = 10
"""Successes at the limit, without a concurrency 429, before the adaptive limit grows by
one. Each step up past the account's limit costs a refusal or a few (the next request to
arrive is refused, whichever instance sent it), so slower probing costs fewer 429s, at the
price of slower recovery when other instances go quiet (from 1 to 4: 30 requests)."""

# detail.status (legacy) or detail.code of a 429 saying the account's concurrency is full
_CONCURRENCY_REFUSALS = frozenset({"too_many_concurrent_requests", "concurrent_limit_exceeded"})


@dataclass(frozen=True)
class Subscription:
    """The account's quota, from ``GET /user/subscription``."""

    tier: str
    character_count: int
    character_limit: int
    next_character_count_reset_unix: int | None = None
    status: str | None = None


class ElevenLabsBackend:
    """A :class:`~core.voice.backend.VoiceBackend` speaking through ElevenLabs.

    ``client`` is shared and owned by the caller (who closes it); ``api_url`` is the API
    base including ``/v1`` (ELEVENLABS_API_URL); ``default_model_id`` is used when a request
    names no model; ``timeout`` applies to each HTTP request (its read part is what turns a
    hang into ``TIMEOUT``); ``retry`` is the policy of calls made without a budget and
    ``sleep`` how retries wait; ``max_concurrency``, ``account_concurrency`` and
    ``adaptive_concurrency`` bound the requests in flight (see the module docstring).
    Raises ``ValueError`` naming the argument for an empty key, a URL that is not http(s),
    an output format other than ``mp3_*``, or ``max_concurrency`` or
    ``account_concurrency`` < 1.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        api_url: str,
        api_key: SecretStr,
        *,
        default_model_id: str = "eleven_multilingual_v2",
        output_format: str = "mp3_44100_128",
        max_concurrency: int = 4,
        account_concurrency: int | None = None,
        adaptive_concurrency: bool = True,
        timeout: httpx.Timeout | None = None,
        retry: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not api_key.get_secret_value().strip():
            raise ValueError("api_key must not be empty")
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must be an http(s) URL, got {api_url!r}")
        if not output_format.startswith("mp3_"):
            raise ValueError(f"output_format must be an mp3_* format, got {output_format!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if account_concurrency is not None and account_concurrency < 1:
            raise ValueError(f"account_concurrency must be >= 1, got {account_concurrency}")
        if not default_model_id:
            raise ValueError("default_model_id must not be empty")
        self._client = client
        self._api_url = api_url.rstrip("/")
        self._key = api_key
        self._default_model_id = default_model_id
        self._output_format = output_format
        ceiling = min(max_concurrency, account_concurrency or max_concurrency)
        self._slots = AdaptiveLimit(ceiling, floor=1 if adaptive_concurrency else ceiling,
                                    grow_after=GROW_AFTER, name="ElevenLabs")
        self._timeout = timeout if timeout is not None else httpx.Timeout(30.0, connect=5.0)
        self._retry = retry if retry is not None else Backoff()
        self._sleep = sleep
        self._budget: RetryBudget | None = None

    def __repr__(self) -> str:
        return f"ElevenLabsBackend({self._api_url!r}, model={self._default_model_id!r})"

    @property
    def name(self) -> str:
        return "elevenlabs"

    @property
    def default_model_id(self) -> str:
        return self._default_model_id

    @property
    def audio_variant(self) -> str:
        """The API and the output format (ELEVENLABS_API_URL, ELEVENLABS_OUTPUT_FORMAT):
        another format is other bytes, another API possibly other audio."""
        return f"{self._api_url} {self._output_format}"

    @property
    def concurrency_limit(self) -> int:
        """Requests this process lets be in flight now (it adapts; see the module
        docstring)."""
        return self._slots.limit

    def performs_audio_tags(self, model_id: str | None) -> bool:
        return model_facts(model_id or self._default_model_id).performs_audio_tags

    def with_budget(self, budget: RetryBudget) -> ElevenLabsBackend:
        """This backend (same client, same concurrency slots) spending ``budget`` on every
        request and retry of its calls: one request's view."""
        view = copy.copy(self)
        view._budget = budget
        return view

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings) -> None:
        """Speak ``text`` into an MP3 at ``path`` (see the module docstring).

        Raises an :class:`~core.voice.elevenlabs_faults.ElevenLabsError` subclass for an
        upstream failure and :class:`InternalError` when the parts cannot be joined.
        """
        budget = self._budget if self._budget is not None else RetryBudget(self._retry)
        model_id = settings.model_id or self._default_model_id
        facts = model_facts(model_id)
        chunks = split_text(text, facts.chunk_chars)
        if not chunks:
            raise InternalError("nothing to speak")
        if len(chunks) == 1:
            audio, _ = await self._convert(
                settings.voice_id, self._body(chunks[0], model_id, settings), budget)
        else:
            stitch = self._stitched if facts.stitching else self._with_context
            parts = await stitch(chunks, model_id, settings, budget)
            audio = await asyncio.to_thread(join_mp3, parts)
        await asyncio.to_thread(path.write_bytes, audio)

    async def _stitched(self, chunks: list[str], model_id: str, settings: VoiceSettings,
                        budget: RetryBudget) -> list[bytes]:
        """The parts one after the other, each stitched to the ones before it by their
        ``request-id`` (see the module docstring)."""
        parts: list[bytes] = []
        ids: list[str] = []
        for i, chunk in enumerate(chunks):
            following = context(chunks[i + 1], before=False) if i + 1 < len(chunks) else None
            body = self._body(chunk, model_id, settings, following=following)
            if ids:
                body["previous_request_ids"] = ids[-MAX_STITCHED:]
            elif i > 0:  # the part before came without a request-id: its text instead
                body["previous_text"] = context(chunks[i - 1], before=True)
            audio, request_id = await self._convert(settings.voice_id, body, budget)
            parts.append(audio)
            ids = [*ids, request_id] if request_id else []
        return parts

    async def _with_context(self, chunks: list[str], model_id: str, settings: VoiceSettings,
                            budget: RetryBudget) -> list[bytes]:
        """The parts concurrently, each with its neighbours' text as context."""
        bodies = [
            self._body(
                chunk, model_id, settings,
                previous=context(chunks[i - 1], before=True) if i > 0 else None,
                following=context(chunks[i + 1], before=False) if i + 1 < len(chunks) else None,
            )
            for i, chunk in enumerate(chunks)
        ]
        answers = await _all_or_nothing(
            [self._convert(settings.voice_id, b, budget) for b in bodies])
        return [audio for audio, _ in answers]

    async def subscription(self) -> Subscription:
        """The account's subscription (one request, no retries).

        Raises an :class:`~core.voice.elevenlabs_faults.ElevenLabsError` subclass.
        """
        url = f"{self._api_url}/user/subscription"
        try:
            response = await self._client.get(url, headers=self._headers("application/json"),
                                               timeout=self._timeout)
        except httpx.TimeoutException as exc:
            raise ElevenLabsTimeoutError("ElevenLabs subscription check timed out") from exc
        except httpx.RequestError as exc:
            raise ElevenLabsUnavailableError(
                f"ElevenLabs unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise error_for_response(response.status_code, response.content, response.headers,
                                     attempts=1, secret=self._key.get_secret_value())
        try:
            data: Any = response.json()
            return Subscription(
                tier=str(data["tier"]),
                character_count=int(data["character_count"]),
                character_limit=int(data["character_limit"]),
                next_character_count_reset_unix=data.get("next_character_count_reset_unix"),
                status=data.get("status"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ElevenLabsUnavailableError(
                "ElevenLabs answered a subscription without tier and character counts"
            ) from exc

    # --- one request ---

    def _headers(self, accept: str) -> dict[str, str]:
        return {"xi-api-key": self._key.get_secret_value(), "accept": accept}

    @staticmethod
    def _body(
        text: str, model_id: str, settings: VoiceSettings, *,
        previous: str | None = None, following: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "model_id": model_id}
        voice_settings = {
            name: value
            for name in ("stability", "similarity_boost", "style", "use_speaker_boost", "speed")
            if (value := getattr(settings, name)) is not None
        }
        if voice_settings:  # none given: the voice's own stored settings apply
            body["voice_settings"] = voice_settings
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.pronunciation_dictionaries:
            body["pronunciation_dictionary_locators"] = locators(
                settings.pronunciation_dictionaries)
        if previous:
            body["previous_text"] = previous
        if following:
            body["next_text"] = following
        return body

    async def _convert(self, voice_id: str, body: dict[str, Any], budget: RetryBudget
                       ) -> tuple[bytes, str | None]:
        """The audio for one request body and its ``request-id`` (``None`` when upstream
        sent none), retried as the module docstring says."""
        url = f"{self._api_url}/text-to-speech/{quote(voice_id, safe='')}"
        params = {"output_format": self._output_format}
        while True:
            error: ElevenLabsError
            async with self._slots.slot() as slot:
                budget.attempt()
                try:
                    response = await self._client.post(
                        url, params=params, json=body, headers=self._headers("audio/mpeg"),
                        timeout=self._timeout,
                    )
                except httpx.ReadTimeout as exc:
                    raise ElevenLabsTimeoutError(
                        f"ElevenLabs sent no audio within {self._timeout.read}s",
                        attempts=budget.attempts,
                    ) from exc
                except httpx.RequestError as exc:  # connect, write, pool, dropped body
                    error = ElevenLabsUnavailableError(
                        f"ElevenLabs unreachable: {type(exc).__name__}",
                        attempts=budget.attempts,
                    )
                    error.__cause__ = exc
                else:
                    if response.status_code == 200 and response.content:
                        slot.succeeded()
                        return response.content, response.headers.get("request-id") or None
                    if response.status_code == 200:
                        error = ElevenLabsUnavailableError(
                            "ElevenLabs answered 200 without audio", http_status=200,
                            attempts=budget.attempts,
                        )
                    else:
                        error = error_for_response(
                            response.status_code, response.content, response.headers,
                            attempts=budget.attempts, secret=self._key.get_secret_value(),
                        )
                        if (error.http_status == 429
                                and error.upstream_status in _CONCURRENCY_REFUSALS):
                            slot.overloaded()
            wait = budget.retry(error)
            if wait is None:
                raise error
            logger.warning("%s (attempt %d, at most %d for one request); retrying in %.2fs",
                           error.message, budget.attempts, budget.max_attempts, wait)
            await self._sleep(wait)


async def _all_or_nothing(calls: list[Awaitable[_T]]) -> list[_T]:
    """The results of ``calls`` run concurrently, in order; on the first failure the others
    are cancelled and that failure is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
