"""Lost-event counting from per-node sequence numbers."""

from __future__ import annotations

from evapi_worker.core.sequence import REJECTED, SequenceTracker


def test_first_event_of_a_node_counts_nothing_before_it() -> None:
    s = SequenceTracker()
    assert s.observe("a", 1, 5000, 0.0) == 0
    assert s.observe("a", 1, 5001, 0.0) == 0
    assert s.expire(100.0) == []


def test_reordered_events_fill_their_gap_within_the_grace() -> None:
    s = SequenceTracker(grace=2.0)
    s.observe("a", 1, 1, 0.0)
    s.observe("a", 1, 4, 0.0)
    assert s.pending("a") == 2
    s.observe("a", 1, 3, 0.5)
    s.observe("a", 1, 2, 0.6)
    assert s.pending("a") == 0
    assert s.expire(10.0) == []


def test_gap_still_open_after_the_grace_is_lost() -> None:
    s = SequenceTracker(grace=2.0)
    s.observe("a", 1, 1, 0.0)
    s.observe("a", 1, 5, 1.0)
    assert s.expire(2.9) == []
    s.observe("a", 1, 3, 2.95)
    assert s.expire(3.0) == [("a", 2)]
    assert s.pending("a") == 0


def test_duplicates_and_old_numbers_are_ignored() -> None:
    s = SequenceTracker()
    s.observe("a", 1, 10, 0.0)
    assert s.observe("a", 1, 10, 0.0) == 0
    assert s.observe("a", 1, 3, 0.0) == 0
    assert s.expire(100.0) == []


def test_kamailio_restart_counts_open_gaps_and_events_missed_in_the_new_boot() -> None:
    s = SequenceTracker()
    s.observe("a", 1, 1, 0.0)
    s.observe("a", 1, 3, 0.0)  # 2 is missing
    assert s.observe("a", 2, 4, 1.0) == 1 + 3  # 2 from before, 1..3 of the new boot
    assert s.observe("a", 1, 2, 1.1) == 0  # a straggler from the old boot
    assert s.observe("a", 2, 5, 1.2) == 0


def test_huge_gap_is_counted_at_once_without_memory() -> None:
    s = SequenceTracker(max_missing=100)
    s.observe("a", 1, 1, 0.0)
    assert s.observe("a", 1, 1_000_002, 0.0) == 1_000_000
    assert s.pending("a") == 0


def test_nodes_are_independent() -> None:
    s = SequenceTracker(grace=1.0)
    s.observe("a", 1, 1, 0.0)
    s.observe("b", 1, 1, 0.0)
    s.observe("a", 1, 3, 0.0)
    s.observe("b", 1, 2, 0.0)
    assert s.expire(5.0) == [("a", 1)]


def test_a_new_boot_id_smaller_than_the_old_one_is_still_a_restart() -> None:
    s = SequenceTracker()
    s.observe("a", 1795724634_900, 5, 0.0)
    assert s.observe("a", 1795724634_120, 3, 1.0) == 2  # same second, lower pid
    assert s.observe("a", 1795724634_900, 6, 1.1) == 0  # straggler of the old boot


def test_a_gap_does_not_age_while_the_worker_is_paused() -> None:
    # Stopped for 25 s with a gap open: the event that fills it was waiting
    # unread, and is not counted lost when the worker looks again first.
    s = SequenceTracker(grace=2.0)
    s.observe("a", 1, 1, 0.0)
    s.observe("a", 1, 3, 1.0)
    s.paused(25.0)
    assert s.expire(26.5) == []
    assert s.observe("a", 1, 2, 26.6) == 0
    # A gap that stays open still counts, after the grace of running time.
    s.observe("a", 1, 5, 27.0)
    s.paused(10.0)
    assert s.expire(38.9) == []
    assert s.expire(39.0) == [("a", 1)]


def test_the_wrap_of_kamailio_s_32_bit_counter_is_no_gap() -> None:
    # Seen on Kamailio 5.6: after 2**31 - 1 its counter reads -2**31.
    s = SequenceTracker(grace=1.0)
    s.observe("a", 1, 2**31 - 2, 0.0, 100.0)
    assert s.observe("a", 1, 2**31 - 1, 0.1, 100.1) == 0
    assert s.observe("a", 1, -(2**31), 0.2, 100.2) == 0
    assert s.observe("a", 1, -(2**31) + 2, 0.3, 100.3) == 0  # one missing, across nothing
    assert s.pending("a") == 1
    assert s.observe("a", 1, -(2**31) + 1, 0.4, 100.4) == 0  # it came, reordered
    assert s.observe("a", 1, 2**31 - 1, 0.5, 100.5) == 0  # an old one, before the wrap
    assert s.expire(10.0) == []


def test_a_gap_across_the_wrap_is_counted_once_the_grace_passed() -> None:
    s = SequenceTracker(grace=1.0)
    s.observe("a", 1, 2**31 - 2, 0.0, 100.0)
    s.observe("a", 1, -(2**31) + 1, 0.1, 100.1)  # 2**31 - 1 and -2**31 missing
    assert s.pending("a") == 2
    assert s.expire(5.0) == [("a", 2)]


def test_a_number_no_node_can_have_reached_is_rejected_not_counted_lost() -> None:
    s = SequenceTracker()
    s.observe("a", 1, 10, 0.0, 1000.0)
    # A forged 2**31 - 1 a moment later: two billion events in a millisecond.
    assert s.observe("a", 1, 2**31 - 1, 0.001, 1000.001) == REJECTED
    assert s.observe("a", 1, 11, 0.002, 1000.002) == 0  # the node goes on as before
    assert s.expire(100.0) == []
    # A real gap of a long outage is a loss: its events' stamps are minutes apart.
    assert s.observe("a", 1, 3_000_012, 600.0, 1600.0) == 3_000_000


def test_a_new_boot_that_cannot_have_counted_so_far_is_rejected() -> None:
    s = SequenceTracker()
    s.observe("a", 1, 10, 0.0, 1000.0)
    assert s.observe("a", 2, 2**31 - 1, 0.1, 1000.1) == REJECTED
    assert s.observe("a", 2, 3, 5.0, 1005.0) == 2  # a real restart
