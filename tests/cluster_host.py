"""One simulated host of a cluster (run by ``cluster_support.start_host`` under ``unshare --uts``).

Posts ``--events`` events into the space of ``GOOGLE_CHAT_WEBHOOK_URL`` with
chat_magic, ``--cards`` of them as cards spread among the texts, all in this
host's thread, timing each ``send()``; then waits until its outbox is empty
and prints one JSON line: hostname, outbox path, send() times, whether all
were delivered, and when the last one left.

``--procs N`` posts from N processes of this host at once (forked after the
hostname is set), each with its own worker, as N ranks of one node would.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import threading
import time


def card(title: str) -> dict:
    return {"cardId": "result", "card": {"header": {"title": title},
                                         "sections": [{"widgets": [{"textParagraph": {"text": "loss 0.042, accuracy 0.97"}}]}]}}


def time_worker_locks() -> list[float]:
    """Record how long the delivery worker holds the outbox's write lock (a measurement, for the benchmark)."""
    from chat_magic import outbox

    holds: list[float] = []

    class Timed(outbox._Tx):
        def __enter__(self):
            db = super().__enter__()
            self.t0 = time.perf_counter()
            return db

        def __exit__(self, *exc):
            super().__exit__(*exc)
            if threading.current_thread().name.startswith("chat_magic-delivery"):
                holds.append(time.perf_counter() - self.t0)

    outbox._Tx = Timed  # type: ignore[misc]
    return holds


def post(args: argparse.Namespace, proc: int) -> dict:
    import chat_magic
    from chat_magic import delivery

    holds = time_worker_locks() if args.lock_holds else []

    host = socket.gethostname()
    every = max(1, args.events // max(1, args.cards)) if args.cards else 0
    cards = {i * every + every // 2 for i in range(args.cards)} if args.cards else set()
    tag = host if args.procs == 1 else f"{host}/{proc}"
    if args.warm:  # the worker is up and has posted once: only steady-state send() is timed
        chat_magic.send(f"{tag} warm-up", thread_key=f"{tag}-warm")
        chat_magic.flush(args.flush)
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    times = []
    for i in range(args.events):
        label = f"{tag} event {i:02d}"
        t0 = time.perf_counter()
        if i in cards:
            chat_magic.send(cards=[card(label)], fallback_text=label, thread_key=tag)
        else:
            chat_magic.send(label, thread_key=tag)
        times.append(time.perf_counter() - t0)
        if args.every:
            time.sleep(args.every)
    ok = chat_magic.flush(args.flush)
    box = delivery.dispatcher().outbox
    return {"host": host, "proc": proc, "path": str(box.path), "send": times, "delivered": ok,
            "counts": box.counts(), "done_at": time.time(), "lock_holds": holds}


def _child(args: argparse.Namespace, proc: int, queue) -> None:
    queue.put(post(args, proc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=23)
    ap.add_argument("--cards", type=int, default=8)
    ap.add_argument("--every", type=float, default=0.0, help="seconds between two events")
    ap.add_argument("--flush", type=float, default=300.0, help="how long to wait for delivery")
    ap.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start posting (all hosts together)")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--warm", action="store_true", help="post and deliver one message before the timed events")
    ap.add_argument("--lock-holds", action="store_true", help="report how long the worker held the write lock each time")
    args = ap.parse_args(argv)
    if args.procs == 1:
        print(json.dumps(post(args, 0)), flush=True)
        return 0
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(args, k, queue)) for k in range(args.procs)]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=args.flush + 60) for _ in procs]
    for p in procs:
        p.join(30)
    print(json.dumps({"host": socket.gethostname(), "procs": reports}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
