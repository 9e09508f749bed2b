"""Tests of the aggregate under CPython, through the same bytes the host
sends: python3 -m unittest (or make test)."""

import unittest

from app import counter
from rehydra import Context, Rejection, invalid


def run(state, command, data, version):
    return counter.handle_bytes(*state, command, data, Context("c1", version))


class CounterTest(unittest.TestCase):
    def test_counts_and_replies_with_the_total(self):
        started = run(counter.initial_state_bytes(), "start", b'{"label":" hits "}', 0)
        self.assertEqual(started.events, [("Started", b'{"label":"hits"}')])
        once = run(started.state, "increment", b'{"by":2}', 1)
        twice = run(once.state, "increment", b'{"by":3}', 2)
        self.assertEqual(twice.reply, b"5")
        self.assertEqual(twice.state, (1, b'{"label":"hits","total":5}'))
        reset = run(twice.state, "reset", b"", 3)
        self.assertEqual(reset.state, (1, b'{"label":"hits","total":0}'))
        # Resetting again changes nothing.
        self.assertEqual(run(reset.state, "reset", b"", 4).events, [])

    def test_refuses_bad_data(self):
        s0 = counter.initial_state_bytes()
        for command, data, field, message in [
            ("start", b"{}", "label", "is required"),
            ("start", b'{"label":"  "}', "label", "must not be empty"),
            ("increment", b'{"by":0}', "by", "must be greater than 0"),
            ("increment", b'{"by":-1}', "by", "invalid value: integer `-1`, expected u64"),
        ]:
            with self.assertRaises(Rejection) as caught:
                run(s0, command, data, 1)
            self.assertEqual(caught.exception, invalid(field, message))


if __name__ == "__main__":
    unittest.main()
