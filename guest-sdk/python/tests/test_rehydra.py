"""Unit tests of the Python SDK, under plain CPython (no component needed):

    python3 -m unittest discover -s guest-sdk/python/tests
"""

import enum
import math
import os
import sys
import types
import unittest
from dataclasses import dataclass
from typing import Any, Optional
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rehydra import (  # noqa: E402
    Aggregate,
    CancelTimer,
    Context,
    DataField,
    FieldProblem,
    Follow,
    PluginBug,
    ProcessInfo,
    Rejection,
    ScheduleTimer,
    TimerFiring,
    Unreadable,
    cancel_timer,
    data_field,
    decision,
    event,
    follow,
    forbidden,
    format_float,
    invalid,
    parse_json,
    rejected,
    schedule,
    send,
    stringify_json,
    t,
    timer_key,
    trim,
)


class JsonTest(unittest.TestCase):
    def test_integers_are_exact_and_told_from_floats(self):
        self.assertEqual(parse_json('{"a":1,"b":1.0}'), {"a": 1, "b": 1.0})
        self.assertIsInstance(parse_json("1"), int)
        self.assertIsInstance(parse_json("1.0"), float)
        self.assertEqual(parse_json("18446744073709551615"), 18446744073709551615)
        self.assertEqual(parse_json("-9223372036854775808"), -9223372036854775808)
        # Beyond u64 / i64, and "-0", serde_json reads a float.
        self.assertIsInstance(parse_json("18446744073709551616"), float)
        self.assertIsInstance(parse_json("-9223372036854775809"), float)
        self.assertEqual(math.copysign(1, parse_json("-0")), -1)
        with self.assertRaises(ValueError):
            parse_json("NaN")
        with self.assertRaises(ValueError):
            parse_json("{")

    def test_stringify(self):
        self.assertEqual(
            stringify_json({"b": 1, "a": [1, 1.5, "é", None, True]}),
            '{"b":1,"a":[1,1.5,"é",null,true]}',
        )
        self.assertEqual(stringify_json(1e20), "1e+20")
        self.assertEqual(stringify_json(float("nan")), "null")
        with self.assertRaises(TypeError):
            stringify_json(object())

    def test_floats_are_written_as_the_host_writes_them(self):
        cases = [
            (1.0, "1.0"),
            (1.5, "1.5"),
            (-0.0, "-0.0"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e20, "1e+20"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (1e-5, "0.00001"),
            (1.2345e-5, "0.000012345"),
            (1e-6, "1e-6"),
            (1e-7, "1e-7"),
            (123e-20, "1.23e-18"),
            (123456.789, "123456.789"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (-1e15, "-1000000000000000.0"),
        ]
        for x, want in cases:
            self.assertEqual(format_float(x), want, x)


def message(ftype, raw):
    try:
        ftype.decode(parse_json(raw), "f")
    except FieldProblem as e:
        return e.message
    return "accepted"


class FieldTypeTest(unittest.TestCase):
    def test_serde_messages(self):
        cases = [
            (t.u64, '"ten"', 'invalid type: string "ten", expected u64'),
            (t.u64, "-5", "invalid value: integer `-5`, expected u64"),
            (t.u64, "1.0", "invalid type: floating point `1.0`, expected u64"),
            (t.u64, "true", "invalid type: boolean `true`, expected u64"),
            (t.u64, "null", "invalid type: null, expected u64"),
            (t.u64, "[]", "invalid type: sequence, expected u64"),
            (t.u64, "{}", "invalid type: map, expected u64"),
            (t.u64, "18446744073709551615", "accepted"),
            (t.u32, "4294967296", "invalid value: integer `4294967296`, expected u32"),
            (t.i64, "9223372036854775808", "invalid value: integer `9223372036854775808`, expected i64"),
            (t.string, "5", "invalid type: integer `5`, expected a string"),
            (t.bool, '"yes"', 'invalid type: string "yes", expected a boolean'),
            (t.bool, "1", "invalid type: integer `1`, expected a boolean"),
            (t.f64, "3", "accepted"),
            (t.list(t.u32), "{}", "invalid type: map, expected a sequence"),
            (t.optional(t.u32), "null", "accepted"),
            (t.record("Address", {"city": t.string}), '"x"', 'invalid type: string "x", expected struct Address'),
        ]
        for ftype, raw, want in cases:
            self.assertEqual(message(ftype, raw), want, raw)

    def test_strings_are_quoted_as_rust_debug_quotes_them(self):
        self.assertEqual(
            message(t.u64, '"a\\"b\\n\\u0001\\u0000\\u007f\\t\\r\\\\ é😀\'"'),
            'invalid type: string "a\\"b\\n\\u{1}\\0\\u{7f}\\t\\r\\\\ é😀\'", expected u64',
        )
        self.assertEqual(
            message(t.u64, '"e\\u0301\\u00a0\\ufeff\\ue000\\u2028\\u0378\\u0903"'),
            'invalid type: string "e\\u{301}\\u{a0}\\u{feff}\\u{e000}\\u{2028}\\u{378}ः", expected u64',
        )

    def test_nested_paths(self):
        lines = t.record("Order", {"lines": t.list(t.record("Line", {"qty": t.u32}))})
        try:
            lines.decode(parse_json('{"lines":[{"qty":1},{}]}'), "")
        except FieldProblem as e:
            self.assertEqual((e.field, e.message), ("lines[1].qty", "is required"))
        else:
            self.fail("accepted")

    def test_trim_is_rusts(self):
        self.assertEqual(trim(" \u00a0Bob\ufeff "), "Bob\ufeff")
        self.assertEqual(trim("\x85x\x85"), "x")
        self.assertEqual(trim("\x1cx"), "\x1cx")


# A small aggregate exercising every part of the SDK.
tab = Aggregate(
    type="tab",
    stream_prefix="tab",
    state_schema=3,
    state={"table": t.u32, "items": t.list(t.string), "total": t.u64, "paid": t.bool},
)


@tab.command("open", mode="create", fields={"table": t.u32})
def open_tab(state, cmd, ctx):
    return event("Opened", table=cmd["table"])


@tab.command("order", mode="update", fields={"item": t.string, "price": t.u64, "note": t.optional(t.string)})
def order(state, cmd, ctx):
    if cmd["price"] == 0:
        raise invalid("price", "must be greater than 0")
    return decision(
        event("Ordered", item=cmd["item"], price=cmd["price"]),
        reply={"total": state["total"] + cmd["price"], "version": ctx.version},
    )


@tab.command("pay", mode="update")
def pay(state, cmd, ctx):
    if state["paid"]:
        return decision(reply=ctx.version)
    if ctx.principal is None:
        raise forbidden("sign in to pay")
    return [event("Paid")]


@tab.command("refund", mode="update")
def refund(state, cmd, ctx):
    raise rejected("no refunds")


@tab.command("broken", mode="upsert")
def broken(state, cmd, ctx):
    return event("Exploded")


@tab.event("Opened", fields={"table": t.u32})
def opened(state, data):
    return {**state, "table": data["table"]}


@tab.event("Ordered", fields={"item": t.string, "price": t.u64})
def ordered(state, data):
    state["items"].append(data["item"])
    state["total"] += data["price"]


@tab.event("Paid")
def paid(state, data):
    return {**state, "paid": True}


def ctx(version, principal="ann"):
    meta = [("principal", principal)] if principal else []
    return Context("t1", version, meta)


def session():
    """Opens table 4 and orders two items; every outcome."""
    s0 = tab.initial_state_bytes()
    opened_ = tab.handle_bytes(*s0, "open", b'{"table":4}', ctx(0))
    tea = tab.handle_bytes(*opened_.state, "order", b'{"item":"tea","price":3}', ctx(1))
    cake = tab.handle_bytes(*tea.state, "order", b'{"price":5,"item":"cake"}', ctx(2))
    return [opened_, tea, cake]


class AggregateTest(unittest.TestCase):
    def refusal(self, state, command, data, context=None):
        with self.assertRaises(Rejection) as caught:
            tab.handle_bytes(*state, command, data, context or ctx(3))
        return caught.exception

    def test_initial_state_is_each_fields_zero(self):
        self.assertEqual(tab.initial_state_bytes(), (3, b'{"table":0,"items":[],"total":0,"paid":false}'))

    def test_handle_emits_events_with_the_new_state_and_a_reply(self):
        opened_, _, cake = session()
        self.assertEqual(opened_.events, [("Opened", b'{"table":4}')])
        self.assertIsNone(opened_.reply)
        self.assertEqual(cake.events, [("Ordered", b'{"item":"cake","price":5}')])
        self.assertEqual(cake.state, (3, b'{"table":4,"items":["tea","cake"],"total":8,"paid":false}'))
        self.assertEqual(cake.reply, b'{"total":8,"version":2}')

    def test_state_after_handle_equals_the_rebuilt_state(self):
        outcomes = session()
        events = [(name, data, i + 1) for i, (name, data) in enumerate(e for o in outcomes for e in o.events)]
        self.assertEqual(tab.apply_bytes(*tab.initial_state_bytes(), events), outcomes[2].state)

    def test_bad_data_is_a_field_error(self):
        s = session()[2].state
        self.assertEqual(self.refusal(s, "order", b'{"price":2}'), invalid("item", "is required"))
        self.assertEqual(self.refusal(s, "order", b'{"item":"x","price":0}'), invalid("price", "must be greater than 0"))
        self.assertEqual(
            self.refusal(s, "order", b'{"price":"x","note":5}'),
            invalid("note", "invalid type: integer `5`, expected a string"),
        )
        self.assertEqual(self.refusal(s, "order", b"[1]"), invalid("", "the command's data must be a JSON object"))
        self.assertEqual(self.refusal(s, "refund", b"{}"), rejected("no refunds"))
        self.assertEqual(self.refusal(s, "tip", b"{}"), rejected("unknown command `tip`"))

    def test_a_command_without_fields_takes_blank_empty_or_null(self):
        s = session()[2].state
        for body in [b"", b" ", b"{}", b"null", b'{"extra":1}']:
            out = tab.handle_bytes(*s, "pay", body, ctx(3))
            self.assertEqual(out.events, [("Paid", b"{}")])

    def test_forbidden_and_a_no_op_with_a_reply(self):
        s = session()[2].state
        self.assertEqual(self.refusal(s, "pay", b"", ctx(3, principal=None)), forbidden("sign in to pay"))
        paid_state = tab.handle_bytes(*s, "pay", b"", ctx(3)).state
        again = tab.handle_bytes(*paid_state, "pay", b"", ctx(4))
        self.assertEqual((again.events, again.reply, again.state), ([], b"4", paid_state))

    def test_incompatible_state(self):
        self.assertEqual(self.refusal((2, b'{"table":1}'), "pay", b""), Rejection("incompatible-state", 2))
        with self.assertRaisesRegex(Unreadable, "schema 2"):
            tab.apply_bytes(2, b'{"table":1}', [])
        self.assertEqual(self.refusal((3, b'{"tables":"many"}'), "pay", b""), Rejection("incompatible-state", 3))
        # Empty bytes are the initial state whatever the schema.
        self.assertEqual(len(tab.handle_bytes(0, b"", "open", b'{"table":1}', ctx(0)).events), 1)

    def test_apply_names_the_event_it_cannot_read(self):
        s = tab.initial_state_bytes()
        with self.assertRaises(Unreadable) as caught:
            tab.apply_bytes(*s, [("Spilled", b"{}", 7)])
        self.assertEqual(str(caught.exception), "cannot read event 7 (`Spilled`): unknown event type")
        with self.assertRaises(Unreadable) as caught:
            tab.apply_bytes(*s, [("Ordered", b'{"item":"x"}', 2)])
        self.assertEqual(str(caught.exception), "cannot read event 2 (`Ordered`): field `price`: is required")

    def test_an_undeclared_event_is_a_plugin_bug(self):
        with self.assertRaisesRegex(PluginBug, "`Exploded`"):
            tab.handle_bytes(*tab.initial_state_bytes(), "broken", b"{}", ctx(0))

    def test_wrong_definitions_fail_early(self):
        with self.assertRaisesRegex(ValueError, "stream_prefix"):
            Aggregate(type="x", stream_prefix="a-b", state={})
        with self.assertRaisesRegex(ValueError, "mode"):
            tab.command("go", mode="sometimes")
        with self.assertRaisesRegex(ValueError, "twice"):
            tab.event("Paid")

    def test_context(self):
        c = Context("a1", 0, [("now", "2026-01-01T00:00:00Z"), ("message-id", "m"), ("correlation-id", "c"), ("causation-id", "k")])
        self.assertTrue(c.is_new)
        self.assertEqual((c.now, c.message_id, c.correlation_id, c.causation_id, c.principal),
                         ("2026-01-01T00:00:00Z", "m", "c", "k", None))

    def test_no_timers_is_an_empty_list(self):
        for outcome in session():
            self.assertEqual(outcome.timers, [])
        s = session()[2].state
        self.assertEqual(tab.handle_bytes(*s, "pay", b"", ctx(3)).timers, [])


# An aggregate whose handlers schedule and cancel timers. `reschedule`
# returns whatever `next_timers` gives, for the malformed cases.
next_timers = lambda: []  # noqa: E731
shop = Aggregate(type="shop-order", stream_prefix="shop_order", state={"placed": t.bool})


@shop.command("place", mode="create", fields={"customer": t.string})
def place(state, cmd, ctx):
    return decision(
        event("Placed", customer=cmd["customer"]),
        reply={"ok": True},
        timers=[
            schedule("payment-deadline", "expire", after_ms=30 * 60 * 1000),
            schedule(
                "remind",
                "send-reminder",
                {"order": "t1", "attempt": 1},
                at="2026-12-01T09:00:00Z",
                target=("customer", cmd["customer"]),
            ),
            cancel_timer("old"),
        ],
    )


@shop.command("pay", mode="update")
def pay_order(state, cmd, ctx):
    return decision(event("Paid"), timers=[cancel_timer("payment-deadline")])


@shop.command("remind", mode="update")
def remind(state, cmd, ctx):
    return decision(timers=[schedule("remind", "remind", after_ms=0)])


@shop.command("reschedule", mode="upsert")
def reschedule(state, cmd, ctx):
    return decision(timers=next_timers())


@shop.event("Placed", fields={"customer": t.string})
def placed(state, data):
    return {"placed": True}


@shop.event("Paid")
def order_paid(state, data):
    return state


# Stand-ins for the classes componentize-py generates from wit/aggregate.wit
# (`wit_world.imports.types`): dataclasses with the WIT fields in order.
@dataclass
class WitState:
    schema: int
    bytes: bytes


@dataclass
class WitNewEvent:
    event_type: str
    data: bytes


@dataclass
class WitCommand:
    command_type: str
    aggregate_id: str
    data: bytes
    metadata: list


@dataclass
class WitDueAt:
    value: str


@dataclass
class WitDueAfterMs:
    value: int


@dataclass
class WitAggregateRef:
    aggregate_type: str
    aggregate_id: str


@dataclass
class WitTimer:
    key: str
    target: Optional[WitAggregateRef]
    command_type: str
    data: bytes
    due: Any


@dataclass
class WitSchedule:
    value: WitTimer


@dataclass
class WitCancel:
    value: str


@dataclass
class WitDecision:
    events: list
    state: WitState
    reply: Optional[bytes]
    timers: list


class WitErr(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value


WitErr.__name__ = "Err"


def fake_bindings(logged):
    """The modules a component provides, as ``sys.modules`` entries."""
    wit = types.ModuleType("wit_world.imports.types")
    wit.State, wit.NewEvent, wit.Decision = WitState, WitNewEvent, WitDecision
    wit.Due_At, wit.Due_AfterMs, wit.AggregateRef, wit.Timer = WitDueAt, WitDueAfterMs, WitAggregateRef, WitTimer
    wit.TimerChange_Schedule, wit.TimerChange_Cancel = WitSchedule, WitCancel
    wit.LogLevel = enum.Enum("LogLevel", ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"])
    imports = types.ModuleType("wit_world.imports")
    imports.types = wit
    world = types.ModuleType("wit_world")
    world.imports = imports
    world.log = lambda level, message: logged.append((level.name, message))
    runtime = types.ModuleType("componentize_py_types")
    runtime.Err = WitErr
    return {
        "wit_world": world,
        "wit_world.imports": imports,
        "wit_world.imports.types": wit,
        "componentize_py_types": runtime,
    }


class TimerTest(unittest.TestCase):
    def test_timers_are_in_the_outcome_in_order(self):
        out = shop.handle_bytes(*shop.initial_state_bytes(), "place", b'{"customer":"c7"}', ctx(0))
        self.assertEqual(out.events, [("Placed", b'{"customer":"c7"}')])
        self.assertEqual(out.reply, b'{"ok":true}')
        self.assertEqual(
            out.timers,
            [
                ScheduleTimer("payment-deadline", "expire", b"{}", after_ms=1800000),
                ScheduleTimer(
                    "remind",
                    "send-reminder",
                    b'{"order":"t1","attempt":1}',
                    at="2026-12-01T09:00:00Z",
                    target=("customer", "c7"),
                ),
                CancelTimer("old"),
            ],
        )
        paid_ = shop.handle_bytes(*out.state, "pay", b"", ctx(1))
        self.assertEqual(paid_.timers, [CancelTimer("payment-deadline")])
        # Timers alone: no events, no reply.
        reminded = shop.handle_bytes(*paid_.state, "remind", b"", ctx(2))
        self.assertEqual(
            (reminded.events, reminded.reply, reminded.timers),
            ([], None, [ScheduleTimer("remind", "remind", b"{}", after_ms=0)]),
        )

    def test_the_world_gives_the_host_the_contracts_decision(self):
        logged = []
        with mock.patch.dict(sys.modules, fake_bindings(logged)):
            world = shop.world()()
            placed_ = world.handle(WitState(1, b""), 0, WitCommand("place", "t1", b'{"customer":"c7"}', []))
            self.assertEqual(
                placed_.timers,
                [
                    WitSchedule(WitTimer("payment-deadline", None, "expire", b"{}", WitDueAfterMs(1800000))),
                    WitSchedule(
                        WitTimer(
                            "remind",
                            WitAggregateRef("customer", "c7"),
                            "send-reminder",
                            b'{"order":"t1","attempt":1}',
                            WitDueAt("2026-12-01T09:00:00Z"),
                        )
                    ),
                    WitCancel("old"),
                ],
            )
            self.assertEqual(placed_.reply, b'{"ok":true}')
            # No timers: an empty list.
            opened_ = tab.world()().handle(WitState(3, b""), 0, WitCommand("open", "t1", b'{"table":4}', []))
            self.assertEqual(opened_.timers, [])
            # A malformed timer traps, logged like any bug in the plugin. The
            # log's traceback reads no source file: that traps in a
            # component built with --stub-wasi, and the message would be lost.
            global next_timers
            next_timers = lambda: [schedule("k", "expire")]  # noqa: E731
            no_sources = AssertionError("read a source file")
            try:
                with mock.patch("linecache.getline", side_effect=no_sources), \
                        mock.patch("linecache.updatecache", side_effect=no_sources), \
                        self.assertRaises(PluginBug):
                    world.handle(WitState(1, b""), 0, WitCommand("reschedule", "t1", b"", []))
            finally:
                next_timers = lambda: []  # noqa: E731
        [(level, message)] = logged
        self.assertEqual(level, "ERROR")
        self.assertTrue(
            message.startswith("plugin `shop-order` failed in command `reschedule`: the timer `k` has no due time"),
            message,
        )
        self.assertIn("in reschedule\n", message)
        self.assertTrue(message.endswith("rehydra.PluginBug: " + message.split(": ", 1)[1].split("\n")[0]), message)

    def test_a_malformed_timer_is_a_plugin_bug_naming_it(self):
        def failure(make):
            global next_timers
            next_timers = make
            try:
                with self.assertRaises(PluginBug) as caught:
                    shop.handle_bytes(*shop.initial_state_bytes(), "reschedule", b"", ctx(0))
            finally:
                next_timers = lambda: []  # noqa: E731
            return str(caught.exception)

        cyclic = []
        cyclic.append(cyclic)
        bad_target = (
            "the timer `k` has a target without both a type and an id: give `target=(type, id)` (two strs), "
            "or leave it out to send the command to this aggregate"
        )
        cases = [
            (lambda: [schedule(None, "expire", after_ms=5)],
             "a timer for command `expire` has no key: give `key`, a str that names the timer"),
            (lambda: [schedule(7, "expire", after_ms=5)],
             "a timer for command `expire` has the key 7: give `key` as a str"),
            (lambda: [schedule("k", "expire", after_ms=5, at="2026-12-01T09:00:00Z")],
             "the timer `k` has both `after_ms` and `at`: give one of them"),
            (lambda: [schedule("k", "expire")],
             "the timer `k` has no due time: give `after_ms` (milliseconds after the command's `now`) "
             "or `at` (an RFC 3339 time)"),
            (lambda: [schedule("k", "expire", after_ms=-1)],
             "the timer `k` has `after_ms` -1: give a whole number of milliseconds, 0 or more"),
            (lambda: [schedule("k", "expire", after_ms=1.5)],
             "the timer `k` has `after_ms` 1.5: give a whole number of milliseconds, 0 or more"),
            (lambda: [schedule("k", "expire", after_ms=True)],
             "the timer `k` has `after_ms` True: give a whole number of milliseconds, 0 or more"),
            (lambda: [schedule("k", "expire", after_ms="5")],
             "the timer `k` has `after_ms` '5': give a whole number of milliseconds, 0 or more"),
            (lambda: [schedule("k", "expire", after_ms=1 << 64)],
             "the timer `k` has `after_ms` 18446744073709551616: give at most 2**64 - 1 milliseconds"),
            (lambda: [schedule("k", "expire", at=0)],
             "the timer `k` has `at` 0: give an RFC 3339 time as a str, e.g. '2026-12-01T09:00:00Z'"),
            (lambda: [schedule("k", "expire", {"s": {1, 2}}, after_ms=5)],
             "the data of timer `k` cannot be encoded as JSON: a set cannot be JSON"),
            (lambda: [schedule("k", "expire", cyclic, after_ms=5)],
             "the data of timer `k` cannot be encoded as JSON: maximum recursion depth exceeded"),
            (lambda: [schedule("k", "expire", after_ms=5, target=("customer",))], bad_target),
            (lambda: [schedule("k", "expire", after_ms=5, target=("customer", None))], bad_target),
            (lambda: [schedule("k", "expire", after_ms=5, target="customer/c7")], bad_target),
            (lambda: [schedule("k", None, after_ms=5)],
             "the timer `k` has the command None: give `command`, the name of the command to send, as a str"),
            (lambda: [cancel_timer(None)],
             "cancel_timer() takes the key of the timer to cancel, a str, not None"),
            (lambda: schedule("k", "expire", after_ms=5),
             "`timers` must be a list of schedule(...) and cancel_timer(...), not ScheduleTimer"),
            (lambda: [("cancel", "k")],
             "each of `timers` must be made with schedule(...) or cancel_timer(...), not ('cancel', 'k')"),
        ]
        for make, want in cases:
            got = failure(make)
            if want.endswith("maximum recursion depth exceeded"):
                self.assertTrue(got.startswith(want), got)
            else:
                self.assertEqual(got, want)

    def test_schedule_takes_a_list_target_and_any_json_data(self):
        timer = schedule("k", "c", [1.5, "é"], at="x", target=["customer", "c7"])
        self.assertEqual((timer.data, timer.target), ('[1.5,"é"]'.encode(), ("customer", "c7")))
        self.assertEqual(schedule("k", "c", after_ms=(1 << 64) - 1).after_ms, (1 << 64) - 1)

    def test_the_context_tells_when_a_timer_sent_the_command(self):
        self.assertIsNone(Context("a1", 1, [("now", "2026-01-01T00:00:00Z")]).timer)
        c = Context("a1", 1, [
            ("timer-key", "remind"),
            ("timer-due", "2026-12-01T09:00:00Z"),
            ("timer-late", "false"),
            ("scheduled-by", "shop-order/t1"),
        ])
        self.assertEqual(c.timer, TimerFiring("remind", "2026-12-01T09:00:00Z", False, "shop-order/t1"))


# ---------------------------------------------------------------------------
# Process managers


def make_relay(follows=..., on_refused="refused", finished_by=("Refused",), declare=True):
    """A process manager following one event type per instance key."""
    if follows is ...:
        follows = [
            follow("bank-account", "Opened", "aggregate-id", "start"),
            follow("bank-account", "Deposited", "correlation-id", "heard"),
            follow("bank-account", "Withdrawn", "scheduled-by", "heard"),
            follow("order", "Placed", data_field("customer"), "heard"),
        ]
    agg = Aggregate(
        type="relay",
        stream_prefix="relay",
        state={"seen": t.u64, "last": t.omittable(t.string)},
        follows=follows,
        on_refused=on_refused,
        finished_by=None if finished_by is None else list(finished_by),
    )
    if not declare:
        return agg

    @agg.command("start", mode="create")
    def start(state, cmd, ctx):
        return event("Started")

    @agg.command("heard", mode="upsert", fields={"event": t.followed_event})
    def heard(state, cmd, ctx):
        e = cmd["event"]
        return decision(
            event("Heard", {"from": f"{e['aggregate']['type']}/{e['aggregate']['id']}", "key": timer_key(e)}),
            reply={"version": e["version"], "position": e["position"], "data": e["data"], "type": e["type"], "id": e["id"]},
            timers=[send(f"ack-{e['id']}", e["aggregate"]["type"], e["aggregate"]["id"], "ack", {"seen": state["seen"] + 1})],
        )

    @agg.command("refused", mode="update", fields={"refusal": t.refusal})
    def refused(state, cmd, ctx):
        r = cmd["refusal"]
        why = f"{r['key']}: {r['target']['type']}/{r['target']['id']} refused {r['command']} ({r['code']}): {r['message']}"
        return decision(event("Refused", why=why), reply=r["data"])

    @agg.event("Started")
    def started(state, data):
        return state

    @agg.event("Heard", fields={"from": t.string, "key": t.optional(t.string)})
    def was_heard(state, data):
        return {"seen": state["seen"] + 1, "last": data["from"]}

    @agg.event("Refused", fields={"why": t.string})
    def was_refused(state, data):
        return {**state, "last": data["why"]}

    return agg


relay = make_relay()


# Stand-ins for the process-manager world's generated classes.
@dataclass
class WitInstanceKeyAggregateId:
    pass


@dataclass
class WitInstanceKeyCorrelationId:
    pass


@dataclass
class WitInstanceKeyScheduledBy:
    pass


@dataclass
class WitInstanceKeyDataField:
    value: str


@dataclass
class WitFollow:
    aggregate_type: str
    event_type: str
    instance: Any
    command: str


@dataclass
class WitProcessInfo:
    follows: list
    on_refused: Optional[str]
    finished_by: list


def fake_process_bindings(logged):
    modules = fake_bindings(logged)
    wit = modules["wit_world.imports.types"]
    wit.InstanceKey_AggregateId = WitInstanceKeyAggregateId
    wit.InstanceKey_CorrelationId = WitInstanceKeyCorrelationId
    wit.InstanceKey_ScheduledBy = WitInstanceKeyScheduledBy
    wit.InstanceKey_DataField = WitInstanceKeyDataField
    wit.Follow, wit.ProcessInfo = WitFollow, WitProcessInfo
    return modules


def followed_event(metadata, **over):
    e = {
        "aggregate": {"type": "bank-account", "id": "acc-1"},
        "type": "Withdrawn",
        "version": 3,
        "position": (1 << 64) - 1,
        "id": "0190a4c3-0000-7000-8000-000000000001",
        "data": {"amount": 5},
        "metadata": metadata,
        **over,
    }
    return {"event": e}


class ProcessManagerTest(unittest.TestCase):
    def test_process_gives_the_contracts_process_info_for_each_instance_key(self):
        with mock.patch.dict(sys.modules, fake_process_bindings([])):
            world = relay.world()()
            self.assertEqual(
                world.process(),
                WitProcessInfo(
                    [
                        WitFollow("bank-account", "Opened", WitInstanceKeyAggregateId(), "start"),
                        WitFollow("bank-account", "Deposited", WitInstanceKeyCorrelationId(), "heard"),
                        WitFollow("bank-account", "Withdrawn", WitInstanceKeyScheduledBy(), "heard"),
                        WitFollow("order", "Placed", WitInstanceKeyDataField("customer"), "heard"),
                    ],
                    "refused",
                    ["Refused"],
                ),
            )
            # Without on_refused: none; without finished_by: no event type
            # finishes an instance; no follows at all is allowed too.
            self.assertEqual(make_relay(on_refused=None).world()().process().on_refused, None)
            self.assertEqual(make_relay(finished_by=None).world()().process().finished_by, [])
            self.assertEqual(make_relay(follows=[]).world()().process(), WitProcessInfo([], "refused", ["Refused"]))
            self.assertEqual(
                make_relay(follows=[], on_refused=None, finished_by=None).world()().process(),
                WitProcessInfo([], None, []),
            )
            # Several event types, in the order given.
            self.assertEqual(
                make_relay(finished_by=("Refused", "Started")).world()().process().finished_by,
                ["Refused", "Started"],
            )
            # The aggregate's exports are there as ever.
            for export in ("describe", "initial_state", "apply", "handle"):
                self.assertTrue(callable(getattr(world, export)), export)
        self.assertTrue(relay.is_process_manager)
        self.assertFalse(tab.is_process_manager)
        self.assertFalse(hasattr(tab.world(), "process"))
        self.assertTrue(make_relay(follows=None, finished_by=None).is_process_manager)  # on_refused alone
        self.assertTrue(make_relay(follows=None, on_refused=None).is_process_manager)  # finished_by alone
        self.assertFalse(make_relay(follows=None, on_refused=None, finished_by=None).is_process_manager)
        self.assertEqual(
            relay.process_info(),
            ProcessInfo(
                [
                    Follow("bank-account", "Opened", "aggregate-id", "start"),
                    Follow("bank-account", "Deposited", "correlation-id", "heard"),
                    Follow("bank-account", "Withdrawn", "scheduled-by", "heard"),
                    Follow("order", "Placed", DataField("customer"), "heard"),
                ],
                "refused",
                ["Refused"],
            ),
        )
        self.assertEqual(make_relay(finished_by=None).process_info().finished_by, [])

    def test_a_process_that_names_an_undeclared_command_or_event_type_fails_at_definition_time(self):
        agg = make_relay(
            follows=[follow("bank-account", "Withdrawn", "scheduled-by", "debited")],
            on_refused="refuse",
            finished_by=["Refused", "Completed", "refused"],
        )
        with self.assertRaises(ValueError) as caught:
            agg.world()
        self.assertEqual(
            str(caught.exception),
            "the process manager `relay` is wrong: "
            "`follows[0]` sends bank-account/Withdrawn to `debited`, which is not a declared command; "
            "`on_refused` names `refuse`, which is not a declared command; "
            "`finished_by[1]` names `Completed`, which is not a declared event type; "
            "`finished_by[2]` names `refused`, which is not a declared event type",
        )
        with self.assertRaisesRegex(ValueError, "`on_refused` names `refused`"):
            make_relay(declare=False).world()
        with self.assertRaisesRegex(ValueError, "`finished_by\\[0\\]` names `Refused`, which is not a declared event type"):
            make_relay(declare=False).process_info()

    def test_malformed_declarations_fail_when_made(self):
        def wrong(make):
            with self.assertRaises(ValueError) as caught:
                make()
            return str(caught.exception)

        self.assertEqual(
            wrong(lambda: follow("bank-account", "Withdrawn", "id", "heard")),
            "follow() has the instance 'id': give 'aggregate-id', 'correlation-id', 'scheduled-by' or data_field('name')",
        )
        self.assertEqual(
            wrong(lambda: follow("", None, {"data_field": "x"}, 5)),
            "follow() has the aggregate type '': give the type of the aggregate that stores the event, "
            "e.g. 'bank-account'; the event type None: give the type of the event it follows, e.g. 'Withdrawn'; "
            "the instance {'data_field': 'x'}: give 'aggregate-id', 'correlation-id', 'scheduled-by' or "
            "data_field('name'); the command 5: give the name of the command that receives the event",
        )
        self.assertEqual(
            wrong(lambda: data_field("")),
            "data_field() takes the name of a field of the event's data, a str, not ''",
        )
        self.assertEqual(
            wrong(lambda: Aggregate(type="r", stream_prefix="r", state={}, follows=[("a", "B", "aggregate-id", "c")])),
            "the aggregate definition is wrong: `follows[0]` must be made with follow(...), "
            "not ('a', 'B', 'aggregate-id', 'c')",
        )
        self.assertEqual(
            wrong(lambda: Aggregate(type="r", stream_prefix="r-", state={}, follows="all", on_refused=5)),
            "the aggregate definition is wrong: `stream_prefix` must be 1-64 letters, digits, `_` or `.`, "
            "starting with a letter (no `-`); `follows` must be a list of follow(...), not str; "
            "`on_refused` must be the name of a command, a str, not 5",
        )
        self.assertEqual(
            wrong(lambda: Aggregate(type="r", stream_prefix="r", state={}, finished_by="Completed")),
            "the aggregate definition is wrong: `finished_by` must be a list of the names of event types, "
            "e.g. ['Completed'], not str",
        )
        self.assertEqual(
            wrong(lambda: Aggregate(type="r", stream_prefix="r", state={}, finished_by=["Completed", 5])),
            "the aggregate definition is wrong: `finished_by[1]` must be the name of an event type, a str, not 5",
        )

    def test_send_is_schedule_with_after_ms_0_and_a_target(self):
        sent = send("debit", "bank-account", "a1", "withdraw", {"amount": 5})
        self.assertEqual(sent, ScheduleTimer("debit", "withdraw", b'{"amount":5}', after_ms=0, target=("bank-account", "a1")))
        self.assertEqual(sent, schedule("debit", "withdraw", {"amount": 5}, after_ms=0, target=("bank-account", "a1")))
        self.assertEqual(send("k", "x", "y", "c").data, b"{}")
        self.assertEqual(send(key="k", type="x", id="y", command="c", data=[1]).data, b"[1]")
        with self.assertRaises(PluginBug) as caught:
            send("k", None, "y", "c")
        self.assertEqual(
            str(caught.exception),
            "the timer `k` has the type None and the id 'y': "
            "give `type` and `id`, two strs that name the aggregate to send the command to",
        )
        with self.assertRaisesRegex(PluginBug, "^a timer for command `c` has no key"):
            send(None, "x", "y", "c")
        with self.assertRaisesRegex(PluginBug, "^the timer `k` has the command None"):
            send("k", "x", "y", None)
        with self.assertRaisesRegex(PluginBug, "^the data of timer `k` cannot be encoded as JSON"):
            send("k", "x", "y", "c", {1, 2})

    def test_a_followed_event_arrives_as_a_command_with_data_event(self):
        s0 = relay.initial_state_bytes()
        self.assertEqual(s0, (1, b'{"seen":0}'))
        meta = {"$correlationId": "c1", "timer": {"key": "debit", "scheduledBy": "relay/r1"}}
        out = relay.handle_bytes(*s0, "heard", stringify_json(followed_event(meta)).encode(), ctx(0))
        self.assertEqual(out.events, [("Heard", b'{"from":"bank-account/acc-1","key":"debit"}')])
        self.assertEqual(
            out.reply,
            b'{"version":3,"position":18446744073709551615,"data":{"amount":5},"type":"Withdrawn",'
            b'"id":"0190a4c3-0000-7000-8000-000000000001"}',
        )
        self.assertEqual(
            out.timers,
            [send("ack-0190a4c3-0000-7000-8000-000000000001", "bank-account", "acc-1", "ack", {"seen": 1})],
        )
        self.assertEqual(out.state, (1, b'{"seen":1,"last":"bank-account/acc-1"}'))
        plain = relay.handle_bytes(*s0, "heard", stringify_json(followed_event({})).encode(), ctx(0))
        self.assertEqual(plain.events, [("Heard", b'{"from":"bank-account/acc-1","key":null}')])

        def refusal(data):
            with self.assertRaises(Rejection) as caught:
                relay.handle_bytes(*s0, "heard", data, ctx(0))
            return caught.exception

        self.assertEqual(refusal(b"{}"), invalid("event", "is required"))
        self.assertEqual(
            refusal(b'{"event":{"aggregate":{"type":"x"},"version":"3"}}'), invalid("event.aggregate.id", "is required")
        )
        self.assertEqual(
            refusal(b'{"event":[]}'), invalid("event", "invalid type: sequence, expected struct FollowedEvent")
        )
        no_metadata = followed_event(None)
        del no_metadata["event"]["metadata"]
        self.assertEqual(refusal(stringify_json(no_metadata).encode()), invalid("event.metadata", "is required"))

    def test_a_refusal_arrives_as_the_on_refused_command_with_data_refusal(self):
        started = relay.handle_bytes(*relay.initial_state_bytes(), "start", b"", ctx(0))
        r = {
            "refusal": {
                "key": "credit",
                "target": {"type": "bank-account", "id": "acc-2"},
                "command": "deposit",
                "data": {"amount": 5},
                "code": "rejected",
                "message": "account is closed",
            }
        }
        out = relay.handle_bytes(*started.state, "refused", stringify_json(r).encode(), ctx(1))
        self.assertEqual(
            out.events,
            [("Refused", b'{"why":"credit: bank-account/acc-2 refused deposit (rejected): account is closed"}')],
        )
        self.assertEqual(out.reply, b'{"amount":5}')
        del r["refusal"]["code"]
        with self.assertRaises(Rejection) as caught:
            relay.handle_bytes(*started.state, "refused", stringify_json(r).encode(), ctx(1))
        self.assertEqual(caught.exception, invalid("refusal.code", "is required"))
        events = [(name, data, i + 1) for i, (name, data) in enumerate(started.events + out.events)]
        self.assertEqual(relay.apply_bytes(*relay.initial_state_bytes(), events), out.state)

    def test_timer_key_reads_metadata_timer_key_if_it_is_a_str(self):
        self.assertEqual(timer_key({"metadata": {"timer": {"key": "debit"}}}), "debit")
        for e in [{"metadata": {}}, {"metadata": {"timer": {"key": 5}}}, {"metadata": {"timer": "debit"}},
                  {"metadata": None}, {}, None]:
            self.assertIsNone(timer_key(e), e)

    def test_while_the_component_is_built_messages_go_to_stderr(self):
        # componentize-py imports the plugin's module to build it, when the
        # host's `log` is a stub that traps: a wrong definition's message
        # must reach the build's output instead.
        import io

        import rehydra

        logged = []
        stderr = io.StringIO()
        with mock.patch.dict(sys.modules, fake_process_bindings(logged)), mock.patch.object(sys, "platform", "wasi"), \
                mock.patch.object(sys, "__stderr__", stderr), mock.patch.object(rehydra, "_serving", False):
            rehydra.log.warn("while building")
            self.assertEqual((stderr.getvalue(), logged), ("while building\n", []))
            # Once the host calls an export, messages go to its log.
            relay.world()().process()
            rehydra.log.warn("while serving")
            self.assertEqual(logged, [("WARN", "while serving")])

    def test_an_omittable_field_is_left_out_when_none(self):
        ftype = t.record("S", {"a": t.u32, "b": t.omittable(t.string)})
        self.assertEqual(ftype.encode({"a": 1, "b": None}, ""), '{"a":1}')
        self.assertEqual(ftype.encode({"a": 1}, ""), '{"a":1}')
        self.assertEqual(ftype.encode({"a": 1, "b": "x"}, ""), '{"a":1,"b":"x"}')
        self.assertEqual(ftype.decode({"a": 1}, ""), {"a": 1, "b": None})
        self.assertEqual(ftype.decode({"a": 1, "b": None}, ""), {"a": 1, "b": None})
        self.assertIsNone(ftype.zero()["b"])


if __name__ == "__main__":
    unittest.main()
