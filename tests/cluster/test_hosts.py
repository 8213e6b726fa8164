"""The hosts themselves (worker/local/hosts.py): every host reaches the others and the root
namespace over the bridge, and a cut host reaches nobody until it is healed."""

from __future__ import annotations

import socket
import sys
import threading

from worker.local import hosts

PROBE = ("import socket, sys\n"
         "try:\n"
         "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n"
         "except OSError as exc:\n"
         "    sys.exit(f'{type(exc).__name__}: {exc}')\n")


def reaches(host: hosts.Host, address: str, port: int) -> bool:
    return host.run([sys.executable, "-c", PROBE, address, str(port)], capture_output=True, timeout=20).returncode == 0


def test_every_host_reaches_the_others_and_the_root_namespace(cluster_environment):
    listener = socket.socket()
    listener.bind((hosts.GATEWAY, 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    def accept() -> None:
        try:
            while True:
                listener.accept()[0].close()
        except OSError:  # the listener closed: done
            pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        for host in hosts.PLANNED:
            assert reaches(host, hosts.GATEWAY, port), f"{host.name} does not reach the root namespace"
            assert reaches(host, hosts.host("mq2").address, 5672), f"{host.name} does not reach mq2"
            assert reaches(host, hosts.host("db1").address, 5432), f"{host.name} does not reach db1"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone would not
        listener.close()


def test_a_cut_host_reaches_nobody_until_healed(cluster_environment):
    w1, mq2 = hosts.host("w1"), hosts.host("mq2")
    w1.cut()
    try:
        assert w1.is_cut()
        assert not reaches(w1, mq2.address, 5672)
    finally:
        w1.heal()
    assert not w1.is_cut()
    assert reaches(w1, mq2.address, 5672)
