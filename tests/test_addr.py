"""Unit tables: address and range arithmetic, IPv4 and IPv6, edges included."""
import pytest

from appliance.core.addr import (AddrError, Cidr, format_addr, parse_addr, parse_cidr,
                                 parse_hostport, range_to_cidrs)
from appliance.core.intervals import IntervalSet


@pytest.mark.parametrize("text, family, value", [
    ("0.0.0.0", 4, 0),
    ("10.32.0.1", 4, 0x0A200001),
    ("255.255.255.255", 4, 2**32 - 1),
    ("::", 6, 0),
    ("::1", 6, 1),
    ("fd00::1", 6, 0xFD00 << 112 | 1),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 6, 2**128 - 1),
    (" 10.0.0.1 ", 4, 0x0A000001),
    ("10.0.0.1\n", 4, 0x0A000001),
])
def test_parse_addr(text, family, value):
    assert parse_addr(text) == (family, value)
    assert parse_addr(format_addr(family, value)) == (family, value)


@pytest.mark.parametrize("text", ["", "10.0.0", "10.0.0.256", "1.2.3.4/24", "::g", "fe80::1%eth0",
                                  None, 17, b"10.0.0.1"])
def test_parse_addr_rejects(text):
    with pytest.raises(AddrError):
        parse_addr(text)


@pytest.mark.parametrize("text, start, prefix, size, normalised", [
    ("10.32.0.0/12", "10.32.0.0", 12, 2**20, False),
    ("10.1.0.1/16", "10.1.0.0", 16, 2**16, True),     # Weave's form: host bits dropped
    ("0.0.0.0/0", "0.0.0.0", 0, 2**32, False),
    ("255.255.255.255/32", "255.255.255.255", 32, 1, False),
    ("10.0.0.0/31", "10.0.0.0", 31, 2, False),
    ("fd00::/64", "fd00::", 64, 2**64, False),
    ("fd00::5/127", "fd00::4", 127, 2, True),
    ("::/0", "::", 0, 2**128, False),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 128, 1, False),
])
def test_parse_cidr(text, start, prefix, size, normalised):
    block, norm = parse_cidr(text)
    assert (block.addr(block.start), block.prefix, block.size, norm) == (start, prefix, size,
                                                                       normalised)
    assert block.end == block.start + size


@pytest.mark.parametrize("text", ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "10.0.0.0/-1",
                                  "x/8", "/8", "10.0.0.0/8/8", 12, None])
def test_parse_cidr_rejects(text):
    with pytest.raises(AddrError):
        parse_cidr(text)


@pytest.mark.parametrize("text, first, last", [
    ("10.0.0.0/24", "10.0.0.1", "10.0.0.254"),    # network and broadcast never handed out
    ("10.0.0.0/30", "10.0.0.1", "10.0.0.2"),
    ("10.0.0.0/31", "10.0.0.0", "10.0.0.1"),      # RFC 3021 point-to-point: both usable
    ("10.0.0.7/32", "10.0.0.7", "10.0.0.7"),
    ("255.255.255.0/24", "255.255.255.1", "255.255.255.254"),  # end of the space
    ("255.255.255.254/31", "255.255.255.254", "255.255.255.255"),
    ("fd00::/64", "fd00::1", "fd00::ffff:ffff:ffff:ffff"),  # v6: no broadcast
    ("fd00::/127", "fd00::", "fd00::1"),          # RFC 6164
    ("fd00::9/128", "fd00::9", "fd00::9"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff0/124", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff1",
     "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
])
def test_host_bounds(text, first, last):
    block = parse_cidr(text)[0]
    lo, hi = block.host_bounds()
    assert (block.addr(lo), block.addr(hi - 1)) == (first, last)


def test_containment_and_overlap():
    big, small, other = (parse_cidr(t)[0] for t in ("10.32.0.0/12", "10.33.0.0/16", "10.48.0.0/12"))
    v6 = parse_cidr("fd00::/8")[0]
    assert big.contains_cidr(small) and not small.contains_cidr(big)
    assert big.overlaps(small) and small.overlaps(big)
    assert not big.overlaps(other) and not big.overlaps(v6)
    assert parse_addr("10.47.255.255") in big and parse_addr("10.48.0.0") not in big
    assert (6, big.start) not in big  # same integer, other family
    last = parse_cidr("255.255.255.255/32")[0]
    assert last.end == 2**32 and parse_addr("255.255.255.255") in last


@pytest.mark.parametrize("family, lo, hi, expect", [
    (4, "10.0.0.0", "10.0.1.0", ["10.0.0.0/24"]),
    (4, "10.0.0.1", "10.0.0.4", ["10.0.0.1/32", "10.0.0.2/31"]),
    (4, "10.0.0.3", "10.0.0.8", ["10.0.0.3/32", "10.0.0.4/30"]),
    (4, "0.0.0.0", None, ["0.0.0.0/0"]),
    (4, "255.255.255.254", None, ["255.255.255.254/31"]),
    (6, "fd00::", "fd00::3", ["fd00::/127", "fd00::2/128"]),
    (6, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", None,
     ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127"]),
])
def test_range_to_cidrs(family, lo, hi, expect):
    lo_v = parse_addr(lo)[1]
    hi_v = parse_addr(hi)[1] if hi else 2 ** (32 if family == 4 else 128)
    blocks = range_to_cidrs(family, lo_v, hi_v)
    assert [str(b) for b in blocks] == expect
    assert sum(b.size for b in blocks) == hi_v - lo_v


def test_interval_set_table():
    s = IntervalSet()
    for x in (5, 6, 8, 7, 1):
        s.add(x)
    assert s.intervals() == [(1, 2), (5, 9)]
    assert s.first_gap(0, 10) == 0 and s.first_gap(1, 10) == 2 and s.first_gap(5, 10) == 9
    assert s.first_gap(5, 9) is None
    s.discard(6)
    assert s.intervals() == [(1, 2), (5, 6), (7, 9)]
    s.discard(5)
    s.discard(1)
    s.discard(100)
    assert s.intervals() == [(7, 9)] and len(s) == 2 and 8 in s and 9 not in s
    top = 2**32 - 1
    s.add(top)
    assert s.first_gap(top, 2**32) is None and s.first_gap(top - 1, 2**32) == top - 1


@pytest.mark.parametrize("text, host, port", [
    ("198.18.0.1:6786", "198.18.0.1", 6786),
    ("[fd00::1]:6786", "fd00::1", 6786),
    ("host.example:0", "host.example", 0),
    (":7000", None, 7000),
    ("0.0.0.0:65535", "0.0.0.0", 65535),
])
def test_parse_hostport(text, host, port):
    assert parse_hostport(text) == (host, port)


@pytest.mark.parametrize("text", ["198.18.0.1", "h:65536", "h:-1", "h:12x", "h:", "", 5, None,
                                  "h:\u00b2", "h:\u0663"])  # digits, but not ASCII ones
def test_parse_hostport_rejects(text):
    with pytest.raises(AddrError):
        parse_hostport(text)
