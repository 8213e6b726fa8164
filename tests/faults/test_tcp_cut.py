"""The fault suite's proxy (conftest.TcpCut) ends a connection on both sides. It once did not: a pipe
thread closed the server's side while its twin was blocked in recv() on it, and close() alone does not
end a socket in use by another thread, so the broker kept the worker's BRPOP blocked after the cut and
handed it the next message published, which went nowhere (the broker-cut scenario's 1 in 322 lost)."""

from __future__ import annotations

import socket

import pytest
import redis

from tests.conftest import wait_for
from tests.faults.conftest import TcpCut

KEY = "tcp-cut-probe"


def blocked_brpop(port: int) -> socket.socket:
    """A raw client through the proxy, blocked in BRPOP on KEY (for 30 s, longer than the test)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"*3\r\n$5\r\nBRPOP\r\n${len(KEY)}\r\n{KEY}\r\n$2\r\n30\r\n".encode())
    return sock


def blocked_clients(server: redis.Redis) -> int:
    return sum(1 for client in server.client_list() if client.get("cmd") == "brpop")


@pytest.mark.parametrize("how", ["client-closes", "cut"])
def test_a_connection_ended_at_the_proxy_ends_at_the_broker(fault_environment, how):
    broker = fault_environment.broker
    if not hasattr(broker, "flush") or not broker.url.startswith("redis"):
        pytest.skip("the probe speaks Redis")
    server = redis.Redis(port=broker.port)
    server.delete(KEY)
    proxy = TcpCut(broker.port)
    proxy.up()
    client = blocked_brpop(proxy.port)
    try:
        wait_for(lambda: blocked_clients(server) == 1, timeout=5, what="the BRPOP blocked at the broker")
        if how == "cut":
            proxy.cut()
        else:
            client.shutdown(socket.SHUT_RDWR)
        wait_for(lambda: blocked_clients(server) == 0, timeout=3, what="the broker to see the connection end")
        # no BRPOP is left blocked (waited for above): nothing at the broker can take it now
        server.lpush(KEY, "published after the connection ended")
        assert server.llen(KEY) == 1, "a BRPOP of a connection already ended took the message"
    finally:
        client.close()
        proxy.cut()
        server.delete(KEY)
