"""Every HTTP exchange of a test checked against the checked-in ``docs/openapi.json`` with
openapi-core, the request as it went on the wire and the response as it came back.

- A response must fit the document: its status is documented for the operation, its
  content type is one the document names, a JSON body fits the schema. The check is
  strict where the document is lenient for forward compatibility: an object whose
  properties the document lists may have no others (an undocumented field is drift).
- A request that does not fit the document must be refused with a 4xx (tests send bad
  requests on purpose; the engine must not accept what the document says it does not).
- A path the document does not have must be answered 404 or 405.

:func:`check_client` hooks this into aiohttp's ``TestClient`` (``tests/http/conftest.py``
does it for every HTTP test); :func:`check_exchange` is the check itself.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy
from openapi_core import OpenAPI
from openapi_core.exceptions import OpenAPIError
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_core.testing import MockRequest, MockResponse
from yarl import URL

__all__ = ["DOCS", "Exchange", "check_client", "check_exchange", "openapi", "strict"]

DOCS = Path(__file__).resolve().parents[2] / "docs"
_KEPT_BODY = 4 * 2**20  # request bytes kept for the check (tests upload 300 MB bodies)
_REGENERATE = "run `multimodal-engine docs` if the code changed on purpose"


def strict(schema: Any) -> Any:
    """A copy of ``schema`` in which every object that lists its properties allows no
    others (unless it says otherwise)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def openapi(path: Path = DOCS / "openapi.json") -> OpenAPI:
    """The checked-in document (made strict), read once."""
    return OpenAPI.from_dict(strict(json.loads(path.read_text("utf-8"))))


@dataclass
class Exchange:
    """One request as sent and its response as received."""

    method: str
    url: URL
    request_headers: dict[str, str]
    request_body: bytes
    status: int
    response_headers: dict[str, str]
    response_body: bytes
    request_body_dropped: bool = False  # over _KEPT_BODY bytes: the request is not checked

    def describe(self) -> str:
        return f"{self.method} {self.url.path_qs} → {self.status}"


def check_exchange(exchange: Exchange, spec: OpenAPI | None = None) -> None:
    """Raises ``AssertionError`` saying what does not fit, as the module docstring says."""
    spec = spec or openapi()
    url = exchange.url
    request = MockRequest(
        f"{url.scheme}://{url.authority}", exchange.method, url.path,
        args=dict(url.query), headers=exchange.request_headers, data=exchange.request_body,
        content_type=_header(exchange.request_headers, "Content-Type"))
    try:
        spec.validate_request(request)
    except (PathNotFound, OperationNotFound) as exc:
        if exchange.status not in (404, 405):
            raise AssertionError(f"{exchange.describe()}: not in docs/openapi.json ({exc}); "
                                 f"{_REGENERATE}") from None
        return
    # openapi-core's own parsers fail on some hostile bodies (RecursionError on deep JSON,
    # AssertionError on a broken multipart): the request does not fit either way
    except Exception as exc:  # noqa: BLE001
        if exchange.request_body_dropped:
            pass  # too large to keep: only the response is checked
        elif not 400 <= exchange.status < 500:
            raise AssertionError(
                f"{exchange.describe()}: the request does not fit docs/openapi.json "
                f"({_reason(exc)}) but was not refused with a 4xx") from None
    response = MockResponse(
        exchange.response_body, exchange.status, headers=exchange.response_headers,
        content_type=_header(exchange.response_headers, "Content-Type"))
    try:
        spec.validate_response(request, response)
    except OpenAPIError as exc:
        raise AssertionError(f"{exchange.describe()}: the response does not fit "
                             f"docs/openapi.json: {_reason(exc)}; body "
                             f"{exchange.response_body[:300]!r}; {_REGENERATE}") from None


def _header(headers: dict[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), "")


def _reason(exc: BaseException) -> str:
    """openapi-core's error, with the schema errors under it where it has some."""
    cause: BaseException | None = exc
    while cause is not None:
        details = getattr(cause, "schema_errors", None)
        if details:
            return f"{type(exc).__name__}: " + "; ".join(
                f"at /{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
                for e in details)[:600]
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {str(exc)[:300]}"


@dataclass
class _Sent:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    dropped: bool = False


async def _on_headers(session: Any, context: SimpleNamespace,
                      params: aiohttp.TraceRequestHeadersSentParams) -> None:
    sent = context.trace_request_ctx
    if isinstance(sent, _Sent):
        sent.headers = dict(params.headers)


async def _on_chunk(session: Any, context: SimpleNamespace,
                    params: aiohttp.TraceRequestChunkSentParams) -> None:
    sent = context.trace_request_ctx
    if isinstance(sent, _Sent) and not sent.dropped:
        sent.body += params.chunk
        if len(sent.body) > _KEPT_BODY:
            sent.body = bytearray()
            sent.dropped = True


def check_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on (for the test), every ``TestClient`` request and its response are
    checked with :func:`check_exchange` before the test sees the response (whose body is
    then already read)."""
    init: Callable[..., None] = TestClient.__init__
    request: Callable[..., Awaitable[aiohttp.ClientResponse]] = TestClient._request

    def checked_init(self: TestClient[Any, Any], *args: Any, **kwargs: Any) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_on_headers)
        trace.on_request_chunk_sent.append(_on_chunk)
        kwargs["trace_configs"] = [*kwargs.get("trace_configs", ()), trace]
        init(self, *args, **kwargs)

    async def checked_request(self: TestClient[Any, Any], method: str, path: Any,
                              **kwargs: Any) -> aiohttp.ClientResponse:
        sent = _Sent()
        response = await request(self, method, path, trace_request_ctx=sent, **kwargs)
        body = await response.read()
        check_exchange(Exchange(method.upper(), response.url, sent.headers, bytes(sent.body),
                                response.status, _plain(response.headers), body,
                                sent.dropped))
        return response

    monkeypatch.setattr(TestClient, "__init__", checked_init)
    monkeypatch.setattr(TestClient, "_request", checked_request)


def _plain(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {key: value for key, value in headers.items()}
