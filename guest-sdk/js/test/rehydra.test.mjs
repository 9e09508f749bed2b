// Unit tests of the JavaScript SDK, under Node (no component needed):
//   npm test   (in guest-sdk/js)
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  Context,
  aggregate,
  cancelTimer,
  forbidden,
  formatFloat,
  invalid,
  parseJson,
  rejected,
  schedule,
  send,
  stringifyJson,
  t,
  timerKey,
  trim,
} from '../rehydra.js';

const enc = new TextEncoder();
const dec = new TextDecoder();
const bytes = (s) => enc.encode(s);
const json = (b) => parseJson(dec.decode(b));

test('parseJson keeps integers exact and tells them from floats', () => {
  assert.deepEqual(parseJson('{"a":1,"b":1.0,"c":[18446744073709551615,-9223372036854775808]}'), {
    a: 1n,
    b: 1,
    c: [18446744073709551615n, -9223372036854775808n],
  });
  // Beyond u64 / i64, and "-0", serde_json reads a float.
  assert.equal(typeof parseJson('18446744073709551616'), 'number');
  assert.equal(typeof parseJson('-9223372036854775809'), 'number');
  assert.ok(Object.is(parseJson('-0'), -0));
  assert.deepEqual(parseJson(' [ true , false , null , "x\\u00e9" ] '), [true, false, null, 'xé']);
  const proto = parseJson('{"__proto__":{"x":1}}');
  assert.deepEqual(Object.keys(proto), ['__proto__']);
  assert.equal(Object.getPrototypeOf(proto), Object.prototype);
  for (const bad of ['', '{', '[1,]', '01', '"\u0001"', '{"a" 1}', 'nul', '1 2']) {
    assert.throws(() => parseJson(bad), SyntaxError, bad);
  }
});

test('stringifyJson writes BigInts as integers and keeps key order', () => {
  assert.equal(stringifyJson({ b: 1n, a: [1, 1.5, 'x', null, true], u: undefined }), '{"b":1,"a":[1,1.5,"x",null,true]}');
  assert.equal(stringifyJson(1e20), '1e+20');
  assert.equal(stringifyJson(Number.NaN), 'null');
  const cyclic = {};
  cyclic.self = cyclic;
  assert.throws(() => stringifyJson(cyclic), TypeError);
});

test('formatFloat writes floats as the host does', () => {
  const cases = [
    [1, '1.0'],
    [1.5, '1.5'],
    [-0, '-0.0'],
    [100, '100.0'],
    [1e15, '1000000000000000.0'],
    [1e16, '1e+16'],
    [1.5e16, '1.5e+16'],
    [1e20, '1e+20'],
    [18446744073709551616, '1.8446744073709552e+19'],
    [1e-5, '0.00001'],
    [1.2345e-5, '0.000012345'],
    [1e-6, '1e-6'],
    [1e-7, '1e-7'],
    [123e-20, '1.23e-18'],
    [123456.789, '123456.789'],
    [5e-324, '5e-324'],
    [1.7976931348623157e308, '1.7976931348623157e+308'],
    [-1e15, '-1000000000000000.0'],
  ];
  for (const [x, want] of cases) assert.equal(formatFloat(x), want, String(x));
});

test('field types give serde\'s messages', () => {
  const err = (type, raw) => {
    try {
      type.decode(parseJson(raw), 'f');
    } catch (e) {
      return e.message;
    }
    return 'accepted';
  };
  assert.equal(err(t.u64, '"ten"'), 'invalid type: string "ten", expected u64');
  assert.equal(err(t.u64, '-5'), 'invalid value: integer `-5`, expected u64');
  assert.equal(err(t.u64, '1.0'), 'invalid type: floating point `1.0`, expected u64');
  assert.equal(err(t.u64, 'true'), 'invalid type: boolean `true`, expected u64');
  assert.equal(err(t.u64, 'null'), 'invalid type: null, expected u64');
  assert.equal(err(t.u64, '[]'), 'invalid type: sequence, expected u64');
  assert.equal(err(t.u64, '{}'), 'invalid type: map, expected u64');
  assert.equal(err(t.u64, '18446744073709551615'), 'accepted');
  assert.equal(err(t.u32, '4294967296'), 'invalid value: integer `4294967296`, expected u32');
  assert.equal(err(t.i64, '9223372036854775808'), 'invalid value: integer `9223372036854775808`, expected i64');
  assert.equal(err(t.string, '5'), 'invalid type: integer `5`, expected a string');
  assert.equal(err(t.bool, '"yes"'), 'invalid type: string "yes", expected a boolean');
  assert.equal(err(t.f64, '3'), 'accepted');
  assert.equal(err(t.list(t.u32), '{}'), 'invalid type: map, expected a sequence');
  assert.equal(err(t.optional(t.u32), 'null'), 'accepted');
  assert.equal(err(t.record('Address', { city: t.string }), '"x"'), 'invalid type: string "x", expected struct Address');
  // Strings are quoted as Rust's Debug quotes them.
  assert.equal(
    err(t.u64, '"a\\"b\\n\\u0001\\u0000\\u007f\\t\\r\\\\ é😀\'"'),
    'invalid type: string "a\\"b\\n\\u{1}\\0\\u{7f}\\t\\r\\\\ é😀\'", expected u64',
  );
  assert.equal(err(t.u64, '"e\\u0301\\u00a0\\ufeff\\ue000\\u2028\\u0378\\u0903"'),
    'invalid type: string "e\\u{301}\\u{a0}\\u{feff}\\u{e000}\\u{2028}\\u{378}ः", expected u64');
});

test('trim removes what Rust\'s str::trim removes', () => {
  assert.equal(trim(' \u00a0Bob\ufeff '), 'Bob\ufeff');
  assert.equal(trim('\u0085x\u0085'), 'x');
  assert.equal(trim('  '), '');
});

// A small aggregate exercising every part of the SDK.
const tab = aggregate({
  type: 'tab',
  streamPrefix: 'tab',
  stateSchema: 3,
  state: { table: t.u32, items: t.list(t.string), total: t.u64, paid: t.bool },
  commands: {
    open: {
      mode: 'create',
      fields: { table: t.u32 },
      handle: (_, { table }) => ({ type: 'Opened', data: { table } }),
    },
    order: {
      mode: 'update',
      fields: { item: t.string, price: t.u64, note: t.optional(t.string) },
      handle(state, { item, price }, ctx) {
        if (price === 0n) throw invalid('price', 'must be greater than 0');
        return {
          events: [{ type: 'Ordered', data: { item, price } }],
          reply: { total: state.total + price, version: ctx.version },
        };
      },
    },
    pay: {
      mode: 'update',
      handle(state, _, ctx) {
        if (state.paid) return { events: [], reply: ctx.version };
        if (!ctx.principal) throw forbidden('sign in to pay');
        return [{ type: 'Paid' }];
      },
    },
    refund: {
      mode: 'update',
      handle() {
        throw rejected('no refunds');
      },
    },
    broken: { mode: 'upsert', handle: () => ({ type: 'Exploded' }) },
  },
  events: {
    Opened: { fields: { table: t.u32 }, apply: (s, { table }) => ({ ...s, table }) },
    Ordered: {
      fields: { item: t.string, price: t.u64 },
      apply(s, { item, price }) {
        s.items.push(item);
        s.total += price;
      },
    },
    Paid: { apply: (s) => ({ ...s, paid: true }) },
    Refunded: { apply: (s) => s },
  },
});

const cmd = (commandType, data, metadata = [['principal', 'ann']]) => ({
  commandType,
  aggregateId: 't1',
  data: bytes(data),
  metadata,
});

/** Opens table 4 and orders two items; every decision. */
function session() {
  const s0 = tab.initialState();
  const open = tab.handle(s0, 0n, cmd('open', '{"table":4}'));
  const tea = tab.handle(open.state, 1n, cmd('order', '{"item":"tea","price":3}'));
  const cake = tab.handle(tea.state, 2n, cmd('order', '{"price":5,"item":"cake"}'));
  return [open, tea, cake];
}

test('describe lists what was declared', () => {
  assert.deepEqual(tab.describe(), {
    aggregateType: 'tab',
    streamPrefix: 'tab',
    stateSchema: 3,
    commands: [
      { name: 'open', mode: 'create' },
      { name: 'order', mode: 'update' },
      { name: 'pay', mode: 'update' },
      { name: 'refund', mode: 'update' },
      { name: 'broken', mode: 'upsert' },
    ],
    eventTypes: ['Opened', 'Ordered', 'Paid', 'Refunded'],
  });
});

test('the initial state is every field\'s zero value', () => {
  const s = tab.initialState();
  assert.equal(s.schema, 3);
  assert.equal(dec.decode(s.bytes), '{"table":0,"items":[],"total":0,"paid":false}');
});

test('handle emits events in declaration order, with the new state and a reply', () => {
  const [open, , cake] = session();
  assert.deepEqual(open.events.map((e) => [e.eventType, dec.decode(e.data)]), [['Opened', '{"table":4}']]);
  assert.equal(open.reply, undefined);
  assert.equal(dec.decode(cake.events[0].data), '{"item":"cake","price":5}');
  assert.equal(dec.decode(cake.state.bytes), '{"table":4,"items":["tea","cake"],"total":8,"paid":false}');
  assert.equal(dec.decode(cake.reply), '{"total":8,"version":2}');
});

test('the state after handle equals the state rebuilt from the events', () => {
  const decisions = session();
  const events = decisions.flatMap((d) => d.events).map((e, i) => ({ ...e, version: BigInt(i + 1), metadata: '{}' }));
  const rebuilt = tab.apply(tab.initialState(), events);
  assert.deepEqual(rebuilt, decisions[2].state);
});

test('bad data is a field error naming the field', () => {
  const s = session()[2].state;
  const rejection = (c, data) => {
    try {
      tab.handle(s, 3n, cmd(c, data));
    } catch (e) {
      return e;
    }
    return assert.fail('accepted');
  };
  assert.deepEqual(rejection('order', '{"price":2}'), { tag: 'invalid', val: [{ field: 'item', message: 'is required' }] });
  assert.deepEqual(rejection('order', '{"item":"x","price":0}'), {
    tag: 'invalid',
    val: [{ field: 'price', message: 'must be greater than 0' }],
  });
  // Present fields are checked in key order before missing ones.
  assert.deepEqual(rejection('order', '{"price":"x","note":5}'), {
    tag: 'invalid',
    val: [{ field: 'note', message: 'invalid type: integer `5`, expected a string' }],
  });
  assert.deepEqual(rejection('order', '[1]'), {
    tag: 'invalid',
    val: [{ field: '', message: "the command's data must be a JSON object" }],
  });
  assert.deepEqual(rejection('refund', '{}'), { tag: 'rejected', val: 'no refunds' });
  assert.deepEqual(rejection('tip', '{}'), { tag: 'rejected', val: 'unknown command `tip`' });
});

test('a command without fields takes a blank body, {} or null', () => {
  const s = session()[2].state;
  for (const body of ['', ' ', '{}', 'null', '{"extra":1}']) {
    const paid = tab.handle(s, 3n, cmd('pay', body));
    assert.equal(paid.events[0].eventType, 'Paid');
    assert.equal(dec.decode(paid.events[0].data), '{}');
  }
});

test('forbidden, and a no-op with a reply', () => {
  const s = session()[2].state;
  assert.deepEqual(
    (() => {
      try {
        return tab.handle(s, 3n, cmd('pay', '', []));
      } catch (e) {
        return e;
      }
    })(),
    { tag: 'forbidden', val: 'sign in to pay' },
  );
  const paid = tab.handle(s, 3n, cmd('pay', '')).state;
  const again = tab.handle(paid, 4n, cmd('pay', ''));
  assert.deepEqual(again.events, []);
  assert.equal(dec.decode(again.reply), '4');
  assert.deepEqual(again.state, paid);
});

test('state of another schema, or unreadable, is incompatible', () => {
  const other = { schema: 2, bytes: bytes('{"table":1}') };
  assert.throws(() => tab.handle(other, 1n, cmd('pay', '')), (e) => e.tag === 'incompatible-state' && e.val === 2);
  assert.throws(() => tab.apply(other, []), /schema 2/);
  const garbage = { schema: 3, bytes: bytes('{"tables":"many"}') };
  assert.throws(() => tab.handle(garbage, 1n, cmd('pay', '')), (e) => e.tag === 'incompatible-state' && e.val === 3);
  // Empty bytes are the initial state whatever the schema.
  assert.equal(tab.handle({ schema: 0, bytes: new Uint8Array() }, 0n, cmd('open', '{"table":1}')).events.length, 1);
});

test('apply names the event it cannot read', () => {
  const s = tab.initialState();
  assert.throws(
    () => tab.apply(s, [{ eventType: 'Spilled', data: bytes('{}'), version: 7n, metadata: '{}' }]),
    (e) => e === 'cannot read event 7 (`Spilled`): unknown event type',
  );
  assert.throws(
    () => tab.apply(s, [{ eventType: 'Ordered', data: bytes('{"item":"x"}'), version: 2n, metadata: '{}' }]),
    (e) => e === 'cannot read event 2 (`Ordered`): field `price`: is required',
  );
});

test('a bug in the plugin traps and is logged', () => {
  globalThis.rehydraLog.length = 0;
  assert.throws(() => tab.handle(tab.initialState(), 0n, cmd('broken', '{}')), Error);
  const [[level, message]] = globalThis.rehydraLog;
  assert.equal(level, 'error');
  assert.match(message, /`Exploded`, which is not declared/);
});

test('a wrong definition fails at build time with every problem', () => {
  assert.throws(
    () => aggregate({ type: 'x', streamPrefix: 'a-b', state: {}, commands: { go: { mode: 'sometimes' } }, events: {} }),
    (e) =>
      /streamPrefix/.test(e.message) &&
      /`go` needs a `mode`/.test(e.message) &&
      /`go` needs a `handle`/.test(e.message) &&
      /at least one event type/.test(e.message),
  );
});

test('the context reads the host\'s metadata', () => {
  const ctx = new Context('a1', 0n, [
    ['now', '2026-01-01T00:00:00Z'],
    ['message-id', 'm'],
    ['correlation-id', 'c'],
    ['causation-id', 'k'],
  ]);
  assert.equal(ctx.isNew, true);
  assert.equal(ctx.now, '2026-01-01T00:00:00Z');
  assert.deepEqual([ctx.messageId, ctx.correlationId, ctx.causationId, ctx.principal], ['m', 'c', 'k', undefined]);
});

test('json helper round trip', () => {
  assert.deepEqual(json(bytes('{"a":[1]}')), { a: [1n] });
});

test('a decision without timers has an empty list of them', () => {
  for (const d of session()) assert.deepEqual(d.timers, []);
  const s = session()[2].state;
  assert.deepEqual(tab.handle(s, 3n, cmd('pay', '')).timers, []);
});

// An aggregate whose handlers schedule and cancel timers. `reschedule`
// returns whatever `nextTimers` gives, for the malformed cases.
let nextTimers = () => [];
const shop = aggregate({
  type: 'shop-order',
  streamPrefix: 'shop_order',
  state: { placed: t.bool },
  commands: {
    place: {
      mode: 'create',
      fields: { customer: t.string },
      handle: (_, { customer }) => ({
        events: [{ type: 'Placed', data: { customer } }],
        reply: { ok: true },
        timers: [
          schedule({ key: 'payment-deadline', command: 'expire', afterMs: 30 * 60 * 1000 }),
          schedule({
            key: 'remind',
            command: 'send-reminder',
            data: { order: 't1', attempt: 1n },
            at: '2026-12-01T09:00:00Z',
            target: { type: 'customer', id: customer },
          }),
          cancelTimer('old'),
        ],
      }),
    },
    pay: {
      mode: 'update',
      handle: () => ({ events: [{ type: 'Paid' }], timers: [cancelTimer('payment-deadline')] }),
    },
    remind: { mode: 'update', handle: () => ({ timers: [schedule({ key: 'remind', command: 'remind', afterMs: 0 })] }) },
    reschedule: { mode: 'upsert', handle: () => ({ timers: nextTimers() }) },
  },
  events: {
    Placed: { fields: { customer: t.string }, apply: () => ({ placed: true }) },
    Paid: { apply: (s) => s },
  },
});

test('timers are in the decision in order, in the contract\'s shape', () => {
  const placed = shop.handle(shop.initialState(), 0n, cmd('place', '{"customer":"c7"}'));
  assert.deepEqual(placed.events.map((e) => e.eventType), ['Placed']);
  assert.equal(dec.decode(placed.reply), '{"ok":true}');
  assert.deepEqual(placed.timers, [
    {
      tag: 'schedule',
      val: {
        key: 'payment-deadline',
        target: undefined,
        commandType: 'expire',
        data: bytes('{}'),
        due: { tag: 'after-ms', val: 1800000n },
      },
    },
    {
      tag: 'schedule',
      val: {
        key: 'remind',
        target: { aggregateType: 'customer', aggregateId: 'c7' },
        commandType: 'send-reminder',
        data: bytes('{"order":"t1","attempt":1}'),
        due: { tag: 'at', val: '2026-12-01T09:00:00Z' },
      },
    },
    { tag: 'cancel', val: 'old' },
  ]);
  assert.ok(placed.timers[0].val.data instanceof Uint8Array);
  const paid = shop.handle(placed.state, 1n, cmd('pay', ''));
  assert.deepEqual(paid.timers, [{ tag: 'cancel', val: 'payment-deadline' }]);
  // Timers alone: no events, no reply.
  const reminded = shop.handle(paid.state, 2n, cmd('remind', ''));
  assert.deepEqual([reminded.events, reminded.reply], [[], undefined]);
  assert.deepEqual(reminded.timers, [
    { tag: 'schedule', val: { key: 'remind', target: undefined, commandType: 'remind', data: bytes('{}'), due: { tag: 'after-ms', val: 0n } } },
  ]);
});

test('schedule takes a BigInt delay and null for absent options', () => {
  const u64 = schedule({ key: 'k', command: 'c', afterMs: 18446744073709551615n, data: null, at: null, target: null });
  assert.deepEqual(u64, {
    tag: 'schedule',
    val: { key: 'k', target: undefined, commandType: 'c', data: bytes('{}'), due: { tag: 'after-ms', val: 18446744073709551615n } },
  });
  // Data is any JSON value, written as event data is.
  assert.equal(dec.decode(schedule({ key: 'k', command: 'c', at: 'x', data: [1.5, 'é'] }).val.data), '[1.5,"é"]');
});

test('a malformed timer fails the command, naming the timer and what is wrong', () => {
  const failure = (make) => {
    nextTimers = make;
    globalThis.rehydraLog.length = 0;
    assert.throws(() => shop.handle(shop.initialState(), 0n, cmd('reschedule', '')), /plugin `shop-order` failed in command `reschedule`/);
    const [[level, message]] = globalThis.rehydraLog;
    assert.equal(level, 'error');
    const prefix = 'plugin `shop-order` failed in command `reschedule`: ';
    assert.ok(message.startsWith(prefix), message);
    return message.slice(prefix.length).split('\n')[0];
  };
  const cyclic = {};
  cyclic.self = cyclic;
  const cases = [
    [() => [schedule({ command: 'expire', afterMs: 5 })], 'a timer for command `expire` has no key: give `key`, a string that names the timer'],
    [() => [schedule({ key: 7, command: 'expire', afterMs: 5 })], 'a timer for command `expire` has the key 7: give `key` as a string'],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: 5, at: '2026-12-01T09:00:00Z' })], 'the timer `k` has both `afterMs` and `at`: give one of them'],
    [() => [schedule({ key: 'k', command: 'expire' })], "the timer `k` has no due time: give `afterMs` (milliseconds after the command's `now`) or `at` (an RFC 3339 time)"],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: -1 })], 'the timer `k` has `afterMs` -1: give a whole number of milliseconds, 0 or more'],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: 1.5 })], 'the timer `k` has `afterMs` 1.5: give a whole number of milliseconds, 0 or more'],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: 2 ** 53 })], 'the timer `k` has `afterMs` 9007199254740992: give a whole number of milliseconds, 0 or more (beyond 2^53 - 1 a number is not exact: give a BigInt)'],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: 2n ** 64n })], 'the timer `k` has `afterMs` 18446744073709551616n: give at most 2^64 - 1 milliseconds'],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: -1n })], 'the timer `k` has `afterMs` -1n: give a whole number of milliseconds, 0 or more'],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: '5' })], 'the timer `k` has `afterMs` "5": give a whole number of milliseconds, 0 or more'],
    [() => [schedule({ key: 'k', command: 'expire', at: new Date(0) })], "the timer `k` has `at` an object: give an RFC 3339 time as a string, e.g. '2026-12-01T09:00:00Z'"],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: 5, data: { f: () => 1 } })], 'the data of timer `k` cannot be encoded as JSON: a function cannot be JSON'],
    [() => [schedule({ key: 'k', command: 'expire', afterMs: 5, data: cyclic })], 'the data of timer `k` cannot be encoded as JSON: a value refers to itself and cannot be JSON'],
    ...[{ type: 'customer' }, { id: 'c7' }, { aggregateType: 'customer', aggregateId: 'c7' }, 'customer/c7'].map((target) => [
      () => [schedule({ key: 'k', command: 'expire', afterMs: 5, target })],
      'the timer `k` has a target without both a type and an id: give `target: { type, id }` (two strings), or leave it out to send the command to this aggregate',
    ]),
    [() => [schedule({ key: 'k', afterMs: 5 })], 'the timer `k` has the command undefined: give `command`, the name of the command to send, as a string'],
    [() => [schedule({ key: 'k', command: 'expire', delay: 5 })], 'the timer `k` has the unknown option `delay`: give only `key`, `command`, `data`, `afterMs`, `at`, `target`'],
    [() => [schedule()], 'schedule() takes an object, { key, command, data, afterMs or at, target }, not undefined'],
    [() => [cancelTimer()], 'cancelTimer() takes the key of the timer to cancel, a string, not undefined'],
    [() => schedule({ key: 'k', command: 'expire', afterMs: 5 }), '`timers` must be an array of schedule(...) and cancelTimer(...), not an object'],
    [() => [{ tag: 'cancel', val: 'k' }], 'each of `timers` must be made with schedule(...) or cancelTimer(...), not an object'],
  ];
  for (const [make, want] of cases) assert.equal(failure(make), want);
  nextTimers = () => [];
});

test('the context tells when a timer sent the command', () => {
  assert.equal(new Context('a1', 1n, [['now', '2026-01-01T00:00:00Z']]).timer, undefined);
  const ctx = new Context('a1', 1n, [
    ['timer-key', 'remind'],
    ['timer-due', '2026-12-01T09:00:00Z'],
    ['timer-late', 'true'],
    ['scheduled-by', 'shop-order/t1'],
  ]);
  assert.deepEqual(ctx.timer, { key: 'remind', due: '2026-12-01T09:00:00Z', late: true, scheduledBy: 'shop-order/t1' });
});

// ---------------------------------------------------------------------------
// Process managers

/** A process manager's definition; `process` and `commands` replaced as given. */
function relay({ process, commands } = {}) {
  return {
    type: 'relay',
    streamPrefix: 'relay',
    state: { seen: t.u64, last: t.omittable(t.string) },
    commands: commands ?? {
      start: { mode: 'create', handle: () => ({ type: 'Started' }) },
      heard: {
        mode: 'upsert',
        fields: { event: t.followedEvent },
        handle: (s, { event }, ctx) => ({
          events: [{ type: 'Heard', data: { from: `${event.aggregate.type}/${event.aggregate.id}`, key: timerKey(event) ?? null } }],
          reply: { version: event.version, position: event.position, data: event.data, type: event.type, id: event.id },
          timers: [send({ key: `ack-${event.id}`, type: event.aggregate.type, id: event.aggregate.id, command: 'ack', data: { seen: s.seen + 1n } })],
        }),
      },
      refused: {
        mode: 'update',
        fields: { refusal: t.refusal },
        handle: (s, { refusal }) => ({
          events: [{
            type: 'Refused',
            data: { why: `${refusal.key}: ${refusal.target.type}/${refusal.target.id} refused ${refusal.command} (${refusal.code}): ${refusal.message}` },
          }],
          reply: refusal.data,
        }),
      },
    },
    events: {
      Started: { apply: (s) => s },
      Heard: {
        fields: { from: t.string, key: t.optional(t.string) },
        apply: (s, { from }) => ({ seen: s.seen + 1n, last: from }),
      },
      Refused: { fields: { why: t.string }, apply: (s, { why }) => ({ ...s, last: why }) },
    },
    process: process ?? {
      follows: [
        { aggregateType: 'bank-account', eventType: 'Opened', instance: 'aggregate-id', command: 'start' },
        { aggregateType: 'bank-account', eventType: 'Deposited', instance: 'correlation-id', command: 'heard' },
        { aggregateType: 'bank-account', eventType: 'Withdrawn', instance: 'scheduled-by', command: 'heard' },
        { aggregateType: 'order', eventType: 'Placed', instance: { dataField: 'customer' }, command: 'heard' },
      ],
      onRefused: 'refused',
      finishedBy: ['Refused'],
    },
  };
}

const pm = aggregate(relay());

test('process() gives the contract\'s process-info for each instance key', () => {
  assert.deepEqual(Object.keys(pm), ['describe', 'initialState', 'apply', 'handle', 'process']);
  assert.deepEqual(pm.process(), {
    follows: [
      { aggregateType: 'bank-account', eventType: 'Opened', instance: { tag: 'aggregate-id' }, command: 'start' },
      { aggregateType: 'bank-account', eventType: 'Deposited', instance: { tag: 'correlation-id' }, command: 'heard' },
      { aggregateType: 'bank-account', eventType: 'Withdrawn', instance: { tag: 'scheduled-by' }, command: 'heard' },
      { aggregateType: 'order', eventType: 'Placed', instance: { tag: 'data-field', val: 'customer' }, command: 'heard' },
    ],
    onRefused: 'refused',
    finishedBy: ['Refused'],
  });
  // Each call gives a fresh copy.
  pm.process().follows[0].instance.tag = 'changed';
  assert.equal(pm.process().follows[0].instance.tag, 'aggregate-id');
  pm.process().finishedBy.push('Heard');
  assert.deepEqual(pm.process().finishedBy, ['Refused']);
  // Without onRefused: option none; without finishedBy: no event type
  // finishes an instance; no follows at all is allowed too.
  assert.deepEqual(aggregate(relay({ process: { follows: [] } })).process(), { follows: [], onRefused: undefined, finishedBy: [] });
  assert.deepEqual(
    aggregate(relay({ process: { follows: [], onRefused: null, finishedBy: null } })).process(),
    { follows: [], onRefused: undefined, finishedBy: [] },
  );
  // Several event types, in the order given.
  assert.deepEqual(
    aggregate(relay({ process: { follows: [], finishedBy: ['Refused', 'Started'] } })).process(),
    { follows: [], onRefused: undefined, finishedBy: ['Refused', 'Started'] },
  );
  // A plain aggregate exports no `process`.
  assert.equal('process' in tab, false);
  // The aggregate's own exports are unchanged.
  assert.deepEqual(pm.describe().commands, [
    { name: 'start', mode: 'create' },
    { name: 'heard', mode: 'upsert' },
    { name: 'refused', mode: 'update' },
  ]);
});

test('a process that names an undeclared command or event type, or is malformed, fails at definition time', () => {
  const wrong = (process) => {
    try {
      aggregate(relay({ process }));
    } catch (e) {
      assert.match(e.message, /^the aggregate definition is wrong: /);
      return e.message.slice('the aggregate definition is wrong: '.length).split('; ');
    }
    return assert.fail('accepted');
  };
  const follow = (over) => ({ aggregateType: 'bank-account', eventType: 'Withdrawn', instance: 'scheduled-by', command: 'heard', ...over });
  assert.deepEqual(wrong({ follows: [follow({ command: 'debited' })], onRefused: 'refuse' }), [
    '`process.follows[0]` sends bank-account/Withdrawn to `debited`, which is not one of `commands`',
    '`process.onRefused` names `refuse`, which is not one of `commands`',
  ]);
  assert.deepEqual(wrong({ follows: [follow(), follow({ instance: 'id' })] }), [
    "`process.follows[1]` has the instance \"id\": give 'aggregate-id', 'correlation-id', 'scheduled-by' or { dataField: 'name' }",
  ]);
  for (const instance of [{ dataField: '' }, { dataField: 'a', extra: 1 }, { field: 'a' }, undefined, 7]) {
    assert.equal(wrong({ follows: [follow({ instance })] }).length, 1, String(instance));
  }
  assert.deepEqual(wrong({ follows: [follow({ aggregateType: '', eventType: undefined, command: 5, when: 1 })] }), [
    '`process.follows[0]` has the unknown option `when`: give only `aggregateType`, `eventType`, `instance`, `command`',
    "`process.follows[0]` needs an `aggregateType`: the type of the aggregate that stores the event, e.g. 'bank-account'",
    "`process.follows[0]` needs an `eventType`: the type of the event it follows, e.g. 'Withdrawn'",
    '`process.follows[0]` needs a `command`: the name of the command that receives the event',
  ]);
  assert.deepEqual(wrong({ follows: [], finishedBy: ['Refused', 'Completed', 'refused'] }), [
    '`process.finishedBy[1]` names `Completed`, which is not one of `events`',
    '`process.finishedBy[2]` names `refused`, which is not one of `events`',
  ]);
  assert.deepEqual(wrong({ follows: [], finishedBy: 'Refused' }), [
    "`process.finishedBy` must be an array of the names of event types, e.g. ['Completed'], not \"Refused\"",
  ]);
  assert.deepEqual(wrong({ follows: [], finishedBy: [5, { type: 'Refused' }] }), [
    '`process.finishedBy[0]` must be the name of an event type, a string, not 5',
    '`process.finishedBy[1]` must be the name of an event type, a string, not an object',
  ]);
  assert.deepEqual(wrong({ follows: 'all', onRefused: 5, onRefuse: 'refused' }), [
    '`process` has the unknown option `onRefuse`: give only `follows`, `onRefused`, `finishedBy`',
    '`process.follows` must be an array of { aggregateType, eventType, instance, command }, not "all"',
    '`process.onRefused` must be the name of a command, a string, not 5',
  ]);
  assert.deepEqual(wrong({ onRefused: 'refused' }), [
    '`process.follows` must be an array of { aggregateType, eventType, instance, command }, not undefined',
  ]);
  assert.deepEqual(wrong([]), ['`process` must be an object, { follows, onRefused, finishedBy }, not an array']);
  assert.deepEqual(wrong({ follows: [null] }), [
    '`process.follows[0]` must be an object, { aggregateType, eventType, instance, command }, not null',
  ]);
  // With the rest of the definition's problems, in one message.
  assert.throws(
    () => aggregate({ ...relay(), streamPrefix: 'a-b', process: { follows: [follow({ command: 'nope' })] } }),
    (e) => /streamPrefix/.test(e.message) && /to `nope`, which is not one of `commands`/.test(e.message),
  );
});

test('send is schedule with afterMs 0 and a target', () => {
  const sent = send({ key: 'debit', type: 'bank-account', id: 'a1', command: 'withdraw', data: { amount: 5n } });
  assert.deepEqual(sent, {
    tag: 'schedule',
    val: {
      key: 'debit',
      target: { aggregateType: 'bank-account', aggregateId: 'a1' },
      commandType: 'withdraw',
      data: bytes('{"amount":5}'),
      due: { tag: 'after-ms', val: 0n },
    },
  });
  assert.deepEqual(sent, schedule({ key: 'debit', command: 'withdraw', data: { amount: 5n }, afterMs: 0, target: { type: 'bank-account', id: 'a1' } }));
  assert.equal(dec.decode(send({ key: 'k', type: 'x', id: 'y', command: 'c' }).val.data), '{}');
  const bug = (message) => {
    try {
      send(message);
    } catch (e) {
      assert.equal(e.constructor.name, 'PluginBug');
      return e.message;
    }
    return assert.fail('accepted');
  };
  assert.equal(bug(undefined), 'send() takes an object, { key, type, id, command, data }, not undefined');
  assert.equal(bug({ type: 'x', id: 'y', command: 'c' }), 'a timer for command `c` has no key: give `key`, a string that names the timer');
  assert.equal(
    bug({ key: 'k', id: 'y', command: 'c' }),
    'the timer `k` has the type undefined and the id "y": give `type` and `id`, two strings that name the aggregate to send the command to',
  );
  assert.equal(bug({ key: 'k', type: 'x', id: 'y', command: 'c', afterMs: 5 }), 'the timer `k` has the unknown option `afterMs`: give only `key`, `type`, `id`, `command`, `data`');
  assert.equal(bug({ key: 'k', type: 'x', id: 'y' }), 'the timer `k` has the command undefined: give `command`, the name of the command to send, as a string');
});

const followedEvent = (metadata) => ({
  event: {
    aggregate: { type: 'bank-account', id: 'acc-1' },
    type: 'Withdrawn',
    version: 3,
    position: 18446744073709551615n,
    id: '0190a4c3-0000-7000-8000-000000000001',
    data: { amount: 5 },
    metadata,
  },
});

test('a followed event arrives as a command with data {event}', () => {
  const s0 = pm.initialState();
  assert.equal(dec.decode(s0.bytes), '{"seen":0}');
  const meta = { $correlationId: 'c1', timer: { key: 'debit', scheduledBy: 'relay/r1' }, plugin: 'bank-account' };
  const heard = pm.handle(s0, 0n, cmd('heard', stringifyJson(followedEvent(meta)), []));
  assert.deepEqual(heard.events.map((e) => [e.eventType, dec.decode(e.data)]), [['Heard', '{"from":"bank-account/acc-1","key":"debit"}']]);
  // version and position are BigInts, data any JSON.
  assert.equal(
    dec.decode(heard.reply),
    '{"version":3,"position":18446744073709551615,"data":{"amount":5},"type":"Withdrawn","id":"0190a4c3-0000-7000-8000-000000000001"}',
  );
  assert.deepEqual(heard.timers, [send({ key: 'ack-0190a4c3-0000-7000-8000-000000000001', type: 'bank-account', id: 'acc-1', command: 'ack', data: { seen: 1n } })]);
  // `last` is written once it is set (omittable), and read back.
  assert.equal(dec.decode(heard.state.bytes), '{"seen":1,"last":"bank-account/acc-1"}');
  // An event no timer caused has no timer key.
  const plain = pm.handle(s0, 0n, cmd('heard', stringifyJson(followedEvent({ $correlationId: 'c1' })), []));
  assert.equal(dec.decode(plain.events[0].data), '{"from":"bank-account/acc-1","key":null}');
  // What does not read as a followed event is a field error, as serde says it.
  const invalidEvent = (data) => {
    try {
      pm.handle(s0, 0n, cmd('heard', data, []));
    } catch (e) {
      return e;
    }
    return assert.fail('accepted');
  };
  assert.deepEqual(invalidEvent('{}'), { tag: 'invalid', val: [{ field: 'event', message: 'is required' }] });
  assert.deepEqual(invalidEvent('{"event":{"aggregate":{"type":"x"},"version":"3"}}'), {
    tag: 'invalid',
    val: [{ field: 'event.aggregate.id', message: 'is required' }],
  });
  assert.deepEqual(invalidEvent('{"event":[]}'), {
    tag: 'invalid',
    val: [{ field: 'event', message: 'invalid type: sequence, expected struct FollowedEvent' }],
  });
  const noMetadata = followedEvent(null);
  delete noMetadata.event.metadata;
  assert.deepEqual(invalidEvent(stringifyJson(noMetadata)), { tag: 'invalid', val: [{ field: 'event.metadata', message: 'is required' }] });
});

test('a refusal arrives as the onRefused command with data {refusal}', () => {
  const started = pm.handle(pm.initialState(), 0n, cmd('start', '', []));
  const refusal = {
    refusal: {
      key: 'credit',
      target: { type: 'bank-account', id: 'acc-2' },
      command: 'deposit',
      data: { amount: 5 },
      code: 'rejected',
      message: 'account is closed',
    },
  };
  const refused = pm.handle(started.state, 1n, cmd('refused', stringifyJson(refusal), []));
  assert.deepEqual(refused.events.map((e) => [e.eventType, dec.decode(e.data)]), [
    ['Refused', '{"why":"credit: bank-account/acc-2 refused deposit (rejected): account is closed"}'],
  ]);
  assert.equal(dec.decode(refused.reply), '{"amount":5}');
  delete refusal.refusal.code;
  assert.throws(
    () => pm.handle(started.state, 1n, cmd('refused', stringifyJson(refusal), [])),
    (e) => e.tag === 'invalid' && e.val[0].field === 'refusal.code' && e.val[0].message === 'is required',
  );
  // The state after handle is the state rebuilt from the events.
  const events = [...started.events, ...refused.events].map((e, i) => ({ ...e, version: BigInt(i + 1), metadata: '' }));
  assert.deepEqual(pm.apply(pm.initialState(), events), refused.state);
});

test('timerKey reads metadata.timer.key, if it is a string', () => {
  assert.equal(timerKey({ metadata: { timer: { key: 'debit' } } }), 'debit');
  for (const event of [{ metadata: {} }, { metadata: { timer: { key: 5 } } }, { metadata: { timer: 'debit' } }, { metadata: null }, {}, null, undefined]) {
    assert.equal(timerKey(event), undefined, stringifyJson(event ?? null));
  }
});

test('an omittable field is left out when null and reads back as null', () => {
  const type = t.record('S', { a: t.u32, b: t.omittable(t.string) });
  assert.equal(type.encode({ a: 1, b: null }, ''), '{"a":1}');
  assert.equal(type.encode({ a: 1 }, ''), '{"a":1}');
  assert.equal(type.encode({ a: 1, b: 'x' }, ''), '{"a":1,"b":"x"}');
  assert.deepEqual(type.decode(parseJson('{"a":1}'), ''), { a: 1, b: null });
  assert.deepEqual(type.decode(parseJson('{"a":1,"b":null}'), ''), { a: 1, b: null });
  assert.equal(type.zero.b, null);
});
