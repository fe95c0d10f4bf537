"""API keys (API_KEYS): every route but the probes (``/health/live``, ``/health/ready``)
answers 401 without a key or with a wrong one and works with a right one, ``/health``,
``/outputs`` and the voice streams included; ``/metrics`` and the files may be opened by
their own settings (METRICS_REQUIRE_KEY, OUTPUTS_REQUIRE_KEY set to false); keys (plain or configured as ``sha256:<hex>``) never appear in a log line, a
401 or a configuration error.

The app is the real one (:func:`http_files.create_app` with the policy of its settings)
over the real cores of ``tests/http/conftest.py``; every exchange is checked against
``docs/openapi.json`` there, so each 401 is one the document declares."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from core.settings import ConfigurationError, load_settings
from http_files import create_app
from http_files.auth import AccessPolicy, access_policy, warn_if_open
from http_files.services import SERVICES
from http_files.uploads import upload_limits
from tests.http.conftest import Serve
from tests.http.forms import form

Client = TestClient[web.Request, web.Application]

PLAIN_KEY = "plain-key-0123456789abcdef-PLAIN"
HASHED_KEY = "hashed-key-fedcba9876543210-HASHED"
HASH_ENTRY = f"sha256:{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}"
API_KEYS = f"{PLAIN_KEY}, {HASH_ENTRY}"
WRONG_KEY = "wrong-key-0123456789abcdef-WRONG"
UNKNOWN_OUTPUT = "/outputs/00000000-0000-4000-8000-000000000000.mp3"
UNKNOWN_STREAM = "/streams/voice/engine-1/00000000-0000-4000-8000-000000000000"
SECRETS = (PLAIN_KEY, HASHED_KEY, WRONG_KEY, HASH_ENTRY.removeprefix("sha256:"))

Start = Callable[..., Awaitable[Client]]


@pytest.fixture
async def keyed(serve: Serve, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Start]:
    """``await keyed(**settings)``: the app with API_KEYS set (and ``settings``), every
    log record of the test captured from DEBUG on; at the end no record holds a key."""
    caplog.set_level(logging.DEBUG)
    clients: list[Client] = []

    async def start(**overrides: Any) -> Client:
        served = await serve(**{"api_keys": API_KEYS, **overrides})
        services = served.client.server.app[SERVICES]
        app = create_app(services, upload_limits(served.settings),
                         access_policy(served.settings))
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert records  # (the capture works: every request has its access line at least)
    logged = " ".join(f"{r.getMessage()} {r.args!r} {r.__dict__!r}" for r in records)
    for secret in SECRETS:
        assert secret not in logged


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    with_key: int  # the status with a right key: the route's own answer
    body: Callable[[], dict[str, Any]] = dict


ROUTES = {
    "generate": Route("POST", "/generate/voice", 200,
                      lambda: {"json": {"text": "Hello there.", "seed": 1}}),
    "train": Route("POST", "/train-lora", 422, lambda: {"data": form([b"x"])}),  # 1 image
    "cancel": Route("DELETE", "/requests/r-1?conversation_id=c-1", 202),
    "training-status": Route("GET", "/train-lora/no-such-training", 404),
    "openapi": Route("GET", "/openapi.json", 200),
    "metrics": Route("GET", "/metrics", 200),  # METRICS_REQUIRE_KEY defaults to true
    "health": Route("GET", "/health", 503),  # not a probe; this app was never started
    "output": Route("GET", UNKNOWN_OUTPUT, 404),  # OUTPUTS_REQUIRE_KEY defaults to true
    "stream": Route("GET", UNKNOWN_STREAM, 404),
}
PROBES = ("/health/live", "/health/ready")


async def call(client: Client, route: Route, key: str | None, scheme: str = "Bearer"
               ) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"{scheme} {key}"} if key is not None else {}
    return await client.request(route.method, route.path, headers=headers, **route.body())


async def assert_refused(response: aiohttp.ClientResponse, *, wrong: bool) -> None:
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is wrong
    body = await response.json()
    assert body["error_code"] == "UNAUTHORIZED" and body["retryable"] is False
    text = await response.text() + str(response.headers)
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize("kind", sorted(ROUTES))
async def test_a_route_needs_a_right_key(keyed: Start, kind: str) -> None:
    client = await keyed()
    route = ROUTES[kind]
    await assert_refused(await call(client, route, None), wrong=False)
    await assert_refused(await call(client, route, WRONG_KEY), wrong=True)
    await assert_refused(await call(client, route, PLAIN_KEY, scheme="Basic"), wrong=False)
    await assert_refused(await call(client, route, HASH_ENTRY), wrong=True)  # not the key
    for key in (PLAIN_KEY, HASHED_KEY):
        response = await call(client, route, key)
        assert response.status == route.with_key, await response.text()
    response = await call(client, route, PLAIN_KEY, scheme="bearer")  # case-insensitive
    assert response.status == route.with_key


async def test_the_probes_need_no_key_and_ignore_a_wrong_one(keyed: Start) -> None:
    client = await keyed()
    for path in PROBES:
        statuses = set()
        for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"},
                        {"Authorization": f"Bearer {PLAIN_KEY}"}):
            response = await client.get(path, headers=headers)
            statuses.add(response.status)
        # this app has no Kafka and was never started: only liveness is 200
        assert statuses == ({200} if path == "/health/live" else {503}), path


async def test_outputs_are_capability_urls_with_outputs_require_key_false(
        keyed: Start) -> None:
    client = await keyed(outputs_require_key=False)
    made = await client.post("/generate/voice", json={"text": "A file.", "seed": 2},
                             headers={"Authorization": f"Bearer {PLAIN_KEY}"})
    assert made.status == 200
    url = "/outputs/" + (await made.json())["filename"]
    assert (await client.get(url)).status == 200
    assert (await client.get(url, headers={"Authorization": f"Bearer {WRONG_KEY}"})).status == 200
    assert (await client.get(UNKNOWN_OUTPUT)).status == 404


async def test_outputs_need_a_key_by_default(keyed: Start) -> None:
    client = await keyed()
    made = await client.post("/generate/voice", json={"text": "A file.", "seed": 3},
                             headers={"Authorization": f"Bearer {HASHED_KEY}"})
    url = "/outputs/" + (await made.json())["filename"]
    output = Route("GET", url, 200)
    await assert_refused(await call(client, output, None), wrong=False)
    await assert_refused(await call(client, output, WRONG_KEY), wrong=True)
    assert (await call(client, output, PLAIN_KEY)).status == 200
    assert (await call(client, Route("GET", UNKNOWN_OUTPUT, 404), PLAIN_KEY)).status == 404


async def test_voice_streams_are_capability_urls_like_outputs(keyed: Start) -> None:
    # opened for players that send no header when opening a stream_url
    client = await keyed(outputs_require_key=False)
    assert (await client.get(UNKNOWN_STREAM)).status == 404
    client = await keyed()
    stream = Route("GET", UNKNOWN_STREAM, 404)
    await assert_refused(await call(client, stream, None), wrong=False)
    await assert_refused(await call(client, stream, WRONG_KEY), wrong=True)
    assert (await call(client, stream, PLAIN_KEY)).status == 404


async def test_metrics_are_open_with_metrics_require_key_false(keyed: Start) -> None:
    client = await keyed(metrics_require_key=False)
    assert (await client.get("/metrics")).status == 200
    await assert_refused(await call(client, ROUTES["openapi"], None), wrong=False)


async def test_without_api_keys_nothing_needs_a_key(serve: Serve) -> None:
    served = await serve()
    assert not access_policy(served.settings).enabled
    for route in (ROUTES["metrics"], ROUTES["openapi"], ROUTES["training-status"]):
        response = await call(served.client, route, None)
        assert response.status == route.with_key


# --- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "short-key",  # under 16 characters
    f"{PLAIN_KEY},,{PLAIN_KEY}x",  # an empty entry
    "sha256:abc123",  # not 64 hex digits
    f"{PLAIN_KEY} with spaces",
])
def test_an_invalid_api_keys_stops_start_up_without_showing_it(value: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings(api_keys=value, _env_file=None)
    message = str(raised.value)
    assert message.startswith("invalid configuration: API_KEYS='**********' (allowed: ")
    assert value not in message and PLAIN_KEY not in message


def test_keys_are_secret_in_the_settings_and_the_policy() -> None:
    settings = load_settings(api_keys=API_KEYS, _env_file=None)
    policy = access_policy(settings)
    for shown in (repr(settings), str(settings.model_dump()), repr(policy)):
        for secret in SECRETS:
            assert secret not in shown
    assert len(policy.digests) == 2
    assert policy.accepts(PLAIN_KEY) and policy.accepts(HASHED_KEY)
    assert not policy.accepts(WRONG_KEY) and not policy.accepts(HASH_ENTRY)
    assert load_settings(api_keys=" ", _env_file=None).api_keys is None  # empty: unset


@pytest.mark.parametrize(("host", "keys", "warned"), [
    ("0.0.0.0", False, True),
    ("", False, True),
    ("10.1.2.3", False, True),
    ("0.0.0.0", True, False),
    ("127.0.0.1", False, False),  # what `dev` binds
    ("::1", False, False),
    ("localhost", False, False),
])
def test_serving_beyond_loopback_without_keys_is_a_loud_warning(
    host: str, keys: bool, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    policy = access_policy(load_settings(api_keys=API_KEYS, _env_file=None)) if keys \
        else AccessPolicy()
    with caplog.at_level(logging.WARNING, logger="http_files.auth"):
        assert warn_if_open(host, 8000, policy) is warned
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "API_KEYS" in warnings[0].getMessage()
