"""A money transfer between two bank accounts: a process manager — in Python.

The same process manager as examples/transfer (Rust), answer for answer and
key for key (its aggregate type is ``transfer-py``, streams
``transfer_py-<id>``, so that it can be loaded beside the Rust one): the same
commands, events, statuses and refusal reasons.

A transfer is started with ``start {"from", "to", "amount"}``. It sends
``withdraw`` to the source account; once the account has stored
``Withdrawn``, it sends ``deposit`` to the target; once that is stored, the
transfer is complete. If the target refuses the deposit (a closed account),
the transfer sends the money back with a ``deposit`` to the source: it is
compensated. If the source refuses the withdrawal (insufficient funds,
closed), the transfer fails and nothing moved.

| command     | receives                                | events |
|-------------|-----------------------------------------|--------|
| `start`     | `{"from", "to", "amount"}` (a client)   | `Started`; sends `withdraw` |
| `debited`   | the source's `Withdrawn` (followed)     | `Debited`; sends `deposit` to the target |
| `deposited` | either account's `Deposited` (followed) | `Completed` (the credit), or `Compensated` (the refund) |
| `refused`   | a refusal of a command it sent          | `Failed` (the debit), `CreditRefused` and sends the refund (the credit), `RefundFailed` (the refund) |

Every command it sends is a timer due at once, stored with its events: a
crash between deciding and sending loses nothing, and the host sends each
once. Build it for the ``process-manager`` world (``componentize-py -w
process-manager``).
"""

from rehydra import Aggregate, decision, event, follow, invalid, send, t, timer_key, trim

# The keys of the commands a transfer sends.
DEBIT = "debit"
CREDIT = "credit"
REFUND = "refund"

# Stored as {"status": "started", "from": "a", "to": "b", "amount": 5}, with
# "reason" once there is one. The status is one of `none`, `started`,
# `debited`, `refunding`, `completed`, `compensated`, `failed`,
# `refund-failed`.
transfer = Aggregate(
    type="transfer-py",
    stream_prefix="transfer_py",
    state_schema=1,
    state={"status": t.string, "from": t.string, "to": t.string, "amount": t.u64, "reason": t.omittable(t.string)},
    initial_state={"status": "none", "from": "", "to": "", "amount": 0, "reason": None},
    follows=[
        follow("bank-account", "Withdrawn", "scheduled-by", "debited"),
        follow("bank-account", "Deposited", "scheduled-by", "deposited"),
    ],
    on_refused="refused",
    # A transfer is over once it has one of these: the host then delivers it
    # nothing more.
    finished_by=["Completed", "Compensated", "Failed", "RefundFailed"],
)


def to_account(key, account, command, amount):
    """A command to a bank account, sent at once."""
    return send(key, "bank-account", account, command, {"amount": amount})


@transfer.command("start", mode="create", fields={"from": t.string, "to": t.string, "amount": t.u64})
def start(state, cmd, ctx):
    source, target, amount = cmd["from"], cmd["to"], cmd["amount"]
    if amount == 0:
        raise invalid("amount", "must be greater than 0")
    if not trim(source):
        raise invalid("from", "must not be empty")
    if not trim(target):
        raise invalid("to", "must not be empty")
    if source == target:
        raise invalid("to", "must differ from `from`")
    return decision(
        event("Started", {"from": source, "to": target, "amount": amount}),
        timers=[to_account(DEBIT, source, "withdraw", amount)],
    )


@transfer.command("debited", mode="update", fields={"event": t.followed_event})
def debited(state, cmd, ctx):
    if state["status"] != "started" or timer_key(cmd["event"]) != DEBIT:
        return None
    return decision(event("Debited"), timers=[to_account(CREDIT, state["to"], "deposit", state["amount"])])


@transfer.command("deposited", mode="update", fields={"event": t.followed_event})
def deposited(state, cmd, ctx):
    key = timer_key(cmd["event"])
    if state["status"] == "debited" and key == CREDIT:
        return event("Completed")
    if state["status"] == "refunding" and key == REFUND:
        return event("Compensated")
    return None


@transfer.command("refused", mode="update", fields={"refusal": t.refusal})
def refused(state, cmd, ctx):
    refusal = cmd["refusal"]
    reason = f"{refusal['target']['id']} refused {refusal['command']}: {refusal['message']}"
    if state["status"] == "started" and refusal["key"] == DEBIT:
        return event("Failed", reason=reason)
    if state["status"] == "debited" and refusal["key"] == CREDIT:
        return decision(
            event("CreditRefused", reason=reason),
            timers=[to_account(REFUND, state["from"], "deposit", state["amount"])],
        )
    if state["status"] == "refunding" and refusal["key"] == REFUND:
        return event("RefundFailed", reason=reason)
    return None


@transfer.event("Started", fields={"from": t.string, "to": t.string, "amount": t.u64})
def started(state, data):
    return {**state, "status": "started", "from": data["from"], "to": data["to"], "amount": data["amount"]}


@transfer.event("Debited")
def was_debited(state, data):
    return {**state, "status": "debited"}


@transfer.event("Completed")
def completed(state, data):
    return {**state, "status": "completed"}


@transfer.event("CreditRefused", fields={"reason": t.string})
def credit_refused(state, data):
    return {**state, "status": "refunding", "reason": data["reason"]}


@transfer.event("Compensated")
def compensated(state, data):
    return {**state, "status": "compensated"}


@transfer.event("Failed", fields={"reason": t.string})
def failed(state, data):
    return {**state, "status": "failed", "reason": data["reason"]}


@transfer.event("RefundFailed", fields={"reason": t.string})
def refund_failed(state, data):
    return {**state, "status": "refund-failed", "reason": data["reason"]}


# What componentize-py exports (the process-manager world).
WitWorld = transfer.world()
