"""Bad input on the hook socket: hypothesis-generated lines and raw bytes.

Every one gets an error reply or a closed connection; afterwards the daemon still answers, and
neither its allocations nor its database have changed.
"""
import json
import socket

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .daemon_proc import Daemon

OPS = ["allocate", "claim", "release", "lookup", "list", "status", "cni", "leave", "rmpeer",
       "range_add", "range_retire"]
NOT_STR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                          st.integers(), max_size=2))
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                       lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@st.composite
def invalid_requests(draw):
    """JSON objects that cannot be a valid request, each in its own way."""
    kind = draw(st.sampled_from(["no_op", "bad_op", "op_type", "handle_type", "no_handle",
                                 "bad_handle", "bad_subnet", "bad_address", "bad_anchor",
                                 "bad_version", "bad_range", "bad_range_flag"]))
    op = draw(st.sampled_from(["allocate", "claim", "release", "lookup"]))
    req = {"op": op, "handle": draw(st.text(min_size=1, max_size=20).filter(str.isprintable))}
    if op == "claim":
        req["address"] = "10.20.0.9"
    extra = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in (
        "op", "v", "handle", "subnet", "address", "anchor", "range", "undo",
        "allow_route_overlap")), JSONISH, max_size=3))
    req.update(extra)  # unknown fields are ignored, so they cannot make a request valid
    if kind == "no_op":
        del req["op"]
    elif kind == "bad_op":
        req["op"] = draw(st.text().filter(lambda o: o not in OPS))
    elif kind == "op_type":
        req["op"] = draw(NOT_STR)
    elif kind == "handle_type":
        req["handle"] = draw(NOT_STR)
    elif kind == "no_handle":
        del req["handle"]
    elif kind == "bad_handle":
        req["handle"] = draw(st.just("") | st.text(min_size=256) |
                             st.text(min_size=1).map(lambda t: t + "\n"))
    elif kind == "bad_subnet":
        req["op"] = "allocate"  # the ops that read a subnet
        req["subnet"] = draw(NOT_STR.filter(lambda x: x is not None) |
                             st.text().filter(lambda t: "/" not in t) | st.just("10.20.0.5/24"))
    elif kind == "bad_address":
        req["op"] = "claim"
        req["address"] = draw(NOT_STR | st.text(max_size=12).filter(lambda t: ":" not in t
                                                                    and "." not in t))
    elif kind == "bad_anchor":
        req["op"] = "allocate"
        req["anchor"] = draw(st.dictionaries(st.sampled_from(["netns", "pid", "x"]), NOT_STR,
                                             min_size=1).filter(lambda a: a.get("pid") is None or
                                                                type(a["pid"]) is not int))
    elif kind == "bad_range":  # range_add and range_retire name a CIDR block, host bits zero
        req["op"] = draw(st.sampled_from(["range_add", "range_retire"]))
        req["range"] = draw(NOT_STR | st.text().filter(lambda t: "/" not in t) |
                            st.sampled_from(["10.20.0.5/24", "10.20.0.0/33", "fd00::1/64"]))
    elif kind == "bad_range_flag":  # a good range, but a flag that is not true or false
        req["op"], flag = draw(st.sampled_from([("range_add", "allow_route_overlap"),
                                                ("range_retire", "undo")]))
        req["range"] = "10.20.0.0/24"
        req[flag] = draw(NOT_STR.filter(lambda v: type(v) is not bool))
    elif kind == "bad_version":
        req["v"] = draw(NOT_STR.filter(lambda v: v != 1 or v is True))
    return json.dumps(req).encode()


RAW = st.binary(max_size=300).filter(lambda b: b'"op"' not in b)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("fuzz"), "--iprange", "10.20.0.0/24")
    d.start()
    for i in range(5):
        assert d.call({"op": "allocate", "handle": f"keep-{i}"})["ok"]
    before = d.call({"op": "list"})
    db = apsw.Connection(f"file:{d.db}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY |
                         apsw.SQLITE_OPEN_URI)
    rows = db.execute("SELECT * FROM allocations ORDER BY address").fetchall()
    yield d, before
    assert db.execute("SELECT * FROM allocations ORDER BY address").fetchall() == rows
    assert db.execute("SELECT count(*) FROM freed").fetchall() == [(0,)]
    db.close()
    d.stop()


def exchange(d, payload: bytes) -> dict | None:
    """Send payload; the reply, or None when the daemon hung up."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(d.socket))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            return None
        line = s.makefile("rb").readline()
    return json.loads(line) if line else None


def check_unchanged(d, before):
    assert d.call({"op": "list"}) == before


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(line=invalid_requests())
def test_invalid_requests_get_errors(daemon, line):
    d, before = daemon
    reply = exchange(d, line + b"\n")
    assert reply is not None and reply["ok"] is False and reply["error"]["message"]
    check_unchanged(d, before)


@FUZZ
@given(data=RAW)
def test_raw_bytes_get_errors_or_close(daemon, data):
    d, before = daemon
    reply = exchange(d, data + b"\n")
    if data.strip():
        assert reply is None or reply["ok"] is False
    check_unchanged(d, before)


@FUZZ
@given(data=st.binary(max_size=200).filter(lambda b: b'"op"' not in b and b"\n" not in b))
def test_unterminated_bytes_then_hangup(daemon, data):
    d, before = daemon
    reply = exchange(d, data)  # no newline: the daemon sees only a half line and a hang-up
    assert reply is None
    check_unchanged(d, before)
