"""Redis commands packed in one C call (hiredis.pack_command) instead of redis-py's per-argument loop.

redis-py 8 packs every command through hiredis too, but first runs each argument through its
Python `Encoder.encode` and two generator passes: with a dozen keys and arguments per script call
that was over half of the gateway's Redis cost per request (cProfile under bench/replicas.py:
about 27 us of Python per packed command, against 1.3 us for hiredis.pack_command alone).
hiredis packs str (UTF-8, strict), bytes, int and float exactly as redis-py does (floats by
repr; checked in tests/serve/test_redis_pack.py) and refuses anything else with a TypeError:
those commands, and a first argument with a space in it (redis-py splits 'CONFIG GET'), still go
through redis-py's own packer, so its errors (a bool, None) are unchanged.
"""

from __future__ import annotations


def fast_packing(pool) -> bool:
    """Give `pool`'s future connections the one-call packer (before any connection is made: the
    pool picks the class per URL scheme, TCP, TLS or unix socket, and that class stays the base).
    False, changing nothing, where hiredis (or its packer) is not installed."""
    try:
        from hiredis import pack_command as pack  # hiredis >= 2.1; redis[hiredis] 5+ wants 3
    except ImportError:
        return False
    base = pool.connection_class

    class Packed(base):
        def pack_command(self, *args):
            cmd = args[0]
            if cmd.__class__ is str and " " not in cmd:
                try:
                    return [pack(args)]
                except TypeError:
                    pass
            return super().pack_command(*args)

    Packed.__name__ = Packed.__qualname__ = f"HiredisPacked{base.__name__}"
    pool.connection_class = Packed
    return True
