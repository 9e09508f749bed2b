#!/usr/bin/env python3
"""Interoperability test: Rehydra's gRPC API driven by Python grpcio, with
client code generated from proto/ by grpcio-tools.

    target/interop-venv/bin/python tests/interop/interop_test.py \\
        --grpc http://127.0.0.1:50051 [--token TOKEN --principal NAME]

The host must serve the bank-account and users example plugins. Every
check uses fresh aggregate ids, so the test can run again on the same host.
It exercises every service and every error code a client can provoke, reads
the stable code from the trailing metadata, and with --token checks
authentication and that the principal reaches the events' metadata. Each
failed check is printed; the exit status is 1 if any failed.

`make interop` installs grpcio into target/interop-venv and generates the
stubs into target/interop-gen (found automatically inside this checkout, or
put it on PYTHONPATH). The Rust test tests/tests/grpc_python.rs runs this
against real hosts.
"""

import argparse
import json
import os
import queue
import sys
import threading
import traceback
import uuid
from pathlib import Path

try:
    import grpc
    from rehydra.v1 import (aggregates_pb2, aggregates_pb2_grpc, commands_pb2,
                            commands_pb2_grpc, plugins_pb2, plugins_pb2_grpc,
                            streams_pb2, streams_pb2_grpc)
except ImportError:
    _root = Path(__file__).resolve().parents[2]
    _target = Path(os.environ.get("CARGO_TARGET_DIR") or _root / "target")
    sys.path.insert(0, str(_target / "interop-gen"))
    try:
        import grpc
        from rehydra.v1 import (aggregates_pb2, aggregates_pb2_grpc,
                                commands_pb2, commands_pb2_grpc, plugins_pb2,
                                plugins_pb2_grpc, streams_pb2,
                                streams_pb2_grpc)
    except ImportError as e:
        sys.exit(f"interop_test.py: {e}: run `make interop` (make test does) "
                 "and use target/interop-venv/bin/python")

TYPE = "bank-account"
PREFIX = "bank_account"
# How long any one call or awaited subscription message may take.
TIMEOUT = 30


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def equal(got, expected, what):
    check(got == expected, f"{what}: expected {expected!r}, got {got!r}")


def fresh_id(label):
    return f"{label}-{uuid.uuid4().hex[:12]}"


class Client:
    """The four generated stubs on one channel, with the caller's metadata."""

    def __init__(self, address, token):
        self.channel = grpc.insecure_channel(address.removeprefix("http://"))
        self.commands = commands_pb2_grpc.CommandsStub(self.channel)
        self.aggregates = aggregates_pb2_grpc.AggregatesStub(self.channel)
        self.streams = streams_pb2_grpc.StreamsStub(self.channel)
        self.plugins = plugins_pb2_grpc.PluginsStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def execute(self, aggregate_id, command, payload=None, metadata=None, **fields):
        request = commands_pb2.ExecuteRequest(
            aggregate_type=fields.pop("aggregate_type", TYPE),
            aggregate_id=aggregate_id,
            command=command,
            payload_json=payload if isinstance(payload, str) else json.dumps(payload or {}),
            **fields,
        )
        return self.commands.Execute(
            request, metadata=self.metadata if metadata is None else metadata,
            timeout=TIMEOUT)

    def get_state(self, aggregate_id, aggregate_type=TYPE, metadata=None):
        request = aggregates_pb2.GetStateRequest(
            aggregate_type=aggregate_type, aggregate_id=aggregate_id)
        return self.aggregates.GetState(
            request, metadata=self.metadata if metadata is None else metadata,
            timeout=TIMEOUT)

    def read(self, stream, from_version=0, limit=0, metadata=None):
        request = streams_pb2.ReadStreamRequest(
            stream=stream, from_version=from_version, limit=limit)
        return self.streams.Read(
            request, metadata=self.metadata if metadata is None else metadata,
            timeout=TIMEOUT)

    def list_plugins(self, metadata=None):
        return self.plugins.List(
            plugins_pb2.ListPluginsRequest(),
            metadata=self.metadata if metadata is None else metadata,
            timeout=TIMEOUT)

    def subscribe(self, metadata=None, **request):
        return Subscription(self.streams.Subscribe(
            streams_pb2.SubscribeRequest(**request),
            metadata=self.metadata if metadata is None else metadata))


class Subscription:
    """A Subscribe call read by a thread, so that the test can wait for each
    message with a time limit instead of blocking for ever."""

    def __init__(self, call):
        self.call = call
        self.messages = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        try:
            for message in self.call:
                self.messages.put(message)
            self.messages.put(None)
        except grpc.RpcError as error:
            self.messages.put(error)

    def next(self, what):
        """The next message; fails the check if the call ended or nothing came
        within TIMEOUT."""
        try:
            message = self.messages.get(timeout=TIMEOUT)
        except queue.Empty:
            raise CheckFailed(f"subscription: no message within {TIMEOUT} s, waiting for {what}")
        if message is None:
            raise CheckFailed(f"subscription ended by the server, waiting for {what}")
        if isinstance(message, grpc.RpcError):
            raise CheckFailed(f"subscription failed, waiting for {what}: {describe(message)}")
        return message

    def error(self):
        """The error the call ends with (the first message must be it)."""
        try:
            message = self.messages.get(timeout=TIMEOUT)
        except queue.Empty:
            raise CheckFailed(f"subscription: no error within {TIMEOUT} s")
        check(isinstance(message, grpc.RpcError),
              f"subscription: expected an error, got {message!r}")
        return message

    def events_until(self, done, what):
        """Events (caught_up markers included, as ("caught_up", position))
        until `done(events_so_far)` holds."""
        got = []
        while not done(got):
            message = self.next(what)
            if message.WhichOneof("message") == "event":
                got.append(message.event)
            else:
                got.append(("caught_up", message.caught_up.position))
        return got

    def close(self):
        self.call.cancel()


def trailers(error):
    return dict(error.trailing_metadata() or ())


def describe(error):
    t = trailers(error)
    return (f"{error.code().name} code={t.get('rehydra-error-code')!r} "
            f"details={t.get('rehydra-error-details')!r} message={error.details()!r}")


def caught_up(got):
    """Whether the last message received is the caught_up marker."""
    return bool(got) and isinstance(got[-1], tuple)


def of_stream(got, stream):
    """The events of one stream among the messages received."""
    return [e for e in got if not isinstance(e, tuple) and e.stream == stream]


# The gRPC status each stable error code must come with, as the README's gRPC
# section maps them.
STATUS = {
    "malformed_request": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_command": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown_aggregate_type": grpc.StatusCode.NOT_FOUND,
    "unknown_command": grpc.StatusCode.NOT_FOUND,
    "aggregate_not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "wrong_expected_version": grpc.StatusCode.ABORTED,
    "rejected": grpc.StatusCode.FAILED_PRECONDITION,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
}


def expect_error(call, code, what):
    """Runs `call`, which must fail with Rehydra error `code` (from the
    trailers) and its gRPC status; returns the error details (a dict)."""
    try:
        result = call()
    except grpc.RpcError as error:
        t = trailers(error)
        equal(t.get("rehydra-error-code"), code,
              f"{what}: rehydra-error-code ({describe(error)})")
        equal(error.code(), STATUS[code], f"{what}: gRPC status ({describe(error)})")
        raw = t.get("rehydra-error-details")
        if raw is None:
            return {}
        try:
            details = json.loads(raw)
        except ValueError:
            raise CheckFailed(f"{what}: rehydra-error-details is not JSON: {raw!r}")
        check(isinstance(details, dict), f"{what}: rehydra-error-details is not an object: {raw!r}")
        return details
    raise CheckFailed(f"{what}: expected error {code}, the call succeeded: {result}")


# ---------------------------------------------------------------- the checks


def test_plugins_list(client, args):
    answer = client.list_plugins()
    by_type = {p.aggregate_type: p for p in answer.plugins}
    for wanted in (TYPE, "user"):
        check(wanted in by_type, f"Plugins.List: no {wanted} among {sorted(by_type)}")
    equal(by_type["user"].stream_prefix, "ex_users", "the users plugin's stream prefix")
    plugin = by_type[TYPE]
    equal(plugin.name, "bank-account", "plugin name")
    equal(plugin.stream_prefix, PREFIX, "stream prefix")
    modes = {c.name: c.mode for c in plugin.commands}
    equal(modes, {
        "open": plugins_pb2.COMMAND_MODE_CREATE,
        "deposit": plugins_pb2.COMMAND_MODE_UPDATE,
        "withdraw": plugins_pb2.COMMAND_MODE_UPDATE,
        "close": plugins_pb2.COMMAND_MODE_UPDATE,
    }, "commands and their modes")
    equal(sorted(plugin.event_types), ["Closed", "Deposited", "Opened", "Withdrawn"],
          "event types")
    check(len(plugin.hash) == 64 and all(c in "0123456789abcdef" for c in plugin.hash),
          f"hash is not SHA-256 hex: {plugin.hash!r}")
    check(plugin.size > 0, "plugin size is 0")
    check(plugin.path.endswith("bank-account.wasm"), f"plugin path: {plugin.path!r}")
    check(plugin.loaded_at, "loaded_at is empty")
    equal(plugin.quarantined_for_ms, 0, "quarantined_for_ms")
    equal(list(answer.loading), [], "plugins still loading after 'plugins ready'")


def test_execute(client, args):
    acc = fresh_id("acc")
    key = fresh_id("key")
    opened = client.execute(acc, "open", {"owner": "Ada"}, idempotency_key=key,
                            correlation_id="corr-1", causation_id="cause-1")
    equal((opened.aggregate_type, opened.aggregate_id), (TYPE, acc), "open: aggregate")
    equal(opened.version, 1, "open: version")
    equal([(e.event_type, e.version, json.loads(e.data_json)) for e in opened.events],
          [("Opened", 1, {"owner": "Ada"})], "open: events")
    check(not opened.replayed, "open: replayed on the first call")
    check(not opened.HasField("reply_json"), f"open: unexpected reply {opened.reply_json!r}")

    # The same idempotency key: the stored outcome, nothing appended.
    again = client.execute(acc, "open", {"owner": "Ada"}, idempotency_key=key)
    check(again.replayed, "open with the same idempotency key: replayed is false")
    equal(again.version, 1, "replay: version")
    equal([(e.event_type, e.version, e.data_json) for e in again.events],
          [(e.event_type, e.version, e.data_json) for e in opened.events], "replay: events")

    deposit = client.execute(acc, "deposit", {"amount": 100})
    equal(deposit.version, 2, "deposit: version")
    equal([(e.event_type, json.loads(e.data_json)) for e in deposit.events],
          [("Deposited", {"amount": 100})], "deposit: events")

    # expected_version: right, then stale.
    right = client.execute(acc, "withdraw", {"amount": 30}, expected_version=2)
    equal(right.version, 3, "withdraw at the expected version: version")
    details = expect_error(
        lambda: client.execute(acc, "deposit", {"amount": 5}, expected_version=2),
        "wrong_expected_version", "deposit at a stale expected_version")
    equal((details.get("expected"), details.get("actual")), (2, 3),
          "wrong_expected_version details")
    # 0 means "must not exist".
    expect_error(lambda: client.execute(acc, "deposit", {"amount": 5}, expected_version=0),
                 "wrong_expected_version", "deposit with expected_version 0 on an existing account")

    state = client.get_state(acc)
    equal((state.aggregate_type, state.aggregate_id, state.version), (TYPE, acc, 3),
          "GetState: aggregate and version")
    equal(json.loads(state.state_json), {"owner": "Ada", "balance": 70, "open": True},
          "GetState: state")

    # The correlation and causation ids and the idempotency key in the metadata.
    first = client.read(f"{PREFIX}-{acc}").events[0]
    meta = json.loads(first.metadata_json)
    equal(meta.get("messageId"), key, "metadata messageId")
    equal(meta.get("$correlationId"), "corr-1", "metadata $correlationId")
    equal(meta.get("$causationId"), "cause-1", "metadata $causationId")
    equal(meta.get("commandType"), "open", "metadata commandType")
    equal(meta.get("plugin"), "bank-account", "metadata plugin")


def test_errors(client, args):
    acc = fresh_id("acc")
    client.execute(acc, "open", {"owner": "Bo"})
    client.execute(acc, "deposit", {"amount": 10})

    expect_error(lambda: client.execute(acc, "withdraw", {"amount": 1000}),
                 "rejected", "withdrawing more than the balance")
    details = expect_error(lambda: client.execute(acc, "deposit", {"amount": 0}),
                           "invalid_command", "depositing 0")
    fields = json.dumps(details.get("fields"))
    check("amount" in fields, f"invalid_command details do not name the field: {details}")
    expect_error(lambda: client.execute(acc, "deposit", {"amount": "ten"}),
                 "invalid_command", "a deposit whose amount is a string")
    expect_error(lambda: client.execute(acc, "open", {"owner": "Bo"}),
                 "already_exists", "opening an open account")
    expect_error(lambda: client.execute(fresh_id("none"), "deposit", {"amount": 1}),
                 "aggregate_not_found", "depositing into no account")
    expect_error(lambda: client.execute(acc, "deposit", {"amount": 1}, aggregate_type="no-such-type"),
                 "unknown_aggregate_type", "a command for an unknown type")
    expect_error(lambda: client.execute(acc, "transfer", {"amount": 1}),
                 "unknown_command", "an unknown command")
    expect_error(lambda: client.execute(acc, "deposit", '{"amount": 1'),
                 "malformed_request", "a payload that is not JSON")
    expect_error(lambda: client.execute(acc, "deposit", "[1, 2]"),
                 "malformed_request", "a payload that is not a JSON object")
    expect_error(lambda: client.execute("a/b", "open", {"owner": "Bo"}),
                 "malformed_request", "an aggregate id with a slash")
    expect_error(lambda: client.execute("", "open", {"owner": "Bo"}),
                 "malformed_request", "an empty aggregate id")
    expect_error(lambda: client.execute(fresh_id("acc"), "open", {"owner": "Bo"},
                                        idempotency_key="x" * 129),
                 "malformed_request", "an idempotency key of 129 characters")
    expect_error(lambda: client.get_state(fresh_id("none")),
                 "aggregate_not_found", "GetState of no account")
    expect_error(lambda: client.get_state(acc, aggregate_type="no-such-type"),
                 "unknown_aggregate_type", "GetState of an unknown type")

    # Nothing a refused command produced was stored.
    equal(client.get_state(acc).version, 2, "version after the refused commands")


def test_several_events_and_a_reply(client, args):
    # The users plugin: `new` appends two events; an `update-profile` that
    # changes nothing appends none and replies with the version.
    uid = fresh_id("user")
    created = client.execute(uid, "new", {"email": "ann@example.com", "name": "Ann Smith"},
                             aggregate_type="user")
    equal(created.version, 2, "new user: version")
    equal([(e.event_type, e.version) for e in created.events],
          [("Created", 1), ("ProfileSet", 2)], "new user: events")
    noop = client.execute(uid, "update-profile", {"name": "Ann Smith"}, aggregate_type="user")
    equal((noop.version, list(noop.events)), (2, []), "a no-op: version and events")
    check(noop.HasField("reply_json"), "a no-op: no reply")
    equal(json.loads(noop.reply_json), 2, "a no-op: reply")
    details = expect_error(
        lambda: client.execute(fresh_id("user"), "new", {"email": "nope", "name": "A"},
                               aggregate_type="user"),
        "invalid_command", "a user with a bad email and name")
    named = sorted(f.get("field") for f in details.get("fields", []))
    equal(named, ["email", "name"], "invalid_command: the fields named")
    equal([e.event_type for e in client.read(f"ex_users-{uid}").events],
          ["Created", "ProfileSet"], "the user's stream")


def test_read_paging(client, args):
    acc = fresh_id("acc")
    client.execute(acc, "open", {"owner": "Cy"})
    for amount in range(1, 7):
        client.execute(acc, "deposit", {"amount": amount})
    stream = f"{PREFIX}-{acc}"

    # Seven events in pages of three: 1-3, 4-6, 7, then an empty page.
    pages, version = [], 1
    while True:
        page = client.read(stream, from_version=version, limit=3)
        equal(page.stream, stream, "Read: stream")
        pages.append([e.version for e in page.events])
        if not page.HasField("next_version"):
            break
        check(len(pages) < 10, "Read: paging does not end")
        version = page.next_version
    equal(pages, [[1, 2, 3], [4, 5, 6], [7], []], "Read: pages of three")

    everything = client.read(stream).events  # limit 0: up to 100
    equal([e.version for e in everything], list(range(1, 8)), "Read with limit 0")
    for e in everything:
        equal(e.stream, stream, "event stream")
        uuid.UUID(e.event_id)  # raises if it is not a UUID
        check(isinstance(json.loads(e.metadata_json), dict), "metadata is not a JSON object")
    equal([e.event_type for e in everything[:2]], ["Opened", "Deposited"], "event types")
    equal(json.loads(everything[1].data_json), {"amount": 1}, "event data")
    positions = [e.position for e in everything]
    equal(positions, sorted(set(positions)), "positions strictly increase")
    equal(len({e.event_id for e in everything}), 7, "distinct event ids")
    equal([e.version for e in client.read(stream, from_version=0, limit=2).events], [1, 2],
          "from_version 0 reads from 1")

    empty = client.read(f"{PREFIX}-{fresh_id('none')}")
    equal(list(empty.events), [], "Read of a stream that does not exist")
    check(not empty.HasField("next_version"), "next_version on an empty stream")
    expect_error(lambda: client.read(""), "malformed_request", "Read of an empty stream name")


def test_subscribe(client, args):
    acc = fresh_id("acc")
    client.execute(acc, "open", {"owner": "Di"})
    client.execute(acc, "deposit", {"amount": 50})
    client.execute(acc, "withdraw", {"amount": 20})
    stream = f"{PREFIX}-{acc}"
    stored = client.read(stream).events
    start = stored[0].position

    # Catch-up from the account's first event, then live.
    sub = client.subscribe(from_position=start, categories=[PREFIX])
    try:
        caught = sub.events_until(caught_up, "caught_up")
        events, marker = caught[:-1], caught[-1][1]
        mine = [(e.version, e.position, e.event_id) for e in of_stream(events, stream)]
        equal(mine, [(e.version, e.position, e.event_id) for e in stored],
              "catch-up: the account's stored events")
        check(all(e.stream.startswith(PREFIX + "-") for e in events),
              "catch-up: an event outside the category")
        check(all(e.position >= start for e in events), "catch-up: an event before from_position")
        check(marker >= stored[-1].position,
              f"caught_up position {marker} is before the last stored event {stored[-1].position}")

        # Live: three commands after caught_up arrive, once each, in order.
        for amount in (1, 2, 3):
            client.execute(acc, "deposit", {"amount": amount})
        live = sub.events_until(
            lambda got: len(of_stream(got, stream)) >= 3,
            "three live events")
        check(not any(isinstance(e, tuple) for e in live), "a second caught_up message")
        mine_live = of_stream(live, stream)
        equal([(e.version, json.loads(e.data_json)["amount"]) for e in mine_live],
              [(4, 1), (5, 2), (6, 3)], "live events")
        positions = [e.position for e in events + live]
        equal(positions, sorted(set(positions)),
              "positions strictly increase across the catch-up-to-live switch")
        check(positions[-1] > marker, "a live event at or before the caught_up position")
    finally:
        sub.close()

    # Resuming after the last position received repeats nothing.
    last = mine_live[-1].position
    resumed = client.subscribe(from_position=last + 1, categories=[PREFIX])
    try:
        got = resumed.events_until(caught_up, "caught_up")
        equal(of_stream(got, stream), [], "resuming at last + 1: repeated events")
    finally:
        resumed.close()

    # An event-type filter.
    typed = client.subscribe(from_position=start, categories=[PREFIX], event_types=["Withdrawn"])
    try:
        got = typed.events_until(caught_up, "caught_up")
        check(all(e.event_type == "Withdrawn" for e in got[:-1]),
              f"event-type filter let through {sorted({e.event_type for e in got[:-1]})}")
        equal([e.version for e in of_stream(got, stream)], [3], "the account's withdrawals")
    finally:
        typed.close()

    # From the end: only what is committed after caught_up.
    tail = client.subscribe(from_end=True, categories=[PREFIX])
    try:
        got = tail.events_until(caught_up, "caught_up (from_end)")
        equal(of_stream(got, stream), [], "from_end: old events")
        client.execute(acc, "close")
        got = tail.events_until(lambda got: of_stream(got, stream), "Closed")
        equal([(e.event_type, e.version) for e in of_stream(got, stream)], [("Closed", 7)],
              "from_end: the event after subscribing")
    finally:
        tail.close()

    # Filters that no plugin could have declared are errors, not silence:
    # the aggregate type is not its category.
    for request, what in (({"categories": ["bank-account"]}, "a category with a '-'"),
                          ({"event_types": ["no such type!"]}, "a malformed event type")):
        error = client.subscribe(from_beginning=True, **request).error()
        equal((error.code(), trailers(error).get("rehydra-error-code")),
              (STATUS["malformed_request"], "malformed_request"),
              f"Subscribe with {what} ({describe(error)})")

    # From the beginning, without filters: everything, starting with the
    # first event in the store.
    whole = client.subscribe(from_beginning=True)
    try:
        got = whole.events_until(caught_up, "caught_up (from_beginning)")
        mine = [e.version for e in of_stream(got, stream)]
        equal(mine, list(range(1, 8)), "from_beginning: the account's events")
    finally:
        whole.close()


def test_auth(client, args):
    acc = fresh_id("acc")
    no_token, bad_token = [], [("authorization", "Bearer not-a-token")]
    for metadata, label in ((no_token, "no token"), (bad_token, "a wrong token")):
        expect_error(lambda: client.execute(acc, "open", {"owner": "Ed"}, metadata=metadata),
                     "unauthenticated", f"Execute with {label}")
        expect_error(lambda: client.get_state(acc, metadata=metadata),
                     "unauthenticated", f"GetState with {label}")
        expect_error(lambda: client.read(f"{PREFIX}-{acc}", metadata=metadata),
                     "unauthenticated", f"Read with {label}")
        expect_error(lambda: client.list_plugins(metadata=metadata),
                     "unauthenticated", f"List with {label}")
        error = client.subscribe(metadata=metadata, from_beginning=True).error()
        equal(error.code(), grpc.StatusCode.UNAUTHENTICATED,
              f"Subscribe with {label} ({describe(error)})")
        equal(trailers(error).get("rehydra-error-code"), "unauthenticated",
              f"Subscribe with {label}: rehydra-error-code")
    # Nothing the refused calls sent was run.
    expect_error(lambda: client.get_state(acc), "aggregate_not_found",
                 "the account opened without a token")

    # With the token: the principal is in each event's metadata, as Read
    # and Subscribe return it.
    client.execute(acc, "open", {"owner": "Ed"})
    client.execute(acc, "deposit", {"amount": 9})
    stream = f"{PREFIX}-{acc}"
    events = client.read(stream).events
    equal(len(events), 2, "events of the account opened with the token")
    for e in events:
        equal(json.loads(e.metadata_json).get("principal"), args.principal,
              f"Read: the principal in the metadata {e.metadata_json}")
    sub = client.subscribe(from_position=events[0].position, categories=[PREFIX])
    try:
        got = sub.events_until(lambda got: len(of_stream(got, stream)) >= 2,
                               "the account's events")
        for e in of_stream(got, stream):
            equal(json.loads(e.metadata_json).get("principal"), args.principal,
                  f"Subscribe: the principal in the metadata {e.metadata_json}")
    finally:
        sub.close()


TESTS = [test_plugins_list, test_execute, test_errors, test_several_events_and_a_reply,
         test_read_paging, test_subscribe]


def where(error):
    """The line of this file where a call failed."""
    here = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == __file__]
    return f"line {here[-1].lineno}: {here[-1].line}" if here else "?"


def main():
    parser = argparse.ArgumentParser(description="Rehydra gRPC interoperability test")
    parser.add_argument("--grpc", required=True, help="the host's gRPC address")
    parser.add_argument("--token", help="a bearer token the host accepts (tests auth)")
    parser.add_argument("--principal", help="the principal of --token")
    args = parser.parse_args()
    if bool(args.token) != bool(args.principal):
        parser.error("--token and --principal go together")

    client = Client(args.grpc, args.token)
    try:
        grpc.channel_ready_future(client.channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        print(f"FAIL: no gRPC server at {args.grpc} within {TIMEOUT} s")
        return 1
    tests = TESTS + ([test_auth] if args.token else [])
    failed = 0
    for test in tests:
        try:
            test(client, args)
            print(f"ok   {test.__name__}")
        except CheckFailed as failure:
            failed += 1
            print(f"FAIL {test.__name__}: {failure}")
        except grpc.RpcError as error:
            failed += 1
            print(f"FAIL {test.__name__}: unexpected gRPC error {describe(error)}"
                  f" at {where(error)}")
        except Exception:
            failed += 1
            print(f"FAIL {test.__name__}: the test itself broke")
            traceback.print_exc(file=sys.stdout)
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
