"""What travels to the GPU machine, and in how many calls (pure: sizes in, a plan out).

Each call of the device tool sends the working tree plus the paths it carries, at most 64 MiB
together; files a call writes to an ignored folder stay there while the machine is warm (about
30 s between calls). So the pieces that must travel (wheels, corpora, the model) are packed into
as few calls as fit, each call carrying its own folder `.gpu/callN`; a file larger than the room
of one call (the bundled 98 MB GGUF) is cut into consecutive parts that fill the calls' leftover
room, and put back together, checksum verified, on the device before the run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

MIB = 2**20
LIMIT = 64 * MIB
MARGIN = 1 * MIB  # the tool's own listing, file-system rounding: never plan to the last byte


@dataclass(frozen=True)
class Piece:
    name: str  # where it lands under .gpu/callN/
    bytes: int
    part_of: str | None = None  # the split file it is a part of
    offset: int = 0  # the byte offset of this part in that file


@dataclass
class Call:
    index: int  # 1-based
    tree_bytes: int
    pieces: list[Piece] = field(default_factory=list)

    @property
    def carry(self) -> str:
        return f".gpu/call{self.index}"

    @property
    def bytes(self) -> int:
        return self.tree_bytes + sum(p.bytes for p in self.pieces)

    def to_dict(self) -> dict:
        return {"index": self.index, "carry": self.carry, "bytes": self.bytes, "mib": round(self.bytes / MIB, 1),
                "tree_bytes": self.tree_bytes, "pieces": [asdict(p) for p in self.pieces]}


def plan_calls(tree_bytes: int, pieces: dict[str, int], split: dict[str, int], *, limit: int = LIMIT,
               margin: int = MARGIN) -> list[Call]:
    """The fewest calls that carry `pieces` whole and `split` files in parts, each under `limit`.

    pieces: name → bytes, each travels whole (first fit, largest first); split: name → bytes, cut
    into consecutive parts that fill what room is left, in as many calls as that takes.
    """
    room = limit - margin - tree_bytes
    if room <= 0:
        raise ValueError(f"the working tree alone ({tree_bytes / MIB:.1f} MiB) leaves no room under "
                         f"{limit / MIB:.0f} MiB: ignore or carry less")
    for name, size in pieces.items():
        if size > room:
            raise ValueError(f"{name} ({size / MIB:.1f} MiB) does not fit one call ({room / MIB:.1f} MiB of room); "
                             f"give it to `split` to cut it into parts")
    total = sum(pieces.values()) + sum(split.values())
    n = max(1, math.ceil(total / room))
    while True:
        calls = _fill(n, tree_bytes, room, pieces, split)
        if calls is not None:
            return calls
        n += 1  # whole pieces left gaps the parts cannot use: one more call


def _fill(n: int, tree_bytes: int, room: int, pieces: dict[str, int], split: dict[str, int]) -> list[Call] | None:
    calls = [Call(i + 1, tree_bytes) for i in range(n)]
    free = [room] * n
    for name, size in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        i = next((i for i in range(n) if free[i] >= size), None)
        if i is None:
            return None
        calls[i].pieces.append(Piece(name, size))
        free[i] -= size
    for name, size in split.items():
        offset, k = 0, 0
        for i in range(n):
            take = min(free[i], size - offset)
            if take <= 0:
                continue
            k += 1
            calls[i].pieces.append(Piece(f"{name}.part{k}", take, part_of=name, offset=offset))
            free[i] -= take
            offset += take
        if offset < size:
            return None
    return calls


def summary(calls: list[Call]) -> str:
    lines = []
    for c in calls:
        what = ", ".join(f"{p.name} {p.bytes / MIB:.1f}" for p in c.pieces)
        lines.append(f"call {c.index}: {c.bytes / MIB:.1f} MiB (tree {c.tree_bytes / MIB:.1f} + {what}) → carry {c.carry}")
    return "\n".join(lines)
