"""IPv4/IPv6 addresses and CIDR blocks as integers.

Parsing leans on the standard library's ipaddress; the core works on plain ints so that range
arithmetic (which needs exclusive ends that may equal 2**32 or 2**128) never overflows.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property

BITS = {4: 32, 6: 128}


class AddrError(ValueError):
    """Text that is not a usable address or CIDR block."""


def parse_addr(text: object) -> tuple[int, int]:
    """'10.0.0.1' -> (4, 167772161)."""
    if not isinstance(text, str):
        raise AddrError(f"address must be a string, got {type(text).__name__}")
    try:
        a = ipaddress.ip_address(text.strip())
    except ValueError:
        raise AddrError(f"{text!r} is not an IPv4 or IPv6 address") from None
    if getattr(a, "scope_id", None):
        raise AddrError(f"{text!r} has a zone index; container addresses take none")
    return a.version, int(a)


def parse_hostport(text: object) -> tuple[str | None, int]:
    """'host:6786' -> ('host', 6786); '[fd00::1]:6786' -> ('fd00::1', 6786); ':0' -> (None, 0).
    The host is not resolved here: a name is fine."""
    if not isinstance(text, str):
        raise AddrError(f"HOST:PORT must be a string, got {type(text).__name__}")
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise AddrError(f"{text!r} is not HOST:PORT (port 0 to 65535)")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if host and not _host_ok(host, bracketed):
        raise AddrError(f"{text!r}: {host!r} is neither an IP address nor a valid DNS name")
    return host or None, int(port)


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _host_ok(host: str, bracketed: bool) -> bool:
    """An IP literal (IPv6 in brackets), or a DNS name of letters, digits and hyphens: what
    can be dialled without surprises (IDNA errors, empty labels)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if bracketed or ip is not None:
        return ip is not None and (ip.version == 4) != bracketed
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.match(x) for x in name.split("."))


def format_addr(family: int, value: int) -> str:
    if family == 4 and 0 <= value < 1 << 32:
        # Every allocation formats its address: this is ten times faster than ipaddress.
        return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


@dataclass(frozen=True, order=True)
class Cidr:
    family: int
    start: int
    prefix: int
    # Computed once: every allocate asks for them several times (a hot path).
    size: int = field(init=False, compare=False, repr=False)
    end: int = field(init=False, compare=False, repr=False)  # exclusive: may be 2**bits
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        size = 1 << (BITS[self.family] - self.prefix)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "end", self.start + size)
        object.__setattr__(self, "_hash", hash((self.family, self.start, self.prefix)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def bits(self) -> int:
        return BITS[self.family]

    def __contains__(self, item: tuple[int, int]) -> bool:
        family, value = item
        return family == self.family and self.start <= value < self.end

    def contains_cidr(self, other: Cidr) -> bool:
        return other.family == self.family and self.start <= other.start and other.end <= self.end

    def overlaps(self, other: Cidr) -> bool:
        return other.family == self.family and self.start < other.end and other.start < self.end

    def host_bounds(self) -> tuple[int, int]:
        """[lo, hi) of the addresses that may be handed out.

        IPv4 drops the network and broadcast addresses except on /31 and /32 (RFC 3021); IPv6 drops
        the subnet-router anycast address (the all-zero host) except on /127 and /128 (RFC 6164).
        """
        lo, hi = self.start, self.end
        if self.family == 4 and self.prefix <= 30:
            return lo + 1, hi - 1
        if self.family == 6 and self.prefix <= 126:
            return lo + 1, hi
        return lo, hi

    def addr(self, value: int) -> str:
        return format_addr(self.family, value)

    def with_prefix(self, value: int) -> str:
        return f"{format_addr(self.family, value)}/{self.prefix}"

    @cached_property
    def text(self) -> str:
        # Formatted once per block: replies and rows name their subnet on every request.
        return f"{format_addr(self.family, self.start)}/{self.prefix}"

    def __str__(self) -> str:
        return self.text


def parse_cidr(text: object) -> tuple[Cidr, bool]:
    """Parse a CIDR block; also take Weave's form with host bits set ('10.1.0.1/16').

    Returns (block, normalised): normalised is True when host bits were dropped, so the caller
    can tell the operator what it understood.
    """
    if not isinstance(text, str):
        raise AddrError(f"CIDR must be a string, got {type(text).__name__}")
    if "/" not in text:
        raise AddrError(f"{text!r} is not a CIDR block (expected ADDRESS/PREFIX)")
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise AddrError(f"{text!r} is not a CIDR block: {e}") from None
    block = Cidr(net.version, int(net.network_address), net.prefixlen)
    addr_part = text.strip().split("/", 1)[0]
    normalised = int(ipaddress.ip_address(addr_part)) != block.start
    return block, normalised


def exact_cidr(text: object, what: str) -> Cidr:
    """A CIDR block from a machine (a request, a peer): host bits set are refused, not dropped,
    since a program that sends them has a bug worth naming. Errors start with `what`."""
    try:
        block, normalised = parse_cidr(text)
    except AddrError as e:
        raise AddrError(f"{what}: {e}") from None
    if normalised:
        raise AddrError(f"{what} {text!r} has host bits set; did you mean {block}?")
    return block


def cidr(text: str) -> Cidr:
    """Strict-enough parse for trusted text (tests, the database)."""
    return parse_cidr(text)[0]


def uncovered(subnet: Cidr, ranges: list[Cidr]) -> list[Cidr]:
    """The parts of subnet that no range covers, as the fewest CIDR blocks."""
    out, lo = [], subnet.start
    for r in sorted((r for r in ranges if r.overlaps(subnet)), key=lambda r: r.start):
        if r.start > lo:
            out += range_to_cidrs(subnet.family, lo, r.start)
        lo = max(lo, r.end)
    if lo < subnet.end:
        out += range_to_cidrs(subnet.family, lo, subnet.end)
    return out


def range_to_cidrs(family: int, lo: int, hi: int) -> list[Cidr]:
    """The fewest aligned CIDR blocks covering [lo, hi) exactly."""
    out = []
    bits = BITS[family]
    while lo < hi:
        # Largest block aligned at lo that fits in what is left.
        size = lo & -lo if lo else 1 << bits
        while size > hi - lo:
            size >>= 1
        out.append(Cidr(family, lo, bits - size.bit_length() + 1))
        lo += size
    return out
