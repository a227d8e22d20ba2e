"""The path from an event to the engine: node routing, the nodes' clocks,
and rate-limited warnings."""

from __future__ import annotations

from evapi_worker.engine import Act, Engine, EngineSettings
from evapi_worker.intake import Intake, NodeClocks
from evapi_worker.logs import Throttle

from .helpers import Wire

T0 = 1_700_000_000.0


def test_a_node_s_clock_is_the_wall_clock_until_a_quick_ping_measures_it() -> None:
    clocks = NodeClocks(wall_offset=T0 - 100.0)  # engine time 100 is T0 on the wall
    assert clocks.local("kam1", T0 + 2) == 102.0
    # The node is 3 s ahead: it stamped its answer at our 200.05 + 3.
    clocks.ping("kam1", 200.0, 200.1, T0 - 100 + 203.05)
    assert abs(clocks.offset("kam1") - (T0 - 100 + 3)) < 1e-6
    # A slow answer (1 s round trip) says little: the better measure stays.
    clocks.ping("kam1", 300.0, 301.0, T0 - 100 + 300.0)
    assert abs(clocks.offset("kam1") - (T0 - 100 + 3)) < 1e-6
    assert clocks.local("kam2", T0) == 100.0  # other nodes unaffected
    assert clocks.local("kam1", float("inf")) is None


def test_a_register_read_late_has_its_deadline_from_when_it_happened() -> None:
    wire, engine = Wire(), Engine(EngineSettings(deadline=5))
    intake = Intake(engine, NodeClocks(wall_offset=T0))  # engine time 0 is T0
    intake.feed("kam1", wire.start(T0), 0.0)
    intake.feed("kam1", wire.cancelled(T0 + 1), 0.0)
    # Registered at T0 + 2, read 20 s later (a frozen worker).
    (act,) = intake.feed("kam1", wire.register(T0 + 2), 22.0)
    assert isinstance(act, Act) and act.deadline == 7.0  # passed long ago
    # Read in time, the deadline is 5 s after the REGISTER.
    wire2, engine2 = Wire(), Engine(EngineSettings(deadline=5))
    intake2 = Intake(engine2, NodeClocks(wall_offset=T0))
    intake2.feed("kam1", wire2.start(T0), 0.0)
    intake2.feed("kam1", wire2.cancelled(T0 + 1), 1.0)
    (act2,) = intake2.feed("kam1", wire2.register(T0 + 2), 2.1)
    assert isinstance(act2, Act) and act2.deadline == 7.0
    # A stamp ahead of the worker's clock counts from when it was read.
    wire3, engine3 = Wire(), Engine(EngineSettings(deadline=5))
    intake3 = Intake(engine3, NodeClocks(wall_offset=T0 - 50))  # the node runs 50 s ahead
    intake3.feed("kam1", wire3.start(T0), 0.0)
    intake3.feed("kam1", wire3.cancelled(T0 + 1), 0.0)
    (act3,) = intake3.feed("kam1", wire3.register(T0 + 2), 0.5)
    assert isinstance(act3, Act) and act3.deadline == 5.5


def test_a_register_belongs_to_the_node_whose_connection_brought_it() -> None:
    wire, engine = Wire(node="edge-a"), Engine()
    intake = Intake(engine, NodeClocks(wall_offset=T0))
    intake.feed("kam1", wire.start(T0), 0.0)
    intake.feed("kam1", wire.cancelled(T0 + 1), 1.0)
    (act,) = intake.feed("kam1", wire.register(T0 + 2), 2.0)
    assert act.node == "kam1"


def test_a_throttle_says_one_line_per_key_and_second_and_counts_the_rest() -> None:
    throttle: Throttle[str] = Throttle(every=1.0)
    said = [throttle.note("bad", 10.0 + i / 1000) for i in range(500)]
    assert said[0] == 1 and sum(1 for n in said if n) == 1
    assert throttle.note("other", 10.2) == 1  # keys are independent
    assert throttle.due(10.5) == []  # not a second yet
    assert throttle.due(11.0) == [("bad", 499)]
    assert throttle.due(12.0) == []
    assert throttle.note("bad", 12.5) == 1
