"""Fetching URLs named in requests without reaching the engine's own network.

:class:`SafeFetcher` downloads one URL (http/https only, redirects by hand, each hop's
address checked and pinned); :mod:`core.net.policy` decides which addresses may be
reached (public ones, and the hosts an operator allows); :mod:`core.net.resolve` turns a
host name into addresses, once per hop.
"""

from core.net.policy import AllowedHosts, IPAddress, is_public_address
from core.net.resolve import Resolver, resolve_host
from core.net.safe_fetch import FetchLimits, SafeFetcher

__all__ = [
    "AllowedHosts", "FetchLimits", "IPAddress", "Resolver", "SafeFetcher", "is_public_address",
    "resolve_host",
]
