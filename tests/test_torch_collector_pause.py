"""castore.torch.collector.paused(): the cyclic collector off for a block and restored by the last of concurrent
blocks, a program's own gc.disable() respected."""

from __future__ import annotations

import gc
import threading

import pytest

from castore.torch import collector


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_the_collector_is_off_inside_and_on_again_after():
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_it_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with collector.paused():
            raise RuntimeError("a load that fails")
    assert gc.isenabled()


def test_the_last_of_overlapping_blocks_restores_it():
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        with collector.paused():
            inside.set()
            release.wait(10)
        done.set()

    thread = threading.Thread(target=other)
    with collector.paused():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's load is still running
    release.set()
    thread.join(10)
    assert done.is_set() and gc.isenabled()


def test_a_collector_the_program_disabled_stays_disabled():
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_what_the_block_made_is_moved_to_the_oldest_generation_and_stays_collectable():
    import weakref

    class Node:
        pass

    gc.collect()
    with collector.paused():
        made = [[i] for i in range(20_000)]  # what a load leaves: objects that live on
        cycle = Node()
        cycle.self = cycle  # and some cyclic garbage
        dead = weakref.ref(cycle)
        del cycle
    assert gc.get_freeze_count() == 0
    assert any(obj is made[-1] for obj in gc.get_objects(generation=2))
    assert dead() is not None  # no collection walked them on the way
    gc.collect()
    assert dead() is None  # a full collection still finds the garbage


def test_objects_the_program_froze_stay_frozen():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with collector.paused():
            made = [[i] for i in range(1000)]
        assert gc.get_freeze_count() == frozen and made
    finally:
        gc.unfreeze()
