"""The virtual clock: client speeds from a spec or a file, task steps, the event heap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlearn.errors import ConfigError
from fedlearn.seeding import rng_for
from fedlearn.sim.clock import EventQueue, client_speeds, task_steps


def test_constant_is_one_for_everybody_and_constant_s_is_s() -> None:
    np.testing.assert_array_equal(client_speeds("constant", 4, 0), np.ones(4))
    np.testing.assert_array_equal(client_speeds("constant:2.5", 3, 0), np.full(3, 2.5))


def test_lognormal_has_median_one_and_is_drawn_from_the_run_seed() -> None:
    speeds = client_speeds("lognormal:1.0", 20_000, 7)
    assert speeds.shape == (20_000,) and (speeds > 0).all()
    assert np.median(speeds) == pytest.approx(1.0, rel=0.05)
    assert np.std(np.log(speeds)) == pytest.approx(1.0, rel=0.05)
    expected = np.exp(rng_for("client-speeds", 7).normal(0.0, 1.0, 20_000))
    np.testing.assert_array_equal(speeds, expected)
    np.testing.assert_array_equal(client_speeds("lognormal:1.0", 5, 7),
                                  client_speeds("lognormal:1.0", 5, 7))
    assert not np.array_equal(client_speeds("lognormal:1.0", 5, 7),
                              client_speeds("lognormal:1.0", 5, 8))
    np.testing.assert_array_equal(client_speeds("lognormal:0", 3, 1), np.ones(3))


def test_uniform_stays_within_its_bounds() -> None:
    speeds = client_speeds("uniform:0.5:2", 1000, 0)
    assert speeds.min() >= 0.5 and speeds.max() <= 2.0
    np.testing.assert_array_equal(client_speeds("UNIFORM:1:1", 3, 0), np.ones(3))


def test_a_file_gives_one_speed_per_client_in_order(tmp_path: Path) -> None:
    text = tmp_path / "speeds.txt"
    text.write_text("# measured on our phones\n1.5\n0.25  # slow\n\n3\n")
    np.testing.assert_array_equal(client_speeds(str(text), 3, 0), [1.5, 0.25, 3.0])
    csv = tmp_path / "speeds.csv"
    csv.write_text("speed\n1,2\n0.5\n")
    np.testing.assert_array_equal(client_speeds(str(csv), 3, 0), [1.0, 2.0, 0.5])


@pytest.mark.parametrize(("spec", "words"), [
    ("gamma:2", "is not a speed spec or a readable file"),
    ("lognormal", "wrong number of parts; write lognormal:SIGMA"),
    ("lognormal:abc", "non-number SIGMA 'abc'"),
    ("lognormal:-1", "SIGMA >= 0"),
    ("lognormal:inf", "finite SIGMA"),
    ("uniform:2", "wrong number of parts; write uniform:LO:HI"),
    ("uniform:2:1", "0 < LO <= HI"),
    ("uniform:0:1", "0 < LO <= HI"),
    ("constant:0", "positive speed"),
    ("constant:1:2", "wrong number of parts"),
    ("/no/such/speeds.csv", "is not a speed spec or a readable file"),
])
def test_a_bad_spec_is_one_sentence(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match="--client-speeds") as info:
        client_speeds(spec, 3, 0)
    message = str(info.value)
    assert words in message and message.endswith(".") and "\n" not in message


@pytest.mark.parametrize(("content", "words"), [
    ("1\n2\n", "holds 2 speeds but there are 3 clients"),
    ("1\n2\n3\n4\n", "holds 4 speeds but there are 3 clients"),
    ("1\nfast\n2\n", "line 2 has 'fast', not a number"),
    ("1\n0\n2\n", "line 2 has speed 0"),
    ("1\n-2\n2\n", "line 2 has speed -2"),
    ("1\nnan\n2\n", "line 2 has speed nan"),
    ("", "holds 0 speeds"),
])
def test_a_bad_file_is_one_sentence(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "speeds.csv"
    path.write_text(content)
    with pytest.raises(ConfigError, match="--client-speeds file") as info:
        client_speeds(str(path), 3, 0)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_an_unreadable_file_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "speeds.bin"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match=r"cannot read --client-speeds file .*\(not UTF-8 text\)"):
        client_speeds(str(path), 3, 0)


def test_task_steps_count_mini_batches() -> None:
    assert task_steps(60, 1, 32) == 2
    assert task_steps(64, 1, 32) == 2
    assert task_steps(65, 3, 32) == 9
    assert task_steps(1, 1, 32) == 1


def test_the_heap_pops_by_virtual_time_and_ties_in_arrival_order() -> None:
    queue: EventQueue[str] = EventQueue()
    for time, name in [(5.0, "e"), (1.0, "a"), (3.0, "c1"), (0.5, "first"), (3.0, "c2"),
                       (9.0, "z"), (3.0, "c3")]:
        queue.push(time, name)
    assert len(queue) == 7 and queue.peek_time() == 0.5
    popped = [queue.pop() for _ in range(len(queue))]
    assert popped == [(0.5, "first"), (1.0, "a"), (3.0, "c1"), (3.0, "c2"), (3.0, "c3"),
                      (5.0, "e"), (9.0, "z")]
    assert queue.peek_time() is None and len(queue) == 0
    with pytest.raises(IndexError):
        queue.pop()


def test_the_heap_orders_many_random_times() -> None:
    rng = np.random.default_rng(0)
    times = rng.exponential(size=500)
    queue: EventQueue[int] = EventQueue()
    for i, t in enumerate(times):
        queue.push(float(t), i)
    out = [queue.pop() for _ in range(500)]
    assert [t for t, _ in out] == sorted(times.tolist())
    assert sorted(i for _, i in out) == list(range(500))
