"""One URL from a request → its body, without reaching the engine's own network (SSRF).

Each hop (the URL, then every redirect, at most ``max_redirects``) is checked the same way,
before anything is resolved or sent: ``http``/``https`` only, at most 8192 characters, a
port from 1 to 65535, a host that is an IP address or a DNS name (labels of at most 63
characters, 253 in all, ``xn--`` labels valid IDNA). An internationalised name
(``http://bücher.example/``) is IDNA-encoded as httpx encodes it, and that ASCII form is
what is checked, allowed, resolved and sent (``Host``, SNI). Then the host is resolved
once and refused when any address is not public
(:func:`~core.net.policy.is_public_address`) unless the host is in the
:class:`~core.net.policy.AllowedHosts`; the request then goes to that checked address,
never to the name again: ``http`` asks the IP with the original ``Host`` header, ``https``
also passes the name as ``sni_hostname`` so TLS verifies the certificate against the name.
So the client given must take no proxy from the environment (the engine's fetch client is
built with a transport of its own, beside which httpx mounts no HTTP(S)_PROXY): a proxy
would resolve the name again, past this check; and since the URL sent names the IP, TLS
through a CONNECT tunnel would fail and NO_PROXY would never match the name.

The body is read raw and decoded here, not by httpx: ``Accept-Encoding: identity`` is
asked for, and one ``gzip`` or ``deflate`` coding sent anyway is undone without ever
holding more than ``max_bytes`` + 1 decoded bytes. httpx would undo each coding of a
raw chunk whole, so a few hundred bytes coded twice could take gigabytes of memory
before the size check saw them; stacked codings, ``br``, ``zstd`` and ``compress`` are
refused instead (other values of Content-Encoding are ignored, as httpx does).

Errors name the request's field and a generic reason only, never a resolved address, a
port or the exception text (those go to the log):

- not a URL (as above, saying what is wrong with it), not http(s), an address not
  allowed, a redirect to a broken URL, too many redirects, 4xx, too large, a coding
  refused or a body not in its coding →
  :class:`InvalidRequestError` (the request is wrong; a retry cannot help);
- 429, 5xx, a name that does not resolve, connection errors, timeouts →
  :class:`UpstreamUnavailableError` (retryable).
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address

import httpx
import idna

from core.net.policy import AllowedHosts, IPAddress, is_public_address
from core.net.resolve import Resolver, resolve_host
from schemas.errors import InvalidRequestError, UpstreamUnavailableError

__all__ = ["FetchLimits", "SafeFetcher"]

_log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")  # as httpx gives it: IDNA, lower
_MAX_LABEL, _MAX_NAME = 63, 253  # DNS's limits, in the name's ASCII form
_MAX_PORT = 65535
_MAX_URL_CHARS = 8192  # more than most servers take in a request line
_ZLIB, _RAW_DEFLATE = zlib.MAX_WBITS, -zlib.MAX_WBITS  # wbits of zlib.decompressobj
_CODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": _ZLIB}
_REFUSED_CODINGS = frozenset({"br", "zstd", "compress", "x-compress"})


@dataclass(frozen=True)
class FetchLimits:
    """What one fetch may take: ``max_bytes`` of body (a larger ``Content-Length`` is
    refused before reading, a longer body is cut off), ``timeout`` seconds in all,
    redirects included, and ``max_redirects`` redirects. ``max_bytes_setting`` and
    ``timeout_setting`` name where the limits come from, for the messages."""

    max_bytes: int
    timeout: float
    max_redirects: int = 3
    max_bytes_setting: str = "the size limit"
    timeout_setting: str = "the time limit"

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")


class SafeFetcher:
    """Fetches URLs with ``client`` (the engine's shared one: only its transport, default
    headers and pool are used) within ``limits``, reaching only public addresses and
    ``allowed_hosts``; ``resolver`` turns a host into addresses (the system's by
    default)."""

    def __init__(self, client: httpx.AsyncClient, limits: FetchLimits, *,
                 allowed_hosts: AllowedHosts | None = None,
                 resolver: Resolver = resolve_host) -> None:
        self._client = client
        self._limits = limits
        self._allowed = allowed_hosts if allowed_hosts is not None else AllowedHosts()
        self._resolve = resolver

    async def fetch(self, url: str, *, field: str) -> bytes:
        """The body at ``url``; errors name ``field`` and are raised as the module
        docstring says. Nothing is written."""
        target = _checked_url(_parse(url, field), field)
        limits = self._limits
        try:
            async with asyncio.timeout(limits.timeout):
                return await self._follow(target, field)
        except (TimeoutError, httpx.TimeoutException) as exc:
            _log.info("%s: fetching from %s timed out", field, _host(target))
            raise UpstreamUnavailableError(
                f"{field}: the image server did not answer within {limits.timeout_setting}"
                f" ({limits.timeout:g} s)") from exc
        except (httpx.HTTPError, OSError) as exc:
            _log.warning("%s: fetching from %s failed: %r", field, _host(target), exc)
            raise UpstreamUnavailableError(
                f"{field}: the image server could not be reached") from exc

    async def _follow(self, target: httpx.URL, field: str) -> bytes:
        for _ in range(self._limits.max_redirects + 1):
            addresses = await self._destination(target, field)
            outcome = await self._get(target, addresses, field)
            if isinstance(outcome, bytes):
                return outcome
            target = outcome
        raise InvalidRequestError(
            f"{field}: more than {self._limits.max_redirects} redirects", field=field)

    async def _destination(self, target: httpx.URL, field: str) -> Sequence[IPAddress]:
        """The checked addresses of ``target``'s host, to connect to in this order."""
        host = _host(target)
        try:
            addresses: Sequence[IPAddress] = [ip_address(host)]
        except ValueError:
            addresses = await self._resolve(host, target.port or _DEFAULT_PORTS[target.scheme])
            if not addresses:
                raise OSError(f"{host!r} resolved to no address") from None
        if self._allowed.allows(host):
            return addresses
        if not all(is_public_address(address) for address in addresses):
            _log.info("%s: refused %s, which resolves to %s", field, host,
                      ", ".join(map(str, addresses)))
            raise InvalidRequestError(f"{field}: the address is not allowed", field=field)
        return addresses

    async def _get(self, target: httpx.URL, addresses: Sequence[IPAddress], field: str
                   ) -> bytes | httpx.URL:
        """The body, or the URL a redirect points to; tries the addresses in order until
        one connects."""
        failure: httpx.ConnectError | None = None
        for address in addresses:
            try:
                response = await self._client.send(self._request(target, address),
                                                   stream=True, follow_redirects=False)
            except httpx.ConnectError as exc:
                failure = exc
                continue
            except (httpx.InvalidURL, UnicodeError, httpx.RemoteProtocolError) as exc:
                # httpx builds the redirect it is told not to follow from Location before
                # returning the response: a broken Location raises here (InvalidURL, an
                # IDNAError, or RemoteProtocolError raised while handling InvalidURL).
                if isinstance(exc, httpx.RemoteProtocolError) and not isinstance(
                        exc.__context__, httpx.InvalidURL):
                    raise  # the connection's own failure: retryable
                _log.info("%s: %s sent a broken redirect: %r", field, _host(target), exc)
                raise _broken_redirect(field) from exc
            try:
                return await self._read(response, target, field)
            finally:
                await response.aclose()
        assert failure is not None  # addresses is never empty
        raise failure

    def _request(self, target: httpx.URL, address: IPAddress) -> httpx.Request:
        headers = httpx.Headers(self._client.headers)
        headers["Host"] = target.netloc.decode("ascii")
        headers["Accept-Encoding"] = "identity"  # the body is decoded here: see the module
        extensions: dict[str, object] = {"timeout": httpx.Timeout(self._limits.timeout).as_dict()}
        if target.scheme == "https":
            extensions["sni_hostname"] = _host(target)
            # The pool keys connections by the IP alone: a kept-alive TLS connection
            # verified for one name must not carry a request for another name.
            headers["Connection"] = "close"
        # Built by hand, not client.build_request: no cookies of the shared client go out.
        return httpx.Request("GET", target.copy_with(host=str(address), fragment=None),
                             headers=headers, extensions=extensions)

    async def _read(self, response: httpx.Response, target: httpx.URL, field: str
                    ) -> bytes | httpx.URL:
        status = response.status_code
        if status in _REDIRECTS and "location" in response.headers:
            return _redirected(target, response.headers["location"], field)
        if status == 429 or status >= 500:
            raise UpstreamUnavailableError(
                f"{field}: the image server is unavailable (HTTP {status})")
        if not 200 <= status < 300:
            raise InvalidRequestError(
                f"{field}: the image server answered an error (HTTP {status})", field=field)
        limits = self._limits
        too_large = (f"{field}: the image is larger than {limits.max_bytes_setting} "
                     f"({limits.max_bytes} bytes)")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_bytes:
            raise InvalidRequestError(too_large, field=field)
        body = _Body(limits.max_bytes, _coding(response.headers, field))
        try:
            async for chunk in response.aiter_raw(_CHUNK):
                body.add(chunk)
                if body.too_large:
                    raise InvalidRequestError(too_large, field=field)
                if body.complete:
                    break  # what follows the coded data is ignored, as httpx does
        except zlib.error as exc:
            _log.info("%s: %s sent a body not in its coding: %s", field, _host(target), exc)
            raise InvalidRequestError(
                f"{field}: the image server sent a body that could not be decompressed",
                field=field) from exc
        return bytes(body.data)


class _Body:
    """A response body from its raw chunks, undoing at most one zlib coding (``wbits``
    as :func:`zlib.decompressobj` takes it; None for none). Decoding stops at ``limit`` + 1
    bytes of output, whatever the data's ratio."""

    def __init__(self, limit: int, wbits: int | None) -> None:
        self.data = bytearray()
        self.complete = False  # the coded data has ended
        self._raw = 0
        self._limit = limit
        self._wbits = wbits
        self._inflate = None if wbits is None else zlib.decompressobj(wbits)

    @property
    def too_large(self) -> bool:
        """Whether the raw or the decoded body is past the limit."""
        return max(self._raw, len(self.data)) > self._limit

    def add(self, chunk: bytes) -> None:
        """Adds the next raw chunk; raises :class:`zlib.error` for data not in the coding."""
        first = self._raw == 0
        self._raw += len(chunk)
        if self._inflate is None:
            self.data += chunk
        elif not self.too_large:
            try:
                self._decode(chunk)
            except zlib.error:
                if not (first and self._wbits == _ZLIB):
                    raise
                # "deflate" is zlib data, but some servers send raw deflate data (httpx
                # tries both the same way).
                self._inflate = zlib.decompressobj(_RAW_DEFLATE)
                self.data.clear()
                self._decode(chunk)

    def _decode(self, data: bytes) -> None:
        inflate = self._inflate
        assert inflate is not None
        # max_length leaves the rest of the input in unconsumed_tail. Output that filled
        # max_length is past the limit; output short of it means zlib holds no more.
        while data and not inflate.eof and not self.too_large:
            self.data += inflate.decompress(data, self._limit + 1 - len(self.data))
            data = inflate.unconsumed_tail
        self.complete = inflate.eof


def _coding(headers: httpx.Headers, field: str) -> int | None:
    """The wbits of the response's one zlib coding, or None for none."""
    codings = [value.strip().lower()
               for value in headers.get_list("content-encoding", split_commas=True)]
    known = [coding for coding in codings if coding in _CODINGS or coding in _REFUSED_CODINGS]
    if not known:
        return None
    if len(known) == 1 and known[0] in _CODINGS:
        return _CODINGS[known[0]]
    _log.info("%s: refused Content-Encoding %r", field, headers.get("content-encoding"))
    raise InvalidRequestError(
        f"{field}: the image server sent the image in a content encoding that is not "
        "supported", field=field)


def _parse(url: str, field: str) -> httpx.URL:
    """The caller's ``url``, parsed and checked (see :func:`_url_problem`) before anything
    is resolved or sent."""
    if len(url) > _MAX_URL_CHARS:
        raise _not_a_url(field, f" (longer than {_MAX_URL_CHARS} characters)")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:  # ValueError: IDNA's own
        raise _not_a_url(field) from exc
    return _checked_url(parsed, field)


def _checked_url(url: httpx.URL, field: str, *, redirect: bool = False) -> httpx.URL:
    """``url`` when it may be fetched; a redirect's problems other than its scheme are
    all "redirected to an invalid URL"."""
    if url.scheme not in _DEFAULT_PORTS:
        raise InvalidRequestError(f"{field}: only http and https URLs are fetched",
                                  field=field)
    problem = _url_problem(url)
    if problem is None:
        return url
    raise _broken_redirect(field) if redirect else _not_a_url(field, problem)


def _url_problem(url: httpx.URL) -> str | None:
    """Why ``url`` (http or https) cannot be fetched: a detail for "not a valid URL", or
    None when it can. Checked here, not left to the socket calls, whose errors
    (OverflowError for a port, UnicodeError for a host name) are no refusal."""
    if len(str(url)) > _MAX_URL_CHARS:
        return f" (longer than {_MAX_URL_CHARS} characters)"
    if url.port is not None and not 0 < url.port <= _MAX_PORT:
        return f" (the port must be 1 to {_MAX_PORT})"
    host = _host(url)
    if _is_ip(host):
        return None
    if not _HOST_NAME.fullmatch(host):
        return ""
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(name) > _MAX_NAME:
        return f" (the host name is longer than {_MAX_NAME} characters)"
    if any(len(label) > _MAX_LABEL for label in labels):
        return f" (a label of the host name is longer than {_MAX_LABEL} characters)"
    for label in labels:
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except UnicodeError:  # idna.IDNAError among them
                return " (the host name is not valid IDNA)"
    return None


def _host(url: httpx.URL) -> str:
    """The host as it is resolved and sent: a name in ASCII (an internationalised name
    IDNA-encoded, as httpx encodes it; ``url.host`` would decode it again) or an IP."""
    return url.raw_host.decode("ascii")


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _not_a_url(field: str, detail: str = "") -> InvalidRequestError:
    return InvalidRequestError(f"{field}: not a valid URL{detail}", field=field)


def _redirected(target: httpx.URL, location: str, field: str) -> httpx.URL:
    """Where a redirect from ``target`` leads (relative to the name, not the IP)."""
    try:
        url = target.join(location)
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise _broken_redirect(field) from exc
    return _checked_url(url, field, redirect=True)


def _broken_redirect(field: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field}: the image server redirected to an invalid URL",
                               field=field)
