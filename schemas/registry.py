"""A Confluent Schema Registry as the source of Avro writer schemas (SCHEMA_REGISTRY_URL).

With a registry, Avro records use Confluent's wire format: a zero byte, the 4-byte
big-endian schema id the registry gave, then the Avro body. :class:`RegistryFraming` is
what :class:`~schemas.codec.EventCodec` asks for the header of a topic's event (ids learnt
when the engine registered its writer schemas under ``{topic}-value``) and for the writer
schema of an id it reads (a bounded cache, filled by :meth:`RegistryFraming.resolve`). An
id the registry does not have is asked for again the next time it is read, since a
lagging replica may have it by then; such misses never take the place of a schema.

Errors::

    SchemaRegistryError
     ├── SchemaRegistryUnavailable    unreachable, 5xx, 429, auth refused: transient
     └── SchemaIncompatibleError      409: the subject's compatibility level refuses it

The user info (``user:password``) is sent as HTTP basic auth and never appears in an error.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import httpx

__all__ = [
    "CONFLUENT_MAGIC",
    "RegistryFraming",
    "SchemaIncompatibleError",
    "SchemaRegistryError",
    "SchemaRegistryUnavailable",
    "register_writer_schemas",
    "subject_of",
]

logger = logging.getLogger(__name__)

CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_LEN = 5
_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
_MISSING = ""  # the answer for an id the registry says it does not have (or not as Avro)
_MISSES_KEPT = 64  # misses remembered between resolve() and the decode that follows it


def subject_of(topic: str) -> str:
    """The subject of a topic's record values (Confluent's TopicNameStrategy)."""
    return f"{topic}-value"


class Backoff(Protocol):
    """The retry policy of start-up's registrations (the engine's RETRY_* settings)."""

    @property
    def max_attempts(self) -> int: ...

    def jittered(self, retry: int) -> float: ...


class SchemaRegistryError(Exception):
    """A Schema Registry call that did not give what was asked."""


class SchemaRegistryUnavailable(SchemaRegistryError):
    """The registry could not answer now (unreachable, timeout, 5xx, 429, 401/403)."""


class SchemaIncompatibleError(SchemaRegistryError):
    """The registry refused a schema under ``subject`` as incompatible (409)."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"the Schema Registry refused the schema of subject {subject} as "
                         f"incompatible: {reason}")
        self.subject = subject
        self.reason = reason


class RegistryFraming:
    """Ids and writer schemas from one registry, for the Confluent wire format.

    ``client`` is the engine's :class:`httpx.AsyncClient` (its timeouts apply);
    ``user_info`` is ``user:password`` or ``None``; ``cache_size`` bounds the writer
    schemas kept by id. ``on_reachable`` is told ``True``/``False`` after each call.
    """

    def __init__(self, url: str, client: httpx.AsyncClient, *, user_info: str | None = None,
                 cache_size: int = 1000,
                 on_reachable: Callable[[bool], None] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("SCHEMA_REGISTRY_URL must start with http:// or https://")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.url = url.rstrip("/")
        self._client = client
        self._auth: tuple[str, str] | None = None
        if user_info is not None:
            user, sep, password = user_info.partition(":")
            if not sep:
                raise ValueError("SCHEMA_REGISTRY_USER_INFO must be user:password")
            self._auth = (user, password)
        self._cache_size = cache_size
        self._by_id: OrderedDict[int, str] = OrderedDict()  # id → schema text, or _MISSING
        # ids the registry did not have at the last ask: kept apart, so that unknown (or
        # hostile) ids cannot push real schemas out, and only until asked for again
        self._misses: OrderedDict[int, None] = OrderedDict()
        self._ids: dict[tuple[str, str], int] = {}  # (topic, schema full name) → id
        self._on_reachable = on_reachable
        self.reachable: bool | None = None  # None until the first call

    # --- writing ----------------------------------------------------------------------

    async def register(self, topic: str, schema_name: str, schema_text: str) -> int:
        """Registers ``schema_text`` under ``{topic}-value`` (the same schema again is
        answered its id) and remembers the id for :meth:`header`.

        Raises :class:`SchemaIncompatibleError` (409), :class:`SchemaRegistryUnavailable`
        (transient) or :class:`SchemaRegistryError` (any other refusal).
        """
        subject = subject_of(topic)
        body = await self._call("POST", f"/subjects/{subject}/versions",
                                json={"schema": schema_text, "schemaType": "AVRO"},
                                subject=subject)
        schema_id = body.get("id")
        if not isinstance(schema_id, int) or not 0 <= schema_id < 2**31:
            raise SchemaRegistryError(f"the Schema Registry answered subject {subject} "
                                      f"without a valid id: {str(body)[:200]}")
        self._ids[(topic, schema_name)] = schema_id
        self._remember(schema_id, schema_text)
        return schema_id

    def header(self, topic: str, schema_name: str) -> bytes | None:
        """``00`` + the big-endian id of ``schema_name`` under ``topic``'s subject, or
        ``None`` when it was not registered by this instance."""
        schema_id = self._ids.get((topic, schema_name))
        return None if schema_id is None else CONFLUENT_MAGIC + struct.pack(">I", schema_id)

    # --- reading ----------------------------------------------------------------------

    @staticmethod
    def schema_id(value: bytes) -> int | None:
        """The schema id of a Confluent-framed value, ``None`` for anything else."""
        if len(value) < CONFLUENT_HEADER_LEN or not value.startswith(CONFLUENT_MAGIC):
            return None
        (schema_id,) = struct.unpack(">I", value[1:CONFLUENT_HEADER_LEN])
        return int(schema_id)

    def cached(self, schema_id: int) -> str | None:
        """The writer schema text of ``schema_id`` once resolved; ``""`` when the
        registry said at the last :meth:`resolve` that it has no such id (or not as Avro);
        ``None`` when not (or no longer) cached."""
        text = self._by_id.get(schema_id)
        if text is not None:
            self._by_id.move_to_end(schema_id)
            return text
        return _MISSING if schema_id in self._misses else None

    async def resolve(self, value: bytes) -> None:
        """Makes the writer schema of a Confluent-framed ``value`` cached (a no-op for
        other values and cached ids). An id the registry does not have is remembered as
        missing for the decode that follows, and asked for again at the next call (a
        lagging replica may have it by then).

        Raises :class:`SchemaRegistryUnavailable` while the registry cannot answer, and
        :class:`SchemaRegistryError` for any other failure.
        """
        schema_id = self.schema_id(value)
        if schema_id is None or self._by_id.get(schema_id) is not None:
            return
        try:
            body = await self._call("GET", f"/schemas/ids/{schema_id}")
        except _NotFound:
            self._missed(schema_id)
            return
        text = body.get("schema")
        if not isinstance(text, str) or not text:
            raise SchemaRegistryError(f"the Schema Registry answered schema id {schema_id} "
                                      "without a schema")
        if body.get("schemaType", "AVRO") != "AVRO":
            self._remember(schema_id, _MISSING)  # not Avro: no event can be written with it
            return
        self._remember(schema_id, text)

    def _missed(self, schema_id: int) -> None:
        self._misses[schema_id] = None
        self._misses.move_to_end(schema_id)
        while len(self._misses) > _MISSES_KEPT:
            self._misses.popitem(last=False)

    def _remember(self, schema_id: int, text: str) -> None:
        self._misses.pop(schema_id, None)
        self._by_id[schema_id] = text
        self._by_id.move_to_end(schema_id)
        while len(self._by_id) > self._cache_size:
            self._by_id.popitem(last=False)

    # --- HTTP -------------------------------------------------------------------------

    async def probe(self) -> bool:
        """Whether the registry answers ``GET /subjects`` now (for /health)."""
        try:
            await self._call("GET", "/subjects")
        except SchemaRegistryError:
            return False
        return True

    async def _call(self, method: str, path: str, *, json: Any = None,
                    subject: str | None = None) -> dict[str, Any]:
        where = f"{self.url}{path}"
        try:
            response = await self._client.request(
                method, where, json=json, auth=self._auth,
                headers={"Accept": _CONTENT_TYPE, "Content-Type": _CONTENT_TYPE})
        except httpx.HTTPError as exc:
            self._seen(False)
            raise SchemaRegistryUnavailable(
                f"cannot reach the Schema Registry at {self.url}: "
                f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status >= 500 or status in (401, 403, 408, 429):
            self._seen(False)
            why = "credentials refused (SCHEMA_REGISTRY_USER_INFO)" \
                if status in (401, 403) else _message(response)
            raise SchemaRegistryUnavailable(
                f"the Schema Registry at {self.url} answered {status}: {why}")
        self._seen(True)
        if status == 404:
            raise _NotFound(_message(response))
        if status == 409 and subject is not None:
            raise SchemaIncompatibleError(subject, _message(response))
        if status >= 400:
            raise SchemaRegistryError(f"the Schema Registry refused {method} {path} "
                                      f"({status}): {_message(response)}")
        # These words may reach a caller (a record whose writer schema was asked for): they
        # say what the registry did wrong, never the JSON parser's or Python's own words.
        try:
            body = response.json()
        except ValueError as exc:
            raise SchemaRegistryError(f"the Schema Registry answered {path} with a body "
                                      "that is not JSON") from exc
        if not isinstance(body, (dict, list)):
            raise SchemaRegistryError(f"the Schema Registry answered {path} with JSON that "
                                      "is neither an object nor an array")
        return body if isinstance(body, dict) else {"items": body}

    def _seen(self, reachable: bool) -> None:
        if reachable != self.reachable:
            if reachable and self.reachable is False:
                logger.info("the Schema Registry at %s answers again", self.url)
            self.reachable = reachable
            if self._on_reachable is not None:
                self._on_reachable(reachable)


class _NotFound(SchemaRegistryError):
    pass


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:500]
    return str(body)[:300]


async def register_writer_schemas(
    framing: RegistryFraming, schemas: Iterable[tuple[str, str, str]], backoff: Backoff, *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Registers each ``(topic, schema full name, schema text)``, retrying an unreachable
    registry with ``backoff`` (its ``max_attempts`` calls per schema at most).

    Raises :class:`SchemaIncompatibleError` at once, :class:`SchemaRegistryUnavailable`
    when the attempts are spent (its message says how many), and
    :class:`SchemaRegistryError` for any other refusal.
    """
    for topic, name, text in schemas:
        attempt = 0
        while True:
            attempt += 1
            try:
                schema_id = await framing.register(topic, name, text)
            except SchemaRegistryUnavailable as exc:
                if attempt >= backoff.max_attempts:
                    raise SchemaRegistryUnavailable(
                        f"{exc} (gave up after {attempt} attempt(s))") from exc
                wait = backoff.jittered(attempt)
                logger.warning("registering %s: %s; retrying in %.2fs", subject_of(topic),
                               exc, wait)
                await sleep(wait)
                continue
            logger.info("%s registered in the Schema Registry as id %d", subject_of(topic),
                        schema_id)
            break
