"""The one entry for voice work: a validated request in, an audio output (streamed as it is
made) and its result out.

The Kafka consumer and the HTTP endpoint both call :meth:`VoiceService.generate`, so the
two paths cannot drift apart. The service resolves the voice (request, then the character's
profile, then the defaults) and the seed (the request's, else one derived from its
``request_id``), answers a request it has answered before from the remembered results while
the file exists (:mod:`core.voice.results`), joins the same output being made
(:mod:`core.shared_work`), and otherwise injects emotion the way the model can
perform it and has the backend write the file. A backend that retries upstream calls spends the request's
:class:`~core.retry_budget.RetryBudget` when the caller brings one (the consume loop does,
so that its retries and the backend's share one bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from core.answers import Answers
from core.outputs import OutputStore, StoredFile
from core.remembered import looked_up
from core.retry_budget import RetryBudget
from core.seeds import derive_seed
from core.shared_work import Keeper, SharedWork
from core.storage import StorageError, unavailable
from core.voice.backend import SEED_MAX, VoiceBackend, VoiceSettings
from core.voice.emotion import EmotionInjector, shift_settings
from core.voice.emotion_rules import RulesEmotionInjector
from core.voice.formats import DEFAULT_OUTPUT_FORMAT, format_named
from core.voice.mp3 import audio_duration
from core.voice.profiles import VoiceProfiles
from core.voice.quota import QuotaMonitor
from core.voice.results import RememberedVoice, VoiceResults, voice_fingerprint
from core.voice.streams import AudioStream, AudioStreams
from core.voice.tags import strip_audio_tags
from core.voice.timing import Alignment, word_timings
from schemas.errors import EngineError, InternalError, InvalidRequestError
from schemas.events import WordTiming

__all__ = ["OnStream", "VoiceJob", "VoiceRequestLike", "VoiceResult", "VoiceService"]

OnStream = Callable[[AudioStream, str], Awaitable[None]]
"""Told of a request's live stream and its URL, once, when its first audio is in it (the
audio keeps coming meanwhile)."""

logger = logging.getLogger(__name__)

DEFAULT_MAX_TEXT_CHARS = 50_000
"""VOICE_MAX_TEXT_CHARS's default (see :mod:`core.settings` and docs/voice.md)."""


@runtime_checkable
class _SpendsBudget(Protocol):
    """A backend that retries upstream calls (ElevenLabs) and can spend a given budget."""

    def with_budget(self, budget: RetryBudget) -> VoiceBackend: ...


class VoiceRequestLike(Protocol):
    """What the service reads of a request: ``VoiceRequested``, the HTTP body model and
    :class:`VoiceJob` all fit."""

    @property
    def text(self) -> str: ...
    @property
    def voice_id(self) -> str | None: ...
    @property
    def stability(self) -> float | None: ...
    @property
    def similarity_boost(self) -> float | None: ...
    @property
    def style(self) -> float | None: ...
    @property
    def model_id(self) -> str | None: ...
    @property
    def inject_emotion(self) -> bool: ...
    @property
    def character_id(self) -> str | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def request_id(self) -> str | None: ...


@dataclass(frozen=True)
class VoiceJob:
    """A plain voice request (the original API's body), for callers without an event.
    Without ``seed`` and ``request_id`` the upstream samples freely and nothing is
    remembered."""

    text: str
    voice_id: str | None = None
    stability: float | None = None
    similarity_boost: float | None = None
    style: float | None = None
    model_id: str | None = None
    inject_emotion: bool = True
    character_id: str | None = None
    seed: int | None = None
    request_id: str | None = None
    output_format: str | None = None


@dataclass(frozen=True)
class VoiceResult:
    """The original ``/generate/voice`` response: ``text`` as requested, ``enhanced_text``
    as spoken, ``duration_seconds`` read from the written file, ``timestamp`` ISO-8601 UTC
    (when the file was made, or when a remembered result was answered); plus ``seed``, the
    seed the audio was asked for with (``None``: none)."""

    audio_id: str
    filename: str
    text: str
    enhanced_text: str
    voice_id: str
    url: str
    duration_seconds: float
    timestamp: str
    seed: int | None = None
    words: list[WordTiming] | None = None
    alignment_url: str | None = None
    output_format: str | None = None


class VoiceService:
    """Turns voice requests into audio outputs in ``store`` through ``backend``, streamed
    through ``streams`` (none: not streamed).

    ``default_voice_id`` is used when neither a request nor its character's profile (in
    ``profiles``) names a voice; the model falls back to the backend's default. ``injector``
    makes text expressive when a request asks for emotion (default: the rules,
    :class:`~core.voice.emotion_rules.RulesEmotionInjector`); texts longer than
    ``max_text_chars`` (VOICE_MAX_TEXT_CHARS) are rejected. ``quota`` is the provider's
    quota monitor, when the backend has an account. ``results`` remembers answered
    requests (none: every request is made anew), ``answers`` which request ids they
    answered (none: :meth:`remembered` finds nothing). Raises ``ValueError`` for an empty
    ``default_voice_id`` or a ``max_text_chars`` below 1.
    """

    def __init__(
        self,
        backend: VoiceBackend,
        store: OutputStore,
        default_voice_id: str,
        injector: EmotionInjector | None = None,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        *,
        profiles: VoiceProfiles | None = None,
        quota: QuotaMonitor | None = None,
        results: VoiceResults | None = None,
        answers: Answers | None = None,
        streams: AudioStreams | None = None,
    ) -> None:
        if not default_voice_id:
            raise ValueError("default_voice_id must not be empty")
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        self._backend = backend
        self._store = store
        self._default_voice_id = default_voice_id
        self._injector = injector if injector is not None else RulesEmotionInjector()
        self._max_text_chars = max_text_chars
        self._profiles = profiles if profiles is not None else VoiceProfiles()
        self._quota = quota
        self._results = results
        self._answers = answers
        self._streams = streams
        self._making: SharedWork[_Made] = SharedWork("voice")

    @property
    def backend(self) -> VoiceBackend:
        return self._backend

    @property
    def _default_format(self) -> str:
        # a backend written before formats existed makes MP3
        return str(getattr(self._backend, "default_output_format", DEFAULT_OUTPUT_FORMAT))

    @property
    def streams(self) -> AudioStreams | None:
        """This instance's live streams (``None``: requests are not streamed)."""
        return self._streams

    @property
    def quota(self) -> QuotaMonitor | None:
        """The provider's quota monitor (ElevenLabs), ``None`` for the local voice."""
        return self._quota

    async def generate(self, request: VoiceRequestLike, *, budget: RetryBudget | None = None,
                       on_stream: OnStream | None = None,
                       keep_when_abandoned: Keeper | None = None) -> VoiceResult:
        """Speak ``request.text`` into a new output in ``request.output_format`` (the
        backend's default when absent) and describe it, with its words' timings.

        With ``on_stream`` and the service's ``streams``, the audio is streamed as it is
        made: ``on_stream(stream, url)`` is called once, when the first audio is in the
        stream, and runs while the audio keeps coming; it has returned before this does
        (so a progress event it publishes precedes the completed one), and its failure is
        the request's. The stream is finished when the file is complete and aborted when
        the request fails or is cancelled (a request answered from the remembered results
        is not streamed: its file is there). A failure is final (``retryable`` false) once
        ``on_stream`` returned: a listener may have heard the audio's start, which a
        retry would repeat.

        ``budget`` is the request's retry budget: the backend's upstream calls and retries
        are counted and bounded by it (``None``: the backend's own, one per call).

        Cancelling the caller stops the work, its upstream call and its stream, unless
        ``keep_when_abandoned`` keeps it (a revoked record, which comes again; a request
        with a seed, given or derived, when results are remembered): then the voice goes
        on, streamed as before, and the record's next delivery joins it (same stream, no
        second call) or is answered from the remembered results; it stops once that
        keeper is dropped (the request cancelled) with nobody else waiting for it.

        Tags such as ``[warmly]`` reach the backend only if it performs them for the
        requested model; for other models emotion shifts the voice settings a request did
        not set itself. ``enhanced_text`` is exactly what was sent to the backend. A text
        longer than the model takes in one request is spoken in parts by the backend
        (ElevenLabs: stitched, :mod:`core.voice.elevenlabs`).

        The seed is ``request.seed``, else one derived from ``request.request_id`` (none
        without either). A request with a seed that was answered before (same text, voice,
        settings, model, backend, its ``audio_variant`` and seed) is answered from the
        remembered result while its file has a useful life left
        (:func:`core.remembered.useful_life`), with no backend call; once the file is gone
        or about to be, the remembered text and settings are spoken again. The same output asked for
        while it is being made is waited for, not made twice.

        Raises :class:`InvalidRequestError` (before any work) for a text that is empty once
        audio tags are removed, or too long, a voice setting outside 0..1, a seed outside
        0..4294967295, a blank ``voice_id``/``model_id`` or an ``output_format``
        ElevenLabs does not list; the backend's
        :class:`~schemas.errors.EngineError` as raised (ElevenLabs: the subclasses of
        :class:`~core.voice.elevenlabs_faults.ElevenLabsError`, carrying ``attempts``);
        :class:`InternalError` when the output cannot be written or read back. A failed
        request leaves no file.
        """
        settings, explicit = self._settings(request)
        plain = self._checked_text(request.text)
        if settings.seed is None or self._results is None:
            made = await self._make(request, plain, settings, explicit, budget,
                                    on_stream=on_stream)
            return self._answer(request.text, made)
        key = self._key(request, settings)
        remembered, current = await self._looked_up(key)
        if remembered is not None and current:
            logger.debug("voice answered from the remembered results: %s", remembered.filename)
            words = await self._words(request.text, remembered)
            await self._recorded(request, key)
            return self._answer(request.text, _Made(remembered, time.time(), words))
        if remembered is not None:
            logger.info("voice output %s is gone or about to expire: speaking it again with seed %s",
                        remembered.filename, settings.seed)

        async def make() -> _Made:
            made = await self._make(request, plain, settings, explicit, budget, remembered,
                                    on_stream=on_stream)
            await self._remember(key, made.voice)
            return made

        made = await self._making.run(key, make, keep_when_abandoned=keep_when_abandoned)
        await self._recorded(request, key)
        return self._answer(request.text, made)

    async def remembered(self, request: VoiceRequestLike) -> VoiceResult | None:
        """The result :meth:`generate` would answer ``request`` with from the remembered
        results (same file, same URL), found without emotion injection or an upstream
        call, for a request that :meth:`generate` answered before (its ``request_id``,
        the same content); ``None`` for any other (a new request with the same content
        included), when its file is gone or about to be, or the request is invalid (no
        error raised)."""
        if self._results is None or self._answers is None:
            return None
        try:
            settings, _ = self._settings(request)
            self._checked_text(request.text)
        except EngineError:
            return None
        if settings.seed is None:
            return None
        key = self._key(request, settings)
        if not await self._answers.answered_with(request.request_id, key):
            return None
        remembered, current = await self._looked_up(key)
        if remembered is None or not current:
            return None
        words = await self._words(request.text, remembered)
        return self._answer(request.text, _Made(remembered, time.time(), words))

    def _key(self, request: VoiceRequestLike, settings: VoiceSettings) -> str:
        model = settings.model_id or getattr(self._backend, "default_model_id", None)
        return voice_fingerprint(request.text, request.inject_emotion, settings,
                                 self._backend.name, model, self._backend.audio_variant)

    async def _looked_up(self, key: str) -> tuple[RememberedVoice | None, bool]:
        assert self._results is not None
        return await looked_up(self._results.get, self._store, key, lambda r: [r.filename],
                               shared=self._results.shared or self._store.shared is not None)

    async def _make(
        self, request: VoiceRequestLike, plain: str, settings: VoiceSettings,
        explicit: frozenset[str], budget: RetryBudget | None,
        remembered: RememberedVoice | None = None, *, on_stream: OnStream | None = None,
    ) -> _Made:
        """A new output for ``request``, when it was made and its words' timings (from the
        backend's alignment in memory, off the event loop); ``remembered`` says what to
        speak and how (a replay after cleanup), else emotion is injected now."""
        if remembered is not None:
            spoken, settings = remembered.spoken, remembered.settings
        else:
            spoken, settings = await self._expressed(request, plain, settings, explicit)
        fmt = format_named(settings.output_format or self._default_format)

        duration = 0.0
        alignment: Alignment | None = None

        backend = self._backend
        if budget is not None and isinstance(backend, _SpendsBudget):
            backend = backend.with_budget(budget)
        stream = _Announcer(self._streams, fmt.content_type, on_stream) \
            if on_stream is not None and self._streams is not None else None

        async def write(path: Path) -> None:
            nonlocal duration, alignment
            if stream is None:  # the older signature, which simple backends still have
                alignment = await backend.synthesize_to(path, spoken, settings)
            else:
                alignment = await backend.synthesize_to(path, spoken, settings, stream)
                await stream.announced()  # its progress before the completed event
            # from the file itself, not from the samples: a header read, ~0.1 ms
            duration = audio_duration(path)

        try:
            try:
                stored = await self._store.write_with_async(write, fmt.suffix)
            except StorageError as exc:  # the store comes back: the request may retry
                raise unavailable(exc) from exc
            except OSError as exc:
                raise InternalError(f"cannot write the voice output: {exc}") from exc
        except EngineError as exc:
            if stream is not None:
                await stream.end(f"{exc.code}: {exc}")
                if stream.heard and exc.retryable:
                    _heard(exc)  # asked again it would be a second stream, its start repeated
            raise
        except BaseException as exc:  # cancelled, or a bug: listeners see the stream end
            if stream is not None:
                stream.cancel(f"{type(exc).__name__}: {exc}")
            raise
        if stream is not None:
            await stream.end(None)
        timings = await self._timings_file(alignment)
        words = None if alignment is None else \
            await asyncio.to_thread(word_timings, request.text, alignment)
        logger.debug("voice %s: %d chars, %.3f s", stored.filename, len(spoken), duration)
        made = RememberedVoice(audio_id=stored.file_id, filename=stored.filename,
                               spoken=spoken, duration_seconds=round(duration, 3),
                               settings=settings, alignment_filename=timings)
        return _Made(made, stored.created_at, words)

    async def _timings_file(self, alignment: Alignment | None) -> str | None:
        """The characters' timings as a JSON output beside the audio (its name), or
        ``None`` without timings or when it cannot be written (the audio is fine)."""
        if alignment is None:
            return None

        def write() -> StoredFile:
            data = json.dumps({"text": alignment.text, **alignment.as_json()}).encode()
            return self._store.write(data, "json")

        try:
            stored = await asyncio.to_thread(write)
        except (OSError, StorageError) as exc:
            logger.warning("voice timings not written: %s", exc)
            return None
        return stored.filename

    async def _words(self, text: str, made: RememberedVoice) -> list[WordTiming] | None:
        """``text``'s words timed by ``made``'s timings file (a remembered result), read
        here or from the shared store; ``None`` without one or when it cannot be read."""
        if made.alignment_filename is None:
            return None
        try:
            data = await self._read_output(made.alignment_filename)
        except (OSError, StorageError) as exc:
            logger.warning("voice timings %s not read: %s", made.alignment_filename, exc)
            return None
        if data is None:
            return None

        def timed() -> list[WordTiming]:
            raw = json.loads(data)
            alignment = Alignment.of_characters(  # every character written: no matching
                raw["text"], raw["characters"], raw["character_start_times_seconds"],
                raw["character_end_times_seconds"])
            return word_timings(text, alignment)

        try:
            return await asyncio.to_thread(timed)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("voice timings %s unreadable: %s", made.alignment_filename, exc)
            return None

    async def _read_output(self, filename: str) -> bytes | None:
        """The bytes of the current output ``filename``, held here or in the shared store
        (``None``: in neither). Raises ``OSError`` or :class:`StorageError`."""
        path = self._store.resolve(filename)
        if path is not None:
            return await asyncio.to_thread(path.read_bytes)
        shared = self._store.shared
        if shared is None or not self._store.is_output_name(filename):
            return None
        read = await shared.open(filename)
        if read is None:
            return None
        async with contextlib.aclosing(read.chunks) as chunks:
            return b"".join([chunk async for chunk in chunks])

    async def _expressed(self, request: VoiceRequestLike, plain: str, settings: VoiceSettings,
                         explicit: frozenset[str]) -> tuple[str, VoiceSettings]:
        """The text to speak and the settings to speak it with, emotion injected as the
        model can perform it."""
        text = request.text
        performs_tags = self._backend.performs_audio_tags(settings.model_id)
        if request.inject_emotion:
            expression = await self._injector.express(text, performs_tags)
            text = expression.text
            if not performs_tags:
                settings = shift_settings(settings, expression.emotion, explicit)
        spoken = text.strip() if performs_tags else strip_audio_tags(text)
        if not strip_audio_tags(spoken):
            logger.warning("emotion injection returned no speech; speaking the text as given")
            spoken = plain
        return spoken, settings

    async def _remember(self, key: str, made: RememberedVoice) -> None:
        assert self._results is not None
        try:
            await asyncio.to_thread(self._results.put, key, made)
        except OSError as exc:  # the output is fine; only a replay will cost again
            logger.warning("voice result not remembered: %s", exc)

    async def _recorded(self, request: VoiceRequestLike, key: str) -> None:
        """``request`` answered with the result under ``key``: recorded (durably) before
        the caller publishes it, so that a redelivery finds it (:meth:`remembered`)."""
        if self._answers is not None:
            await self._answers.record(request.request_id, key)

    def _answer(self, text: str, answered: _Made) -> VoiceResult:
        made, words = answered.voice, answered.words
        return VoiceResult(
            audio_id=made.audio_id,
            filename=made.filename,
            text=text,
            enhanced_text=made.spoken,
            voice_id=made.settings.voice_id,
            url=self._store.url_for(made.filename),
            duration_seconds=made.duration_seconds,
            timestamp=_iso_utc(answered.created_at),
            seed=made.settings.seed,
            words=words,
            alignment_url=self._store.url_for(made.alignment_filename)
            if words is not None and made.alignment_filename else None,
            output_format=made.settings.output_format,
        )

    def _settings(self, request: VoiceRequestLike) -> tuple[VoiceSettings, frozenset[str]]:
        """The voice for ``request`` (request, then profile, then defaults) and the names of
        the settings the request set itself."""
        for field in ("stability", "similarity_boost", "style"):
            value = getattr(request, field)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidRequestError(f"{field} must be within 0..1, got {value}", field=field)
        for field in ("voice_id", "model_id"):
            value = getattr(request, field)
            if value is not None and not value.strip():
                raise InvalidRequestError(f"{field} must not be blank", field=field)
        seed = request.seed
        if seed is not None and (isinstance(seed, bool) or not 0 <= seed <= SEED_MAX):
            raise InvalidRequestError(f"seed must be within 0..{SEED_MAX}, got {seed}",
                                      field="seed")
        fmt = getattr(request, "output_format", None)
        if fmt is not None:
            format_named(fmt)  # an unknown name: INVALID_REQUEST naming output_format
        if seed is None and request.request_id:
            seed = derive_seed(request.request_id, SEED_MAX)  # a replay asks for the same audio
        profile = self._profiles.get(getattr(request, "character_id", None))

        def pick(field: str) -> Any:
            value = getattr(request, field, None)
            if value is None and profile is not None:
                value = getattr(profile, field)
            return value

        explicit = frozenset(
            f for f in ("stability", "similarity_boost", "style")
            if getattr(request, f) is not None
        )
        settings = VoiceSettings(
            voice_id=pick("voice_id") or self._default_voice_id,
            model_id=pick("model_id"),
            stability=pick("stability"),
            similarity_boost=pick("similarity_boost"),
            style=pick("style"),
            speed=pick("speed"),
            use_speaker_boost=pick("use_speaker_boost"),
            seed=seed,
            pronunciation_dictionaries=profile.pronunciation_dictionaries if profile else (),
            output_format=fmt or self._default_format,
        )
        return settings, explicit

    def _checked_text(self, text: str) -> str:
        if len(text) > self._max_text_chars:
            raise InvalidRequestError(
                f"text has {len(text)} characters, at most {self._max_text_chars} are allowed",
                field="text",
            )
        plain = strip_audio_tags(text)
        if not plain:
            raise InvalidRequestError(
                "text is empty (audio tags alone are not speech)", field="text"
            )
        return plain


def _iso_utc(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class _Made:
    """An output as answered: what was made, when (or when answered from the remembered
    results), and its words' timings."""

    voice: RememberedVoice
    created_at: float
    words: list[WordTiming] | None


class _Announcer:
    """A request's stream as its backend's sink: on the first audio written, the listener
    is told where to play it (``on_stream``, after the audio is in the stream), in a task
    of its own, so that the upstream's audio keeps coming meanwhile; a failed announce
    stops the writes that follow."""

    def __init__(self, streams: AudioStreams, content_type: str, on_stream: OnStream) -> None:
        self._streams = streams
        self.stream = streams.open(content_type)
        self._on_stream = on_stream
        self._announcing: asyncio.Task[None] | None = None

    async def write(self, data: bytes) -> None:
        self._raise_if_failed()
        await self.stream.write(data)
        if self._announcing is None and self.stream.first_audio.is_set():
            self._announcing = asyncio.ensure_future(
                self._on_stream(self.stream, self._streams.url_for(self.stream)))

    async def rewrite(self, offset: int, data: bytes) -> None:
        await self.stream.rewrite(offset, data)

    async def announced(self) -> None:
        """Wait for the announce to return; raises what it raised."""
        if self._announcing is not None:
            await self._announcing

    @property
    def heard(self) -> bool:
        """Whether the announce returned: from then on a listener may have heard some of
        the audio (before, nobody had its URL)."""
        task = self._announcing
        return task is not None and task.done() and not task.cancelled() \
            and task.exception() is None

    def _raise_if_failed(self) -> None:
        task = self._announcing
        if task is not None and task.done() and not task.cancelled():
            failure = task.exception()
            if failure is not None:
                raise failure

    async def end(self, failure: str | None) -> None:
        """The stream ends, complete (``failure`` ``None``) or aborted; an announce still
        under way is waited for first (then :attr:`heard` says whether it got through)."""
        if self._announcing is not None and not self._announcing.done():
            await asyncio.wait([self._announcing])
        if self._announcing is not None and not self._announcing.cancelled():
            self._announcing.exception()  # seen here: its failure is the request's, if any
        self._close(failure)

    def cancel(self, failure: str) -> None:
        """The request stops now: the announce too, and listeners see the stream end."""
        if self._announcing is not None:
            self._announcing.cancel()
        self._close(failure)

    def _close(self, failure: str | None) -> None:
        if failure is None:
            self.stream.finish()
        else:
            self.stream.abort(failure)
        self._streams.close(self.stream)


def _heard(error: EngineError) -> None:
    """``error``, once a listener may have heard the audio: final (a retry would start the
    audio again)."""
    error.retryable = False
    if "after audio was streamed" not in error.message:
        error.message = f"{error.message} (after audio was streamed: not asked again)"
        error.args = (error.message,)
