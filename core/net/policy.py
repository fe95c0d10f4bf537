"""Which destinations a URL from a request may reach.

An address is *public* when it is globally routable: not loopback, private, link-local,
multicast, reserved, unspecified, shared (100.64/10) or site-local. IPv6 addresses that
carry an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64 ``64:ff9b::/96``) are judged by
that IPv4 address too, since that is where the packets end up.

:class:`AllowedHosts` is the operator's exception list (LORA_FETCH_ALLOWED_HOSTS): hosts,
as written in URLs, that may be reached whatever they resolve to (an internal image store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

__all__ = ["AllowedHosts", "IPAddress", "is_public_address"]

IPAddress = IPv4Address | IPv6Address

_NAT64_PREFIX = int(IPv6Address("64:ff9b::")) >> 32  # the well-known /96
_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


def is_public_address(address: IPAddress) -> bool:
    """Whether ``address`` is globally routable (see the module docstring)."""
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        if int(address) >> 32 == _NAT64_PREFIX:
            return is_public_address(IPv4Address(int(address) & 0xFFFF_FFFF))
        embedded = [address.sixtofour, address.teredo[1] if address.teredo else None]
        if address.is_site_local or any(
                v4 is not None and not is_public_address(v4) for v4 in embedded):
            return False
    return address.is_global and not (
        address.is_loopback or address.is_private or address.is_link_local
        or address.is_multicast or address.is_reserved or address.is_unspecified)


def _normalise_name(host: str) -> str:
    return host.strip().lower().removesuffix(".")


@dataclass(frozen=True)
class AllowedHosts:
    """Host names (case-insensitive, trailing dot ignored) and IP addresses that may be
    fetched from although they are not public. Empty by default: nothing internal is."""

    names: frozenset[str] = field(default_factory=frozenset)
    addresses: frozenset[IPAddress] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str) -> AllowedHosts:
        """``"images.internal, 10.0.0.5, [fd00::5]"`` → the allowed hosts. Raises
        :class:`ValueError` for an entry that is neither a host name nor an IP address
        (a scheme, port or path)."""
        names: set[str] = set()
        addresses: set[IPAddress] = set()
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                addresses.add(ip_address(entry.removeprefix("[").removesuffix("]")))
                continue
            except ValueError:
                pass
            name = _normalise_name(entry)
            if not _NAME.fullmatch(name):
                raise ValueError("comma-separated host names or IP addresses, without scheme, "
                                 f"port or path; not {entry!r}")
            names.add(name)
        return cls(frozenset(names), frozenset(addresses))

    def allows(self, host: str) -> bool:
        """Whether ``host`` (a URL's host as written: a name, or an IP literal without
        brackets) is on the list."""
        try:
            return ip_address(host) in self.addresses
        except ValueError:
            return _normalise_name(host) in self.names
