"""A bank account, the "hello world" of event sourcing — in Python.

The same aggregate as examples/bank-account (Rust), answer for answer: an
account is opened for an owner, takes deposits and withdrawals, and is
eventually closed. Its balance never goes below zero, and a closed account
takes no more money in or out.

| command    | mode   | data          | events      |
|------------|--------|---------------|-------------|
| `open`     | create | `{"owner"}`   | `Opened`    |
| `deposit`  | update | `{"amount"}`  | `Deposited` |
| `withdraw` | update | `{"amount"}`  | `Withdrawn` |
| `close`    | update | none          | `Closed`    |

Amounts are whole numbers of the smallest currency unit (cents): a u64,
like the Rust version's.
"""

from rehydra import Aggregate, event, invalid, rejected, t, trim

U64_MAX = (1 << 64) - 1

# Stored as {"owner": "...", "balance": 0, "open": false}.
account = Aggregate(
    type="bank-account-py",
    stream_prefix="bank_account_py",
    state={"owner": t.string, "balance": t.u64, "open": t.bool},
)


def positive(amount):
    """Amounts must be at least one cent."""
    if amount == 0:
        raise invalid("amount", "must be greater than 0")


def ensure_open(state):
    if not state["open"]:
        raise rejected("account is closed")


@account.command("open", mode="create", fields={"owner": t.string})
def open_account(state, cmd, ctx):
    owner = trim(cmd["owner"])
    if not owner:
        raise invalid("owner", "must not be empty")
    return event("Opened", owner=owner)


@account.command("deposit", mode="update", fields={"amount": t.u64})
def deposit(state, cmd, ctx):
    amount = cmd["amount"]
    positive(amount)
    ensure_open(state)
    if state["balance"] + amount > U64_MAX:
        raise rejected("the balance would be too large")
    return event("Deposited", amount=amount)


@account.command("withdraw", mode="update", fields={"amount": t.u64})
def withdraw(state, cmd, ctx):
    amount = cmd["amount"]
    positive(amount)
    ensure_open(state)
    if amount > state["balance"]:
        raise rejected("insufficient funds")
    return event("Withdrawn", amount=amount)


@account.command("close", mode="update")
def close(state, cmd, ctx):
    if not state["open"]:
        raise rejected("account is already closed")
    return event("Closed")


@account.event("Opened", fields={"owner": t.string})
def opened(state, data):
    return {**state, "owner": data["owner"], "open": True}


@account.event("Deposited", fields={"amount": t.u64})
def deposited(state, data):
    return {**state, "balance": state["balance"] + data["amount"]}


@account.event("Withdrawn", fields={"amount": t.u64})
def withdrawn(state, data):
    return {**state, "balance": state["balance"] - data["amount"]}


@account.event("Closed")
def closed(state, data):
    return {**state, "open": False}


# What componentize-py exports.
WitWorld = account.world()
