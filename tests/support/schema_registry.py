"""A local Confluent Schema Registry: a real aiohttp server on 127.0.0.1 speaking the paths,
bodies, content type and error codes of Confluent's published REST API (Schema Registry API
Reference), for Avro schemas, so that Confluent's own clients (``confluent-kafka``'s
``SchemaRegistryClient``, ``AvroSerializer``, ``AvroDeserializer``) run against it unchanged.

Paths:

- ``POST /subjects/{subject}/versions`` ``{"schema", "schemaType"?, "references"?}``:
  ``{"id"}``; the same schema again answers its id; one incompatible with the versions the
  subject's level names is ``409`` (``error_code`` 409), an invalid one ``422`` (42201).
- ``POST /subjects/{subject}``: the version of a schema under a subject (``40401`` subject
  not found, ``40403`` schema not found).
- ``GET /subjects``, ``GET /subjects/{subject}/versions``,
  ``GET /subjects/{subject}/versions/{version|latest|-1}``: ``{"subject", "id", "version",
  "schema"}`` (``40401``, ``40402`` version not found, ``42202`` invalid version).
- ``GET /schemas/ids/{id}``: ``{"schema"}`` (``40403``).
- ``POST /compatibility/subjects/{subject}/versions/{version|latest}`` (``?verbose=true``
  adds ``messages``): ``{"is_compatible"}``.
- ``GET``/``PUT /config`` and ``/config/{subject}``: ``{"compatibilityLevel"}`` /
  ``{"compatibility"}``, ``BACKWARD`` by default (``42203`` for an unknown level, ``40408``
  for a subject without its own level unless ``?defaultToGlobal=true``).

Ids are global and the same schema (by Avro Parsing Canonical Form) has one id in every
subject, as in Confluent's registry. Answers are ``application/vnd.schemaregistry.v1+json``;
errors ``{"error_code", "message"}``. With ``user_info`` (``user:password``) every request
needs HTTP basic auth (``401`` otherwise). Setting :attr:`SchemaRegistryServer.unavailable`
makes every request answer ``503`` until it is cleared (an outage, for tests). Compatibility is Apache Avro's own checker
(``avro.compatibility``), which is what the Java registry runs. Not modelled: JSON Schema
and Protobuf, references, contexts, modes, soft deletes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import avro.schema
import fastavro
from aiohttp import web
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from fastavro.schema import to_parsing_canonical_form

__all__ = ["LEVELS", "SchemaRegistryServer", "running_registry"]

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
LEVELS = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL",
          "FULL_TRANSITIVE", "NONE")


@dataclass
class _Stored:
    id: int
    text: str  # as registered
    canonical: str


@dataclass
class SchemaRegistryServer:
    """The registry's state and its aiohttp app; :attr:`requests` records
    ``(method, path)`` of every request, for tests that count calls."""

    user_info: str | None = None
    compatibility: str = "BACKWARD"
    subjects: dict[str, list[_Stored]] = field(default_factory=dict)
    subject_levels: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    unavailable: bool = False  # the fault switch: every request answers 503 while set
    url: str | None = None  # once started
    _by_id: dict[int, _Stored] = field(default_factory=dict)
    _by_canonical: dict[str, _Stored] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticated])
        r = app.router
        r.add_get("/subjects", self._list_subjects)
        r.add_post("/subjects/{subject}/versions", self._register)
        r.add_post("/subjects/{subject}", self._lookup)
        r.add_get("/subjects/{subject}/versions", self._list_versions)
        r.add_get("/subjects/{subject}/versions/{version}", self._get_version)
        r.add_get("/schemas/ids/{id}", self._get_by_id)
        r.add_post("/compatibility/subjects/{subject}/versions/{version}", self._check)
        r.add_get("/config", self._get_config)
        r.add_put("/config", self._put_config)
        r.add_get("/config/{subject}", self._get_config)
        r.add_put("/config/{subject}", self._put_config)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serves on ``host`` (a free port by default); returns the base URL."""
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{bound[0]}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the API -----------------------------------------------------------------------

    @web.middleware
    async def _authenticated(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.unavailable:
            return _error(503, 50003, "Service Unavailable")
        if self.user_info is not None:
            expected = "Basic " + base64.b64encode(self.user_info.encode()).decode()
            if request.headers.get("Authorization") != expected:
                return _error(401, 401, "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    async def _register(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        parsed = await _posted_schema(request)
        if isinstance(parsed, web.Response):
            return parsed
        text, canonical = parsed
        versions = self.subjects.get(subject, [])
        for stored in versions:
            if stored.canonical == canonical:
                return _ok({"id": stored.id})
        problems = self._problems(subject, text, versions, self._level(subject))
        if problems:
            return _error(409, 409, f"Schema being registered is incompatible with an earlier "
                          f"schema for subject \"{subject}\", details: {problems}")
        stored = self._by_canonical.get(canonical)
        if stored is None:
            stored = _Stored(len(self._by_id) + 1, text, canonical)
            self._by_id[stored.id] = stored
            self._by_canonical[canonical] = stored
        self.subjects.setdefault(subject, []).append(stored)
        return _ok({"id": stored.id})

    async def _lookup(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        if subject not in self.subjects:
            return _subject_not_found(subject)
        parsed = await _posted_schema(request)
        if isinstance(parsed, web.Response):
            return parsed
        for version, stored in enumerate(self.subjects[subject], start=1):
            if stored.canonical == parsed[1]:
                return _ok(_version(subject, version, stored))
        return _error(404, 40403, "Schema not found")

    async def _list_subjects(self, request: web.Request) -> web.Response:
        return _ok(sorted(self.subjects))

    async def _list_versions(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        if subject not in self.subjects:
            return _subject_not_found(subject)
        return _ok(list(range(1, len(self.subjects[subject]) + 1)))

    async def _get_version(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        found = self._find_version(subject, request.match_info["version"])
        if isinstance(found, web.Response):
            return found
        return _ok(_version(subject, found, self.subjects[subject][found - 1]))

    async def _get_by_id(self, request: web.Request) -> web.Response:
        text = request.match_info["id"]
        stored = self._by_id.get(int(text)) if text.isdigit() else None
        if stored is None:
            return _error(404, 40403, f"Schema {text} not found")
        return _ok({"schema": stored.text})

    async def _check(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        found = self._find_version(subject, request.match_info["version"])
        if isinstance(found, web.Response):
            return found
        parsed = await _posted_schema(request)
        if isinstance(parsed, web.Response):
            return parsed
        level = self._level(subject).removesuffix("_TRANSITIVE")  # against one version
        problems = self._problems(subject, parsed[0], [self.subjects[subject][found - 1]], level)
        answer: dict[str, Any] = {"is_compatible": not problems}
        if request.query.get("verbose", "").lower() == "true":
            answer["messages"] = problems
        return _ok(answer)

    async def _get_config(self, request: web.Request) -> web.Response:
        subject = request.match_info.get("subject")
        if subject is None:
            return _ok({"compatibilityLevel": self.compatibility})
        level = self.subject_levels.get(subject)
        if level is None:
            if request.query.get("defaultToGlobal", "").lower() == "true":
                return _ok({"compatibilityLevel": self.compatibility})
            return _error(404, 40408, f"Subject '{subject}' does not have subject-level "
                          "compatibility configured")
        return _ok({"compatibilityLevel": level})

    async def _put_config(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        level = str(body.get("compatibility", "")).upper()
        if level not in LEVELS:
            return _error(422, 42203, "Invalid compatibility level. Valid values are none, "
                          "backward, forward, full, backward_transitive, forward_transitive, "
                          "and full_transitive")
        subject = request.match_info.get("subject")
        if subject is None:
            self.compatibility = level
        else:
            self.subject_levels[subject] = level
        return _ok({"compatibility": level})

    # --- helpers ------------------------------------------------------------------------

    def _level(self, subject: str) -> str:
        return self.subject_levels.get(subject, self.compatibility)

    def _find_version(self, subject: str, text: str) -> int | web.Response:
        versions = self.subjects.get(subject)
        if not versions:
            return _subject_not_found(subject)
        if text in ("latest", "-1"):
            return len(versions)
        if not text.isdigit() or int(text) < 1:
            return _error(422, 42202, "The specified version is not a valid version id. "
                          "Allowed values are between [1, 2^31-1] and the string \"latest\"")
        if int(text) > len(versions):
            return _error(404, 40402, f"Version {text} not found.")
        return int(text)

    @staticmethod
    def _problems(subject: str, text: str, versions: list[_Stored], level: str) -> list[str]:
        if level == "NONE" or not versions:
            return []
        against = versions if level.endswith("_TRANSITIVE") else versions[-1:]
        new = avro.schema.parse(text)
        problems: list[str] = []
        for stored in against:
            old = avro.schema.parse(stored.text)
            pairs = []
            if level.startswith(("BACKWARD", "FULL")):
                pairs.append((new, old))  # the new schema reads the old data
            if level.startswith(("FORWARD", "FULL")):
                pairs.append((old, new))
            for reader, writer in pairs:
                result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
                if result.compatibility is not SchemaCompatibilityType.compatible:
                    locations = sorted(loc for loc in result.locations if loc != "/")
                    problems.append(
                        f"{{errorType:'{result.incompatibilities[0].name.upper()}', "
                        f"description:'{'; '.join(sorted(result.messages))}', "
                        f"additionalInfo:'{', '.join(locations) or '/'}'}}")
        return problems


@contextlib.contextmanager
def running_registry(server: SchemaRegistryServer) -> Iterator[str]:
    """Runs ``server`` on its own event loop in a thread (for synchronous clients such as
    Confluent's ``SchemaRegistryClient``), yielding its base URL; stops it on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="schema-registry", daemon=True)
    thread.start()
    try:
        url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _ok(body: Any) -> web.Response:
    return web.Response(text=json.dumps(body), content_type=CONTENT_TYPE)


def _error(status: int, code: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error_code": code, "message": message}),
                        content_type=CONTENT_TYPE)


def _subject_not_found(subject: str) -> web.Response:
    return _error(404, 40401, f"Subject '{subject}' not found.")


def _version(subject: str, version: int, stored: _Stored) -> dict[str, Any]:
    return {"subject": subject, "id": stored.id, "version": version, "schema": stored.text}


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.text())
    except ValueError as exc:
        return _error(400, 400, f"Unrecognized JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, 400, "the body must be a JSON object")
    return body


async def _posted_schema(request: web.Request) -> tuple[str, str] | web.Response:
    """:func:`_parse` of the request's body, or the error answer to a body that is not a
    JSON object or holds no valid Avro schema."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    return _parse(body)


def _parse(body: dict[str, Any]) -> tuple[str, str] | web.Response:
    """``(text as registered, Parsing Canonical Form)`` of the body's Avro schema."""
    if body.get("schemaType", "AVRO") != "AVRO":
        return _error(422, 42201, f"Invalid schema type {body.get('schemaType')}: this "
                      "registry holds Avro only")
    text = body.get("schema")
    if not isinstance(text, str):
        return _error(422, 42201, "Invalid schema: 'schema' must be a string")
    try:
        parsed = fastavro.parse_schema(json.loads(text), named_schemas={})
        avro.schema.parse(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's invalid schema
        return _error(422, 42201, f"Invalid schema {text[:200]}: {exc}")
    return text, to_parsing_canonical_form(parsed)
