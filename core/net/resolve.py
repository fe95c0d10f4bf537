"""Host name → addresses, the one DNS lookup of a fetch hop.

A :data:`Resolver` is the seam: :func:`resolve_host` asks the system (``getaddrinfo`` in
the event loop's executor, so the loop keeps running); a test may pass its own to give a
name the addresses it needs. The fetcher checks what the resolver returns and connects to
exactly those addresses, so a second lookup can never answer differently (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import ip_address

from core.net.policy import IPAddress

__all__ = ["Resolver", "resolve_host"]

Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
"""``(host, port) → addresses`` in the order to try them; raises :class:`OSError` (such as
:class:`socket.gaierror`) when the name does not resolve."""


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The TCP addresses of ``host`` in ``getaddrinfo``'s order, each once. Numeric forms
    that are no dotted quad (``2130706433``, ``0x7f.1``, ``127.1``) come back as the address
    they stand for. Raises :class:`OSError` when there is none."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ip_address(str(sockaddr[0]).partition("%")[0])  # no IPv6 zone in a URL
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(f"{host!r} has no IPv4 or IPv6 address")
    return addresses
