// A money transfer between two bank accounts: a process manager — in
// JavaScript.
//
// The same process manager as examples/transfer (Rust), answer for answer
// and key for key: the same commands, events, statuses and refusal reasons.
// Its aggregate type is `transfer-js` (streams `transfer_js-<id>`), so that
// it can be loaded beside the Rust one.
//
// A transfer is started with `start {"from", "to", "amount"}`. It sends
// `withdraw` to the source account; once the account has stored
// `Withdrawn`, it sends `deposit` to the target; once that is stored, the
// transfer is complete. If the target refuses the deposit (a closed
// account), the transfer sends the money back with a `deposit` to the
// source: it is compensated. If the source refuses the withdrawal
// (insufficient funds, closed), the transfer fails and nothing moved.
//
// | command     | receives                                | events |
// |-------------|-----------------------------------------|--------|
// | `start`     | `{"from", "to", "amount"}` (a client)   | `Started`; sends `withdraw` |
// | `debited`   | the source's `Withdrawn` (followed)     | `Debited`; sends `deposit` to the target |
// | `deposited` | either account's `Deposited` (followed) | `Completed` (the credit), or `Compensated` (the refund) |
// | `refused`   | a refusal of a command it sent          | `Failed` (the debit), `CreditRefused` and sends the refund (the credit), `RefundFailed` (the refund) |
//
// Every command it sends is a timer due at once, stored with its events: a
// crash between deciding and sending loses nothing, and the host sends
// each once. Build it for the `process-manager` world:
// `node guest-sdk/js/build.mjs examples/transfer-js/aggregate.js transfer-js.wasm --world process-manager`.

import { aggregate, invalid, send, t, timerKey, trim } from '../../guest-sdk/js/rehydra.js';

// The keys of the commands a transfer sends.
const DEBIT = 'debit';
const CREDIT = 'credit';
const REFUND = 'refund';

/** A command to a bank account, sent at once. */
function toAccount(key, account, command, amount) {
  return send({ key, type: 'bank-account', id: account, command, data: { amount } });
}

/** Nothing happens: no events, no commands. */
const NOTHING = undefined;

export const { describe, initialState, apply, handle, process } = aggregate({
  type: 'transfer-js',
  streamPrefix: 'transfer_js',
  stateSchema: 1,
  // Stored as {"status": "started", "from": "a", "to": "b", "amount": 5},
  // with "reason" once there is one. The status is one of `none`,
  // `started`, `debited`, `refunding`, `completed`, `compensated`,
  // `failed`, `refund-failed`.
  state: { status: t.string, from: t.string, to: t.string, amount: t.u64, reason: t.omittable(t.string) },
  initialState: { status: 'none', from: '', to: '', amount: 0n, reason: null },

  commands: {
    start: {
      mode: 'create',
      fields: { from: t.string, to: t.string, amount: t.u64 },
      handle(transfer, { from, to, amount }) {
        if (amount === 0n) throw invalid('amount', 'must be greater than 0');
        if (trim(from) === '') throw invalid('from', 'must not be empty');
        if (trim(to) === '') throw invalid('to', 'must not be empty');
        if (from === to) throw invalid('to', 'must differ from `from`');
        return {
          events: [{ type: 'Started', data: { from, to, amount } }],
          timers: [toAccount(DEBIT, from, 'withdraw', amount)],
        };
      },
    },
    debited: {
      mode: 'update',
      fields: { event: t.followedEvent },
      handle(transfer, { event }) {
        if (transfer.status !== 'started' || timerKey(event) !== DEBIT) return NOTHING;
        return {
          events: [{ type: 'Debited' }],
          timers: [toAccount(CREDIT, transfer.to, 'deposit', transfer.amount)],
        };
      },
    },
    deposited: {
      mode: 'update',
      fields: { event: t.followedEvent },
      handle(transfer, { event }) {
        const key = timerKey(event);
        if (transfer.status === 'debited' && key === CREDIT) return { type: 'Completed' };
        if (transfer.status === 'refunding' && key === REFUND) return { type: 'Compensated' };
        return NOTHING;
      },
    },
    refused: {
      mode: 'update',
      fields: { refusal: t.refusal },
      handle(transfer, { refusal }) {
        const reason = `${refusal.target.id} refused ${refusal.command}: ${refusal.message}`;
        if (transfer.status === 'started' && refusal.key === DEBIT) {
          return { type: 'Failed', data: { reason } };
        }
        if (transfer.status === 'debited' && refusal.key === CREDIT) {
          return {
            events: [{ type: 'CreditRefused', data: { reason } }],
            timers: [toAccount(REFUND, transfer.from, 'deposit', transfer.amount)],
          };
        }
        if (transfer.status === 'refunding' && refusal.key === REFUND) {
          return { type: 'RefundFailed', data: { reason } };
        }
        return NOTHING;
      },
    },
  },

  events: {
    Started: {
      fields: { from: t.string, to: t.string, amount: t.u64 },
      apply: (transfer, { from, to, amount }) => ({ ...transfer, status: 'started', from, to, amount }),
    },
    Debited: { apply: (transfer) => ({ ...transfer, status: 'debited' }) },
    Completed: { apply: (transfer) => ({ ...transfer, status: 'completed' }) },
    CreditRefused: {
      fields: { reason: t.string },
      apply: (transfer, { reason }) => ({ ...transfer, status: 'refunding', reason }),
    },
    Compensated: { apply: (transfer) => ({ ...transfer, status: 'compensated' }) },
    Failed: {
      fields: { reason: t.string },
      apply: (transfer, { reason }) => ({ ...transfer, status: 'failed', reason }),
    },
    RefundFailed: {
      fields: { reason: t.string },
      apply: (transfer, { reason }) => ({ ...transfer, status: 'refund-failed', reason }),
    },
  },

  process: {
    follows: [
      { aggregateType: 'bank-account', eventType: 'Withdrawn', instance: 'scheduled-by', command: 'debited' },
      { aggregateType: 'bank-account', eventType: 'Deposited', instance: 'scheduled-by', command: 'deposited' },
    ],
    onRefused: 'refused',
    // A transfer is over once it has one of these: the host then delivers
    // it nothing more.
    finishedBy: ['Completed', 'Compensated', 'Failed', 'RefundFailed'],
  },
});
