// A bank account, the "hello world" of event sourcing — in JavaScript.
//
// The same aggregate as examples/bank-account (Rust), answer for answer:
// an account is opened for an owner, takes deposits and withdrawals, and
// is eventually closed. Its balance never goes below zero, and a closed
// account takes no more money in or out.
//
// | command    | mode   | data          | events      |
// |------------|--------|---------------|-------------|
// | `open`     | create | `{"owner"}`   | `Opened`    |
// | `deposit`  | update | `{"amount"}`  | `Deposited` |
// | `withdraw` | update | `{"amount"}`  | `Withdrawn` |
// | `close`    | update | none          | `Closed`    |
//
// Amounts are whole numbers of the smallest currency unit (cents), as
// BigInts: a u64, like the Rust version's.

import { aggregate, invalid, rejected, t, trim } from '../../guest-sdk/js/rehydra.js';

const U64_MAX = (1n << 64n) - 1n;

/** Amounts must be at least one cent. */
function positive(amount) {
  if (amount === 0n) throw invalid('amount', 'must be greater than 0');
}

function ensureOpen(account) {
  if (!account.open) throw rejected('account is closed');
}

export const { describe, initialState, apply, handle } = aggregate({
  type: 'bank-account-js',
  streamPrefix: 'bank_account_js',
  // Stored as {"owner": "...", "balance": 0, "open": false}.
  state: { owner: t.string, balance: t.u64, open: t.bool },

  commands: {
    open: {
      mode: 'create',
      fields: { owner: t.string },
      handle(account, { owner }) {
        const name = trim(owner);
        if (name === '') throw invalid('owner', 'must not be empty');
        return { type: 'Opened', data: { owner: name } };
      },
    },
    deposit: {
      mode: 'update',
      fields: { amount: t.u64 },
      handle(account, { amount }) {
        positive(amount);
        ensureOpen(account);
        if (account.balance + amount > U64_MAX) throw rejected('the balance would be too large');
        return { type: 'Deposited', data: { amount } };
      },
    },
    withdraw: {
      mode: 'update',
      fields: { amount: t.u64 },
      handle(account, { amount }) {
        positive(amount);
        ensureOpen(account);
        if (amount > account.balance) throw rejected('insufficient funds');
        return { type: 'Withdrawn', data: { amount } };
      },
    },
    close: {
      mode: 'update',
      handle(account) {
        if (!account.open) throw rejected('account is already closed');
        return { type: 'Closed' };
      },
    },
  },

  events: {
    Opened: {
      fields: { owner: t.string },
      apply: (account, { owner }) => ({ ...account, owner, open: true }),
    },
    Deposited: {
      fields: { amount: t.u64 },
      apply: (account, { amount }) => ({ ...account, balance: account.balance + amount }),
    },
    Withdrawn: {
      fields: { amount: t.u64 },
      apply: (account, { amount }) => ({ ...account, balance: account.balance - amount }),
    },
    Closed: {
      apply: (account) => ({ ...account, open: false }),
    },
  },
});
