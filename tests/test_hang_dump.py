"""The hang watchdog of a rank: a dump for each step that runs past the time, taken when the time runs out, none for
one that ends in time; the log when the file cannot be written or the watchdog cannot run."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time

from masktrain.trainer import hang_dump
from masktrain.trainer.hang_dump import HangDump


def test_a_step_past_its_time_gets_one_dump_of_every_thread_and_a_step_in_time_none(tmp_path, capsys):
    watchdog = HangDump(0.3, tmp_path, rank=3)
    stacks = tmp_path / "stacks" / "rank3.txt"
    try:
        for step in range(1, 4):  # each ends in time: the next one's begin resets the clock
            watchdog.begin(f"step {step}")
            time.sleep(0.05)
        assert not stacks.exists()

        release = threading.Event()
        helper = threading.Thread(target=release.wait, name="helper")
        helper.start()

        def stuck_in_a_step():
            watchdog.begin("step 4")
            time.sleep(1.0)  # past 0.3 s: one dump, not one each 0.3 s

        stuck_in_a_step()
        release.set()
        helper.join()
    finally:
        watchdog.close()
    dump = stacks.read_text()
    assert dump.startswith("rank 3: step 4 has not ended after 0.3 s (launch.collective_timeout); host ")
    assert "Thread MainThread (most recent call last):" in dump and "in stuck_in_a_step" in dump
    assert "Thread helper (most recent call last):" in dump and "in wait" in dump
    assert "masktrain-hang-dump" not in dump  # the watchdog's own stack says nothing
    assert capsys.readouterr().err == (f"[masktrain] rank 3: step 4 has not ended after 0.3 s "
                                       f"(launch.collective_timeout); the stack of each of its threads goes to {stacks}\n")


def test_the_stacks_are_those_of_the_moment_the_time_ran_out(tmp_path, monkeypatch):
    """A slow file system delays the write, not the picture: the step that ran long is the one shown."""
    write = HangDump.dump
    monkeypatch.setattr(HangDump, "dump", lambda self, *args: (time.sleep(0.5), write(self, *args)))
    watchdog = HangDump(0.2, tmp_path, rank=0)

    def step_7():
        watchdog.begin("step 7")
        time.sleep(0.3)

    def step_8():
        watchdog.begin("step 8")
        time.sleep(0.1)

    step_7()
    step_8()
    watchdog.close()  # waits for the write under way
    dump = (tmp_path / "stacks" / "rank0.txt").read_text()
    assert dump.startswith("rank 0: step 7 has not ended") and "in step_7" in dump and "in step_8" not in dump


def test_a_dump_that_cannot_be_written_goes_to_the_log(tmp_path, capsys):
    (tmp_path / "stacks").write_text("a file where the folder would be")
    watchdog = HangDump(0.1, tmp_path, rank=0)
    try:
        watchdog.begin("step 1")
        time.sleep(0.5)
    finally:
        watchdog.close()
    err = capsys.readouterr().err
    assert f"rank 0: {tmp_path / 'stacks' / 'rank0.txt'} not written (" in err
    assert "in test_a_dump_that_cannot_be_written_goes_to_the_log" in err.split("the stacks:\n", 1)[1]


def test_a_c_call_that_holds_the_interpreter_gets_faulthandlers_dump_in_the_log(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(hang_dump, "GRACE", 0.1)
    watchdog = HangDump(0.1, tmp_path, rank=0)
    try:
        watchdog.begin("step 1")
        started = time.monotonic()
        re.match(r"(a+)+$", "a" * 26 + "b")  # exponential backtracking in C, the interpreter held throughout
        assert time.monotonic() - started > 0.5
    finally:
        watchdog.close()
    err = capfd.readouterr().err
    assert re.search(r"Timeout \(0:00:00\.2\d*\)!\n(.*\n)*.* in match\n.* in test_a_c_call", err), err


def test_a_dump_to_a_file_system_that_hangs_is_said_in_the_log_and_does_not_hold_the_rank(tmp_path, capsys):
    """A named pipe nobody reads stands in for a dead hard mount: opening the file never returns."""
    (tmp_path / "stacks").mkdir()
    os.mkfifo(tmp_path / "stacks" / "rank0.tmp")
    watchdog = HangDump(0.1, tmp_path, rank=0)
    watchdog.begin("step 5")
    time.sleep(0.5)
    started = time.monotonic()
    watchdog.close()
    assert time.monotonic() - started < hang_dump.CLOSE_WAIT + 0.5
    assert "[masktrain] rank 0: step 5 has not ended after 0.1 s" in capsys.readouterr().err


def test_a_rank_waiting_for_a_batch_has_its_loader_workers_print_their_stacks_to_the_log(tmp_path, capfd):
    """A read that hangs (a dead mount, a `pipe:` that never ends) is in a loader worker: the rank's own stacks
    only say that it waits for the batch."""
    from test_loader import plain_batcher, spec_for

    from masktrain.data.loader import Loader

    loader = Loader(spec_for(["pipe:sleep 60"], num_workers=1), plain_batcher())
    def wait_for_a_batch():
        with contextlib.suppress(Exception):  # the workers' end, when closed below
            next(loader)

    waiting = threading.Thread(target=wait_for_a_batch, daemon=True)
    waiting.start()
    watchdog = HangDump(0.3, tmp_path, rank=0)
    watchdog.workers = loader.worker_pids
    try:
        deadline = time.monotonic() + 30
        while not (pids := loader.worker_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        watchdog.begin("step 1")
        time.sleep(1.5)
    finally:
        watchdog.close()
        loader.close()
    err = capfd.readouterr().err
    assert f"the stack of each of its threads goes to {tmp_path / 'stacks' / 'rank0.txt'}, and its loader workers' " \
           f"(pids {pids[0]}) to this log\n" in err
    # Its main thread is named after the thread that started it (here the test's).
    assert re.search(rf"\[masktrain\] loader worker pid {pids[0]}, the stack of each of its threads:\nThread .* "
                     r"\(most recent call last\):\n(  File .*\n)*  File .*loader\.py\", line \d+, in read\n", err), err


def test_loader_workers_busy_reading_print_their_stacks_as_often_as_asked_and_read_on_unchanged(tmp_path, capfd):
    """faulthandler's own handler, reading the frames of threads that run meanwhile, crashed a busy worker within
    a few hundred requests; the stacks are printed by the worker's main thread instead."""
    from test_loader import assert_same_batches, plain_batcher, spec_for, take, write_shards

    from masktrain.data.loader import Loader

    spec = spec_for(write_shards(tmp_path, [[37] * 300] * 4), num_workers=2, micro_batch_size=4)
    expected, _ = take(Loader(spec, plain_batcher()), 100)
    loader = Loader(spec, plain_batcher())
    got, asked = [], 0
    for _ in range(100):
        got.append(next(loader))
        for pid in loader.worker_pids():
            os.kill(pid, hang_dump.WORKER_STACKS)
            asked += 1
    loader.close()
    assert_same_batches(got, expected, "asked for stacks after every batch")
    # Requests that come before the last was handled are handled once (a signal is pending or not).
    assert asked >= 150 and capfd.readouterr().err.count("[masktrain] loader worker pid ") >= 20


def test_a_stack_request_that_cannot_be_printed_as_asked_leaves_the_worker_as_it_was(monkeypatch, capfd):
    """The handler runs inside whatever the worker was doing (a shard's read counts a ValueError as a corrupt
    shard): a file name that is no UTF-8 is printed escaped, and a log that cannot be written is passed over."""
    monkeypatch.setattr(hang_dump, "thread_stacks", lambda but: '  File "/data/caf\udce9.py", line 1, in read')
    hang_dump.print_worker_stacks(hang_dump.WORKER_STACKS, None)
    assert '  File "/data/caf\\udce9.py", line 1, in read\n' in capfd.readouterr().err

    def closed(fd: int, data: bytes) -> int:
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(os, "write", closed)
    hang_dump.print_worker_stacks(hang_dump.WORKER_STACKS, None)  # raises nothing

    # Started without a stderr: descriptor 2 is then whatever was opened next (the store's socket), left alone.
    written = []
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(fd) or len(data))
    monkeypatch.setattr(sys, "__stderr__", None)
    hang_dump.print_worker_stacks(hang_dump.WORKER_STACKS, None)
    assert written == []
