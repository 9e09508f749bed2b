#!/usr/bin/env python3
"""A read model of bank-account balances, fed by Rehydra's gRPC subscription.

It follows the `bank_account` category (the stream prefix the bank-account
plugin declares) with `Streams.Subscribe`, keeps every account's owner,
balance, open flag and version in a SQLite database, and stores the global
position it has reached in the same transaction as the balances. After a
restart it resumes from that position + 1: nothing is lost and nothing is
counted twice.

    python balances.py --grpc 127.0.0.1:50051 --db balances.sqlite3
    python balances.py --db balances.sqlite3 --show

The client code is generated from proto/ by grpcio-tools: `make interop`
writes it to target/interop-gen (found automatically inside this checkout,
or put it on PYTHONPATH) and installs grpcio into target/interop-venv.
"""

import argparse
import json
import os
import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path


def import_stubs():
    """Imports the generated modules, from PYTHONPATH or this checkout's
    target/interop-gen."""
    try:
        import grpc  # noqa: F401
        from rehydra.v1 import streams_pb2, streams_pb2_grpc  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        target = Path(os.environ.get("CARGO_TARGET_DIR") or root / "target")
        sys.path.insert(0, str(target / "interop-gen"))
    try:
        import grpc
        from rehydra.v1 import streams_pb2, streams_pb2_grpc
    except ImportError as e:
        sys.exit(
            f"balances.py: {e}: run it with target/interop-venv/bin/python "
            "after `make interop`, or put the generated stubs on PYTHONPATH"
        )
    return grpc, streams_pb2, streams_pb2_grpc


grpc, streams_pb2, streams_pb2_grpc = import_stubs()

# The bank-account plugin's stream prefix: its streams are bank_account-<id>.
CATEGORY = "bank_account"

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id      TEXT PRIMARY KEY,
    owner   TEXT    NOT NULL,
    balance INTEGER NOT NULL,
    open    INTEGER NOT NULL,
    version INTEGER NOT NULL   -- events of the account applied so far
);
-- One row: the global position to resume after.
CREATE TABLE IF NOT EXISTS checkpoint (
    one      INTEGER PRIMARY KEY CHECK (one = 1),
    position INTEGER NOT NULL
);
"""


class ReadModelError(Exception):
    """The event log does not fit this model (a gap, a duplicate, an event
    type it does not know): stop rather than keep a wrong balance."""


def open_db(path):
    db = sqlite3.connect(path, isolation_level=None)  # transactions by hand
    db.executescript(SCHEMA)
    return db


def stored_position(db):
    row = db.execute("SELECT position FROM checkpoint WHERE one = 1").fetchone()
    return row[0] if row else None


def apply_event(db, event):
    """Applies one bank-account event to the `accounts` table."""
    account_id = event.stream[len(CATEGORY) + 1 :]
    data = json.loads(event.data_json) if event.data_json else {}
    row = db.execute(
        "SELECT version FROM accounts WHERE id = ?", (account_id,)
    ).fetchone()
    version = row[0] if row else 0
    # Positions are committed with the balances, so each event comes exactly
    # once and in stream order; anything else means the log is not what this
    # model believes.
    if event.version != version + 1:
        raise ReadModelError(
            f"{event.stream}: got version {event.version} at position "
            f"{event.position}, expected {version + 1}"
        )
    kind = event.event_type
    if kind == "Opened":
        db.execute(
            "INSERT INTO accounts (id, owner, balance, open, version)"
            " VALUES (?, ?, 0, 1, 1)",
            (account_id, data["owner"]),
        )
        return
    if kind == "Deposited":
        change, opened = data["amount"], None
    elif kind == "Withdrawn":
        change, opened = -data["amount"], None
    elif kind == "Closed":
        change, opened = 0, 0
    else:
        raise ReadModelError(f"{event.stream}: unknown event type {kind!r}")
    db.execute(
        "UPDATE accounts SET balance = balance + ?, open = COALESCE(?, open),"
        " version = ? WHERE id = ?",
        (change, opened, event.version, account_id),
    )


def save_position(db, position):
    db.execute(
        "INSERT INTO checkpoint (one, position) VALUES (1, ?)"
        " ON CONFLICT (one) DO UPDATE SET position = excluded.position",
        (position,),
    )


class Subscription:
    """One `Streams.Subscribe` call, read by a thread into a small queue.

    The queue is bounded: when this consumer falls behind, the thread stops
    reading, gRPC flow control pushes back, and the server holds the rest
    (or, past its buffer, disconnects us with `subscriber_too_slow`)."""

    END = object()

    def __init__(self, stub, start, metadata):
        if start is None:
            request = streams_pb2.SubscribeRequest(
                from_beginning=True, categories=[CATEGORY]
            )
        else:
            request = streams_pb2.SubscribeRequest(
                from_position=start, categories=[CATEGORY]
            )
        self.call = stub.Subscribe(request, metadata=metadata)
        self.messages = queue.Queue(maxsize=256)
        self.held = None  # an end or error seen while batching, not yet handled
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        try:
            for message in self.call:
                self.messages.put(message)
            self.messages.put(self.END)
        except grpc.RpcError as error:
            self.messages.put(error)

    def next(self, timeout):
        """The next message, END, an RpcError, or None after `timeout` s."""
        if self.held is not None:
            return self.held
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending(self):
        """A response already queued, or None (an end or error is held for
        `next`)."""
        if self.held is not None:
            return None
        try:
            message = self.messages.get_nowait()
        except queue.Empty:
            return None
        if isinstance(message, streams_pb2.SubscribeResponse):
            return message
        self.held = message
        return None

    def close(self):
        self.call.cancel()


def error_code(error):
    """Rehydra's stable error code of a failed call, from its trailers."""
    for key, value in error.trailing_metadata() or ():
        if key == "rehydra-error-code":
            return value
    return None


def follow(args):
    db = open_db(args.db)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    # gRPC's adaptive flow-control window can grow to megabytes, read ahead
    # into this process whatever this model's pace. A fixed 64 KiB window
    # keeps that small, so the server's per-subscriber buffer and its
    # slow-subscriber rule see how fast events are really applied.
    channel = grpc.insecure_channel(
        args.grpc.removeprefix("http://"), options=[("grpc.http2.bdp_probe", 0)]
    )
    stub = streams_pb2_grpc.StreamsStub(channel)
    applied = 0
    reconnect_deadline = None  # while the host cannot be reached

    while True:
        position = stored_position(db)
        start = None if position is None else position + 1
        subscription = Subscription(stub, start, metadata)
        caught_up = False
        try:
            while True:
                # Before catching up, wait as long as it takes; after, stop
                # once the log has been quiet for --until-idle seconds.
                idle = args.until_idle if caught_up else None
                message = subscription.next(idle)
                if message is None:
                    return applied, stored_position(db)
                if message is Subscription.END:
                    raise ReadModelError("the server ended the subscription")
                if isinstance(message, grpc.RpcError):
                    raise message
                reconnect_deadline = None
                # Apply what is queued in one transaction, position included.
                limit = args.max_events - applied if args.max_events else 500
                batch = [message]
                while len(batch) < min(limit, 500) and (more := subscription.pending()):
                    batch.append(more)
                db.execute("BEGIN IMMEDIATE")
                try:
                    for item in batch:
                        if item.WhichOneof("message") == "event":
                            apply_event(db, item.event)
                            save_position(db, item.event.position)
                            applied += 1
                        else:
                            # Nothing that matches lies before this position.
                            caught_up = True
                            if item.caught_up.position > (stored_position(db) or 0):
                                save_position(db, item.caught_up.position)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                if args.max_events and applied >= args.max_events:
                    return applied, stored_position(db)
        except grpc.RpcError as error:
            code = error_code(error)
            # Too slow for the server's buffer, or the host is away (a
            # restart): resume from the stored position.
            if code == "subscriber_too_slow":
                position = stored_position(db)
                resume = "the beginning" if position is None else position + 1
                print(f"balances: disconnected as too slow ({error.details()}),"
                      f" resuming from {resume}", file=sys.stderr)
                continue
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                now = time.monotonic()
                if reconnect_deadline is None:
                    reconnect_deadline = now + args.reconnect_for
                    print(f"balances: host unavailable ({error.details()}), retrying"
                          f" for up to {args.reconnect_for:g} s", file=sys.stderr)
                if now < reconnect_deadline:
                    time.sleep(0.5)
                    continue
            raise
        finally:
            subscription.close()


def show(db_path):
    db = open_db(db_path)
    accounts = {
        account_id: {"owner": owner, "balance": balance, "open": bool(is_open),
                     "version": version}
        for account_id, owner, balance, is_open, version in db.execute(
            "SELECT id, owner, balance, open, version FROM accounts ORDER BY id"
        )
    }
    return {"position": stored_position(db), "accounts": accounts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc", default="127.0.0.1:50051",
                        help="the host's gRPC address (http:// is optional)")
    parser.add_argument("--db", default="balances.sqlite3",
                        help="the SQLite database of the read model")
    parser.add_argument("--token", help="bearer token, if the host wants one")
    parser.add_argument("--until-idle", type=float, metavar="SECONDS",
                        help="stop once caught up and no event came for this long")
    parser.add_argument("--max-events", type=int, metavar="N",
                        help="stop after applying N events")
    parser.add_argument("--reconnect-for", type=float, default=30, metavar="SECONDS",
                        help="how long to keep retrying an unreachable host")
    parser.add_argument("--show", action="store_true",
                        help="print the stored balances as JSON and exit")
    args = parser.parse_args()

    if args.show:
        print(json.dumps(show(args.db), indent=2, sort_keys=True))
        return 0
    try:
        applied, position = follow(args)
    except KeyboardInterrupt:
        return 130
    except ReadModelError as error:
        print(f"balances: {error}", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(f"balances: {error.code().name} {error_code(error) or ''}: "
              f"{error.details()}", file=sys.stderr)
        return 2
    print(json.dumps({"applied": applied, "position": position}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
