// Tests of the aggregate under Node, through the same calls the host makes:
//   npm test   (or make test)
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { handle, initialState } from './aggregate.js';

const enc = new TextEncoder();
const dec = new TextDecoder();
const command = (commandType, data) => ({ commandType, aggregateId: 'c1', data: enc.encode(data), metadata: [] });
const refusal = (f) => {
  try {
    f();
  } catch (e) {
    return e;
  }
  return assert.fail('the command was accepted');
};

test('counts and replies with the total', () => {
  const started = handle(initialState(), 0n, command('start', '{"label":" hits "}'));
  assert.equal(started.events[0].eventType, 'Started');
  assert.equal(dec.decode(started.events[0].data), '{"label":"hits"}');
  const once = handle(started.state, 1n, command('increment', '{"by":2}'));
  const twice = handle(once.state, 2n, command('increment', '{"by":3}'));
  assert.equal(dec.decode(twice.reply), '5');
  assert.equal(dec.decode(twice.state.bytes), '{"label":"hits","total":5}');
  const reset = handle(twice.state, 3n, command('reset', ''));
  assert.equal(dec.decode(reset.state.bytes), '{"label":"hits","total":0}');
  // Resetting again changes nothing.
  assert.deepEqual(handle(reset.state, 4n, command('reset', '')).events, []);
});

test('refuses bad data', () => {
  const s0 = initialState();
  for (const [name, data, field, message] of [
    ['start', '{}', 'label', 'is required'],
    ['start', '{"label":"  "}', 'label', 'must not be empty'],
    ['increment', '{"by":0}', 'by', 'must be greater than 0'],
    ['increment', '{"by":-1}', 'by', 'invalid value: integer `-1`, expected u64'],
  ]) {
    assert.deepEqual(refusal(() => handle(s0, 1n, command(name, data))), {
      tag: 'invalid',
      val: [{ field, message }],
    });
  }
});
