"""Who may hold the gateway's connections: a cap per client address on connections that have not
passed the key check yet, and room kept for those that have, so idle unauthenticated sockets cannot
lock keyed clients out.

A connection starts *pending*; it is *proven* once a request on it passes the key check (a valid
key, or anonymous access where the manifest allows it). Rules for a new connection:

- its address already holds `per_client` pending connections: it is closed at once;
- the pending ones already take their share (`limit` less the room kept for proven ones), or the
  gateway is at `limit`: the oldest pending connection is closed to make room (a socket nobody
  proved anything on does not outrank a newcomer), and only when every connection is proven is the
  newcomer closed instead.

So a flood of idle sockets from a few addresses costs each of them its own place, and a keyed
client that connects still gets in (the newest pending socket is the last to go), while one that is
already connected is never pushed out. Pure: connections are opaque objects; the server closes.
"""

from __future__ import annotations

import math
from collections import OrderedDict


class ConnectionTable:
    def __init__(self, limit: int, per_client: int, reserved_for_keyed: float):
        self.limit, self.per_client = limit, per_client
        self.pending_cap = max(1, limit - math.ceil(limit * reserved_for_keyed))
        self._pending: OrderedDict[object, str] = OrderedDict()  # connection → its address, oldest first
        self._by_addr: dict[str, int] = {}                        # address → its pending connections
        self._proven: set[object] = set()
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pending) + len(self._proven)

    def opened(self, conn: object, addr: str) -> tuple[bool, list]:
        """(keep the new connection?, the connections to close to make room for it)."""
        if self._by_addr.get(addr, 0) >= self.per_client:
            self.refused += 1
            return False, []
        close = []
        if len(self) >= self.limit or len(self._pending) >= self.pending_cap:
            if not self._pending:
                self.refused += 1
                return False, []
            oldest, _ = next(iter(self._pending.items()))
            self._forget(oldest)
            self.evicted += 1
            close.append(oldest)
        self._pending[conn] = addr
        self._by_addr[addr] = self._by_addr.get(addr, 0) + 1
        return True, close

    def proven(self, conn: object) -> None:
        """A request on `conn` passed the key check: it keeps its place."""
        if conn in self._pending:
            self._forget(conn)
            self._proven.add(conn)

    def closed(self, conn: object) -> None:
        self._forget(conn)
        self._proven.discard(conn)

    def _forget(self, conn: object) -> None:
        addr = self._pending.pop(conn, None)
        if addr is not None:
            n = self._by_addr[addr] - 1
            if n:
                self._by_addr[addr] = n
            else:
                del self._by_addr[addr]
