"""The engine's ``httpx.AsyncClient``s, observed: every request is timed per upstream and
outcome, and the requests to the engine's own upstreams carry the trace. (Two of them: the
shared one, for ElevenLabs and the LLM, follows the proxy variables; the one for URL
fetches connects directly.)

A subclass overriding :meth:`ObservedClient.send` rather than event hooks: hooks never see
a request that fails (a timeout, a refused connection), and those are the slow and broken
calls an operator asks about. Every call of the client (``get``, ``post``, ``stream``,
``send``) goes through ``send``; the callers (ElevenLabs, the LLM, image fetches) are
unchanged.

- ``upstream``: from the request's URL (:class:`UpstreamNames`), e.g. ``elevenlabs``,
  ``persona_llm``, else ``image_fetch`` (the only other caller: URL inputs).
- ``outcome``: ``2xx`` … ``5xx`` by status, ``timeout``, or ``error`` (no answer, or the
  body broke off); the time runs until the body is read or the response closed.
- Trace: :data:`~core.telemetry.trace.current_trace` as ``traceparent``/``tracestate``,
  only to the named upstreams (a fetched URL's server is a stranger: it gets no ids).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from http.cookiejar import Cookie, CookieJar, DefaultCookiePolicy
from typing import Any

import httpx

from core.telemetry.trace import current_trace

__all__ = ["ObservedClient", "UpstreamNames"]

Observe = Callable[[str, str, float], None]  # (upstream, outcome, seconds)


class UpstreamNames:
    """Names a request's upstream by the base URL it falls under; ``default`` otherwise.
    Raises ``ValueError`` for a base that is not an absolute http(s) URL."""

    def __init__(self, bases: Sequence[tuple[str, str]], default: str = "image_fetch") -> None:
        self._bases: list[tuple[httpx.URL, str]] = []
        for base, name in bases:
            url = httpx.URL(base)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"upstream {name}: {base!r} is not an http(s) URL")
            self._bases.append((url, name))
        self.default = default

    def of(self, url: httpx.URL) -> str:
        for base, name in self._bases:
            if (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port) and \
                    _under(url.path, base.path):
                return name
        return self.default


def _under(path: str, base: str) -> bool:
    base = base.rstrip("/")
    return path == base or path.startswith(base + "/") or not base


class _RefuseCookies(DefaultCookiePolicy):
    def set_ok(self, cookie: Cookie, request: Any) -> bool:
        return False


class ObservedClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that reports each request to ``observe`` and passes the
    current trace to the upstreams ``upstreams`` names. Other arguments as for httpx."""

    def __init__(self, *, upstreams: UpstreamNames, observe: Observe, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # no cookies kept: a fetched URL's server must not leave state that a later
        # request (another user's) would carry back to it
        self.cookies = CookieJar(policy=_RefuseCookies())  # httpx keeps this very jar
        self._upstreams = upstreams
        self._observe = observe

    # ``auth`` and ``follow_redirects`` are passed through untouched; their precise types
    # (an auth or USE_CLIENT_DEFAULT) are httpx's private names, hence Any
    async def send(
        self, request: httpx.Request, *, stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT, follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        upstream = self._upstreams.of(request.url)
        trace = current_trace.get()
        if trace is not None and upstream != self._upstreams.default \
                and "traceparent" not in request.headers:
            for name, value in trace.headers():
                request.headers[name] = value
        started = time.perf_counter()

        def done(outcome: str) -> None:
            self._observe(upstream, outcome, time.perf_counter() - started)

        try:
            response = await super().send(request, stream=stream, auth=auth,
                                          follow_redirects=follow_redirects)
        except httpx.TimeoutException:
            done("timeout")
            raise
        except httpx.HTTPError:
            done("error")
            raise
        outcome = f"{min(max(response.status_code // 100, 1), 5)}xx"
        if stream:
            response.stream = _TimedStream(response.stream, outcome, done)
        else:
            done(outcome)
        return response


class _TimedStream(httpx.AsyncByteStream):
    """A response body that reports once, when closed: the outcome, or how it broke."""

    def __init__(self, inner: httpx.SyncByteStream | httpx.AsyncByteStream, outcome: str,
                 done: Callable[[str], None]) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner = inner
        self._outcome = outcome
        self._done: Callable[[str], None] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TimeoutException:
            self._outcome = "timeout"
            raise
        except httpx.HTTPError:
            self._outcome = "error"
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._done is not None:
                done, self._done = self._done, None
                done(self._outcome)
