/**
 * Rehydra guest SDK for JavaScript.
 *
 * Write an event-sourced aggregate as plain JavaScript: declare what the
 * plugin is (aggregate type, stream prefix, state schema), the fields of
 * its state, one handler per command and one `apply` per event. The SDK does
 * the rest of the `aggregate` world of `rehydra:aggregate@0.3.0` (and of
 * its `process-manager` world): JSON in and out, field errors, rejections,
 * durable timers, and computing the new state from the events exactly as a
 * rebuild from the store would.
 *
 * ```js
 * import { aggregate, t, rejected } from './rehydra.js';
 *
 * export const { describe, initialState, apply, handle } = aggregate({
 *   type: 'counter',
 *   streamPrefix: 'counter',
 *   state: { total: t.u64 },
 *   commands: {
 *     add: { mode: 'upsert', fields: { by: t.u64 },
 *            handle: (state, { by }) => ({ type: 'Added', data: { by } }) },
 *   },
 *   events: {
 *     Added: { fields: { by: t.u64 }, apply: (s, { by }) => ({ total: s.total + by }) },
 *   },
 * });
 * ```
 *
 * Numbers follow the component model's JavaScript conventions: 64-bit
 * integer fields (`t.u64`, `t.i64`) are `BigInt`s, so no amount ever loses
 * precision; 32-bit integers and `t.f64` are ordinary numbers.
 *
 * The behaviour mirrors the Rust SDK (`rehydra-guest`) message for message:
 * a missing field "is required", a value of the wrong type gets serde's
 * wording ("invalid type: string \"ten\", expected u64"), and so on, so that
 * the same plugin written in either language answers alike.
 *
 * A handler may also schedule commands for later, and cancel them: return
 * `{ events, reply, timers: [...] }` with {@link schedule} and
 * {@link cancelTimer}. The host stores the timers with the events, both or
 * neither, and sends each command once when it is due:
 *
 * ```js
 * place: { mode: 'create', handle: (state, data, ctx) => ({
 *   events: [{ type: 'Placed', data }],
 *   timers: [schedule({ key: 'payment-deadline', command: 'expire', afterMs: 30 * 60 * 1000 })],
 * }) },
 * pay: { mode: 'update', handle: () => ({ events: [{ type: 'Paid' }], timers: [cancelTimer('payment-deadline')] }) },
 * ```
 *
 * A process manager is an aggregate that also follows other aggregates'
 * events and sends them commands: give `aggregate()` a `process`
 * (`{ follows: [{ aggregateType, eventType, instance, command }],
 * onRefused, finishedBy }`), export `process` too, send commands with
 * {@link send}, and build with `build.mjs --world process-manager`. Each
 * followed event arrives as the command `command` with data `{ event }`
 * ({@link t.followedEvent}); a refusal of a command it sent, as `onRefused`
 * with data `{ refusal }` ({@link t.refusal}). Once an instance has stored
 * one of the event types in `finishedBy`, it is finished: the host delivers
 * it nothing more.
 *
 * An event's `apply` gets its data only. The metadata the host stored with
 * it arrives as one JSON string (`metadata` of each event passed to the
 * exported `apply`), which the SDK leaves unparsed: rehydration never pays
 * for it. A command's metadata is the handler's `ctx`.
 *
 * Build a component with `build.mjs` beside this file (componentize-js).
 * The component imports nothing but the world's `log` function: console
 * output goes to the host's log through it.
 *
 * @module rehydra
 */

import hostLog from 'log';

import { ESCAPED_RANGES } from './printable.js';

// ---------------------------------------------------------------------------
// Logging

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];

/** Renders console arguments the way people expect to read them. */
function render(args) {
  return args
    .map((a) => {
      if (typeof a === 'string') return a;
      if (a instanceof Error) return a.stack ? `${a}\n${a.stack}` : String(a);
      try {
        return stringifyJson(a);
      } catch {
        return String(a);
      }
    })
    .join(' ');
}

/**
 * Writes to the host's log, tagged with the plugin's name. `level` is one of
 * `trace`, `debug`, `info`, `warn`, `error`.
 *
 * @param {'trace'|'debug'|'info'|'warn'|'error'} level
 * @param {...unknown} args what to write; non-strings are shown as JSON
 */
export function log(level, ...args) {
  if (!LEVELS.includes(level)) level = 'info';
  hostLog(level, render(args));
}

for (const level of LEVELS) {
  log[level] = (...args) => log(level, ...args);
}

// A plugin has no stdout or stderr: inside the component, console output
// goes to the host's log. (Under Node, for tests, the console stays.)
if (typeof globalThis.process === 'undefined') globalThis.console = {
  trace: log.trace,
  debug: log.debug,
  log: log.info,
  info: log.info,
  warn: log.warn,
  error: log.error,
};

// ---------------------------------------------------------------------------
// JSON with lossless integers

const U64_MAX = (1n << 64n) - 1n;
const I64_MIN = -(1n << 63n);
const I64_MAX = (1n << 63n) - 1n;

const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
const STRING = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;
const WHITESPACE = /[ \t\n\r]*/y;

/**
 * Parses JSON text the way the host (serde_json) reads it: an integer
 * literal that fits a u64 or an i64 becomes a `BigInt`; any other number
 * (with a fraction or exponent, or too large) becomes a `Number`. So
 * `1` and `1.0` stay distinguishable, and no integer is rounded.
 *
 * @param {string} text
 * @returns {unknown}
 */
export function parseJson(text) {
  let pos = 0;
  const fail = (what) => {
    throw new SyntaxError(`${what} at offset ${pos}`);
  };
  const skip = () => {
    WHITESPACE.lastIndex = pos;
    WHITESPACE.exec(text);
    pos = WHITESPACE.lastIndex;
  };
  const expect = (ch) => {
    skip();
    if (text[pos] !== ch) fail(`expected \`${ch}\``);
    pos += 1;
  };
  const string = () => {
    STRING.lastIndex = pos;
    const m = STRING.exec(text);
    if (!m) fail('invalid string');
    pos = STRING.lastIndex;
    return JSON.parse(m[0]);
  };
  const value = (depth) => {
    if (depth > 128) fail('nested too deeply');
    skip();
    const ch = text[pos];
    if (ch === '{') {
      pos += 1;
      const obj = {};
      skip();
      if (text[pos] === '}') {
        pos += 1;
        return obj;
      }
      for (;;) {
        skip();
        const key = string();
        expect(':');
        setKey(obj, key, value(depth + 1));
        skip();
        if (text[pos] === ',') {
          pos += 1;
        } else if (text[pos] === '}') {
          pos += 1;
          return obj;
        } else {
          fail('expected `,` or `}`');
        }
      }
    }
    if (ch === '[') {
      pos += 1;
      const arr = [];
      skip();
      if (text[pos] === ']') {
        pos += 1;
        return arr;
      }
      for (;;) {
        arr.push(value(depth + 1));
        skip();
        if (text[pos] === ',') {
          pos += 1;
        } else if (text[pos] === ']') {
          pos += 1;
          return arr;
        } else {
          fail('expected `,` or `]`');
        }
      }
    }
    if (ch === '"') return string();
    for (const [word, v] of [
      ['true', true],
      ['false', false],
      ['null', null],
    ]) {
      if (text.startsWith(word, pos)) {
        pos += word.length;
        return v;
      }
    }
    NUMBER.lastIndex = pos;
    const m = NUMBER.exec(text);
    if (!m) fail('expected a JSON value');
    pos = NUMBER.lastIndex;
    return numberFromLiteral(m[0], m[1] === undefined && m[2] === undefined);
  };
  const result = value(0);
  skip();
  if (pos !== text.length) fail('trailing characters');
  return result;
}

/** A number literal as serde_json reads it (see {@link parseJson}). */
function numberFromLiteral(literal, integral) {
  if (integral && literal !== '-0') {
    const n = BigInt(literal);
    if (n >= 0n ? n <= U64_MAX : n >= I64_MIN) return n;
  }
  return Number(literal);
}

/** Sets `obj[key]` even for the key `__proto__`. */
function setKey(obj, key, v) {
  if (key === '__proto__') {
    Object.defineProperty(obj, key, { value: v, enumerable: true, writable: true, configurable: true });
  } else {
    obj[key] = v;
  }
}

/**
 * Writes a value as compact JSON: `BigInt`s as integers, integral numbers as
 * integers, other finite numbers in the host's float notation (`1.5`,
 * `1e+20`), non-finite numbers as `null`. Keys keep their insertion order;
 * `undefined` members are left out. Throws on values JSON cannot hold
 * (functions, symbols, cycles).
 *
 * @param {unknown} v
 * @returns {string}
 */
export function stringifyJson(v) {
  return writeValue(v, new Set());
}

function writeValue(v, seen) {
  switch (typeof v) {
    case 'bigint':
      return v.toString();
    case 'number':
      if (Number.isSafeInteger(v)) return String(v === 0 ? 0 : v);
      return Number.isFinite(v) ? formatFloat(v) : 'null';
    case 'string':
      return JSON.stringify(v);
    case 'boolean':
      return v ? 'true' : 'false';
    case 'undefined':
      return 'null';
    case 'object': {
      if (v === null) return 'null';
      if (seen.has(v)) throw new TypeError('a value refers to itself and cannot be JSON');
      seen.add(v);
      let out;
      if (Array.isArray(v)) {
        out = `[${v.map((x) => writeValue(x, seen)).join(',')}]`;
      } else {
        const parts = [];
        for (const [k, x] of Object.entries(v)) {
          if (x !== undefined) parts.push(`${JSON.stringify(k)}:${writeValue(x, seen)}`);
        }
        out = `{${parts.join(',')}}`;
      }
      seen.delete(v);
      return out;
    }
    default:
      throw new TypeError(`a ${typeof v} cannot be JSON`);
  }
}

/**
 * Formats a float as the host does in messages and JSON: the shortest
 * digits that read back as the same number, in plain notation with at least
 * one decimal (`100.0`, `0.00001`) when the decimal exponent is within
 * -5..=15, otherwise in exponent notation (`1e+16`, `1.5e-7`).
 *
 * @param {number} x
 * @returns {string}
 */
export function formatFloat(x) {
  if (Number.isNaN(x)) return 'NaN';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  const sign = x < 0 || Object.is(x, -0) ? '-' : '';
  if (x === 0) return `${sign}0.0`;
  const [mantissa, exponent] = Math.abs(x).toExponential().split('e');
  const digits = mantissa.replace('.', '');
  const e = Number(exponent);
  if (e >= -5 && e <= 15) {
    if (e < 0) return `${sign}0.${'0'.repeat(-e - 1)}${digits}`;
    const whole = e + 1;
    if (digits.length <= whole) return `${sign}${digits}${'0'.repeat(whole - digits.length)}.0`;
    return `${sign}${digits.slice(0, whole)}.${digits.slice(whole)}`;
  }
  const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${m}e${e < 0 ? '-' : '+'}${Math.abs(e)}`;
}

// ---------------------------------------------------------------------------
// Field types

/** A field of a command or event that does not fit its declared type. */
class FieldProblem extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

/**
 * Whether Rust's `Debug` for `str` writes code point `c` as `\u{..}`:
 * everything not printable (control, format, private use, unassigned,
 * separators other than the space) and every grapheme extender. The table
 * is generated (guest-sdk/tools/gen-printable.mjs), so that the answer does
 * not depend on the engine's Unicode data — SpiderMonkey in a component
 * has none.
 */
function isEscaped(c) {
  let lo = 0;
  let hi = ESCAPED_RANGES.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const [first, last] = ESCAPED_RANGES[mid];
    if (c < first) hi = mid - 1;
    else if (c > last) lo = mid + 1;
    else return true;
  }
  return false;
}

/** A string as Rust's `{:?}` shows it, quotes included. */
function debugString(s) {
  let out = '"';
  for (const ch of s) {
    switch (ch) {
      case '\0':
        out += '\\0';
        break;
      case '\t':
        out += '\\t';
        break;
      case '\r':
        out += '\\r';
        break;
      case '\n':
        out += '\\n';
        break;
      case '\\':
        out += '\\\\';
        break;
      case '"':
        out += '\\"';
        break;
      default:
        if (isEscaped(ch.codePointAt(0))) {
          out += `\\u{${ch.codePointAt(0).toString(16)}}`;
        } else {
          out += ch;
        }
    }
  }
  return `${out}"`;
}

/** What serde calls the value it did not expect. */
function unexpected(v) {
  switch (typeof v) {
    case 'bigint':
      return `integer \`${v}\``;
    case 'number':
      return `floating point \`${formatFloat(v)}\``;
    case 'string':
      return `string ${debugString(v)}`;
    case 'boolean':
      return `boolean \`${v}\``;
    default:
      if (v === null || v === undefined) return 'null';
      return Array.isArray(v) ? 'sequence' : 'map';
  }
}

function invalidType(path, v, expected) {
  return new FieldProblem(path, `invalid type: ${unexpected(v)}, expected ${expected}`);
}

/** Compares strings by code point, the order of the host's JSON maps. */
function byCodePoint(a, b) {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i += 1) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

function isObject(v) {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

const join = (path, name) => (path ? `${path}.${name}` : name);

/**
 * Decodes the declared `fields` of `obj` as a Rust struct deserializes:
 * present fields in key order (the first bad one wins), then missing ones
 * in declaration order ("is required", unless optional). Other keys are
 * ignored.
 */
function decodeFields(fields, obj, path) {
  const out = {};
  const present = Object.keys(obj)
    .filter((k) => Object.hasOwn(fields, k))
    .sort(byCodePoint);
  for (const key of present) {
    out[key] = fields[key].decode(obj[key], join(path, key));
  }
  for (const [key, type] of Object.entries(fields)) {
    if (Object.hasOwn(out, key)) continue;
    if (!type.optional) throw new FieldProblem(join(path, key), 'is required');
    out[key] = null;
  }
  return out;
}

/** Encodes the declared `fields` of `obj`, in declaration order. */
function encodeFields(fields, obj, path) {
  if (!isObject(obj)) throw new TypeError(`${path || 'the value'} must be an object`);
  const parts = [];
  for (const [key, type] of Object.entries(fields)) {
    const v = obj[key];
    if ((v === undefined || v === null) && type.omitNull) continue;
    if ((v === undefined || v === null) && !type.optional) {
      throw new TypeError(`field \`${join(path, key)}\` is missing`);
    }
    parts.push(`${JSON.stringify(key)}:${type.encode(v, join(path, key))}`);
  }
  return `{${parts.join(',')}}`;
}

function integer(name, min, max, big) {
  return {
    expected: name,
    zero: big ? 0n : 0,
    decode(v, path) {
      if (typeof v !== 'bigint') throw invalidType(path, v, name);
      if (v < min || v > max) throw new FieldProblem(path, `invalid value: integer \`${v}\`, expected ${name}`);
      return big ? v : Number(v);
    },
    encode(v, path) {
      let n = v;
      if (typeof v === 'number' && Number.isSafeInteger(v)) n = BigInt(v);
      if (typeof n !== 'bigint' || n < min || n > max) {
        throw new TypeError(`field \`${path}\` must be a ${name}, not ${stringifyJson(v)}`);
      }
      return n.toString();
    },
  };
}

/**
 * Field types. Each one decodes a JSON value (with the host's error
 * messages) and encodes one back.
 */
export const t = {
  /** A string. */
  string: {
    expected: 'a string',
    zero: '',
    decode(v, path) {
      if (typeof v !== 'string') throw invalidType(path, v, 'a string');
      return v;
    },
    encode(v, path) {
      if (typeof v !== 'string') throw new TypeError(`field \`${path}\` must be a string`);
      return JSON.stringify(v);
    },
  },
  /** `true` or `false`. */
  bool: {
    expected: 'a boolean',
    zero: false,
    decode(v, path) {
      if (typeof v !== 'boolean') throw invalidType(path, v, 'a boolean');
      return v;
    },
    encode(v, path) {
      if (typeof v !== 'boolean') throw new TypeError(`field \`${path}\` must be a boolean`);
      return v ? 'true' : 'false';
    },
  },
  /** An unsigned 64-bit integer, as a `BigInt`. */
  u64: integer('u64', 0n, U64_MAX, true),
  /** A signed 64-bit integer, as a `BigInt`. */
  i64: integer('i64', I64_MIN, I64_MAX, true),
  /** An unsigned 32-bit integer, as a number. */
  u32: integer('u32', 0n, 0xffff_ffffn, false),
  /** A signed 32-bit integer, as a number. */
  i32: integer('i32', -(2n ** 31n), 2n ** 31n - 1n, false),
  /** A 64-bit float, as a number; integers are accepted too. */
  f64: {
    expected: 'f64',
    zero: 0,
    decode(v, path) {
      if (typeof v === 'bigint') return Number(v);
      if (typeof v !== 'number') throw invalidType(path, v, 'f64');
      return v;
    },
    encode(v, path) {
      const n = typeof v === 'bigint' ? Number(v) : v;
      if (typeof n !== 'number') throw new TypeError(`field \`${path}\` must be a number`);
      return Number.isFinite(n) ? formatFloat(n) : 'null';
    },
  },
  /** Any JSON value, unchecked (integers as `BigInt`s). */
  any: {
    expected: 'any value',
    zero: null,
    decode: (v) => v,
    encode: (v) => stringifyJson(v),
  },
  /**
   * `null` or `type`; a missing field reads as `null`.
   *
   * @param {object} type
   */
  optional(type) {
    return {
      expected: type.expected,
      optional: true,
      zero: null,
      decode: (v, path) => (v === null || v === undefined ? null : type.decode(v, path)),
      encode: (v, path) => (v === null || v === undefined ? 'null' : type.encode(v, path)),
    };
  },
  /**
   * Like {@link t.optional}, but a `null` value is left out of the JSON
   * instead of written as `null`: Rust's `Option` field with
   * `#[serde(default, skip_serializing_if = "Option::is_none")]`. A missing
   * field reads as `null`.
   *
   * @param {object} type
   */
  omittable(type) {
    return { ...t.optional(type), omitNull: true };
  },
  /**
   * An array of `type`.
   *
   * @param {object} type
   */
  list(type) {
    return {
      expected: 'a sequence',
      get zero() {
        return [];
      },
      decode(v, path) {
        if (!Array.isArray(v)) throw invalidType(path, v, 'a sequence');
        return v.map((x, i) => type.decode(x, `${path}[${i}]`));
      },
      encode(v, path) {
        if (!Array.isArray(v)) throw new TypeError(`field \`${path}\` must be an array`);
        return `[${v.map((x, i) => type.encode(x, `${path}[${i}]`)).join(',')}]`;
      },
    };
  },
  /**
   * An object with the given fields; `name` is used in messages
   * ("expected struct Address").
   *
   * @param {string} name
   * @param {Record<string, object>} fields
   */
  record(name, fields) {
    return {
      expected: `struct ${name}`,
      fields,
      get zero() {
        return zeroOf(fields);
      },
      decode(v, path) {
        if (!isObject(v)) throw invalidType(path, v, `struct ${name}`);
        return decodeFields(fields, v, path);
      },
      encode: (v, path) => encodeFields(fields, v, path),
    };
  },
};

const aggregateRef = t.record('AggregateRef', { type: t.string, id: t.string });

/**
 * An event a process manager follows, as the command that receives it gets
 * it (its field `event`; see {@link aggregate}'s `process`):
 * `{ aggregate: { type, id }, type, version, position, id, data, metadata }`,
 * with `version` and `position` as `BigInt`s and `data` and `metadata` as
 * any JSON (the event's metadata parsed: `metadata.timer.key` is the key of
 * the timer whose command stored the event, see {@link timerKey}).
 */
t.followedEvent = t.record('FollowedEvent', {
  aggregate: aggregateRef,
  type: t.string,
  version: t.u64,
  position: t.u64,
  id: t.string,
  data: t.any,
  metadata: t.any,
});

/**
 * A command a process manager sent (with {@link send}) that its target
 * refused, as its `onRefused` command gets it (its field `refusal`):
 * `{ key, target: { type, id }, command, data, code, message }`; `code` is
 * the refusal's error code (`rejected`, `aggregate_not_found`, ...).
 */
t.refusal = t.record('Refusal', {
  key: t.string,
  target: aggregateRef,
  command: t.string,
  data: t.any,
  code: t.string,
  message: t.string,
});

/** The zero value of each field, as Rust's `Default` would give it. */
function zeroOf(fields) {
  const out = {};
  for (const [key, type] of Object.entries(fields)) out[key] = type.zero;
  return out;
}

// ---------------------------------------------------------------------------
// Rejections

/**
 * Why a command was refused. Throw one from a handler (use
 * {@link invalid}, {@link rejected}, {@link forbidden}); nothing is stored.
 */
export class Rejection extends Error {
  /**
   * @param {{tag: string, val: unknown}} variant the WIT `rejection`
   */
  constructor(variant) {
    super(
      variant.tag === 'invalid'
        ? variant.val.map((f) => `${f.field}: ${f.message}`).join('; ')
        : String(variant.val),
    );
    this.name = 'Rejection';
    this.variant = variant;
  }
}

/**
 * The command's data is invalid (HTTP 422 `invalid_command`). Give one
 * field and its message, or an object of `{field: message}`.
 *
 * @param {string | Record<string, string>} field
 * @param {string} [message]
 */
export function invalid(field, message) {
  const entries = typeof field === 'string' ? [[field, message]] : Object.entries(field);
  return new Rejection({
    tag: 'invalid',
    val: entries.map(([f, m]) => ({ field: f, message: String(m) })),
  });
}

/**
 * A domain rule refused the command (HTTP 422 `rejected`).
 *
 * @param {string} message
 */
export function rejected(message) {
  return new Rejection({ tag: 'rejected', val: String(message) });
}

/**
 * The caller may not do this (HTTP 403 `forbidden`).
 *
 * @param {string} message
 */
export function forbidden(message) {
  return new Rejection({ tag: 'forbidden', val: String(message) });
}

// ---------------------------------------------------------------------------
// Helpers for handlers

const RUST_WHITESPACE =
  '\t\n\u000b\u000c\r \u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000';

/**
 * Removes leading and trailing Unicode White_Space, exactly like Rust's
 * `str::trim` (JavaScript's own `trim` also removes U+FEFF and keeps U+0085).
 *
 * @param {string} s
 * @returns {string}
 */
export function trim(s) {
  let start = 0;
  let end = s.length;
  while (start < end && RUST_WHITESPACE.includes(s[start])) start += 1;
  while (end > start && RUST_WHITESPACE.includes(s[end - 1])) end -= 1;
  return s.slice(start, end);
}

/**
 * What a handler knows about the command besides its data.
 */
export class Context {
  /**
   * @param {string} aggregateId
   * @param {bigint} version the aggregate's version (0: it does not exist)
   * @param {Array<[string, string]>} [metadata]
   */
  constructor(aggregateId, version, metadata = []) {
    /** The id of the aggregate the command is for. */
    this.aggregateId = aggregateId;
    /** The aggregate's version before the command, a `BigInt`. */
    this.version = BigInt(version);
    /** The host's metadata, as an object. */
    this.metadata = Object.fromEntries(metadata);
  }

  /** Whether the aggregate has no events yet. */
  get isNew() {
    return this.version === 0n;
  }

  /** When the host received the command (RFC 3339, UTC); plugins have no clock. */
  get now() {
    return this.metadata.now;
  }

  /** The command's message id (the client's idempotency key, or a UUID). */
  get messageId() {
    return this.metadata['message-id'];
  }

  /** The correlation id. */
  get correlationId() {
    return this.metadata['correlation-id'];
  }

  /** The causation id. */
  get causationId() {
    return this.metadata['causation-id'];
  }

  /** Who sent the command, when the host authenticated the caller. */
  get principal() {
    return this.metadata.principal;
  }

  /**
   * When a timer sent this command (see {@link schedule}):
   * `{ key, due, late, scheduledBy }`. These are the timer's key, when it
   * was due (RFC 3339 UTC), whether it was sent more than a second after
   * that (`late`, e.g. because no host ran then) and the aggregate that
   * scheduled it (`<type>/<id>`). `undefined` when a client sent the command.
   *
   * @returns {{key: string, due: string, late: boolean, scheduledBy: string} | undefined}
   */
  get timer() {
    const m = this.metadata;
    if (m['timer-key'] === undefined || m['timer-due'] === undefined || m['scheduled-by'] === undefined) {
      return undefined;
    }
    return { key: m['timer-key'], due: m['timer-due'], late: m['timer-late'] === 'true', scheduledBy: m['scheduled-by'] };
  }
}

// ---------------------------------------------------------------------------
// Timers

/**
 * Every change that {@link schedule} and {@link cancelTimer} made. A handler's
 * `timers` may hold only these: they are already checked and encoded.
 */
const timerChanges = new WeakSet();

const SCHEDULE_OPTIONS = ['key', 'command', 'data', 'afterMs', 'at', 'target'];

/** A value as a message about a timer shows it. */
function shown(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'bigint') return `${v}n`;
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object' && v !== null) return 'an object';
  if (typeof v === 'function') return 'a function';
  return String(v);
}

/** Registers a checked change and freezes it (its `data` bytes aside). */
function timerChange(change) {
  if (change.tag === 'schedule') {
    Object.freeze(change.val.due);
    if (change.val.target) Object.freeze(change.val.target);
    Object.freeze(change.val);
  }
  Object.freeze(change);
  timerChanges.add(change);
  return change;
}

/**
 * Schedules a command for later: a durable timer. Put the result in the
 * `timers` of a handler's result,
 * `{ events, reply, timers: [schedule({ key, command, afterMs })] }`.
 *
 * The host stores the timer in the same append as the decision's events
 * (both are stored or neither is) and sends the command once, when it is
 * due; one that comes due while no host runs is sent at the next start
 * (the command's {@link Context#timer} tells). Scheduling a key that is still
 * pending replaces that timer.
 *
 * Give exactly one of `afterMs` and `at`. The host checks the key's syntax,
 * the command's name and the time: a timer it refuses fails the command.
 * A timer this function cannot build (no key, both or neither of `afterMs`
 * and `at`, a delay that is not a whole number of milliseconds, data that
 * cannot be JSON, a target without a type or an id) is a bug in the plugin:
 * it throws, and the command fails as `plugin_failed`, with the reason in
 * the host's log.
 *
 * @param {object} timer
 * @param {string} timer.key names the timer among this aggregate's: 1-128
 *   printable ASCII characters, without `/` or `\`
 * @param {string} timer.command the command to send: one of the target
 *   plugin's commands
 * @param {unknown} [timer.data] the command's data: any JSON value (default
 *   `{}`), written as event data is (`BigInt`s as integers)
 * @param {number | bigint} [timer.afterMs] send it this many milliseconds
 *   after the command's `now`: a non-negative safe integer (or a `BigInt`
 *   up to 2^64 - 1, as a `t.u64` field reads)
 * @param {string} [timer.at] send it at this instant: RFC 3339 in UTC, as
 *   `now` is written, e.g. `2026-12-01T09:00:00Z`
 * @param {{type: string, id: string}} [timer.target] the aggregate to send
 *   it to (any type the host serves); absent: this aggregate
 * @returns {object} the change (the contract's `timer-change`)
 */
export function schedule(timer) {
  if (!isObject(timer)) {
    throw new PluginBug(`schedule() takes an object, { key, command, data, afterMs or at, target }, not ${shown(timer)}`);
  }
  const { key, command, data, afterMs, at, target } = timer;
  if (typeof key !== 'string') {
    const which = typeof command === 'string' ? ` for command \`${command}\`` : '';
    throw new PluginBug(
      key === undefined || key === null
        ? `a timer${which} has no key: give \`key\`, a string that names the timer`
        : `a timer${which} has the key ${shown(key)}: give \`key\` as a string`,
    );
  }
  const bug = (what) => new PluginBug(`the timer \`${key}\` ${what}`);
  const unknown = Object.keys(timer).filter((k) => !SCHEDULE_OPTIONS.includes(k));
  if (unknown.length > 0) {
    throw bug(
      `has the unknown option${unknown.length > 1 ? 's' : ''} ${unknown.map((k) => `\`${k}\``).join(', ')}: ` +
        `give only ${SCHEDULE_OPTIONS.map((k) => `\`${k}\``).join(', ')}`,
    );
  }
  if (typeof command !== 'string') {
    throw bug(`has the command ${shown(command)}: give \`command\`, the name of the command to send, as a string`);
  }
  const hasAfter = afterMs !== undefined && afterMs !== null;
  const hasAt = at !== undefined && at !== null;
  if (hasAfter && hasAt) throw bug('has both `afterMs` and `at`: give one of them');
  if (!hasAfter && !hasAt) {
    throw bug("has no due time: give `afterMs` (milliseconds after the command's `now`) or `at` (an RFC 3339 time)");
  }
  let due;
  if (hasAfter) {
    const ms = typeof afterMs === 'number' && Number.isSafeInteger(afterMs) ? BigInt(afterMs) : afterMs;
    if (typeof ms !== 'bigint' || ms < 0n) {
      const unsafe = typeof afterMs === 'number' && Number.isInteger(afterMs) && afterMs > 0;
      throw bug(
        `has \`afterMs\` ${shown(afterMs)}: give a whole number of milliseconds, 0 or more` +
          (unsafe ? ' (beyond 2^53 - 1 a number is not exact: give a BigInt)' : ''),
      );
    }
    if (ms > U64_MAX) throw bug(`has \`afterMs\` ${shown(afterMs)}: give at most 2^64 - 1 milliseconds`);
    due = { tag: 'after-ms', val: ms };
  } else {
    if (typeof at !== 'string') {
      throw bug(`has \`at\` ${shown(at)}: give an RFC 3339 time as a string, e.g. '2026-12-01T09:00:00Z'`);
    }
    due = { tag: 'at', val: at };
  }
  let ref;
  if (target !== undefined && target !== null) {
    if (!isObject(target) || typeof target.type !== 'string' || typeof target.id !== 'string') {
      throw bug(
        'has a target without both a type and an id: give `target: { type, id }` (two strings), ' +
          'or leave it out to send the command to this aggregate',
      );
    }
    ref = { aggregateType: target.type, aggregateId: target.id };
  }
  let bytes;
  try {
    bytes = encoder.encode(stringifyJson(data ?? {}));
  } catch (e) {
    throw new PluginBug(`the data of timer \`${key}\` cannot be encoded as JSON: ${e.message}`);
  }
  return timerChange({ tag: 'schedule', val: { key, target: ref, commandType: command, data: bytes, due } });
}

/**
 * Cancels this aggregate's pending timer `key` (see {@link schedule}): put
 * the result in the `timers` of a handler's result. Nothing happens if no
 * such timer is pending. Changes apply in order, so a cancel after a
 * schedule of the same key in one decision cancels it.
 *
 * @param {string} key the key the timer was scheduled with
 * @returns {object} the change (the contract's `timer-change`)
 */
export function cancelTimer(key) {
  if (typeof key !== 'string') {
    throw new PluginBug(`cancelTimer() takes the key of the timer to cancel, a string, not ${shown(key)}`);
  }
  return timerChange({ tag: 'cancel', val: key });
}

const SEND_OPTIONS = ['key', 'type', 'id', 'command', 'data'];

/**
 * Sends `command` with `data` to the aggregate `type`/`id` at once: how a
 * process manager sends commands. It is {@link schedule} with
 * `afterMs: 0` and that target: the host stores it with the decision's
 * events and sends it once, after they are stored. Put the result in the
 * `timers` of a handler's result.
 *
 * If the target refuses it, the refusal comes back as the process
 * manager's `onRefused` command, with the same `key` (see
 * {@link aggregate}'s `process`); the events the command stores carry the
 * key in their metadata (see {@link timerKey}).
 *
 * @param {object} message
 * @param {string} message.key names it among this aggregate's timers
 * @param {string} message.type the target's aggregate type
 * @param {string} message.id the target's id
 * @param {string} message.command the command to send
 * @param {unknown} [message.data] its data: any JSON value (default `{}`)
 * @returns {object} the change (the contract's `timer-change`)
 */
export function send(message) {
  if (!isObject(message)) {
    throw new PluginBug(`send() takes an object, { key, type, id, command, data }, not ${shown(message)}`);
  }
  const { key, type, id, command, data } = message;
  if (typeof key === 'string') {
    const unknown = Object.keys(message).filter((k) => !SEND_OPTIONS.includes(k));
    if (unknown.length > 0) {
      throw new PluginBug(
        `the timer \`${key}\` has the unknown option${unknown.length > 1 ? 's' : ''} ` +
          `${unknown.map((k) => `\`${k}\``).join(', ')}: give only ${SEND_OPTIONS.map((k) => `\`${k}\``).join(', ')}`,
      );
    }
    if (typeof type !== 'string' || typeof id !== 'string') {
      throw new PluginBug(
        `the timer \`${key}\` has the type ${shown(type)} and the id ${shown(id)}: ` +
          'give `type` and `id`, two strings that name the aggregate to send the command to',
      );
    }
  }
  // schedule() says what is wrong with the key, the command or the data.
  return schedule({ key, command, data, afterMs: 0, target: { type, id } });
}

/**
 * The key of the timer whose command stored a followed event
 * (`event.metadata.timer.key`, see {@link t.followedEvent}): which of the
 * commands a process manager sent ({@link send}) it answers. `undefined`
 * when no timer sent that command.
 *
 * @param {{metadata: unknown}} event a followed event
 * @returns {string | undefined}
 */
export function timerKey(event) {
  const timer = isObject(event) && isObject(event.metadata) ? event.metadata.timer : undefined;
  return isObject(timer) && typeof timer.key === 'string' ? timer.key : undefined;
}

/** A handler's `timers`, checked: an array of changes the helpers made. */
function checkTimers(timers) {
  if (!Array.isArray(timers)) {
    throw new PluginBug(`\`timers\` must be an array of schedule(...) and cancelTimer(...), not ${shown(timers)}`);
  }
  for (const change of timers) {
    if (!timerChanges.has(change)) {
      throw new PluginBug(`each of \`timers\` must be made with schedule(...) or cancelTimer(...), not ${shown(change)}`);
    }
  }
  return [...timers];
}

// ---------------------------------------------------------------------------
// The aggregate

const MODES = ['create', 'update', 'upsert'];
const NAME = /^[A-Za-z][A-Za-z0-9_.-]{0,63}$/;
const PREFIX = /^[A-Za-z][A-Za-z0-9_.]{0,63}$/;
const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** A bug in the plugin rather than a refusal: the call traps. */
class PluginBug extends Error {}

/**
 * Checks a definition and returns the four functions the `aggregate` world
 * exports: `describe`, `initialState`, `apply` and `handle`. Export them
 * from the plugin's main module under those names.
 *
 * @param {object} def
 * @param {string} def.type the aggregate type, e.g. `bank-account`
 * @param {string} def.streamPrefix streams are `<prefix>-<id>`; no `-`
 * @param {number} [def.stateSchema] the state encoding's version (1)
 * @param {Record<string, object> | object} def.state the state's fields
 *   (or one field type, e.g. `t.any`)
 * @param {object} [def.initialState] the state of a new aggregate (default:
 *   each field's zero value: `''`, `0n`, `false`, `[]`, `null`)
 * @param {Record<string, {mode: string, fields?: object, handle: Function}>} def.commands
 *   each command's mode, fields and `handle(state, data, ctx)`, which returns
 *   an event `{type, data}`, an array of events, `{events, reply, timers}`
 *   (each optional; `timers` made with {@link schedule} and
 *   {@link cancelTimer}), or nothing
 * @param {Record<string, {fields?: object, apply: Function}>} def.events
 * @param {{follows: Array<{aggregateType: string, eventType: string, instance: string | {dataField: string}, command: string}>, onRefused?: string, finishedBy?: string[]}} [def.process]
 *   makes the aggregate a process manager (see *Process managers* below):
 *   the result then also has `process`, the export of the
 *   `process-manager` world
 * @returns {{describe: Function, initialState: Function, apply: Function, handle: Function, process?: Function}}
 */
export function aggregate(def) {
  const problems = checkDefinition(def);
  const processDescription = isObject(def) && def.process !== undefined && def.process !== null
    ? describeProcess(def, problems)
    : undefined;
  if (problems.length > 0) {
    throw new Error(`the aggregate definition is wrong: ${problems.join('; ')}`);
  }
  const schema = def.stateSchema ?? 1;
  const stateType = def.state.decode ? def.state : t.record('State', def.state);
  const initial = def.initialState ?? stateType.zero;
  const commandNames = Object.keys(def.commands);
  const eventTypes = Object.keys(def.events);
  const eventTypeOf = Object.fromEntries(
    eventTypes.map((name) => [name, t.record(name, def.events[name].fields ?? {})]),
  );

  // A new aggregate's state is read back from its encoding, like any other
  // state: handlers get a fresh copy with the decoded types.
  const freshInitial = () => stateType.decode(parseJson(stateType.encode(initial, '')), '');
  const encodeState = (state) => ({ schema, bytes: encoder.encode(stateType.encode(state, '')) });

  /** State bytes to a state; `null` when they do not read as this plugin's state. */
  const decodeState = (s) => {
    if (s.bytes.length === 0) return freshInitial();
    if (s.schema !== schema) return null;
    try {
      return stateType.decode(parseJson(decoder.decode(s.bytes)), '');
    } catch (e) {
      const why = e instanceof FieldProblem && e.field ? `field \`${e.field}\`: ${e.message}` : e.message;
      log.warn(`state of schema ${s.schema} does not read as this plugin's state: ${why}`);
      return null;
    }
  };

  const decodeEvent = (eventType, bytes) => {
    const type = eventTypeOf[eventType];
    if (!type) throw new Error('unknown event type');
    let data;
    try {
      data = bytes.length === 0 ? {} : parseJson(decoder.decode(bytes));
    } catch (e) {
      throw new Error(`data is not valid JSON: ${e.message}`);
    }
    if (data === null) data = {};
    try {
      return type.decode(data, '');
    } catch (e) {
      if (e instanceof FieldProblem) {
        throw new Error(e.field ? `field \`${e.field}\`: ${e.message}` : e.message);
      }
      throw e;
    }
  };

  const applyOne = (state, eventType, data) => {
    const next = def.events[eventType].apply(state, data);
    return next === undefined ? state : next;
  };

  const exports = {
    describe() {
      return {
        aggregateType: def.type,
        streamPrefix: def.streamPrefix,
        stateSchema: schema,
        commands: commandNames.map((name) => ({ name, mode: def.commands[name].mode })),
        eventTypes,
      };
    },

    initialState() {
      return trapOnBug(def.type, 'initial-state', () => encodeState(initial));
    },

    apply(s, events) {
      let state = decodeState(s);
      if (state === null) {
        throw `cannot read state of schema ${s.schema} (this plugin reads schema ${schema})`;
      }
      for (const e of events) {
        let data;
        try {
          data = decodeEvent(e.eventType, e.data);
        } catch (err) {
          throw `cannot read event ${e.version} (\`${e.eventType}\`): ${err.message}`;
        }
        state = trapOnBug(def.type, 'apply', () => applyOne(state, e.eventType, data));
      }
      return trapOnBug(def.type, 'apply', () => encodeState(state));
    },

    handle(s, version, c) {
      let state = decodeState(s);
      if (state === null) throw { tag: 'incompatible-state', val: s.schema };
      const command = def.commands[c.commandType];
      if (!command) throw { tag: 'rejected', val: `unknown command \`${c.commandType}\`` };
      let data;
      try {
        data = decodeCommand(command, c.data);
      } catch (e) {
        if (e instanceof FieldProblem) {
          throw { tag: 'invalid', val: [{ field: e.field, message: e.message }] };
        }
        throw e;
      }
      const ctx = new Context(c.aggregateId, version, c.metadata);
      return trapOnBug(def.type, `command \`${c.commandType}\``, () => {
        let decided;
        try {
          decided = command.handle(state, data, ctx);
        } catch (e) {
          if (e instanceof Rejection) throw e.variant;
          throw e;
        }
        const { events, reply, timers } = normalizeDecision(decided);
        const out = [];
        for (const event of events) {
          const type = eventTypeOf[event.type];
          if (!type) {
            throw new PluginBug(
              `it emitted the event type \`${event.type}\`, which is not declared in \`events\``,
            );
          }
          const bytes = encoder.encode(type.encode(event.data ?? {}, ''));
          // Read the event back from its JSON, as a rebuild from the store
          // would, so the new state is exactly the rebuilt one.
          let stored;
          try {
            stored = decodeEvent(event.type, bytes);
          } catch (e) {
            throw new PluginBug(`the event \`${event.type}\` it just produced does not read back: ${e.message}`);
          }
          state = applyOne(state, event.type, stored);
          out.push({ eventType: event.type, data: bytes });
        }
        return {
          events: out,
          state: encodeState(state),
          reply: reply === undefined ? undefined : encoder.encode(stringifyJson(reply)),
          timers: checkTimers(timers),
        };
      });
    },
  };
  if (processDescription !== undefined) {
    // A fresh copy for each call: the caller may change what it gets.
    exports.process = () => ({
      follows: processDescription.follows.map((f) => ({ ...f, instance: { ...f.instance } })),
      onRefused: processDescription.onRefused,
      finishedBy: [...processDescription.finishedBy],
    });
  }
  return exports;
}

// ---------------------------------------------------------------------------
// Process managers

/*
 * How a definition makes a process manager: give {@link aggregate} a
 * `process`, build the plugin with `build.mjs --world process-manager`, and
 * export `process` beside the other four:
 *
 * ```js
 * export const { describe, initialState, apply, handle, process } = aggregate({
 *   type: 'transfer',
 *   // ... state, events, and commands, among them:
 *   //   debited: { mode: 'update', fields: { event: t.followedEvent }, handle },
 *   //   refused: { mode: 'update', fields: { refusal: t.refusal }, handle },
 *   process: {
 *     follows: [
 *       { aggregateType: 'bank-account', eventType: 'Withdrawn', instance: 'scheduled-by', command: 'debited' },
 *     ],
 *     onRefused: 'refused',
 *     finishedBy: ['Completed', 'Failed'],
 *   },
 * });
 * ```
 *
 * A process manager is an aggregate (its instances are aggregates of its
 * type) that also follows events of other aggregates: each event of
 * `aggregateType` and `eventType` arrives at one instance as the command
 * `command`, with data `{ event }` ({@link t.followedEvent}). The command's
 * mode says what the event does: `create` starts an instance (an event for
 * one that exists is ignored), `update` continues one (an event for none is
 * ignored), `upsert` either. `instance` says which instance gets it:
 *
 * - `'aggregate-id'`: the id of the aggregate that stored the event (one
 *   instance per aggregate);
 * - `'correlation-id'`: the event's correlation id;
 * - `'scheduled-by'`: the instance whose command ({@link send}) stored the
 *   event; events no instance of this type caused are ignored;
 * - `{ dataField: 'name' }`: the top-level string field `name` of the
 *   event's data; events without it are ignored.
 *
 * It sends commands with {@link send}. A command it sent that is refused
 * comes back as its command `onRefused`, with data `{ refusal }`
 * ({@link t.refusal}); without `onRefused`, refusals are only logged.
 *
 * `finishedBy` (optional, default none) lists its own event types that
 * finish an instance: once an instance has stored one of them, the host
 * delivers it nothing more (events it would have received are dropped
 * without a call) and lists it as finished.
 *
 * Every `command` and `onRefused` must be one of `commands`, and every
 * `finishedBy` one of `events`: anything else is a bug in the plugin, and
 * `aggregate()` throws (so the build fails).
 */

const INSTANCE_KEYS = ['aggregate-id', 'correlation-id', 'scheduled-by'];
const FOLLOW_OPTIONS = ['aggregateType', 'eventType', 'instance', 'command'];
const PROCESS_OPTIONS = ['follows', 'onRefused', 'finishedBy'];
const INSTANCE_HELP = "give 'aggregate-id', 'correlation-id', 'scheduled-by' or { dataField: 'name' }";

/** The option names in `obj` that are not in `allowed`, as a message part. */
function unknownOptions(obj, allowed) {
  const unknown = Object.keys(obj).filter((k) => !allowed.includes(k));
  if (unknown.length === 0) return undefined;
  return (
    `has the unknown option${unknown.length > 1 ? 's' : ''} ${unknown.map((k) => `\`${k}\``).join(', ')}: ` +
    `give only ${allowed.map((k) => `\`${k}\``).join(', ')}`
  );
}

/** A follow's `instance` as the contract's `instance-key`, or `undefined`. */
function instanceKey(instance) {
  if (typeof instance === 'string') return INSTANCE_KEYS.includes(instance) ? { tag: instance } : undefined;
  if (
    isObject(instance) &&
    Object.keys(instance).length === 1 &&
    typeof instance.dataField === 'string' &&
    instance.dataField !== ''
  ) {
    return { tag: 'data-field', val: instance.dataField };
  }
  return undefined;
}

/**
 * `def.process` as the contract's `process-info` (componentize-js's
 * shape); what is wrong with it goes to `problems`.
 */
function describeProcess(def, problems) {
  const p = def.process;
  if (!isObject(p)) {
    problems.push(`\`process\` must be an object, { follows, onRefused, finishedBy }, not ${shown(p)}`);
    return undefined;
  }
  const unknown = unknownOptions(p, PROCESS_OPTIONS);
  if (unknown) problems.push(`\`process\` ${unknown}`);
  const commands = isObject(def.commands) ? def.commands : {};
  const isCommand = (name) => Object.hasOwn(commands, name);
  const follows = [];
  if (!Array.isArray(p.follows)) {
    problems.push(
      `\`process.follows\` must be an array of { aggregateType, eventType, instance, command }, not ${shown(p.follows)}`,
    );
  } else {
    p.follows.forEach((f, i) => {
      const at = `\`process.follows[${i}]\``;
      if (!isObject(f)) {
        problems.push(`${at} must be an object, { aggregateType, eventType, instance, command }, not ${shown(f)}`);
        return;
      }
      const extra = unknownOptions(f, FOLLOW_OPTIONS);
      if (extra) problems.push(`${at} ${extra}`);
      if (typeof f.aggregateType !== 'string' || f.aggregateType === '') {
        problems.push(`${at} needs an \`aggregateType\`: the type of the aggregate that stores the event, e.g. 'bank-account'`);
      }
      if (typeof f.eventType !== 'string' || f.eventType === '') {
        problems.push(`${at} needs an \`eventType\`: the type of the event it follows, e.g. 'Withdrawn'`);
      }
      const instance = instanceKey(f.instance);
      if (instance === undefined) problems.push(`${at} has the instance ${shown(f.instance)}: ${INSTANCE_HELP}`);
      if (typeof f.command !== 'string') {
        problems.push(`${at} needs a \`command\`: the name of the command that receives the event`);
      } else if (!isCommand(f.command)) {
        problems.push(
          `${at} sends ${f.aggregateType}/${f.eventType} to \`${f.command}\`, which is not one of \`commands\``,
        );
      }
      follows.push({ aggregateType: f.aggregateType, eventType: f.eventType, instance, command: f.command });
    });
  }
  let onRefused;
  if (p.onRefused !== undefined && p.onRefused !== null) {
    if (typeof p.onRefused !== 'string') {
      problems.push(`\`process.onRefused\` must be the name of a command, a string, not ${shown(p.onRefused)}`);
    } else if (!isCommand(p.onRefused)) {
      problems.push(`\`process.onRefused\` names \`${p.onRefused}\`, which is not one of \`commands\``);
    } else {
      onRefused = p.onRefused;
    }
  }
  const finishedBy = [];
  if (p.finishedBy !== undefined && p.finishedBy !== null) {
    const events = isObject(def.events) ? def.events : {};
    if (!Array.isArray(p.finishedBy)) {
      problems.push(
        `\`process.finishedBy\` must be an array of the names of event types, e.g. ['Completed'], not ${shown(p.finishedBy)}`,
      );
    } else {
      p.finishedBy.forEach((eventType, i) => {
        const at = `\`process.finishedBy[${i}]\``;
        if (typeof eventType !== 'string') {
          problems.push(`${at} must be the name of an event type, a string, not ${shown(eventType)}`);
        } else if (!Object.hasOwn(events, eventType)) {
          problems.push(`${at} names \`${eventType}\`, which is not one of \`events\``);
        } else {
          finishedBy.push(eventType);
        }
      });
    }
  }
  return { follows, onRefused, finishedBy };
}

/** The command's data: blank reads as `{}`; then its declared fields. */
function decodeCommand(command, bytes) {
  let data;
  const text = decoder.decode(bytes);
  if (text.trim() === '') {
    data = {};
  } else {
    try {
      data = parseJson(text);
    } catch (e) {
      throw new FieldProblem('', `the command's data is not valid JSON: ${e.message}`);
    }
  }
  if (!command.fields) {
    if (data === null || isObject(data)) return {};
    throw new FieldProblem('', "the command's data must be a JSON object");
  }
  if (!isObject(data)) throw new FieldProblem('', "the command's data must be a JSON object");
  return decodeFields(command.fields, data, '');
}

/** A handler's result as events, a reply and timer changes. */
function normalizeDecision(decided) {
  if (decided === undefined || decided === null) return { events: [], reply: undefined, timers: [] };
  if (Array.isArray(decided)) return { events: decided, reply: undefined, timers: [] };
  if (typeof decided.type === 'string') return { events: [decided], reply: undefined, timers: [] };
  if (Array.isArray(decided.events) || 'reply' in decided || 'timers' in decided) {
    return { events: decided.events ?? [], reply: decided.reply, timers: decided.timers ?? [] };
  }
  throw new PluginBug(
    'a handler must return an event `{type, data}`, an array of events, `{events, reply, timers}`, or nothing',
  );
}

/**
 * Runs `f`; a rejection variant passes through, anything else is a bug in
 * the plugin: it is logged and the call traps (the host answers
 * `plugin_failed`).
 */
function trapOnBug(type, what, f) {
  try {
    return f();
  } catch (e) {
    if (e && typeof e === 'object' && typeof e.tag === 'string' && !(e instanceof Error)) throw e;
    const detail = e instanceof Error ? `${e.message}${e.stack ? `\n${e.stack}` : ''}` : String(e);
    hostLog('error', `plugin \`${type}\` failed in ${what}: ${detail}`);
    // Not a rejection: the component model cannot lower it, so the call traps.
    throw new Error(`plugin \`${type}\` failed in ${what}`);
  }
}

/** Every mistake in a definition, for one clear message at build time. */
function checkDefinition(def) {
  const problems = [];
  if (!def || typeof def !== 'object') return ['aggregate() takes an object'];
  if (typeof def.type !== 'string' || !NAME.test(def.type)) {
    problems.push('`type` must be 1-64 letters, digits, `-`, `_` or `.`, starting with a letter');
  }
  if (typeof def.streamPrefix !== 'string' || !PREFIX.test(def.streamPrefix)) {
    problems.push('`streamPrefix` must be 1-64 letters, digits, `_` or `.`, starting with a letter (no `-`)');
  }
  if (def.stateSchema !== undefined && !(Number.isInteger(def.stateSchema) && def.stateSchema >= 0)) {
    problems.push('`stateSchema` must be a whole number');
  }
  if (!def.state || typeof def.state !== 'object') {
    problems.push('`state` must give the state\'s fields, e.g. `{ total: t.u64 }`');
  }
  if (!isObject(def.commands) || Object.keys(def.commands).length === 0) {
    problems.push('`commands` must declare at least one command');
  } else {
    for (const [name, c] of Object.entries(def.commands)) {
      if (!NAME.test(name)) problems.push(`command name \`${name}\` is not a valid name`);
      if (!c || !MODES.includes(c.mode)) {
        problems.push(`command \`${name}\` needs a \`mode\`: 'create', 'update' or 'upsert'`);
      }
      if (!c || typeof c.handle !== 'function') problems.push(`command \`${name}\` needs a \`handle\` function`);
    }
  }
  if (!isObject(def.events) || Object.keys(def.events).length === 0) {
    problems.push('`events` must declare at least one event type');
  } else {
    for (const [name, e] of Object.entries(def.events)) {
      if (!NAME.test(name)) problems.push(`event type \`${name}\` is not a valid name`);
      if (!e || typeof e.apply !== 'function') problems.push(`event \`${name}\` needs an \`apply\` function`);
    }
  }
  return problems;
}
