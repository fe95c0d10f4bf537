"""A local ElevenLabs: a real aiohttp server on 127.0.0.1 speaking the paths, bodies and
error shapes of ElevenLabs' OpenAPI document (``shared/reference/elevenlabs-openapi-tts.json``)
and of its observed errors, with faults a test can script.

Paths (under ``/v1``): ``POST /text-to-speech/{voice_id}``, ``…/stream``,
``…/with-timestamps`` and ``…/stream/with-timestamps``, ``GET /user/subscription``,
``GET /voices``, ``GET /models``.

- **Formats:** every ``output_format`` of the document: ``mp3_*`` as MP3 at that sample rate
  (LAME's variable bitrate, not the named one), ``pcm_*`` raw 16-bit little-endian mono,
  ``ulaw_8000``/``alaw_8000`` raw G.711 bytes, ``opus_48000_*`` Ogg Opus, like ElevenLabs.
  As the document says, ``mp3_44100_192`` needs the Creator tier and ``pcm_44100`` the Pro
  tier: below it (``tier``, default ``creator``) the request is refused with 403
  ``output_format_not_allowed`` (this refusal's shape is the server's choice; see
  ``_above_tier``).
- **Timestamps:** ``…/with-timestamps`` answers one JSON object
  (``AudioWithTimestampsResponseModel``: ``audio_base64``, ``alignment`` and
  ``normalized_alignment``, each ``characters``, ``character_start_times_seconds``,
  ``character_end_times_seconds``); ``…/stream/with-timestamps`` a stream of such objects,
  one per line (``StreamingAudioChunkWithTimestampsResponseModel``), each with its audio
  chunk and the characters that start within it (``alignment`` null when none), times in
  seconds from the start of the request's audio. The characters are the text as sent,
  spread evenly over the audio; the normalized alignment is the text with its white space
  collapsed, as this server "speaks" it.
- **Streaming:** the ``…/stream`` paths answer chunked: the first chunk after
  :attr:`ElevenLabsServer.time_to_first_chunk` seconds (``latency`` when it is ``None``;
  the audio is made meanwhile, so only a text that takes longer to make is later),
  then one chunk of ``chunk_bytes`` audio bytes every ``chunk_interval`` seconds.
  :attr:`ElevenLabsServer.first_chunk_at` records when each stream's first chunk left,
  and a stream whose client went away before its end is marked ``cut_short`` and put on
  :attr:`ElevenLabsServer.abandoned`.

- **Auth:** header ``xi-api-key``; missing → 401 ``needs_authorization``, wrong → 401
  ``invalid_api_key``, as ``{"detail": {"status", "message"}}``.
- **Validation:** FastAPI's 422 ``{"detail": [{"type", "loc", "msg", "input"}]}`` for a body
  that is not JSON, a missing or non-string ``text``, voice settings out of range
  (stability, similarity_boost, style 0..1; speed 0.7..1.2), a ``seed`` that is not an
  integer within 0..4294967295, ``pronunciation_dictionary_locators`` that are not a list
  of at most 3 objects each with a string ``pronunciation_dictionary_id`` (and a string or
  null ``version_id``), ``previous_request_ids``/``next_request_ids`` that are not lists of
  at most 3 strings, ``previous_text``/``next_text`` that are not strings, or an unknown
  ``output_format``; 400 ``max_character_limit_exceeded`` for a text over the model's
  limit, 400 ``model_not_found``, 404 ``voice_not_found``; 401 ``quota_exceeded`` when the
  account's characters run out (``character_limit``).
- **Request stitching:** every audio answer carries a ``request-id`` header (unless
  :attr:`ElevenLabsServer.send_request_ids` is false, as in zero retention mode). Stitching ids
  sent to ``eleven_v3`` are refused with 400 ``unsupported_model`` (ElevenLabs documents
  stitching as unavailable on v3 without documenting the error: this shape is this
  server's choice), and ids this server never issued with 400 ``request_id_not_found``
  (likewise its choice: it catches an engine that sends made-up ids).
- **eleven_v3:** as ElevenLabs answers (measured, not documented): ``previous_text`` or
  ``next_text`` → 400 ``unsupported_model`` ("Providing previous_text or next_text is not
  yet supported with the 'eleven_v3' model."), a ``voice_settings.stability`` other than
  0.0, 0.5 or 1.0 → 400 ``invalid_ttd_stability`` ("… Must be one of: [0.0, 0.5, 1.0]").
- **Concurrency:** ``max_concurrency`` is the account's limit, counted over every client of
  this server together (several engine instances on one key share it, as on ElevenLabs):
  a text-to-speech request arriving while that many are in flight is refused with 429
  ``too_many_concurrent_requests`` (with ``current-concurrent-requests`` and
  ``maximum-concurrent-requests`` headers; no ``Retry-After``). With
  :attr:`ElevenLabsServer.concurrency_code` ``"concurrent_limit_exceeded"`` the refusal
  takes the shape of ElevenLabs' current errors page instead: ``detail`` with ``code``,
  ``status`` (legacy, the same), ``message`` and ``request_id``; the ``type`` that page also
  names is left out, its value for this error not being documented there.
  :attr:`ElevenLabsServer.concurrency_refusals` counts those refusals;
  :attr:`ElevenLabsServer.peak_in_flight` is the most requests in flight at once, refused
  ones included, :attr:`ElevenLabsServer.peak_admitted` the most being served at once
  (never above ``max_concurrency``).
- **Scripted faults:** :attr:`ElevenLabsServer.faults` is a queue; each text-to-speech
  request takes the next :class:`Fault` (``None``: answered as usual; ``too_many_concurrent_requests``,
  ``concurrent_limit_exceeded`` (the newer shape above), ``system_busy``, each with or
  without ``retry_after``; ``quota_exceeded``; ``server_error`` (500 without
  ``detail``); ``server_error_detail``; ``hang`` (no answer until the server stops);
  ``drop`` (half the audio, then the connection closes; on a streaming path: half the
  chunks)).
- **Latency:** ``latency`` seconds before each answer, like generation time.
- **Audio:** deterministic (a tone whose pitch follows the text), ``seconds_per_char``
  seconds per character, in ``output_format``; cached per text and format.
- **Log:** :attr:`ElevenLabsServer.received` lists every request (never the key itself)
  with its JSON body (``seed``, ``pronunciation_dictionary_locators``, stitching fields as
  sent) and the ``request-id`` answered; :attr:`ElevenLabsServer.tts_calls` counts the
  text-to-speech requests that reached it. Each text-to-speech answer says how long the
  server took in a ``Server-Timing`` header.

Standalone, for trying the engine without a key::

    python -m tests.support.elevenlabs_server --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import soundfile
from aiohttp import web

__all__ = [
    "DEFAULT_KEY", "MODELS", "TIERS", "VOICES", "ElevenLabsServer", "Fault", "Received",
    "RecordingSleep",
]

DEFAULT_KEY = "sk_local_test_key"

FaultKind = Literal[
    "too_many_concurrent_requests", "concurrent_limit_exceeded", "system_busy",
    "quota_exceeded", "server_error", "server_error_detail", "hang", "drop",
]
ConcurrencyCode = Literal["too_many_concurrent_requests", "concurrent_limit_exceeded"]

# model id → characters per request (FACTS.md; the English v2 models: ElevenLabs' models page)
MODELS: dict[str, int] = {
    "eleven_v3": 3_000,
    "eleven_multilingual_v2": 10_000,
    "eleven_flash_v2": 30_000,
    "eleven_turbo_v2": 30_000,
    "eleven_flash_v2_5": 40_000,
    "eleven_turbo_v2_5": 40_000,
}
VOICES: dict[str, str] = {
    "21m00Tcm4TlvDq8ikWAM": "Rachel",
    "EXAVITQu4vr4xnSDxMaL": "Sarah",
    "TX3LPaxmHKxFdv7VOQHJ": "Liam",
    "XB0fDUnXU5powFXDhCwa": "Charlotte",
}
_OUTPUT_FORMATS = {
    "mp3_22050_32", "mp3_44100_32", "mp3_44100_64", "mp3_44100_96", "mp3_44100_128",
    "mp3_44100_192", "pcm_8000", "pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100",
    "pcm_48000", "ulaw_8000", "alaw_8000", "opus_48000_32", "opus_48000_64", "opus_48000_96",
    "opus_48000_128", "opus_48000_192",
}
# The subscription tiers in order (the OpenAPI document's tier names, its grant and trial
# tiers left out: where they rank is not documented), and the formats above the lowest tier,
# with the tier each needs: the output_format parameter's text says "MP3 with 192kbps
# bitrate requires you to be subscribed to Creator tier or above. PCM with 44.1kHz sample
# rate requires you to be subscribed to Pro tier or above."
TIERS = ("free", "starter", "creator", "pro", "growing_business", "scale_2024_08_10",
         "enterprise")
_FORMAT_TIERS = {"mp3_44100_192": "creator", "pcm_44100": "pro"}
_SEED_MAX = 4_294_967_295
_MAX_LOCATORS = 3
_MAX_STITCHED = 3
_STITCHING_IDS = ("previous_request_ids", "next_request_ids")
_V3_STABILITIES = (0.0, 0.5, 1.0)
_SETTING_RANGES = {
    "stability": (0.0, 1.0), "similarity_boost": (0.0, 1.0), "style": (0.0, 1.0),
    "speed": (0.7, 1.2),
}


@dataclass(frozen=True)
class Fault:
    """One scripted answer; ``retry_after`` becomes the ``Retry-After`` header (429s)."""

    kind: FaultKind
    retry_after: float | str | None = None


@dataclass
class Received:
    """One request as the server saw it. ``key`` is ``ok``, ``missing`` or ``wrong``."""

    method: str
    path: str
    query: dict[str, str]
    key: str
    json: Any = None
    voice_id: str | None = None
    status: int | None = None
    audio_seconds: float | None = None
    fault: str | None = None
    at: float = field(default_factory=time.monotonic)
    seconds: float | None = None  # how long the server took to answer
    traceparent: str | None = None  # the W3C trace header the caller sent, if any
    request_id: str | None = None  # the request-id header of an audio answer
    chunks_sent: int = 0  # streaming paths: audio chunks written
    cut_short: bool = False  # streaming paths: the client went away before the end


class RecordingSleep:
    """A ``sleep`` for the backend's retries that records the waits and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _detail(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"detail": {"status": code, "message": message}},
                             status=status, headers=headers or None)


def _invalid(errors: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"detail": errors}, status=422)


def _seed_errors(seed: Any) -> list[dict[str, Any]]:
    loc = ["body", "seed"]
    if seed is None:
        return []
    if not isinstance(seed, int) or isinstance(seed, bool):
        return [{"type": "int_type", "loc": loc, "msg": "Input should be a valid integer",
                 "input": seed}]
    if not 0 <= seed <= _SEED_MAX:
        return [{"type": "value_error", "loc": loc, "input": seed,
                 "msg": f"Value error, seed must be an integer between 0 and {_SEED_MAX}"}]
    return []


def _too_long(loc: list[Any], value: list[Any], most: int) -> dict[str, Any]:
    return {"type": "too_long", "loc": loc, "input": value,
            "msg": f"List should have at most {most} items after validation, not {len(value)}",
            "ctx": {"field_type": "List", "max_length": most, "actual_length": len(value)}}


def _list_errors(name: str, value: Any, most: int) -> list[dict[str, Any]] | None:
    """Errors of a nullable list field beyond its items; ``None``: check the items."""
    if value is None:
        return []
    if not isinstance(value, list):
        return [{"type": "list_type", "loc": ["body", name], "msg": "Input should be a valid list",
                 "input": value}]
    if len(value) > most:
        return [_too_long(["body", name], value, most)]
    return None


def _string_list_errors(name: str, value: Any, most: int) -> list[dict[str, Any]]:
    errors = _list_errors(name, value, most)
    if errors is not None:
        return errors
    return [{"type": "string_type", "loc": ["body", name, i], "msg": "Input should be a valid "
             "string", "input": item} for i, item in enumerate(value) if not isinstance(item, str)]


def _locator_errors(value: Any) -> list[dict[str, Any]]:
    name = "pronunciation_dictionary_locators"
    refused = _list_errors(name, value, _MAX_LOCATORS)
    if refused is not None:
        return refused
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        loc = ["body", name, i]
        if not isinstance(item, dict):
            errors.append({"type": "model_attributes_type", "loc": loc,
                           "msg": "Input should be a valid dictionary", "input": item})
            continue
        if "pronunciation_dictionary_id" not in item:
            errors.append({"type": "missing", "loc": [*loc, "pronunciation_dictionary_id"],
                           "msg": "Field required", "input": item})
        elif not isinstance(item["pronunciation_dictionary_id"], str):
            errors.append({"type": "string_type", "loc": [*loc, "pronunciation_dictionary_id"],
                           "msg": "Input should be a valid string",
                           "input": item["pronunciation_dictionary_id"]})
        version = item.get("version_id")
        if version is not None and not isinstance(version, str):
            errors.append({"type": "string_type", "loc": [*loc, "version_id"],
                           "msg": "Input should be a valid string", "input": version})
    return errors


def _v3_refusal(model_id: str, body: dict[str, Any]) -> web.Response | None:
    """What ElevenLabs refuses on ``eleven_v3`` alone, as it answers (measured upstream):
    text context, and a stability other than 0.0, 0.5 or 1.0."""
    if not model_id.startswith("eleven_v3"):
        return None
    if body.get("previous_text") or body.get("next_text"):
        return _detail(400, "unsupported_model", "Providing previous_text or next_text is not "
                       f"yet supported with the '{model_id}' model.")
    stability = (body.get("voice_settings") or {}).get("stability")
    if stability is not None and stability not in _V3_STABILITIES:
        return _detail(400, "invalid_ttd_stability",
                       "Invalid TTD stability value. Must be one of: [0.0, 0.5, 1.0]")
    return None


def _tone(text: str, seconds: float, rate: int) -> np.ndarray[Any, np.dtype[np.int16]]:
    n = max(1, round(seconds * rate))
    t = np.arange(n) / rate
    pitch = 140 + zlib.crc32(text.encode()) % 160
    syllables = 0.55 + 0.45 * np.abs(np.sin(2 * np.pi * 3.0 * t))  # speech-like rhythm
    return (np.sin(2 * np.pi * pitch * t) * syllables * 9000).astype(np.int16)


class ElevenLabsServer:
    """See the module docstring. ``start()`` returns the API base URL (ending in ``/v1``),
    the value of ELEVENLABS_API_URL."""

    def __init__(
        self,
        api_key: str = DEFAULT_KEY,
        *,
        latency: float = 0.0,
        max_concurrency: int | None = None,
        seconds_per_char: float = 0.06,
        character_limit: int = 1_000_000,
        tier: str = "creator",
        time_to_first_chunk: float | None = None,
        chunk_interval: float = 0.0,
        chunk_bytes: int = 4096,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
        self.api_key = api_key
        self.latency = latency
        self.time_to_first_chunk = time_to_first_chunk
        self.chunk_interval = chunk_interval
        self.chunk_bytes = chunk_bytes
        self.first_chunk_at: list[float] = []  # monotonic, one per stream, in order
        self.abandoned: asyncio.Queue[Received] = asyncio.Queue()
        self.max_concurrency = max_concurrency
        self.seconds_per_char = seconds_per_char
        self.character_limit = character_limit
        self.character_count = 0
        self.tier = tier
        self.faults: list[Fault | None] = []
        self.received: list[Received] = []
        self.tts_calls = 0
        self.send_request_ids = True  # False: answers without the request-id header
        self.issued: set[str] = set()  # request-ids answered, the ones stitching may name
        self.in_flight = 0
        self.peak_in_flight = 0
        self.admitted = 0  # in flight and past the concurrency check
        self.peak_admitted = 0
        self.concurrency_refusals = 0
        self.concurrency_code: ConcurrencyCode = "too_many_concurrent_requests"
        self.url = ""
        self.api_url = ""
        self._audio: dict[tuple[str, str], bytes] = {}
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v1/text-to-speech/{voice_id}", self._tts)
        app.router.add_post("/v1/text-to-speech/{voice_id}/stream", self._tts)
        app.router.add_post("/v1/text-to-speech/{voice_id}/with-timestamps", self._tts)
        app.router.add_post("/v1/text-to-speech/{voice_id}/stream/with-timestamps", self._tts)
        app.router.add_get("/v1/user/subscription", self._subscription)
        app.router.add_get("/v1/voices", self._voices)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        self.api_url = f"{self.url}/v1"
        return self.api_url

    async def stop(self) -> None:
        self._release.set()  # let hanging handlers finish before the server goes
        if self._runner is not None:
            await self._runner.cleanup()

    # --- helpers for tests ---

    def tts_requests(self) -> list[Received]:
        return [r for r in self.received if "/text-to-speech/" in r.path]

    def audio_sent(self, text: str, rate: int | str = 44100) -> bytes:
        """The audio bytes this server answered for ``text``: ``rate`` an MP3 sample rate,
        or an ``output_format`` name (KeyError if none)."""
        fmt = rate if isinstance(rate, str) else f"mp3_{rate}_128"
        if fmt.startswith("mp3_"):  # the bitrate makes no difference here
            fmt = "mp3_" + fmt.split("_")[1]
        return self._audio[(text, fmt)]

    def alignment(self, text: str) -> dict[str, list[Any]]:
        """The character alignment this server answers for ``text`` (see the module
        docstring): every character, spread evenly over the audio."""
        return _alignment(text, self.audio_seconds(text))

    def audio_seconds(self, text: str) -> float:
        """The duration of the audio this server makes for ``text``."""
        return max(0.05, self.seconds_per_char * len(text))

    # --- handlers ---

    def _log(self, request: web.Request) -> tuple[Received, web.Response | None]:
        given = request.headers.get("xi-api-key")
        key = "missing" if given is None else ("ok" if given == self.api_key else "wrong")
        entry = Received(request.method, request.path, dict(request.query), key,
                         voice_id=request.match_info.get("voice_id"),
                         traceparent=request.headers.get("traceparent"))
        self.received.append(entry)
        if key == "missing":
            return entry, _detail(401, "needs_authorization", "Neither authorization header "
                                  "nor xi-api-key received, please provide one.")
        if key == "wrong":
            return entry, _detail(401, "invalid_api_key", "Invalid API key")
        return entry, None

    async def _tts(self, request: web.Request) -> web.StreamResponse:
        entry, refusal = self._log(request)
        self.tts_calls += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            response = refusal or await self._speak(request, entry)
        finally:
            self.in_flight -= 1
        entry.status = response.status
        entry.seconds = time.monotonic() - entry.at
        if not response.prepared:  # the server's own time, for benchmarks
            response.headers["Server-Timing"] = f"app;dur={entry.seconds * 1000:.3f}"
        return response

    async def _speak(self, request: web.Request, entry: Received) -> web.StreamResponse:
        limit = self.max_concurrency
        if limit is not None and self.in_flight > limit:
            entry.fault = "concurrency"
            self.concurrency_refusals += 1
            return self._concurrency_refusal(
                self.concurrency_code, **{"current-concurrent-requests": str(self.in_flight),
                                          "maximum-concurrent-requests": str(limit)})
        self.admitted += 1
        self.peak_admitted = max(self.peak_admitted, self.admitted)
        try:
            return await self._admitted(request, entry)
        finally:
            self.admitted -= 1

    def _concurrency_refusal(self, code: ConcurrencyCode, **headers: str) -> web.Response:
        limit = headers.get("maximum-concurrent-requests")
        message = "Too many concurrent requests." + (
            "" if limit is None else f" Your current subscription is associated with a maximum "
            f"of {limit} concurrent requests (running in parallel).")
        if code == "too_many_concurrent_requests":
            return _detail(429, code, message, **headers)
        return web.json_response(
            {"detail": {"code": code, "status": code, "message": message,
                        "request_id": f"err{len(self.received):06d}"}},
            status=429, headers=headers or None)

    async def _admitted(self, request: web.Request, entry: Received) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError as exc:
            return _invalid([{"type": "json_invalid", "loc": ["body", 0],
                              "msg": "JSON decode error", "input": {},
                              "ctx": {"error": str(exc)}}])
        entry.json = body
        invalid = self._validate(body, request.query)
        if invalid is not None:
            return invalid
        refused = self._above_tier(request.query.get("output_format", "mp3_44100_128"))
        if refused is not None:
            return refused
        text: str = body["text"]
        model_id = body.get("model_id", "eleven_multilingual_v2")
        if model_id not in MODELS:
            return _detail(400, "model_not_found", f"A model with model ID {model_id} does not "
                           "exist.")
        if entry.voice_id not in VOICES:
            return _detail(404, "voice_not_found",
                           f"A voice with the voice_id {entry.voice_id} was not found.")
        if len(text) > MODELS[model_id]:
            return _detail(400, "max_character_limit_exceeded",
                           f"You are sending {len(text)} characters with a maximum of "
                           f"{MODELS[model_id]} for model {model_id}.")
        stitched = [i for name in _STITCHING_IDS for i in body.get(name) or []]
        if stitched and model_id.startswith("eleven_v3"):
            return _detail(400, "unsupported_model", "Request stitching (previous_request_ids, "
                           f"next_request_ids) is not available for {model_id}.")
        refused = _v3_refusal(model_id, body)
        if refused is not None:
            return refused
        unknown = [i for i in stitched if i not in self.issued]
        if unknown:
            return _detail(400, "request_id_not_found",
                           f"No generation with request id {unknown[0]} was found.")

        fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            entry.fault = fault.kind
            answer = await self._fault(fault, request, text)
            if answer is not None:
                return answer
        if self.character_count + len(text) > self.character_limit:
            return self._quota(len(text))
        streaming = request.path.endswith(("/stream", "/stream/with-timestamps"))
        wait = self.latency
        if streaming and self.time_to_first_chunk is not None:
            wait = self.time_to_first_chunk
        fmt = request.query.get("output_format", "mp3_44100_128")
        making = asyncio.ensure_future(self._audio_for(text, fmt))  # while it waits
        try:
            if wait:
                await asyncio.sleep(wait)
            audio = await making
        finally:
            making.cancel()
        self.character_count += len(text)
        entry.audio_seconds = self.audio_seconds(text)
        headers = {"character-cost": str(len(text))}
        if self.send_request_ids:
            entry.request_id = f"req{len(self.received):06d}"
            self.issued.add(entry.request_id)
            headers["request-id"] = entry.request_id
        timestamps = request.path.endswith("/with-timestamps")
        if streaming:
            return await self._stream(request, entry, text, audio, fmt, headers,
                                      timestamps=timestamps)
        if timestamps:
            return web.json_response(
                _timed_chunk(audio, _alignment(text, entry.audio_seconds),
                             _alignment(_normalized(text), entry.audio_seconds)),
                headers=headers)
        return web.Response(body=audio, content_type=_content_type(fmt), headers=headers)

    async def _stream(self, request: web.Request, entry: Received, text: str, audio: bytes,
                      fmt: str, headers: dict[str, str], *, timestamps: bool,
                      fraction: float = 1.0) -> web.StreamResponse:
        """``audio`` in paced chunks (JSON lines with their characters' timings when
        ``timestamps``); only the first ``fraction`` of the chunks when dropping."""
        response = web.StreamResponse(headers={
            **headers, "Content-Type": "application/json" if timestamps else _content_type(fmt)})
        response.enable_chunked_encoding()
        await response.prepare(request)
        step = self.chunk_bytes
        starts = list(range(0, len(audio), step))
        if fraction < 1.0:
            starts = starts[: max(1, int(len(starts) * fraction))]
        seconds = self.audio_seconds(text)
        aligned = _alignment(text, seconds)
        normalized = _alignment(_normalized(text), seconds)
        try:
            for i, start in enumerate(starts):
                if i and self.chunk_interval:
                    await asyncio.sleep(self.chunk_interval)
                chunk = audio[start : start + step]
                if timestamps:
                    lo, hi = start / len(audio) * seconds, (start + step) / len(audio) * seconds
                    line = _timed_chunk(chunk, _within(aligned, lo, hi),
                                        _within(normalized, lo, hi))
                    chunk = json.dumps(line).encode() + b"\n"
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the client went away")
                await response.write(chunk)
                entry.chunks_sent += 1
                if i == 0:
                    self.first_chunk_at.append(time.monotonic())
            if fraction < 1.0:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            entry.cut_short = True
            self.abandoned.put_nowait(entry)
            raise
        return response

    def _validate(self, body: Any, query: Any) -> web.Response | None:
        errors: list[dict[str, Any]] = []
        if not isinstance(body, dict):
            return _invalid([{"type": "model_attributes_type", "loc": ["body"],
                              "msg": "Input should be a valid dictionary", "input": body}])
        if "text" not in body:
            errors.append({"type": "missing", "loc": ["body", "text"], "msg": "Field required",
                           "input": body})
        elif not isinstance(body["text"], str):
            errors.append({"type": "string_type", "loc": ["body", "text"],
                           "msg": "Input should be a valid string", "input": body["text"]})
        settings = body.get("voice_settings")
        if isinstance(settings, dict):
            for name, (low, high) in _SETTING_RANGES.items():
                value = settings.get(name)
                if value is None:
                    continue
                loc = ["body", "voice_settings", name]
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    errors.append({"type": "float_type", "loc": loc,
                                   "msg": "Input should be a valid number", "input": value})
                elif value < low:
                    errors.append({"type": "greater_than_equal", "loc": loc, "input": value,
                                   "msg": f"Input should be greater than or equal to {low}",
                                   "ctx": {"ge": low}})
                elif value > high:
                    errors.append({"type": "less_than_equal", "loc": loc, "input": value,
                                   "msg": f"Input should be less than or equal to {high}",
                                   "ctx": {"le": high}})
        elif settings is not None:
            errors.append({"type": "model_attributes_type", "loc": ["body", "voice_settings"],
                           "msg": "Input should be a valid dictionary", "input": settings})
        errors += _seed_errors(body.get("seed"))
        errors += _locator_errors(body.get("pronunciation_dictionary_locators"))
        for name in _STITCHING_IDS:
            errors += _string_list_errors(name, body.get(name), _MAX_STITCHED)
        for name in ("previous_text", "next_text"):
            value = body.get(name)
            if value is not None and not isinstance(value, str):
                errors.append({"type": "string_type", "loc": ["body", name],
                               "msg": "Input should be a valid string", "input": value})
        fmt = query.get("output_format")
        if fmt is not None and fmt not in _OUTPUT_FORMATS:
            errors.append({"type": "enum", "loc": ["query", "output_format"], "input": fmt,
                           "msg": "Input should be one of the supported output formats"})
        return _invalid(errors) if errors else None

    def _above_tier(self, fmt: str) -> web.Response | None:
        """The refusal of a format the account's tier does not include. FACTS.md does not
        measure it and the OpenAPI document names only the tiers (see ``_FORMAT_TIERS``),
        listing no answer but 422; this follows its text: 403 (what callers on lower plans
        report for ``pcm_44100``) in the ``{"detail": {"status", "message"}}`` shape of
        ElevenLabs' other refusals, the status ``output_format_not_allowed`` being this
        server's choice."""
        needed = _FORMAT_TIERS.get(fmt)
        if needed is None or TIERS.index(self.tier) >= TIERS.index(needed):
            return None
        return _detail(403, "output_format_not_allowed",
                       f"Output format {fmt} requires the {needed.capitalize()} tier or above; "
                       f"this account is on the {self.tier.capitalize()} tier.")

    def _quota(self, needed: int) -> web.Response:
        left = max(0, self.character_limit - self.character_count)
        return _detail(401, "quota_exceeded",
                       f"This request exceeds your quota of {self.character_limit}. You have "
                       f"{left} credits remaining, while {needed} credits are required for "
                       "this request.")

    async def _fault(
        self, fault: Fault, request: web.Request, text: str
    ) -> web.StreamResponse | None:
        headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        if fault.kind in ("too_many_concurrent_requests", "concurrent_limit_exceeded"):
            code: ConcurrencyCode = (
                "too_many_concurrent_requests" if fault.kind == "too_many_concurrent_requests"
                else "concurrent_limit_exceeded")
            return self._concurrency_refusal(code, **headers)
        if fault.kind == "system_busy":
            return _detail(429, fault.kind, "We're experiencing an unusually high volume of "
                           "requests. Please try again later.", **headers)
        if fault.kind == "quota_exceeded":
            return self._quota(len(text) + self.character_limit)
        if fault.kind == "server_error":
            return web.Response(status=500, text="Internal Server Error")
        if fault.kind == "server_error_detail":
            return _detail(500, "internal_error", "An internal error occurred.")
        if fault.kind == "hang":
            await self._release.wait()
            return web.Response(status=503)
        if fault.kind == "drop" and request.path.endswith(("/stream", "/stream/with-timestamps")):
            fmt = request.query.get("output_format", "mp3_44100_128")
            audio = await self._audio_for(text, fmt)
            return await self._stream(request, Received("POST", request.path, {}, "ok"), text,
                                      audio, fmt, {}, fraction=0.5,
                                      timestamps=request.path.endswith("/with-timestamps"))
        if fault.kind == "drop":
            audio = await self._audio_for(text, "mp3_44100_128")
            response = web.StreamResponse(headers={"Content-Type": "audio/mpeg",
                                                   "Content-Length": str(len(audio))})
            await response.prepare(request)
            await response.write(audio[: len(audio) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        return None

    async def _audio_for(self, text: str, fmt: str) -> bytes:
        codec, rate = fmt.split("_")[:2]
        key = (text, f"{codec}_{rate}" if codec == "mp3" else fmt)
        if key not in self._audio:
            samples = _tone(text, self.audio_seconds(text), int(rate))
            self._audio[key] = await asyncio.to_thread(_encode, samples, int(rate), codec)
        return self._audio[key]

    async def _subscription(self, request: web.Request) -> web.Response:
        _, refusal = self._log(request)
        if refusal is not None:
            return refusal
        return web.json_response({
            "tier": self.tier, "character_count": self.character_count,
            "character_limit": self.character_limit, "max_character_limit_extension": None,
            "can_extend_character_limit": False, "allowed_to_extend_character_limit": False,
            "next_character_count_reset_unix": 1_767_225_600, "voice_slots_used": 1,
            "professional_voice_slots_used": 0, "voice_limit": 30, "voice_add_edit_counter": 0,
            "professional_voice_limit": 1, "can_extend_voice_limit": False,
            "can_use_instant_voice_cloning": True, "can_use_professional_voice_cloning": True,
            "currency": "usd", "status": "active", "billing_period": "monthly_period",
            "character_refresh_period": "monthly_period", "next_invoice": None,
            "has_open_invoices": False, "pending_change": None,
        })

    async def _voices(self, request: web.Request) -> web.Response:
        _, refusal = self._log(request)
        if refusal is not None:
            return refusal
        return web.json_response({"voices": [
            {"voice_id": voice_id, "name": name, "category": "premade", "labels": {},
             "description": None, "preview_url": None, "available_for_tiers": [],
             "settings": {"stability": 0.5, "similarity_boost": 0.75, "style": 0.0,
                          "use_speaker_boost": True, "speed": 1.0},
             "high_quality_base_model_ids": list(MODELS)}
            for voice_id, name in VOICES.items()
        ]})

    async def _models(self, request: web.Request) -> web.Response:
        _, refusal = self._log(request)
        if refusal is not None:
            return refusal
        return web.json_response([
            {"model_id": model_id, "name": model_id, "can_do_text_to_speech": True,
             "can_do_voice_conversion": False, "can_use_style": True,
             "can_use_speaker_boost": True, "max_characters_request_free_user": limit,
             "max_characters_request_subscribed_user": limit,
             "maximum_text_length_per_request": limit, "languages": [],
             "concurrency_group": "turbo" if ("flash" in model_id or "turbo" in model_id)
             else "standard"}
            for model_id, limit in MODELS.items()
        ])


def _encode(samples: np.ndarray[Any, np.dtype[np.int16]], rate: int, codec: str) -> bytes:
    if codec == "pcm":
        return samples.astype("<i2").tobytes()
    buffer = io.BytesIO()
    if codec in ("ulaw", "alaw"):
        soundfile.write(buffer, samples, rate, format="RAW", subtype=codec.upper())
    elif codec == "opus":
        soundfile.write(buffer, samples, rate, format="OGG", subtype="OPUS")
    else:
        soundfile.write(buffer, samples, rate, format="MP3")
    return buffer.getvalue()


def _content_type(fmt: str) -> str:
    codec = fmt.split("_")[0]
    return {"mp3": "audio/mpeg", "opus": "audio/ogg", "pcm": "audio/pcm",
            "ulaw": "audio/basic", "alaw": "audio/x-alaw-basic"}[codec]


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _alignment(text: str, seconds: float) -> dict[str, list[Any]]:
    per = seconds / max(1, len(text))
    return {"characters": list(text),
            "character_start_times_seconds": [round(i * per, 6) for i in range(len(text))],
            "character_end_times_seconds": [round((i + 1) * per, 6) for i in range(len(text))]}


def _within(alignment: dict[str, list[Any]], lo: float, hi: float) -> dict[str, list[Any]] | None:
    """The characters of ``alignment`` starting within ``[lo, hi)``; ``None`` when none."""
    keep = [i for i, t in enumerate(alignment["character_start_times_seconds"]) if lo <= t < hi]
    if not keep:
        return None
    return {name: [values[i] for i in keep] for name, values in alignment.items()}


def _timed_chunk(audio: bytes, alignment: dict[str, list[Any]] | None,
                 normalized: dict[str, list[Any]] | None) -> dict[str, Any]:
    return {"audio_base64": base64.b64encode(audio).decode("ascii"), "alignment": alignment,
            "normalized_alignment": normalized}


async def _serve(args: argparse.Namespace) -> None:
    server = ElevenLabsServer(args.api_key, latency=args.latency,
                              max_concurrency=args.max_concurrency, tier=args.tier,
                              time_to_first_chunk=args.time_to_first_chunk,
                              chunk_interval=args.chunk_interval)
    url = await server.start(args.host, args.port)
    print(f"local ElevenLabs on {url}  (ELEVENLABS_API_URL={url} "
          f"ELEVENLABS_API_KEY={args.api_key}); Ctrl-C stops", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A local ElevenLabs API for trying the engine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default=DEFAULT_KEY, help="the key it accepts")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--tier", choices=TIERS, default="creator",
                        help="the plan: mp3_44100_192 needs creator, pcm_44100 pro")
    parser.add_argument("--time-to-first-chunk", type=float, default=None,
                        help="streaming: seconds before the first chunk (default: --latency)")
    parser.add_argument("--chunk-interval", type=float, default=0.0,
                        help="streaming: seconds between chunks")
    try:
        asyncio.run(_serve(parser.parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
