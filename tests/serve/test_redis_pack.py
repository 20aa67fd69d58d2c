"""serve/redis_pack.py: the one-call packer sends what redis-py would, byte for byte, and leaves the
pool's choice of connection class (TCP, TLS, unix socket) as the base."""

import pytest

pytest.importorskip("hiredis")
from redis import DataError  # noqa: E402
from redis.asyncio import ConnectionPool  # noqa: E402
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection  # noqa: E402

from quantgate.serve.redis_pack import fast_packing  # noqa: E402
from quantgate.serve.state import RedisState  # noqa: E402

COMMANDS = [
    ("EVALSHA", "a" * 40, 3, "qg:budget:acme:1765000000", "qg:budget:acme/ünïcode user:1765000000",
     "qg:res:abc1", "3 12 0.0001 1765000000.25 -1 -1"),
    ("SET", "qg:cache:k", '{"text":"héllo \\u00e9"}', "PX", 60000),
    ("SET", "k", b"\x00\xff raw", "PX", 1),
    ("HINCRBYFLOAT", "k", "u", 0.1 + 0.2),
    ("HSET", "k", "l", 1e20, "ts", -0.0, "n", 2**70, "m", -5),
    ("GET", ""),
    ("CONFIG GET", "maxmemory"),  # redis-py splits a first argument with a space: left to it
]


def _packed_class():
    pool = ConnectionPool.from_url("redis://127.0.0.1:1/0")
    assert fast_packing(pool)
    return pool.connection_class


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c[0])
def test_bytes_on_the_wire_are_redis_pys_own(cmd):
    plain, packed = Connection(), _packed_class()()
    assert b"".join(packed.pack_command(*cmd)) == b"".join(plain.pack_command(*cmd))
    assert b"".join(packed.pack_commands([cmd, cmd])) == b"".join(plain.pack_commands([cmd, cmd]))


@pytest.mark.parametrize("bad", [True, None, object()])
def test_what_redis_py_refuses_it_still_refuses(bad):
    with pytest.raises(DataError):
        _packed_class()().pack_command("SET", "k", bad)


def test_a_string_redis_cannot_encode_fails_as_before():
    with pytest.raises(UnicodeEncodeError):
        _packed_class()().pack_command("SET", "k\ud800", "v")


@pytest.mark.parametrize("url, base", [("redis://127.0.0.1:6379/0", Connection),
                                       ("rediss://127.0.0.1:6380/0", SSLConnection),
                                       ("unix:///tmp/redis.sock", UnixDomainSocketConnection)])
def test_the_schemes_connection_class_stays_the_base(url, base):
    pool = ConnectionPool.from_url(url)
    assert fast_packing(pool)
    assert issubclass(pool.connection_class, base) and pool.connection_class is not base
    assert pool.connection_class.__name__ == f"HiredisPacked{base.__name__}"


def test_the_gateways_own_client_packs_in_one_call():
    from quantgate.serve.limits import TenantLimiter
    from quantgate.serve.manifest import StateSpec
    from quantgate.serve.tenants import Ledger

    st = RedisState(StateSpec(redis="redis://127.0.0.1:1/0"), Ledger(None), TenantLimiter({}))
    conn = st.redis.connection_pool.make_connection()
    cmd = st._evalsha("admit", ["k1", "k2"], [2, 10, "0.5", 1.25])
    assert conn.__class__.__name__ == "HiredisPackedConnection"
    assert b"".join(conn.pack_command(*cmd)) == b"".join(Connection().pack_command(*cmd))
