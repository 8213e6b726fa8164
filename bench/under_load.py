"""Where a worker's time goes under record_payment load: py-spy samples of the pool processes and
of the main process, while the relay runs beside them, summed into the stops of a message's path."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.harness import ROOT, Environment, relay, worker
from bench.payments import payment_bodies, publish_payments_until_applied

# (label, a frame that marks it): a sample counts for every stop whose frame is on its stack.
# Micro-batching is on (the default): the pool processes run worker/delivery/batching.py's apply_batch.
STOPS = [
    ("a batch, from the pool's view", "apply_batch (worker/delivery/batching.py"),
    ("  parse the bodies (pydantic)", "_prepare (worker/delivery/batching.py"),
    ("  claim the batch's messageIds (one statement)", "_claim (worker/delivery/batching.py"),
    ("  load and lock the batch's invoices (one statement, ORM)", "_load_and_lock (worker/delivery/batching.py"),
    ("  the domain operations", "InvoicePayments.record_payment"),
    ("  ORM flush: invoices (one executemany), payments (one insert)", "Session.flush ("),
    # The batch's multi-row statements run inline in _write: py-spy's frames carry the line.
    ("  inbox outcomes (RECORD, one statement)", "connection.execute(RECORD, "),
    ("  outbox rows (one statement)", "connection.execute(OUTBOX_INSERT, "),
    ("  history rows (one statement)", "connection.execute(HISTORY_INSERT, "),
    ("  COMMIT", "Session.commit ("),
    ("  log line and metrics of each message", "_report (worker/delivery/batching.py"),
]


def _inline(stops: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A stop named by a statement of worker/delivery/batching.py becomes the frame of its line
    there, in the function that holds it (one line, the call's first); a statement no longer
    found there is left out. (They ran in _transaction once and now run in _write: naming the
    function by hand left these rows at 0% when they moved.)"""
    source = (ROOT / "worker" / "delivery" / "batching.py").read_text().splitlines()
    resolved = []
    for label, frame in stops:
        if frame.startswith("connection.execute("):
            lines = [n for n, text in enumerate(source, 1) if text.strip().startswith(frame)]
            if len(lines) != 1:
                continue
            function = next(text.split("def ", 1)[1].split("(", 1)[0] for text in reversed(source[:lines[0]])
                            if text.startswith("def "))
            frame = f"{function} (worker/delivery/batching.py:{lines[0]})"
        resolved.append((label, frame))
    return resolved


STOPS = _inline(STOPS)
# Leaf frames in which a process waits on PostgreSQL (or for a core to run on).
DATABASE_WAIT = ("psycopg/connection.py", "psycopg/_cursor_base.py", "psycopg/_connection_base.py")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def run(env: Environment, numbers: list[str], count: int, concurrency: int) -> list[tuple[str, str, str]]:
    """Rows of (stop, share of the pool processes' samples, note); empty when py-spy is missing."""
    spy = py_spy()
    if spy is None:
        return []
    proc, rel = worker(concurrency), relay()
    out = Path(tempfile.mkdtemp(prefix="bench-spy-"))
    main = psutil.Process(proc.proc.pid)
    pids = {"main": main.pid, **{f"pool-{i}": c.pid for i, c in enumerate(main.children(recursive=True))}}
    spies = [subprocess.Popen([spy, "record", "-p", str(pid), "-o", str(out / f"{name}.txt"), "-f", "raw", "-r", "100",
                               "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in pids.items()]
    try:
        started = publish_payments_until_applied(env, payment_bodies(numbers, count))[0].began
        seconds = time.monotonic() - started
    finally:
        for s in spies:
            s.send_signal(signal.SIGINT)
        for s in spies:
            s.wait(30)
        rel.stop()
        proc.stop()
    pool = _samples([out / f"{name}.txt" for name in pids if name != "main"])
    main_samples = _samples([out / "main.txt"])
    total = pool["total"] or 1
    rows = [(label, f"{pool[frame] / total:.0%}", "") for label, frame in STOPS]
    rows.append(("  of all that: runnable inside psycopg's send or wait", f"{pool['wait'] / total:.0%}",
                 "a process blocked on the server is idle and not sampled, so this is mostly waiting for a core"))
    rows.append(("the pool's own work outside the batch", f"{(total - pool[STOPS[0][1]]) / total:.0%}",
                 "receiving the batch from the main process, returning what to acknowledge"))
    busy = total / (len(pids) - 1) / 100 / seconds
    rows.append(("pool processes busy", f"{busy:.0%}", f"{count:,} messages in {seconds:.1f} s; the rest is idle, "
                 "blocked on PostgreSQL's reply or on the next message"))
    rows.append(("the main process busy", f"{main_samples['total'] / 100 / seconds:.0%}",
                 "fetching from the broker, gathering batches, handing them to the pool, acknowledging"))
    return rows


def _samples(paths: list[Path]) -> dict[str, Any]:
    counts: dict[str, Any] = collections.Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            counts["total"] += int(n)
            if any(marker in frames[-1] for marker in DATABASE_WAIT):
                counts["wait"] += int(n)
            for _, frame in STOPS:
                if any(frame in f for f in frames):
                    counts[frame] += int(n)
    return counts
