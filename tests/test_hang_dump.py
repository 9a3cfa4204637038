"""The hang watchdog of a rank: a dump for each step that runs past the time, none for one that ends in time."""

from __future__ import annotations

import threading
import time

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
    assert "in stuck_in_a_step" in dump and "in wait" in dump  # the main thread and the helper
    err = capsys.readouterr().err
    assert err == (f"[masktrain] rank 3: step 4 has not ended after 0.3 s (launch.collective_timeout); the stack of "
                   f"each of its threads: {stacks}\n")


def test_a_dump_that_cannot_be_written_goes_to_stderr(tmp_path, capfd):
    (tmp_path / "stacks").write_text("a file where the folder would be")
    watchdog = HangDump(0.1, tmp_path, rank=0)
    try:
        watchdog.begin("the start-up")
        time.sleep(0.5)
    finally:
        watchdog.close()
    err = capfd.readouterr().err
    assert "[masktrain] rank 0: the start-up has not ended after 0.1 s (launch.collective_timeout); the stack of each " \
           f"of its threads ({tmp_path / 'stacks' / 'rank0.txt'} not written: " in err
    assert "test_a_dump_that_cannot_be_written_goes_to_stderr" in err
