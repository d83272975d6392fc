"""Mutation primitives for the hostile-input soak: bytes, JSON and msgpack values, all drawn
from one seeded random.Random so that a seed replays the same inputs."""
from __future__ import annotations

import json
import random

# Integers at the edges: of signed and unsigned machine words, of msgpack (which carries
# -2**63 .. 2**64-1), of JSON doubles, and far beyond.
INTS = [0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53,
        2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**31)]
BIG_INTS = [2**64, 2**128, 2**128 + 1, -(2**64), 10**100, 10**400]
FLOATS = [0.0, -0.0, 0.5, 1e308, -1e308, 1e-320, float("inf"), float("-inf"), float("nan")]
# Strings parsers trip on: empty, control characters, digits that str.isdigit() takes but
# int() does not, other scripts' digits, long ones, addresses in odd forms.
STRINGS = ["", " ", "\t", "\n", "\r\n", "\x00", "\x7f", "\u2028", "²", "٣", "１２", "🙂",
           "é", "a" * 300, "a" * 70, "null", "NaN", "-1", "0x10", "1e999", "%s%n",
           "198.18.0.1", "198.18.0.0/24", "198.18.0.0/33", "198.18.0.1/24", "0.0.0.0/0",
           "255.255.255.255", "10.0.0.1/255.255.0.0", "::ffff:198.18.0.5", "fe80::1%eth0",
           "2001:db8::/64", "2001:db8::1", "::/0", "::", "1.2.3", "1.2.3.4.5", "01.2.3.4",
           "127.0.0.1:1", "h:²", "h:٣", "[::1]:1", "[127.0.0.1]:1", "x..y:1", "-a:1",
           "/run/netns/none", "/proc/self/ns/net", "../../etc/passwd", "/", "\\"]


def pick_int(rng: random.Random, big: bool = True) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.choice(INTS + (BIG_INTS if big else []))
    if r < 0.8:
        return rng.randint(-5, 300)
    return rng.getrandbits(rng.choice([8, 16, 32, 63, 64])) * rng.choice([1, 1, -1])


def pick_str(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return rng.choice(STRINGS)
    n = rng.choice([1, 2, 8, 16, 64, 65, 255, 256])
    alphabet = rng.choice(["abcdef0123456789", "0123456789.:/[]%", "\x00\x01\n\"\\{}[],:",
                           "".join(map(chr, range(0x20, 0x7f))), "éü漢字🙂\u200b\ufeff"])
    return "".join(rng.choice(alphabet) for _ in range(n))


# -- bytes ---------------------------------------------------------------------------------------

def random_bytes(rng: random.Random, most: int = 200) -> bytes:
    n = rng.choice([0, 1, 2, 4, 8, rng.randint(0, most)])
    return rng.randbytes(n)


def mutate_bytes(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    """Bit flips, truncation, duplication, insertion, deletion, interesting bytes."""
    b = bytearray(data)
    for _ in range(rounds or rng.randint(1, 3)):
        op = rng.randrange(7)
        if op == 0 and b:  # flip a few bits
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # truncate
            del b[rng.randrange(len(b)):]
        elif op == 2 and b:  # duplicate a slice in place
            i = rng.randrange(len(b))
            j = rng.randint(i, min(len(b), i + 64))
            b[i:i] = b[i:j] * rng.randint(1, 4)
        elif op == 3:  # insert random bytes
            i = rng.randint(0, len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and b:  # delete a slice
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 8)]
        elif op == 5 and b:  # an interesting byte
            b[rng.randrange(len(b))] = rng.choice([0x00, 0x0a, 0x22, 0x5c, 0x7f, 0x80, 0xc0,
                                                   0xff, 0x7b, 0x5b, 0xe2])
        elif op == 6 and b:  # swap two slices
            i, j = sorted(rng.randrange(len(b)) for _ in range(2))
            b[i:j] = bytes(reversed(b[i:j]))
    return bytes(b)


# -- JSON ----------------------------------------------------------------------------------------

def random_json(rng: random.Random, depth: int = 3):
    r = rng.randrange(9 if depth > 0 else 6)
    if r == 0:
        return None
    if r == 1:
        return rng.choice([True, False])
    if r == 2:
        return pick_int(rng)
    if r == 3:
        return rng.choice(FLOATS)
    if r in (4, 5):
        return pick_str(rng)
    if r in (6, 7):
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {pick_str(rng)[:20]: random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))}


def nested(rng: random.Random, levels: int | None = None):
    """A value nested deeper than any parser's recursion limit, or just deep."""
    levels = levels or rng.choice([50, 999, 1001, 5000, 20000])
    v = random_json(rng, 0)
    for _ in range(levels):
        v = [v] if rng.random() < 0.5 else {"a": v}
    return v


def nested_text(rng: random.Random, levels: int | None = None) -> str:
    levels = levels or rng.choice([999, 1001, 5000, 30000])
    if rng.random() < 0.5:
        return "[" * levels + "]" * levels
    return '{"a":' * levels + "1" + "}" * levels


def dumps(obj) -> bytes:
    """JSON as a lax client might send it: NaN and Infinity allowed; too deep, as text."""
    try:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8", "surrogatepass")
    except RecursionError:
        return _dumps_deep(obj).encode("utf-8", "surrogatepass")


def _dumps_deep(obj) -> str:
    """json.dumps without recursion, for values nested deeper than the interpreter's limit."""
    out: list[str] = []
    stack: list = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            out.append(item.text)
        elif isinstance(item, list):
            stack.append(_Raw("]"))
            for i, x in enumerate(reversed(item)):
                stack.append(x)
                if i < len(item) - 1:
                    stack.append(_Raw(","))
            stack.append(_Raw("["))
        elif isinstance(item, dict):
            stack.append(_Raw("}"))
            pairs = list(item.items())
            for i, (k, v) in enumerate(reversed(pairs)):
                stack.append(v)
                stack.append(_Raw(json.dumps(str(k)) + ":"))
                if i < len(pairs) - 1:
                    stack.append(_Raw(","))
            stack.append(_Raw("{"))
        else:
            out.append(json.dumps(item))
    return "".join(out)


class _Raw:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def mutate_value(rng: random.Random, obj, wrong_types: bool = True):
    """A structural mutation of a JSON-like value: a node replaced by another type, a huge
    number, a deep nesting; a key dropped, added or renamed; a list item dropped or doubled."""
    if isinstance(obj, dict) and obj and rng.random() < 0.7:
        obj = dict(obj)
        key = rng.choice(list(obj))
        op = rng.randrange(6)
        if op == 0:
            del obj[key]
        elif op == 1:
            obj[pick_str(rng)[:16]] = random_json(rng)
        elif op == 2:
            obj[key] = mutate_value(rng, obj[key], wrong_types)
        elif op == 3 and wrong_types:
            obj[key] = random_json(rng, 2)
        elif op == 4:
            obj[key] = rng.choice([pick_int(rng), pick_str(rng), rng.choice(FLOATS)])
        else:
            obj[key] = nested(rng) if rng.random() < 0.3 else obj[key]
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.7:
        obj = list(obj)
        i = rng.randrange(len(obj))
        op = rng.randrange(4)
        if op == 0:
            del obj[i]
        elif op == 1:
            obj.insert(i, obj[i])
        elif op == 2:
            obj[i] = mutate_value(rng, obj[i], wrong_types)
        else:
            obj[i] = random_json(rng, 1)
        return obj
    if isinstance(obj, bool):
        return rng.choice([not obj, None, 0, 1, "true"])
    if isinstance(obj, int):
        return rng.choice([pick_int(rng), str(obj), float(obj) if abs(obj) < 2**60 else 0.5,
                           -obj])
    if isinstance(obj, str):
        r = rng.random()
        if r < 0.3:
            return pick_str(rng)
        if r < 0.6 and obj:
            return mutate_bytes(rng, obj.encode(), 1).decode("utf-8", "replace")
        if r < 0.8:
            return obj * rng.choice([2, 50, 300])
        return random_json(rng, 1)
    return random_json(rng, 2)


# -- msgpack -------------------------------------------------------------------------------------

MP_INTS = [0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**32, 2**31 - 1, 127, 128, 255]


def random_mp(rng: random.Random, depth: int = 2):
    """A value msgpack can carry: ints within 64 bits, bytes, str, lists, maps."""
    r = rng.randrange(10 if depth > 0 else 7)
    if r == 0:
        return None
    if r == 1:
        return rng.choice([True, False])
    if r == 2:
        return rng.choice(MP_INTS) if rng.random() < 0.6 else rng.randint(-10, 1000)
    if r == 3:
        return rng.choice([0.0, -1.5, 1e300, float("nan"), float("inf")])
    if r == 4:
        return rng.randbytes(rng.choice([0, 1, 4, 16, 17, 18, 33]))
    if r in (5, 6):
        return pick_str(rng).encode("utf-8", "replace").decode("utf-8")
    if r in (7, 8):
        return [random_mp(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    keys = [pick_str(rng)[:12] if rng.random() < 0.8 else rng.randint(0, 9)
            for _ in range(rng.randint(0, 3))]
    return {k: random_mp(rng, depth - 1) for k in keys}


def mutate_mp(rng: random.Random, obj):
    """As mutate_value, for msgpack values (bytes and 64-bit integers included)."""
    if isinstance(obj, list) and obj and rng.random() < 0.75:
        obj = list(obj)
        i = rng.randrange(len(obj))
        op = rng.randrange(5)
        if op == 0:
            del obj[i]
        elif op == 1:
            obj.insert(i, obj[i])
        elif op == 2:
            obj[i] = mutate_mp(rng, obj[i])
        elif op == 3:
            obj[i] = random_mp(rng)
        else:
            obj.append(random_mp(rng))
        return obj
    if isinstance(obj, dict) and obj and rng.random() < 0.75:
        obj = dict(obj)
        k = rng.choice(list(obj))
        obj[k] = mutate_mp(rng, obj[k]) if rng.random() < 0.6 else random_mp(rng)
        return obj
    if isinstance(obj, bool):
        return rng.choice([not obj, 0, None])
    if isinstance(obj, int):
        return rng.choice(MP_INTS + [obj + 1, obj - 1 if obj > -(2**63) else 0])
    if isinstance(obj, bytes):
        return mutate_bytes(rng, obj, 1) if rng.random() < 0.5 else \
            rng.randbytes(rng.choice([0, 1, 17, 18, 64]))
    if isinstance(obj, str):
        return pick_str(rng).encode("utf-8", "replace").decode("utf-8") \
            if rng.random() < 0.5 else obj * rng.choice([2, 70])
    return random_mp(rng)


def mp_nested(rng: random.Random, levels: int | None = None):
    v = None
    for _ in range(levels or rng.choice([100, 511, 513, 1000, 3000])):
        v = [v]
    return v
