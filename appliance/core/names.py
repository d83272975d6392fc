"""Name pools: a pattern such as `web-{000..999}` and the names it makes.

A pool is carved as a universe of REGISTRY (spare.py), one address per name: the name of
ordinal i is the address start + 1 + i (the /96's first address, like an IPv6 subnet's, is
never handed out). So names are leased, claimed, released, quarantined and swept exactly as
addresses are, by the same allocator and the same ring rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# prefix{first..last}suffix; first and last of one width when zero-padded.
_PATTERN = re.compile(r"([a-z0-9._-]*)\{(\d+)\.\.(\d+)\}([a-z0-9._-]*)\Z")
MAX_NAMES = 2**32 - 2


@dataclass(frozen=True)
class Pattern:
    prefix: str
    first: int
    last: int
    width: int  # digits, zero-padded (0: as they come)
    suffix: str

    @classmethod
    def parse(cls, text: str) -> Pattern:
        match = _PATTERN.match(text) if len(text) <= 100 else None
        if match is None:
            raise ValueError(f"name pattern {text[:100]!r} must look like web-{{000..999}}: "
                             "lower-case letters, digits, '.', '_' and '-' around one "
                             "{first..last} of decimal numbers")
        prefix, a, b, suffix = match.groups()
        first, last = int(a), int(b)
        if first > last or last - first + 1 > MAX_NAMES:
            raise ValueError(f"name pattern {text!r}: {{{a}..{b}}} must count up, at most "
                             f"{MAX_NAMES} names")
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        if width and len(b) != width:
            raise ValueError(f"name pattern {text!r}: zero-padded bounds must have one width")
        return cls(prefix, first, last, width, suffix)

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def name(self, ordinal: int) -> str:
        return f"{self.prefix}{self.first + ordinal:0{self.width}d}{self.suffix}"

    def ordinal(self, name: str) -> int | None:
        """The ordinal of a name of this pool, or None if the pool does not make it."""
        if not (name.startswith(self.prefix) and name.endswith(self.suffix)):
            return None
        digits = name[len(self.prefix):len(name) - len(self.suffix) or None]
        if not digits.isdigit() or (self.width and len(digits) != self.width) or \
                (not self.width and digits != str(int(digits))):
            return None
        n = int(digits) - self.first
        return n if 0 <= n < self.size else None
