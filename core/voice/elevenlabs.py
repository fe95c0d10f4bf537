"""ElevenLabs text to speech over HTTP, on the engine's one shared ``httpx.AsyncClient``.

``POST {api_url}/text-to-speech/{voice_id}/stream/with-timestamps?output_format=…`` with
the ``xi-api-key`` header and the JSON body of ElevenLabs' OpenAPI document (``text``,
``model_id``, ``voice_settings``, ``seed``, ``pronunciation_dictionary_locators``, and for
long text ``previous_request_ids`` or ``previous_text``/``next_text``; built by
:mod:`core.voice.elevenlabs_body`, which leaves out or adjusts what ``eleven_v3`` refuses:
text context, a stability other than 0, 0.5 or 1); the answer is a
stream of JSON lines, each an audio chunk (``audio_base64``) with the timing of the
characters it speaks (``alignment``), and the ``request-id`` header that names it for
stitching. Each chunk goes to the request's stream (:mod:`core.voice.streams`) the moment
it arrives; the characters' timings come back from :meth:`ElevenLabsBackend.synthesize_to`.

- **Concurrency:** at most ``max_concurrency`` requests are in flight, and never more than
  ``account_concurrency`` (the account's limit, when known); a request waiting out a
  backoff does not hold a slot. ElevenLabs counts concurrency per account, so instances
  sharing one overrun it together: with ``adaptive_concurrency`` (the default) the limit
  adapts (:class:`~core.voice.concurrency.AdaptiveLimit`): a 429 for concurrency
  (``too_many_concurrent_requests``, or ``concurrent_limit_exceeded`` in ElevenLabs' newer
  error shape) halves it, down to 1, and :data:`GROW_AFTER` successes at the limit raise it
  by one again, so the fleet settles within the account's limit. The refused request is
  retried like any 429. Other faults (``system_busy``, 5xx) leave the limit alone. The
  requests waiting for a slot are served interactive first, then conversation by
  conversation: each call queues as the place in line its caller stated
  (:mod:`core.voice.turns`), so a chat's one line does not wait behind another chat's long
  text nor behind a replay's backlog; a background call that is promoted (a live request
  of its conversation waits behind it) waits as interactive from then on, even in line.
- **Faults** (:mod:`core.voice.elevenlabs_faults`): 408, 429, 5xx and connection errors
  (including a connection dropped in the middle of the audio) are retried here, as long as
  the request's :class:`~core.retry_budget.RetryBudget` grants it (capped exponential
  backoff and jitter honouring ``Retry-After``, waiting through the injected ``sleep``);
  then ``ElevenLabsUnavailableError`` (retryable). Each HTTP request is reported to the
  budget, so the consume loop's retries and these share one bound. No audio within the
  read timeout (of the request's start, or of the audio chunk before: a hang, or a drip
  that never makes a chunk) is ``ElevenLabsTimeoutError`` at once (retryable, but a hang
  costs a whole timeout, so only the caller's outer retries try again); a stream that keeps
  sending audio is never cut off, however long. A stream line over
  :data:`~core.voice.elevenlabs_reading.MAX_LINE_BYTES` is a fault like any line that is no
  audio chunk, and of an error answer at most
  :data:`~core.voice.elevenlabs_reading.ERROR_BODY_BYTES` is read. Messages name no
  exception (the log does). 400/401/403/404/422 are permanent; quota exhaustion is
  ``QUOTA_EXCEEDED``. Every error carries ``attempts`` (the request's so far). A part
  whose own audio already went out to the request's stream is not asked for again (the
  stream holds its start): its failure is raised at once, and the caller decides whether
  it is final (:class:`~core.voice.service.VoiceService`: once a listener could have
  heard it). A later part that fails before any of its audio went out (its bytes waiting
  in memory behind the parts before it, or none yet) is retried like any part: what it
  sent is dropped.
- **Budget:** :meth:`ElevenLabsBackend.with_budget` gives a view of the backend that
  spends a request's budget; a call without one gets a budget of its own from
  ``retry`` (the RETRY_* settings), telling ``on_retry`` of each retry it grants.
- **Long text:** split at sentence boundaries within the model's limit
  (:mod:`core.voice.models`, :mod:`core.voice.chunking`) and joined into one stream
  (:mod:`core.voice.assembly`: MP3 frame by frame, Opus page by page, raw under one WAV
  header). On models that take request stitching the parts
  are requested one after the other, each with the ``request-id`` of up to
  :data:`MAX_STITCHED` parts before it as ``previous_request_ids`` and the start of the
  next part as ``next_text`` (a part whose answer had no ``request-id`` is followed by one
  that gets ``previous_text`` instead). On the others they are requested concurrently,
  each with its neighbours as ``previous_text``/``next_text`` (on ``eleven_v3``, which
  refuses both, without), at most
  half the concurrency limit of them at once (at least one; started in order): a long
  text leaves the other slots to other requests, and its parts still come faster than
  they play. As each is
  performed on its own, a part that does not start with an audio tag gets the mood tag in
  force where it starts (:func:`~core.voice.tags.moods_in_force`), whose characters are
  left out of the timings. Every part carries the same ``seed`` and dictionaries.
- **One file per call:** the file is the stream the parts made, written as it goes out and
  completed once every part arrived whole (a WAV header's sizes, a joined MP3's counts are
  written then); a failure leaves it to the caller to remove. The parts' character
  timings become one timeline, each part's shifted to where its audio plays in the file.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from core.backoff import Backoff
from core.net.bounded import BodyTooLarge, Stalled, read_capped, read_prefix
from core.retry_budget import RetryBudget, RetryListener
from core.scheduling.placement import Placement
from core.voice.assembly import PartsStream
from core.voice.backend import VoiceSettings
from core.voice.chunking import context, split_text
from core.voice.concurrency import AdaptiveLimit
from core.voice.elevenlabs_body import request_body
from core.voice.elevenlabs_faults import (
    ElevenLabsError,
    ElevenLabsTimeoutError,
    ElevenLabsUnavailableError,
    error_for_response,
)
from core.voice.elevenlabs_reading import (
    ERROR_BODY_BYTES,
    Answer,
    cause_of,
    read_audio,
    unreachable,
)
from core.voice.formats import OutputFormat, format_named
from core.voice.models import model_facts
from core.voice.streams import AudioSink
from core.voice.tags import moods_in_force
from core.voice.timing import Alignment
from core.voice.turns import current_placement
from schemas.errors import InternalError, InvalidRequestError

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
    names no model; ``timeout`` applies to each HTTP request, and its read part also bounds
    the time without progress (see the module docstring: what turns a hang or a drip into
    ``TIMEOUT``); ``retry`` is the policy of calls made without a budget, ``on_retry`` is
    told of each retry those budgets grant (as :class:`RetryBudget`'s listener), and
    ``sleep`` is how retries wait; ``max_concurrency``, ``account_concurrency`` and
    ``adaptive_concurrency`` bound the requests in flight (see the module docstring).
    Raises ``ValueError`` naming the argument for an empty key, a URL that is not http(s),
    an output format ElevenLabs does not list, or ``max_concurrency`` or
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
        on_retry: RetryListener | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not api_key.get_secret_value().strip():
            raise ValueError("api_key must not be empty")
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must be an http(s) URL, got {api_url!r}")
        try:
            format_named(output_format)
        except InvalidRequestError as exc:
            raise ValueError(str(exc)) from None
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
        self._on_retry = on_retry
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
    def default_output_format(self) -> str:
        return self._output_format

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

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings,
                            sink: AudioSink | None = None) -> Alignment | None:
        """Speak ``text`` into a file at ``path`` in ``settings.output_format`` (the
        backend's default when ``None``), streaming it to ``sink`` (see the module
        docstring); returns the characters' timings on one timeline.

        Raises an :class:`~core.voice.elevenlabs_faults.ElevenLabsError` subclass for an
        upstream failure and :class:`InternalError` when the parts cannot be joined.
        """
        budget = (self._budget if self._budget is not None
                  else RetryBudget(self._retry, on_retry=self._on_retry))
        fmt = format_named(settings.output_format or self._output_format)
        model_id = settings.model_id or self._default_model_id
        facts = model_facts(model_id)
        chunks = split_text(text, facts.chunk_chars)
        if not chunks:
            raise InternalError("nothing to speak")
        # each request stands alone upstream: a part carries the mood tag it starts in
        moods = moods_in_force(chunks) if facts.performs_audio_tags else [None] * len(chunks)
        sent = [chunk if mood is None else f"{mood} {chunk}"
                for chunk, mood in zip(chunks, moods, strict=True)]
        live = PartsStream(path, sink, fmt, len(chunks))
        try:
            call = _Call(settings.voice_id, fmt, budget, live, current_placement())
            if len(chunks) == 1:
                answers = [await self._convert(call, 0, request_body(sent[0], model_id,
                                                                     settings))]
            else:
                stitch = self._stitched if facts.stitching else self._concurrent
                answers = await stitch(sent, model_id, settings, call)
            await live.finish()
        finally:
            live.close()
        return await asyncio.to_thread(_timeline, text, chunks, sent, answers,
                                       live.part_starts())

    async def _stitched(self, chunks: list[str], model_id: str, settings: VoiceSettings,
                        call: _Call) -> list[Answer]:
        """The parts one after the other, each stitched to the ones before it by their
        ``request-id`` (see the module docstring)."""
        parts: list[Answer] = []
        ids: list[str] = []
        for i, chunk in enumerate(chunks):
            following = context(chunks[i + 1], before=False) if i + 1 < len(chunks) else None
            # the part before came without a request-id: its text instead
            previous = context(chunks[i - 1], before=True) if i > 0 and not ids else None
            body = request_body(chunk, model_id, settings, previous=previous,
                                following=following)
            if ids:
                body["previous_request_ids"] = ids[-MAX_STITCHED:]
            answer = await self._convert(call, i, body)
            parts.append(answer)
            ids = [*ids, answer.request_id] if answer.request_id else []
        return parts

    async def _concurrent(self, chunks: list[str], model_id: str, settings: VoiceSettings,
                          call: _Call) -> list[Answer]:
        """The parts concurrently (at most half the limit of them at once), each with its
        neighbours' text as context where the model takes it (not on v3)."""
        bodies = [
            request_body(
                chunk, model_id, settings,
                previous=context(chunks[i - 1], before=True) if i > 0 else None,
                following=context(chunks[i + 1], before=False) if i + 1 < len(chunks) else None,
            )
            for i, chunk in enumerate(chunks)
        ]
        at_once = max(1, self._slots.limit // 2)
        return await _in_order([partial(self._convert, call, i, body)
                                for i, body in enumerate(bodies)], at_once)

    async def subscription(self) -> Subscription:
        """The account's subscription (one request, no retries).

        Raises an :class:`~core.voice.elevenlabs_faults.ElevenLabsError` subclass.
        """
        url = f"{self._api_url}/user/subscription"
        try:
            async with self._client.stream("GET", url, headers=self._headers("application/json"),
                                           timeout=self._timeout) as response:
                if response.status_code != 200:
                    raise error_for_response(
                        response.status_code, await read_prefix(
                            response, ERROR_BODY_BYTES, seconds=self._timeout.read),
                        response.headers, attempts=1, secret=self._key.get_secret_value())
                content = await read_capped(response, ERROR_BODY_BYTES,
                                            seconds=self._timeout.read)
        except (httpx.TimeoutException, Stalled) as exc:
            raise ElevenLabsTimeoutError("ElevenLabs subscription check timed out") from exc
        except BodyTooLarge as exc:
            raise ElevenLabsUnavailableError(
                "ElevenLabs answered a subscription without tier and character counts"
            ) from exc
        except httpx.RequestError as exc:
            raise unreachable(exc, attempts=1) from exc
        try:
            data: Any = json.loads(content)
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

    async def _convert(self, call: _Call, part: int, body: dict[str, Any]) -> Answer:
        """Part ``part``'s audio, its ``request-id`` (``None`` when upstream sent none) and
        its characters' timings, its chunks streamed as they come; retried as the module
        docstring says."""
        url = (f"{self._api_url}/text-to-speech/{quote(call.voice_id, safe='')}"
               "/stream/with-timestamps")
        params = {"output_format": call.fmt.name}
        budget = call.budget
        while True:
            error: ElevenLabsError
            call.live.restart(part)
            placement = call.placement  # promoted, before or while it waits: interactive
            async with self._slots.slot(placement.owner, placement.priority_now(),
                                        placement.promotion) as slot:
                budget.attempt()
                try:
                    async with self._client.stream(
                        "POST", url, params=params, json=body,
                        headers=self._headers("application/json"), timeout=self._timeout,
                    ) as response:
                        if response.status_code == 200:
                            answer = await read_audio(
                                response, partial(call.live.write, part),
                                stall=self._timeout.read, attempts=lambda: budget.attempts)
                            if answer is not None:
                                slot.succeeded()
                                await call.live.done(part)
                                return answer
                            error = ElevenLabsUnavailableError(
                                "ElevenLabs answered 200 without audio", http_status=200,
                                attempts=budget.attempts,
                            )
                        else:
                            content = await read_prefix(response, ERROR_BODY_BYTES,
                                                        seconds=self._timeout.read)
                            error = error_for_response(
                                response.status_code, content, response.headers,
                                attempts=budget.attempts, secret=self._key.get_secret_value(),
                                output_format=call.fmt.name,
                            )
                            if (error.http_status == 429
                                    and error.upstream_status in _CONCURRENCY_REFUSALS):
                                slot.overloaded()
                except (httpx.ReadTimeout, Stalled) as exc:  # a hang, or a drip
                    raise ElevenLabsTimeoutError(
                        f"ElevenLabs sent no audio within {self._timeout.read}s",
                        attempts=budget.attempts,
                    ) from exc
                except httpx.RequestError as exc:  # connect, write, pool, dropped body
                    error = unreachable(exc, attempts=budget.attempts)
            if call.live.heard(part):  # the stream holds its start: asking again repeats it
                raise error
            wait = budget.retry(error)
            if wait is None:
                raise error
            logger.warning("%s%s (attempt %d, at most %d for one request); retrying in %.2fs",
                           error.message, cause_of(error), budget.attempts, budget.max_attempts,
                           wait)
            await self._sleep(wait)


@dataclass(frozen=True)
class _Call:
    """One :meth:`ElevenLabsBackend.synthesize_to`: its voice, format, budget and stream,
    and its place in line (:class:`Placement`), which its requests wait for a slot as."""

    voice_id: str
    fmt: OutputFormat
    budget: RetryBudget
    live: PartsStream
    placement: Placement


def _timeline(text: str, chunks: list[str], sent: list[str], answers: list[Answer],
              starts: list[float]) -> Alignment | None:
    """The parts' alignments as one of ``text``, each shifted to where its audio starts
    in the file (``starts``); ``None`` when a part came without one. A part ``sent`` with
    a mood tag in front of its chunk has that tag's characters left out."""
    if any(answer.timed is None for answer in answers):
        return None
    placed: list[tuple[int, Alignment]] = []
    position = 0
    for chunk, spoken, answer, start in zip(chunks, sent, answers, starts, strict=True):
        assert answer.timed is not None
        position = text.find(chunk, position)
        aligned = Alignment.of_characters(spoken, *answer.timed)
        carried = len(spoken) - len(chunk)
        aligned = Alignment(chunk, aligned.starts[carried:], aligned.ends[carried:])
        placed.append((max(0, position), aligned.shifted(start)))
        position += len(chunk)
    return Alignment.joined(text, placed)


async def _in_order(calls: list[Callable[[], Awaitable[_T]]], at_once: int) -> list[_T]:
    """The results of ``calls``, in order: at most ``at_once`` run at a time, started in
    their order (each as one before it ends); on the first failure the others are
    cancelled and that failure is raised."""
    results: dict[int, _T] = {}
    upcoming = iter(enumerate(calls))

    async def runner() -> None:
        for index, call in upcoming:  # shared: each runner takes the next call
            results[index] = await call()

    await _all_or_nothing([runner() for _ in range(min(at_once, len(calls)))])
    return [results[index] for index in range(len(calls))]


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
