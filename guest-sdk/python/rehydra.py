"""Rehydra guest SDK for Python.

Write an event-sourced aggregate as plain Python: declare what the plugin
is (aggregate type, stream prefix, state schema), the fields of its state,
one handler per command and one ``apply`` per event. The SDK does the rest
of the ``aggregate`` world of ``rehydra:aggregate@0.3.0`` (and of its
``process-manager`` world): JSON in and out, field errors, rejections,
durable timers, and computing the new state from the events exactly as a
rebuild from the store would.

.. code-block:: python

    from rehydra import Aggregate, t, event

    counter = Aggregate(type="counter", stream_prefix="counter",
                        state={"total": t.u64})

    @counter.command("add", mode="upsert", fields={"by": t.u64})
    def add(state, cmd, ctx):
        return event("Added", by=cmd["by"])

    @counter.event("Added", fields={"by": t.u64})
    def added(state, data):
        return {**state, "total": state["total"] + data["by"]}

    WitWorld = counter.world()   # what componentize-py exports

The behaviour mirrors the Rust SDK (``rehydra-guest``) message for message:
a missing field "is required", a value of the wrong type gets serde's
wording ("invalid type: string \\"ten\\", expected u64"), and so on, so that
the same plugin written in either language answers alike.

A handler may also schedule commands for later, and cancel them, with
:func:`schedule` and :func:`cancel_timer` in :func:`decision`. The host
stores the timers with the events, both or neither, and sends each command
once when it is due:

.. code-block:: python

    @orders.command("place", mode="create")
    def place(state, cmd, ctx):
        return decision(event("Placed"), timers=[
            schedule("payment-deadline", "expire", after_ms=30 * 60 * 1000),
        ])

    @orders.command("pay", mode="update")
    def pay(state, cmd, ctx):
        return decision(event("Paid"), timers=[cancel_timer("payment-deadline")])

A process manager is an aggregate that also follows other aggregates'
events and sends them commands: give :class:`Aggregate` ``follows`` (made
with :func:`follow`), ``on_refused`` and ``finished_by``, send commands
with :func:`send`, and build with ``componentize-py -w process-manager``:

.. code-block:: python

    transfer = Aggregate(type="transfer", stream_prefix="transfer", state=...,
                         follows=[follow("bank-account", "Withdrawn", "scheduled-by", "debited")],
                         on_refused="refused", finished_by=["Completed", "Failed"])

    @transfer.command("debited", mode="update", fields={"event": t.followed_event})
    def debited(state, cmd, ctx):
        return decision(event("Debited"),
                        timers=[send("credit", "bank-account", state["to"], "deposit", {"amount": 5})])

Each followed event arrives as the command ``command`` with data
``{"event": ...}`` (``t.followed_event``); a refusal of a command it sent,
as ``on_refused`` with data ``{"refusal": ...}`` (``t.refusal``). Once an
instance has stored one of the event types in ``finished_by``, it is
finished: the host delivers it nothing more.

An event's apply function gets its data only. The metadata the host stored
with the event arrives as one JSON string (``metadata`` of each event
passed to the exported ``apply``), which the SDK leaves unparsed:
rehydration never pays for it. A command's metadata is the handler's
``ctx``.

Build a component with componentize-py and ``--stub-wasi``: the component
then imports nothing but the world's ``log`` function. Inside it,
``print`` and ``sys.stderr`` go to the host's log.

Everything but :meth:`Aggregate.world` runs in plain CPython, so a plugin's
logic can be unit-tested without building a component.
"""

from __future__ import annotations

import bisect
import builtins
import decimal
import json
import math
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rehydra_printable import ESCAPED_RANGES

__all__ = [
    "Aggregate",
    "CancelTimer",
    "Context",
    "DataField",
    "Decision",
    "FieldProblem",
    "Follow",
    "Outcome",
    "PluginBug",
    "ProcessInfo",
    "Rejection",
    "ScheduleTimer",
    "TimerFiring",
    "Unreadable",
    "cancel_timer",
    "data_field",
    "decision",
    "event",
    "follow",
    "forbidden",
    "format_float",
    "invalid",
    "log",
    "parse_json",
    "rejected",
    "schedule",
    "send",
    "stringify_json",
    "t",
    "timer_key",
    "trim",
]

U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

# ---------------------------------------------------------------------------
# Logging

_LEVELS = ("trace", "debug", "info", "warn", "error")

# Whether the host has called an export yet. Before that, inside a
# component, the module is being imported while componentize-py builds it:
# the host's `log` is then a stub that traps (and the message would be
# lost), so messages (a wrong definition's traceback among them) go to the
# build's stderr instead.
_serving = False


def _host_log(level: str, message: str) -> None:
    """Sends one message to the host's log; outside a component, or while
    componentize-py builds it, to stderr."""
    if sys.platform == "wasi" and not _serving:
        sys.__stderr__.write(f"{message}\n")
        return
    try:
        import wit_world
        from wit_world.imports import types as wit

        wit_world.log(getattr(wit.LogLevel, level.upper()), message)
    except (ImportError, NotImplementedError):
        sys.__stderr__.write(f"[{level}] {message}\n")


class _Log:
    """The host's log, tagged with the plugin's name: ``log.info("...")``."""

    def __call__(self, level: str, message: object) -> None:
        """Writes ``message`` at ``level`` (trace, debug, info, warn, error)."""
        _host_log(level if level in _LEVELS else "info", str(message))

    def trace(self, message: object) -> None:
        """Writes at trace level."""
        self("trace", message)

    def debug(self, message: object) -> None:
        """Writes at debug level."""
        self("debug", message)

    def info(self, message: object) -> None:
        """Writes at info level."""
        self("info", message)

    def warn(self, message: object) -> None:
        """Writes at warn level."""
        self("warn", message)

    def error(self, message: object) -> None:
        """Writes at error level."""
        self("error", message)


#: The host's log.
log = _Log()


class _LogStream:
    """A text stream that writes whole lines to the host's log."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line:
                _host_log(self.level, line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            _host_log(self.level, self.pending)
            self.pending = ""

    def isatty(self) -> bool:
        return False


# A plugin has no stdout or stderr: inside the component they go to the
# host's log (stdout as info, stderr as warnings, as the host does for Rust
# plugins). Under CPython, for tests, they stay.
if sys.platform == "wasi":
    sys.stdout = _LogStream("info")
    sys.stderr = _LogStream("warn")

# ---------------------------------------------------------------------------
# JSON as the host reads it


def _parse_int(literal: str) -> Any:
    # serde_json reads an integer that fits neither u64 nor i64, and "-0",
    # as a float.
    if literal == "-0":
        return -0.0
    n = int(literal)
    if (0 <= n <= U64_MAX) or (I64_MIN <= n < 0):
        return n
    return float(literal)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str | bytes) -> Any:
    """Parses JSON the way the host (serde_json) reads it.

    Integers that fit a u64 or an i64 are ``int``; every other number is a
    ``float`` (so ``1`` and ``1.0`` stay distinguishable). Raises
    ``ValueError`` on invalid JSON.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    return json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)


def stringify_json(value: Any) -> str:
    """Writes compact JSON: floats in the host's notation (``1.0``,
    ``1e+20``), non-finite floats as ``null``, keys in insertion order,
    non-ASCII characters as they are."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value) if math.isfinite(value) else "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(
                f"{json.dumps(str(k), ensure_ascii=False)}:{stringify_json(v)}"
                for k, v in value.items()
            )
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(stringify_json(v) for v in value) + "]"
    raise TypeError(f"a {type(value).__name__} cannot be JSON")


def format_float(x: float) -> str:
    """Formats a float as the host does in messages and JSON.

    The shortest digits that read back as the same number, in plain notation
    with at least one decimal (``100.0``, ``0.00001``) when the decimal
    exponent is within -5..=15, otherwise in exponent notation (``1e+16``,
    ``1.5e-7``).
    """
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    sign = "-" if math.copysign(1.0, x) < 0 else ""
    if x == 0:
        return f"{sign}0.0"
    # repr() gives the shortest round-trip digits; Decimal splits them.
    _, digit_tuple, exp = decimal.Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exp += len(digit_tuple) - len(digits)
    e = len(digits) - 1 + exp  # the exponent of the first digit
    if -5 <= e <= 15:
        if e < 0:
            return f"{sign}0.{'0' * (-e - 1)}{digits}"
        whole = e + 1
        if len(digits) <= whole:
            return f"{sign}{digits}{'0' * (whole - len(digits))}.0"
        return f"{sign}{digits[:whole]}.{digits[whole:]}"
    mantissa = f"{digits[0]}.{digits[1:]}" if len(digits) > 1 else digits
    return f"{sign}{mantissa}e{'-' if e < 0 else '+'}{abs(e)}"


# ---------------------------------------------------------------------------
# Field types


class FieldProblem(Exception):
    """A field of a command or event that does not fit its declared type."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.field = path
        self.message = message


_RANGE_STARTS = [first for first, _ in ESCAPED_RANGES]


def _is_escaped(c: int) -> bool:
    """Whether Rust's ``Debug`` for ``str`` writes code point ``c`` as ``\\u{..}``."""
    i = bisect.bisect_right(_RANGE_STARTS, c) - 1
    return i >= 0 and ESCAPED_RANGES[i][0] <= c <= ESCAPED_RANGES[i][1]


_SIMPLE_ESCAPES = {"\0": "\\0", "\t": "\\t", "\r": "\\r", "\n": "\\n", "\\": "\\\\", '"': '\\"'}


def _debug_string(s: str) -> str:
    """A string as Rust's ``{:?}`` shows it, quotes included."""
    out = ['"']
    for ch in s:
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif _is_escaped(ord(ch)):
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _unexpected(v: Any) -> str:
    """What serde calls the value it did not expect."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{format_float(v)}`"
    if isinstance(v, str):
        return f"string {_debug_string(v)}"
    if isinstance(v, list):
        return "sequence"
    return "map"


def _invalid_type(path: str, v: Any, expected: str) -> FieldProblem:
    return FieldProblem(path, f"invalid type: {_unexpected(v)}, expected {expected}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class FieldType:
    """A field's type: decodes a JSON value (with the host's messages) and
    encodes one back. Use the instances in :data:`t`."""

    #: Whether the field may be missing or null.
    optional = False
    #: Whether a ``None`` value is left out of the JSON (see
    #: :meth:`_Types.omittable`).
    omit_null = False

    def __init__(
        self,
        expected: str,
        decode: Callable[[Any, str], Any],
        encode: Callable[[Any, str], str],
        zero: Callable[[], Any],
    ) -> None:
        self.expected = expected
        self._decode = decode
        self._encode = encode
        self._zero = zero

    def decode(self, value: Any, path: str) -> Any:
        """The value of a field at ``path``, or :class:`FieldProblem`."""
        return self._decode(value, path)

    def encode(self, value: Any, path: str) -> str:
        """The field's JSON text; ``TypeError`` if the value does not fit."""
        return self._encode(value, path)

    def zero(self) -> Any:
        """The field's default, as Rust's ``Default`` gives it."""
        return self._zero()


def _decode_fields(fields: dict[str, FieldType], obj: dict, path: str) -> dict:
    """Decodes the declared ``fields`` of ``obj`` as a Rust struct
    deserializes: present fields in key order (the first bad one wins), then
    missing ones in declaration order. Other keys are ignored."""
    out: dict[str, Any] = {}
    for key in sorted(k for k in obj if k in fields):
        out[key] = fields[key].decode(obj[key], _join(path, key))
    for key, ftype in fields.items():
        if key in out:
            continue
        if not ftype.optional:
            raise FieldProblem(_join(path, key), "is required")
        out[key] = None
    # Declaration order, as the state and events are written.
    return {key: out[key] for key in fields}


def _encode_fields(fields: dict[str, FieldType], obj: Any, path: str) -> str:
    if not isinstance(obj, dict):
        raise TypeError(f"{path or 'the value'} must be a dict, not {type(obj).__name__}")
    parts = []
    for key, ftype in fields.items():
        v = obj.get(key)
        if v is None and ftype.omit_null:
            continue
        if v is None and not ftype.optional:
            raise TypeError(f"field `{_join(path, key)}` is missing")
        parts.append(f"{json.dumps(key, ensure_ascii=False)}:{ftype.encode(v, _join(path, key))}")
    return "{" + ",".join(parts) + "}"


def _integer(name: str, low: int, high: int) -> FieldType:
    def decode(v: Any, path: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _invalid_type(path, v, name)
        if not low <= v <= high:
            raise FieldProblem(path, f"invalid value: integer `{v}`, expected {name}")
        return v

    def encode(v: Any, path: str) -> str:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise TypeError(f"field `{path}` must be a {name}, not {v!r}")
        return str(v)

    return FieldType(name, decode, encode, lambda: 0)


def _string_decode(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _invalid_type(path, v, "a string")
    return v


def _string_encode(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise TypeError(f"field `{path}` must be a str, not {v!r}")
    return json.dumps(v, ensure_ascii=False)


def _bool_decode(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _invalid_type(path, v, "a boolean")
    return v


def _bool_encode(v: Any, path: str) -> str:
    if not isinstance(v, bool):
        raise TypeError(f"field `{path}` must be a bool, not {v!r}")
    return "true" if v else "false"


def _f64_decode(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid_type(path, v, "f64")
    return float(v)


def _f64_encode(v: Any, path: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"field `{path}` must be a number, not {v!r}")
    v = float(v)
    return format_float(v) if math.isfinite(v) else "null"


class _Types:
    """The field types: ``t.string``, ``t.u64``, ``t.list(t.string)``, …"""

    #: A string.
    string = FieldType("a string", _string_decode, _string_encode, lambda: "")
    #: ``True`` or ``False``.
    bool = FieldType("a boolean", _bool_decode, _bool_encode, lambda: False)
    #: An unsigned 64-bit integer.
    u64 = _integer("u64", 0, U64_MAX)
    #: A signed 64-bit integer.
    i64 = _integer("i64", I64_MIN, I64_MAX)
    #: An unsigned 32-bit integer.
    u32 = _integer("u32", 0, (1 << 32) - 1)
    #: A signed 32-bit integer.
    i32 = _integer("i32", -(1 << 31), (1 << 31) - 1)
    #: A 64-bit float; integers are accepted too.
    f64 = FieldType("f64", _f64_decode, _f64_encode, lambda: 0.0)
    #: Any JSON value, unchecked.
    any = FieldType("any value", lambda v, _: v, lambda v, _: stringify_json(v), lambda: None)

    @staticmethod
    def optional(inner: FieldType) -> FieldType:
        """``None`` or ``inner``; a missing field reads as ``None``."""
        ftype = FieldType(
            inner.expected,
            lambda v, path: None if v is None else inner.decode(v, path),
            lambda v, path: "null" if v is None else inner.encode(v, path),
            lambda: None,
        )
        ftype.optional = True
        return ftype

    @staticmethod
    def omittable(inner: FieldType) -> FieldType:
        """Like :meth:`optional`, but ``None`` is left out of the JSON
        instead of written as ``null``: Rust's ``Option`` field with
        ``#[serde(default, skip_serializing_if = "Option::is_none")]``. A
        missing field reads as ``None``."""
        ftype = _Types.optional(inner)
        ftype.omit_null = True
        return ftype

    @staticmethod
    def list(inner: FieldType) -> FieldType:
        """A list of ``inner``."""

        def decode(v: Any, path: str) -> list:
            if not isinstance(v, list):
                raise _invalid_type(path, v, "a sequence")
            return [inner.decode(x, f"{path}[{i}]") for i, x in enumerate(v)]

        def encode(v: Any, path: str) -> str:
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"field `{path}` must be a list, not {v!r}")
            return "[" + ",".join(inner.encode(x, f"{path}[{i}]") for i, x in enumerate(v)) + "]"

        return FieldType("a sequence", decode, encode, lambda: [])

    @staticmethod
    def record(name: str, fields: dict[str, FieldType]) -> FieldType:
        """A dict with the given fields; ``name`` is used in messages
        ("expected struct Address")."""

        def decode(v: Any, path: str) -> dict:
            if not isinstance(v, dict):
                raise _invalid_type(path, v, f"struct {name}")
            return _decode_fields(fields, v, path)

        return FieldType(
            f"struct {name}",
            decode,
            lambda v, path: _encode_fields(fields, v, path),
            lambda: {key: ftype.zero() for key, ftype in fields.items()},
        )


#: The field types.
t = _Types()

_AGGREGATE_REF = t.record("AggregateRef", {"type": t.string, "id": t.string})

#: An event a process manager follows, as the command that receives it gets
#: it (its field ``event``; see :class:`Aggregate`'s ``follows``):
#: ``{"aggregate": {"type", "id"}, "type", "version", "position", "id",
#: "data", "metadata"}``, with ``data`` and ``metadata`` as any JSON (the
#: event's metadata parsed: ``metadata["timer"]["key"]`` is the key of the
#: timer whose command stored the event, see :func:`timer_key`).
t.followed_event = t.record(
    "FollowedEvent",
    {
        "aggregate": _AGGREGATE_REF,
        "type": t.string,
        "version": t.u64,
        "position": t.u64,
        "id": t.string,
        "data": t.any,
        "metadata": t.any,
    },
)

#: A command a process manager sent (:func:`send`) that its target refused,
#: as its ``on_refused`` command gets it (its field ``refusal``):
#: ``{"key", "target": {"type", "id"}, "command", "data", "code",
#: "message"}``; ``code`` is the refusal's error code (``rejected``,
#: ``aggregate_not_found``, ...).
t.refusal = t.record(
    "Refusal",
    {
        "key": t.string,
        "target": _AGGREGATE_REF,
        "command": t.string,
        "data": t.any,
        "code": t.string,
        "message": t.string,
    },
)

# ---------------------------------------------------------------------------
# Rejections, events, decisions


class Rejection(Exception):
    """Why a command was refused; raise one from a handler (use
    :func:`invalid`, :func:`rejected`, :func:`forbidden`). Nothing is stored."""

    def __init__(self, kind: str, value: Any) -> None:
        if kind == "invalid":
            text = "; ".join(f"{f}: {m}" for f, m in value)
        else:
            text = str(value)
        super().__init__(text)
        #: ``invalid``, ``rejected``, ``forbidden`` or ``incompatible-state``.
        self.kind = kind
        #: ``[(field, message), ...]`` for ``invalid``, else the message
        #: (or the schema, for ``incompatible-state``).
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejection) and (self.kind, self.value) == (other.kind, other.value)

    def __hash__(self) -> int:
        return hash((self.kind, str(self.value)))

    def __repr__(self) -> str:
        return f"Rejection({self.kind!r}, {self.value!r})"


def invalid(field_or_errors: str | dict[str, str], message: Optional[str] = None) -> Rejection:
    """The command's data is invalid (HTTP 422 ``invalid_command``): one field
    and its message, or a dict of ``{field: message}``."""
    if isinstance(field_or_errors, str):
        errors = [(field_or_errors, str(message))]
    else:
        errors = [(f, str(m)) for f, m in field_or_errors.items()]
    return Rejection("invalid", errors)


def rejected(message: str) -> Rejection:
    """A domain rule refused the command (HTTP 422 ``rejected``)."""
    return Rejection("rejected", str(message))


def forbidden(message: str) -> Rejection:
    """The caller may not do this (HTTP 403 ``forbidden``)."""
    return Rejection("forbidden", str(message))


def event(event_type: str, data: Optional[dict] = None, **fields: Any) -> dict:
    """An event to emit: ``event("Deposited", amount=5)``."""
    return {"type": event_type, "data": {**(data or {}), **fields}}


@dataclass
class Decision:
    """Events to emit, a reply for the client (any JSON value) and timers to
    schedule or cancel (:func:`schedule`, :func:`cancel_timer`)."""

    events: list = field(default_factory=list)
    reply: Any = None
    has_reply: bool = False
    timers: list = field(default_factory=list)


def decision(*events: dict, reply: Any = ..., timers: Optional[list] = None) -> Decision:
    """Events and, if given, a reply and timer changes:
    ``decision(event(...), reply={"total": 5}, timers=[schedule(...)])``.
    ``decision(reply=...)`` changes nothing and only answers;
    ``decision(timers=[...])`` only changes timers."""
    timers = [] if timers is None else timers
    if reply is ...:
        return Decision(list(events), timers=timers)
    return Decision(list(events), reply, True, timers)


# ---------------------------------------------------------------------------
# Timers


def _timer_bug(key: str, what: str) -> PluginBug:
    return PluginBug(f"the timer `{key}` {what}")


@dataclass(frozen=True)
class ScheduleTimer:
    """A command for the host to send later, once: a durable timer, as
    :func:`schedule` makes it (and checks it)."""

    #: Names the timer among this aggregate's.
    key: str
    #: The command to send.
    command: str
    #: The command's data, encoded (JSON).
    data: bytes = b"{}"
    #: When to send it: this many milliseconds after the command's ``now``,
    after_ms: Optional[int] = None
    #: or at this instant (RFC 3339); exactly one of the two is set.
    at: Optional[str] = None
    #: ``(aggregate type, id)`` to send it to; ``None``: this aggregate.
    target: Optional[tuple] = None

    def __post_init__(self) -> None:
        _check_timer_key(self.key, self.command)
        if not isinstance(self.command, str):
            raise _timer_bug(
                self.key, f"has the command {self.command!r}: give `command`, the name of the command to send, as a str"
            )
        if self.after_ms is not None and self.at is not None:
            raise _timer_bug(self.key, "has both `after_ms` and `at`: give one of them")
        if self.after_ms is None and self.at is None:
            raise _timer_bug(
                self.key,
                "has no due time: give `after_ms` (milliseconds after the command's `now`) or `at` (an RFC 3339 time)",
            )
        if self.after_ms is not None:
            ms = self.after_ms
            if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
                raise _timer_bug(self.key, f"has `after_ms` {ms!r}: give a whole number of milliseconds, 0 or more")
            if ms > U64_MAX:
                raise _timer_bug(self.key, f"has `after_ms` {ms!r}: give at most 2**64 - 1 milliseconds")
        if self.at is not None and not isinstance(self.at, str):
            raise _timer_bug(
                self.key, f"has `at` {self.at!r}: give an RFC 3339 time as a str, e.g. '2026-12-01T09:00:00Z'"
            )
        if self.target is not None and not (
            isinstance(self.target, tuple) and len(self.target) == 2 and all(isinstance(x, str) for x in self.target)
        ):
            raise _timer_bug(
                self.key,
                "has a target without both a type and an id: give `target=(type, id)` (two strs), "
                "or leave it out to send the command to this aggregate",
            )
        if not isinstance(self.data, bytes):
            raise _timer_bug(self.key, "has data that is not JSON bytes: make the timer with schedule(...)")


@dataclass(frozen=True)
class CancelTimer:
    """Cancels this aggregate's pending timer ``key``, as
    :func:`cancel_timer` makes it."""

    #: The key the timer was scheduled with.
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise PluginBug(f"cancel_timer() takes the key of the timer to cancel, a str, not {self.key!r}")


def _check_timer_key(key: Any, command: Any) -> None:
    if not isinstance(key, str):
        which = f" for command `{command}`" if isinstance(command, str) else ""
        if key is None:
            raise PluginBug(f"a timer{which} has no key: give `key`, a str that names the timer")
        raise PluginBug(f"a timer{which} has the key {key!r}: give `key` as a str")


def schedule(
    key: str,
    command: str,
    data: Any = None,
    *,
    after_ms: Optional[int] = None,
    at: Optional[str] = None,
    target: Optional[tuple[str, str]] = None,
) -> ScheduleTimer:
    """Schedules a command for later: a durable timer. Pass the result in
    :func:`decision`'s ``timers``:
    ``decision(event(...), timers=[schedule("deadline", "expire", after_ms=60_000)])``.

    The host stores the timer in the same append as the decision's events
    (both are stored or neither is) and sends the command once, when it is
    due; one that comes due while no host runs is sent at the next start
    (the command's :attr:`Context.timer` tells). Scheduling a key that is
    still pending replaces that timer.

    - ``key`` names the timer among this aggregate's: 1-128 printable ASCII
      characters, without ``/`` or ``\\``.
    - ``command`` is the command to send: one of the target plugin's.
    - ``data`` is the command's data: any JSON value (``None``: ``{}``),
      written with :func:`stringify_json`, as a reply is.
    - ``after_ms``: send it this many milliseconds after the command's
      ``now`` (an ``int``, 0 or more); or ``at``: send it at this instant,
      RFC 3339 in UTC, as ``now`` is written (``"2026-12-01T09:00:00Z"``). Give exactly
      one.
    - ``target``: ``(aggregate type, id)`` to send it to (any type the host
      serves); ``None``: this aggregate.

    The host checks the key's syntax, the command's name and the time: a
    timer it refuses fails the command. A timer this function cannot build
    (no key, both or neither of ``after_ms`` and ``at``, a delay that is not
    a whole number of milliseconds, data that cannot be JSON, a target
    without a type or an id) is a bug in the plugin: it raises
    :class:`PluginBug`, and the command fails as ``plugin_failed``, with the
    reason in the host's log.
    """
    _check_timer_key(key, command)
    if isinstance(target, list):
        target = tuple(target)
    # Check everything else before encoding the data, so that the first
    # problem is reported whatever the data.
    checked = ScheduleTimer(key, command, b"{}", after_ms, at, target)
    try:
        raw = stringify_json({} if data is None else data).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise PluginBug(f"the data of timer `{key}` cannot be encoded as JSON: {e}") from None
    return ScheduleTimer(key, command, raw, checked.after_ms, checked.at, checked.target)


def send(key: str, type: str, id: str, command: str, data: Any = None) -> ScheduleTimer:
    """Sends ``command`` with ``data`` to the aggregate ``type``/``id`` at
    once: how a process manager sends commands. It is :func:`schedule` with
    ``after_ms=0`` and that target: the host stores it with the decision's
    events and sends it once, after they are stored. Pass the result in
    :func:`decision`'s ``timers``.

    If the target refuses it, the refusal comes back as the process
    manager's ``on_refused`` command, with the same ``key``; the events the
    command stores carry the key in their metadata (see :func:`timer_key`).
    """
    if isinstance(key, str) and not (isinstance(type, str) and isinstance(id, str)):
        raise PluginBug(
            f"the timer `{key}` has the type {type!r} and the id {id!r}: "
            "give `type` and `id`, two strs that name the aggregate to send the command to"
        )
    # schedule() says what is wrong with the key, the command or the data.
    return schedule(key, command, data, after_ms=0, target=(type, id))


def timer_key(event: Any) -> Optional[str]:
    """The key of the timer whose command stored a followed event
    (``event["metadata"]["timer"]["key"]``, see ``t.followed_event``):
    which of the commands a process manager sent (:func:`send`) it answers.
    ``None`` when no timer sent that command."""
    metadata = event.get("metadata") if isinstance(event, dict) else None
    timer = metadata.get("timer") if isinstance(metadata, dict) else None
    key = timer.get("key") if isinstance(timer, dict) else None
    return key if isinstance(key, str) else None


def cancel_timer(key: str) -> CancelTimer:
    """Cancels this aggregate's pending timer ``key`` (see :func:`schedule`);
    pass the result in :func:`decision`'s ``timers``. Nothing happens if no
    such timer is pending. Changes apply in order, so a cancel after a
    schedule of the same key in one decision cancels it."""
    return CancelTimer(key)


@dataclass(frozen=True)
class TimerFiring:
    """What :attr:`Context.timer` tells about a command a timer sent."""

    #: The timer's key.
    key: str
    #: When it was due, RFC 3339 UTC.
    due: str
    #: Whether it was sent more than a second after it was due (e.g.
    #: because no host ran then).
    late: bool
    #: The aggregate that scheduled it, ``<type>/<id>``.
    scheduled_by: str


_RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def trim(s: str) -> str:
    """Removes leading and trailing Unicode White_Space, exactly like Rust's
    ``str::trim`` (Python's own ``strip`` also removes U+001C..U+001F)."""
    return s.strip(_RUST_WHITESPACE)


class Context:
    """What a handler knows about the command besides its data."""

    def __init__(self, aggregate_id: str, version: int, metadata: Optional[list] = None) -> None:
        #: The id of the aggregate the command is for.
        self.aggregate_id = aggregate_id
        #: The aggregate's version before the command (0: it does not exist).
        self.version = version
        #: The host's metadata, as a dict.
        self.metadata: dict[str, str] = dict(metadata or [])

    @property
    def is_new(self) -> bool:
        """Whether the aggregate has no events yet."""
        return self.version == 0

    @property
    def now(self) -> Optional[str]:
        """When the host received the command (RFC 3339, UTC); plugins have no clock."""
        return self.metadata.get("now")

    @property
    def message_id(self) -> Optional[str]:
        """The command's message id (the client's idempotency key, or a UUID)."""
        return self.metadata.get("message-id")

    @property
    def correlation_id(self) -> Optional[str]:
        """The correlation id."""
        return self.metadata.get("correlation-id")

    @property
    def causation_id(self) -> Optional[str]:
        """The causation id."""
        return self.metadata.get("causation-id")

    @property
    def principal(self) -> Optional[str]:
        """Who sent the command, when the host authenticated the caller."""
        return self.metadata.get("principal")

    @property
    def timer(self) -> Optional[TimerFiring]:
        """When a timer sent this command (see :func:`schedule`): its key,
        when it was due, whether it was late and who scheduled it. ``None``
        when a client sent the command."""
        m = self.metadata
        if "timer-key" not in m or "timer-due" not in m or "scheduled-by" not in m:
            return None
        return TimerFiring(m["timer-key"], m["timer-due"], m.get("timer-late") == "true", m["scheduled-by"])


# ---------------------------------------------------------------------------
# Process managers

#: The instance keys without a parameter (see :func:`follow`).
INSTANCE_KEYS = ("aggregate-id", "correlation-id", "scheduled-by")

_INSTANCE_HELP = "give 'aggregate-id', 'correlation-id', 'scheduled-by' or data_field('name')"


@dataclass(frozen=True)
class DataField:
    """The instance key ``data_field(name)``: a top-level string field of
    the event's data names the instance; events without it are ignored."""

    #: The field's name.
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"data_field() takes the name of a field of the event's data, a str, not {self.name!r}")


def data_field(name: str) -> DataField:
    """The instance key that reads the instance's id from the top-level
    string field ``name`` of the event's data (see :func:`follow`)."""
    return DataField(name)


@dataclass(frozen=True)
class Follow:
    """An event type a process manager follows, and the command of its own
    that receives each, as :func:`follow` makes it (and checks it)."""

    #: The aggregate type that stores the event, e.g. ``bank-account``.
    aggregate_type: str
    #: The event type, e.g. ``Withdrawn``.
    event_type: str
    #: Which instance receives it: ``"aggregate-id"``, ``"correlation-id"``,
    #: ``"scheduled-by"`` or ``data_field(name)``.
    instance: str | DataField
    #: The command that receives it.
    command: str

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.aggregate_type, str) or not self.aggregate_type:
            problems.append(
                f"the aggregate type {self.aggregate_type!r}: give the type of the aggregate that stores "
                "the event, e.g. 'bank-account'"
            )
        if not isinstance(self.event_type, str) or not self.event_type:
            problems.append(f"the event type {self.event_type!r}: give the type of the event it follows, e.g. 'Withdrawn'")
        if not isinstance(self.instance, DataField) and not (
            isinstance(self.instance, str) and self.instance in INSTANCE_KEYS
        ):
            problems.append(f"the instance {self.instance!r}: {_INSTANCE_HELP}")
        if not isinstance(self.command, str):
            problems.append(f"the command {self.command!r}: give the name of the command that receives the event")
        if problems:
            raise ValueError("follow() has " + "; ".join(problems))


def follow(aggregate_type: str, event_type: str, instance: str | DataField, command: str) -> Follow:
    """Follows ``event_type`` of ``aggregate_type``: each such event arrives
    at one instance of the process manager as its command ``command``, with
    data ``{"event": ...}`` (``t.followed_event``). The command's mode says
    what the event does: ``create`` starts an instance (an event for one that
    exists is ignored), ``update`` continues one (an event for none is
    ignored), ``upsert`` either. ``instance`` says which instance gets it:

    - ``"aggregate-id"``: the id of the aggregate that stored the event (one
      instance per aggregate);
    - ``"correlation-id"``: the event's correlation id;
    - ``"scheduled-by"``: the instance whose command (:func:`send`) stored
      the event; events no instance of this type caused are ignored;
    - ``data_field("name")``: the top-level string field ``name`` of the
      event's data; events without it are ignored.

    A mistake in the arguments raises ``ValueError``; a ``command`` that is
    not one of the aggregate's commands is found by :meth:`Aggregate.world`.
    """
    return Follow(aggregate_type, event_type, instance, command)


@dataclass(frozen=True)
class ProcessInfo:
    """What a process manager declares, checked
    (:meth:`Aggregate.process_info`)."""

    #: The events it follows.
    follows: list
    #: Its command that receives refusals; ``None``: they are only logged.
    on_refused: Optional[str]
    #: Its own event types that finish an instance: once an instance has
    #: stored one, the host delivers it nothing more.
    finished_by: list = field(default_factory=list)


def _to_wit_instance_key(wit: Any, instance: str | DataField) -> Any:
    if isinstance(instance, DataField):
        return wit.InstanceKey_DataField(instance.name)
    return {
        "aggregate-id": wit.InstanceKey_AggregateId,
        "correlation-id": wit.InstanceKey_CorrelationId,
        "scheduled-by": wit.InstanceKey_ScheduledBy,
    }[instance]()


def _to_wit_process_info(wit: Any, info: ProcessInfo) -> Any:
    return wit.ProcessInfo(
        [
            wit.Follow(f.aggregate_type, f.event_type, _to_wit_instance_key(wit, f.instance), f.command)
            for f in info.follows
        ],
        info.on_refused,
        list(info.finished_by),
    )


# ---------------------------------------------------------------------------
# The aggregate


class PluginBug(Exception):
    """A mistake in the plugin rather than a refusal: the call traps and the
    host answers ``plugin_failed``."""


class Unreadable(Exception):
    """Stored state or events this plugin cannot read (``apply``'s error)."""


@dataclass
class Outcome:
    """What :meth:`Aggregate.handle_bytes` produced for an accepted command."""

    #: ``[(event type, JSON bytes), ...]``.
    events: list
    #: ``(schema, JSON bytes)`` after the events.
    state: tuple
    #: The reply as JSON bytes, or ``None``.
    reply: Optional[bytes]
    #: The timer changes, in order: :class:`ScheduleTimer` and
    #: :class:`CancelTimer`.
    timers: list = field(default_factory=list)


_MODES = ("create", "update", "upsert")


def _valid_name(name: str, dash: bool = True) -> bool:
    allowed = "_." + ("-" if dash else "")
    return (
        isinstance(name, str)
        and 0 < len(name) <= 64
        and name[0].isascii()
        and name[0].isalpha()
        and all(c.isascii() and (c.isalnum() or c in allowed) for c in name)
    )


class Aggregate:
    """An aggregate type: its facts, its state's fields, its commands and
    events. Declare commands and events with the :meth:`command` and
    :meth:`event` decorators, then export :meth:`world`."""

    def __init__(
        self,
        type: str,
        stream_prefix: str,
        state: dict[str, FieldType] | FieldType,
        state_schema: int = 1,
        initial_state: Any = None,
        follows: Optional[list[Follow]] = None,
        on_refused: Optional[str] = None,
        finished_by: Optional[list[str]] = None,
    ) -> None:
        problems = []
        if not _valid_name(type):
            problems.append("`type` must be 1-64 letters, digits, `-`, `_` or `.`, starting with a letter")
        if not _valid_name(stream_prefix, dash=False):
            problems.append(
                "`stream_prefix` must be 1-64 letters, digits, `_` or `.`, starting with a letter (no `-`)"
            )
        if not isinstance(state_schema, int) or state_schema < 0:
            problems.append("`state_schema` must be a whole number")
        if follows is not None:
            if not isinstance(follows, (list, tuple)):
                problems.append(f"`follows` must be a list of follow(...), not {builtins.type(follows).__name__}")
            else:
                for i, f in enumerate(follows):
                    if not isinstance(f, Follow):
                        problems.append(f"`follows[{i}]` must be made with follow(...), not {f!r}")
        if on_refused is not None and not isinstance(on_refused, str):
            problems.append(f"`on_refused` must be the name of a command, a str, not {on_refused!r}")
        if finished_by is not None:
            if not isinstance(finished_by, (list, tuple)):
                problems.append(
                    "`finished_by` must be a list of the names of event types, e.g. ['Completed'], "
                    f"not {builtins.type(finished_by).__name__}"
                )
            else:
                for i, e in enumerate(finished_by):
                    if not isinstance(e, str):
                        problems.append(f"`finished_by[{i}]` must be the name of an event type, a str, not {e!r}")
        if problems:
            raise ValueError("the aggregate definition is wrong: " + "; ".join(problems))
        #: The aggregate type.
        self.type = type
        #: Streams are named ``<stream_prefix>-<id>``.
        self.stream_prefix = stream_prefix
        #: The state encoding's version.
        self.state_schema = state_schema
        self._state_type = state if isinstance(state, FieldType) else t.record("State", state)
        self._initial = initial_state if initial_state is not None else self._state_type.zero()
        self._commands: dict[str, tuple[str, Optional[dict], Callable]] = {}
        self._events: dict[str, tuple[FieldType, Callable]] = {}
        #: Whether it is a process manager: it was given ``follows``,
        #: ``on_refused`` or ``finished_by``, and :meth:`world` also exports
        #: ``process``.
        self.is_process_manager = follows is not None or on_refused is not None or finished_by is not None
        self._follows: list[Follow] = list(follows or [])
        self._on_refused = on_refused
        self._finished_by: list[str] = list(finished_by or [])

    # -- declarations ------------------------------------------------------

    def command(
        self, name: str, mode: str, fields: Optional[dict[str, FieldType]] = None
    ) -> Callable[[Callable], Callable]:
        """Declares command ``name`` (mode ``create``, ``update`` or
        ``upsert``) with its ``fields``; decorates its handler
        ``(state, data, ctx) -> event | [events] | Decision | None``."""
        if not _valid_name(name):
            raise ValueError(f"command name `{name}` is not a valid name")
        if mode not in _MODES:
            raise ValueError(f"command `{name}` needs a mode: 'create', 'update' or 'upsert'")
        if name in self._commands:
            raise ValueError(f"command `{name}` is declared twice")

        def register(handler: Callable) -> Callable:
            self._commands[name] = (mode, fields, handler)
            return handler

        return register

    def event(self, event_type: str, fields: Optional[dict[str, FieldType]] = None) -> Callable[[Callable], Callable]:
        """Declares event type ``event_type`` with its ``fields``; decorates
        its apply function ``(state, data) -> new state`` (or ``None`` after
        changing ``state`` in place)."""
        if not _valid_name(event_type):
            raise ValueError(f"event type `{event_type}` is not a valid name")
        if event_type in self._events:
            raise ValueError(f"event type `{event_type}` is declared twice")

        def register(apply: Callable) -> Callable:
            self._events[event_type] = (t.record(event_type, fields or {}), apply)
            return apply

        return register

    def process_info(self) -> ProcessInfo:
        """What this process manager declares (its ``follows``,
        ``on_refused`` and ``finished_by``), after checking that every
        command they name is declared, and every event type in
        ``finished_by``. ``ValueError`` names each one that is not: a bug in
        the plugin. :meth:`world` calls it, so that the mistake stops the
        build."""
        problems = []
        for i, f in enumerate(self._follows):
            if f.command not in self._commands:
                problems.append(
                    f"`follows[{i}]` sends {f.aggregate_type}/{f.event_type} to `{f.command}`, "
                    "which is not a declared command"
                )
        if self._on_refused is not None and self._on_refused not in self._commands:
            problems.append(f"`on_refused` names `{self._on_refused}`, which is not a declared command")
        for i, e in enumerate(self._finished_by):
            if e not in self._events:
                problems.append(f"`finished_by[{i}]` names `{e}`, which is not a declared event type")
        if problems:
            raise ValueError(f"the process manager `{self.type}` is wrong: " + "; ".join(problems))
        return ProcessInfo(list(self._follows), self._on_refused, list(self._finished_by))

    def _check(self) -> None:
        if not self._commands:
            raise PluginBug("no commands: declare at least one with @aggregate.command")
        if not self._events:
            raise PluginBug("no events: declare at least one with @aggregate.event")

    # -- state and events --------------------------------------------------

    def encode_state(self, state: Any) -> tuple[int, bytes]:
        """``(schema, JSON bytes)`` of a state."""
        return self.state_schema, self._state_type.encode(state, "").encode("utf-8")

    def initial_state_bytes(self) -> tuple[int, bytes]:
        """The encoded state of an aggregate with no events."""
        return self.encode_state(self._initial)

    def decode_state(self, schema: int, data: bytes) -> Any:
        """A state from its bytes; empty bytes are the initial state.
        :class:`Rejection` ``incompatible-state`` if they do not read."""
        if len(data) == 0:
            data = self._state_type.encode(self._initial, "").encode("utf-8")
        elif schema != self.state_schema:
            raise Rejection("incompatible-state", schema)
        try:
            return self._state_type.decode(parse_json(data), "")
        except (ValueError, FieldProblem) as e:
            why = f"field `{e.field}`: {e.message}" if isinstance(e, FieldProblem) and e.field else str(e)
            log.warn(f"state of schema {schema} does not read as this plugin's state: {why}")
            raise Rejection("incompatible-state", schema) from None

    def _decode_event(self, event_type: str, data: bytes) -> dict:
        spec = self._events.get(event_type)
        if spec is None:
            raise ValueError("unknown event type")
        try:
            payload = parse_json(data) if data.strip() else {}
        except ValueError as e:
            raise ValueError(f"data is not valid JSON: {e}") from None
        try:
            return spec[0].decode({} if payload is None else payload, "")
        except FieldProblem as e:
            raise ValueError(f"field `{e.field}`: {e.message}" if e.field else e.message) from None

    def _apply_one(self, state: Any, event_type: str, data: dict) -> Any:
        new = self._events[event_type][1](state, data)
        return state if new is None else new

    # -- the exports, on plain bytes -----------------------------------------

    def apply_bytes(self, schema: int, state: bytes, events: list) -> tuple[int, bytes]:
        """Folds stored events ``[(event type, data bytes, version), ...]``
        into a state. :class:`Unreadable` names an event that cannot be read."""
        try:
            current = self.decode_state(schema, state)
        except Rejection:
            raise Unreadable(
                f"cannot read state of schema {schema} (this plugin reads schema {self.state_schema})"
            ) from None
        for event_type, data, version in events:
            try:
                decoded = self._decode_event(event_type, data)
            except ValueError as e:
                raise Unreadable(f"cannot read event {version} (`{event_type}`): {e}") from None
            current = self._apply_one(current, event_type, decoded)
        return self.encode_state(current)

    def handle_bytes(
        self, schema: int, state: bytes, command_type: str, data: bytes, ctx: Context
    ) -> Outcome:
        """Handles one command as the host calls it: decodes state and data,
        runs the handler, encodes and re-reads each event, applies it, and
        encodes the new state and reply. Raises :class:`Rejection` for a
        refusal and :class:`PluginBug` for a mistake in the plugin."""
        current = self.decode_state(schema, state)
        spec = self._commands.get(command_type)
        if spec is None:
            raise rejected(f"unknown command `{command_type}`")
        _mode, fields, handler = spec
        try:
            payload = self._decode_command(fields, data)
        except FieldProblem as e:
            raise Rejection("invalid", [(e.field, e.message)]) from None
        events, reply, has_reply, timers = self._normalize(handler(current, payload, ctx))
        encoded = []
        for ev in events:
            if not isinstance(ev, dict) or "type" not in ev:
                raise PluginBug("an event must be a dict {'type': ..., 'data': {...}}; use event(...)")
            event_type = ev["type"]
            if event_type not in self._events:
                raise PluginBug(f"it emitted the event type `{event_type}`, which is not declared")
            try:
                raw = self._events[event_type][0].encode(ev.get("data") or {}, "").encode("utf-8")
            except TypeError as e:
                raise PluginBug(f"the event `{event_type}` cannot be encoded: {e}") from None
            # Read the event back from its JSON, as a rebuild from the store
            # would, so the new state is exactly the rebuilt one.
            try:
                stored = self._decode_event(event_type, raw)
            except ValueError as e:
                raise PluginBug(f"the event `{event_type}` it just produced does not read back: {e}") from None
            current = self._apply_one(current, event_type, stored)
            encoded.append((event_type, raw))
        reply_bytes = stringify_json(reply).encode("utf-8") if has_reply else None
        return Outcome(encoded, self.encode_state(current), reply_bytes, self._check_timers(timers))

    @staticmethod
    def _decode_command(fields: Optional[dict[str, FieldType]], data: bytes) -> dict:
        if not data.strip():
            payload: Any = {}
        else:
            try:
                payload = parse_json(data)
            except ValueError as e:
                raise FieldProblem("", f"the command's data is not valid JSON: {e}") from None
        if fields is None:
            if payload is None or isinstance(payload, dict):
                return {}
            raise FieldProblem("", "the command's data must be a JSON object")
        if not isinstance(payload, dict):
            raise FieldProblem("", "the command's data must be a JSON object")
        return _decode_fields(fields, payload, "")

    @staticmethod
    def _normalize(result: Any) -> tuple[list, Any, bool, Any]:
        if result is None:
            return [], None, False, []
        if isinstance(result, Decision):
            return list(result.events), result.reply, result.has_reply, result.timers
        if isinstance(result, dict):
            return [result], None, False, []
        if isinstance(result, (list, tuple)):
            return list(result), None, False, []
        raise PluginBug(
            "a handler must return an event (event(...)), a list of events, a Decision, or None"
        )

    @staticmethod
    def _check_timers(timers: Any) -> list:
        """A decision's ``timers``, checked: a list of the changes that
        :func:`schedule` and :func:`cancel_timer` make."""
        if not isinstance(timers, (list, tuple)):
            raise PluginBug(
                f"`timers` must be a list of schedule(...) and cancel_timer(...), not {type(timers).__name__}"
            )
        for change in timers:
            if not isinstance(change, (ScheduleTimer, CancelTimer)):
                raise PluginBug(
                    f"each of `timers` must be made with schedule(...) or cancel_timer(...), not {change!r}"
                )
        return list(timers)

    # -- the component -----------------------------------------------------

    def world(self) -> type:
        """The class componentize-py exports: assign it to ``WitWorld`` in
        the plugin's main module. The WIT bindings are imported only when
        the host calls it, so the module also imports under CPython.

        For a process manager (an aggregate given ``follows``,
        ``on_refused`` or ``finished_by``), the class also has ``process``,
        the export of the ``process-manager`` world (build with
        ``componentize-py -w process-manager``); its declarations are
        checked here (:meth:`process_info`), so a command or event type they
        name that is not declared fails the module's import, and with it the
        build."""
        agg = self
        process_info = self.process_info() if self.is_process_manager else None

        class WitWorld:
            """The ``aggregate`` world, implemented by the SDK."""

            def describe(self) -> Any:
                from wit_world.imports import types as wit

                _trap_on_bug(agg.type, "describe", agg._check)
                return wit.Info(
                    agg.type,
                    agg.stream_prefix,
                    agg.state_schema,
                    [wit.CommandInfo(name, getattr(wit.CommandMode, mode.upper())) for name, (mode, _, _) in agg._commands.items()],
                    list(agg._events),
                )

            def initial_state(self) -> Any:
                from wit_world.imports import types as wit

                schema, data = _trap_on_bug(agg.type, "initial-state", agg.initial_state_bytes)
                return wit.State(schema, data)

            def apply(self, s: Any, events: list) -> Any:
                from componentize_py_types import Err
                from wit_world.imports import types as wit

                def run() -> tuple[int, bytes]:
                    try:
                        return agg.apply_bytes(
                            s.schema, s.bytes, [(e.event_type, e.data, e.version) for e in events]
                        )
                    except Unreadable as e:
                        raise Err(str(e)) from None

                schema, data = _trap_on_bug(agg.type, "apply", run)
                return wit.State(schema, data)

            def handle(self, s: Any, version: int, c: Any) -> Any:
                from componentize_py_types import Err
                from wit_world.imports import types as wit

                ctx = Context(c.aggregate_id, version, c.metadata)

                def run() -> Outcome:
                    try:
                        return agg.handle_bytes(s.schema, s.bytes, c.command_type, c.data, ctx)
                    except Rejection as r:
                        raise Err(_to_wit_rejection(wit, r)) from None

                out = _trap_on_bug(agg.type, f"command `{c.command_type}`", run)
                return wit.Decision(
                    [wit.NewEvent(name, data) for name, data in out.events],
                    wit.State(*out.state),
                    out.reply,
                    [_to_wit_timer_change(wit, change) for change in out.timers],
                )

        if process_info is not None:

            def process(self: Any) -> Any:
                """Which events it follows, where refusals go and which of its
                events finish an instance."""
                from wit_world.imports import types as wit

                return _trap_on_bug(agg.type, "process", lambda: _to_wit_process_info(wit, process_info))

            WitWorld.process = process
            WitWorld.__doc__ = "The ``process-manager`` world, implemented by the SDK."
        return WitWorld


def _to_wit_timer_change(wit: Any, change: ScheduleTimer | CancelTimer) -> Any:
    if isinstance(change, CancelTimer):
        return wit.TimerChange_Cancel(change.key)
    due = wit.Due_AfterMs(change.after_ms) if change.after_ms is not None else wit.Due_At(change.at)
    target = None if change.target is None else wit.AggregateRef(*change.target)
    return wit.TimerChange_Schedule(wit.Timer(change.key, target, change.command, change.data, due))


def _to_wit_rejection(wit: Any, r: Rejection) -> Any:
    if r.kind == "invalid":
        return wit.Rejection_Invalid([wit.FieldError(f, m) for f, m in r.value])
    if r.kind == "rejected":
        return wit.Rejection_Rejected(r.value)
    if r.kind == "forbidden":
        return wit.Rejection_Forbidden(r.value)
    return wit.Rejection_IncompatibleState(r.value)


def _trap_on_bug(type_: str, what: str, f: Callable[[], Any]) -> Any:
    """Runs ``f``; an ``Err`` (a refusal) passes through, any other exception
    is a bug in the plugin: it is logged with its traceback and re-raised,
    which traps the call (the host answers ``plugin_failed``)."""
    global _serving
    _serving = True
    try:
        return f()
    except Exception as e:
        if type(e).__name__ == "Err":
            raise
        _host_log("error", f"plugin `{type_}` failed in {what}: {e}\n{_traceback(e)}")
        raise


def _traceback(e: BaseException) -> str:
    """``e``'s traceback without source lines: reading those opens the
    source files, which traps in a component built with ``--stub-wasi``
    (and so would lose the message)."""
    lines = ["Traceback (most recent call last):"]
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        lines.append(f'  File "{frame.f_code.co_filename}", line {lineno}, in {frame.f_code.co_name}')
    lines.extend(line.rstrip("\n") for line in traceback.format_exception_only(type(e), e))
    return "\n".join(lines)
