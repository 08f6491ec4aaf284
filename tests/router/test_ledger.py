"""The router's ledger of the prompts it sent each worker to prefill (router.ledger): the
tokens per worker, and when each prompt was sent, until its first token comes."""

from __future__ import annotations

import time

from pdserve.router.ledger import PrefillLedger


def test_the_ledger_counts_each_prompt_with_when_it_was_sent_until_it_ends():
    ledger = PrefillLedger()
    ledger.started("p", "a", 100)
    time.sleep(0.05)
    ledger.started("p", "b", 30)
    ledger.started("q", "c", 7)
    assert (ledger.tokens("p"), ledger.tokens("q"), ledger.tokens("r")) == (130, 7, 0)
    (age_a, n_a), (age_b, n_b) = ledger.sent("p")  # the oldest first
    assert (n_a, n_b) == (100, 30) and age_a >= age_b + 0.05
    # sent again (a retry): counted once, from the new moment
    ledger.started("p", "a", 100)
    assert ledger.tokens("p") == 130 and [n for _, n in ledger.sent("p")] == [30, 100]
    ledger.ended("a")
    ledger.ended("a")  # idempotent
    assert ledger.tokens("p") == 30 and [n for _, n in ledger.sent("p")] == [30]
    ledger.ended("b")
    assert ledger.tokens("p") == 0 and ledger.sent("p") == ()
    assert [n for _, n in ledger.sent("q")] == [7]  # per worker
