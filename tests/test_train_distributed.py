"""2-rank DeepSpeed runs (gloo, CPU) through the `masktrain train` CLI, interrupted the ways clusters interrupt
them: kill -9 in the middle of a save, kill -9 at a random step, SIGTERM. Each launch costs 15-30 s here, so
every launch serves several assertions.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

from conftest import MASKTRAIN, run_cli
from masktrain.data.shards import manifest_urls
from masktrain.launcher.loading import load_config
from masktrain.launcher.run_lock import RunInUse, check_free
from masktrain.trainer.checkpoint import Checkpointer, read_meta
from masktrain.trainer.status import REQUEUE_EXIT

pytestmark = pytest.mark.slow

RNG = random.Random()  # the chosen steps are in every assertion message, so a failure can be replayed


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in metrics(run_dir) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows}


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, scheduler state letter) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, (parent, _) in table.items() if parent in frontier]
        found += frontier
    return found


def send(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # exited meanwhile
            pass


class Launch:
    """`masktrain train` in the background. Signals go to the launcher, as a scheduler sends them; `kill` takes
    down the whole process tree at once (launcher, torchrun, ranks in their own sessions, loader workers), as a
    node failure would."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen([MASKTRAIN, "train", *args], stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition, what: str, timeout: float = 300, poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"exited ({self.process.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-3000:]}")
            time.sleep(poll)

    def wait_for_step(self, step: int) -> None:
        self.wait_for(lambda: f"] step {step} loss" in self.text(), f"step {step}")

    def freeze(self) -> list[int]:
        """SIGSTOP every process of the job and wait until all are stopped (delivery to a process running on
        another core takes a moment, and a process may start one meanwhile). Returns their pids."""
        deadline = time.monotonic() + 10
        while True:
            table = processes()
            pids = [pid for pid in descendants(self.process.pid, table) if pid in table]
            if all(table[pid][1] in "TtZX" for pid in pids):
                return pids
            assert time.monotonic() < deadline, "the job did not stop"
            send(pids, signal.SIGSTOP)
            time.sleep(0.001)

    def resume(self, pids: list[int]) -> None:
        send(pids, signal.SIGCONT)

    def kill(self) -> None:
        send(self.freeze(), signal.SIGKILL)
        self.process.wait(timeout=60)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not finish in {timeout}s:\n{self.text()[-3000:]}") from None


def kill_during_save(launch: Launch, ckpt_dir: Path, steps: list[int]) -> int:
    """kill -9 the whole job while it writes one of the checkpoints for `steps`; returns that step.

    The job is frozen (SIGSTOP) the moment the `.partial` folder appears; if the save already got published in
    that moment, it runs on to the next candidate."""
    for step in steps:
        partial, final = ckpt_dir / f"step-{step:08d}.partial", ckpt_dir / f"step-{step:08d}"
        launch.wait_for(partial.exists, f"the save of step {step}", poll=0.002)
        frozen = launch.freeze()
        if partial.exists() and not final.exists():
            launch.kill()
            return step
        launch.resume(frozen)
    launch.kill()
    raise AssertionError(f"no save of steps {steps} could be caught in progress")


def test_zero2_kill9_mid_save_and_at_a_random_step_resumes_bitwise(tiny_data, tmp_path):
    common = ["smoke", *tiny_data, "trainer.zero_stage=2", "trainer.max_steps=12", "trainer.log_every=1",
              "trainer.checkpoint_every=3", "trainer.keep_last=2", "trainer.eval_every=6"]
    reference = tmp_path / "reference"
    run_cli("train", *common, f"run.output_dir={reference}", check=True)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 13))

    run = tmp_path / "run"
    ckpt = Checkpointer(run, 2, False)
    args = [*common, f"run.output_dir={run}"]

    # 1. kill -9 while a checkpoint is being written: the previous one stays `latest` and loads (launch 2).
    saving = kill_during_save(Launch(args, tmp_path / "1.log"), ckpt.dir, [6, 9])
    previous = ckpt.dir / f"step-{saving - 3:08d}"
    assert (ckpt.dir / "latest").read_text() == previous.name
    assert ckpt.latest() == previous
    assert (ckpt.dir / f"step-{saving:08d}.partial").exists() and not (ckpt.dir / f"step-{saving:08d}").exists()

    # 2. kill -9 at a random step after the resume.
    kill_at = RNG.randint(saving - 2, 10)
    second = Launch(args, tmp_path / "2.log")
    second.wait_for_step(kill_at)
    second.kill()
    assert f"resumed from {previous} at step {saving - 3}" in second.text(), f"to be killed at step {kill_at}"

    # 3. run to the end: every step's loss equals the uninterrupted run's, bit for bit.
    third = run_cli("train", *args, check=True)
    assert "resumed from" in third.stdout
    got = losses(run)
    assert got == expected, f"killed mid-save at step {saving}, then at step {kill_at}: {got} != {expected}"

    rows = metrics(run)
    evals = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0.0 < r["val/accuracy"] < 1.0 and "val/ppl" not in r for r in evals)
    assert evals == [r for r in metrics(reference) if "val/loss" in r]
    assert [p.name for p in ckpt.complete()] == ["step-00000009", "step-00000012"]
    assert not list(ckpt.dir.glob("*.partial")), "an interrupted save was not cleaned up"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_zero3_sigterm_and_sigusr1_checkpoint_requeue_and_resume_exactly(tiny_data, tmp_path):
    run = tmp_path / "run"
    ckpt = Checkpointer(run, 4, False)
    args = ["smoke", *tiny_data, f"run.output_dir={run}", "trainer.zero_stage=3", "trainer.max_steps=12",
            "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.keep_last=4"]

    def stop(launch: Launch, sig: signal.Signals, at: int) -> int:
        """Signal the launcher (as a scheduler would) at step `at`: it finishes the step, checkpoints and exits
        with the requeue code. Returns the step it stopped at."""
        launch.wait_for_step(at)
        launch.process.send_signal(sig)
        assert launch.finish() == 75, launch.text()[-3000:]
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "preempted" and status["reason"] == sig.name and status["step"] >= at, status
        assert f"stopping on {sig.name}" in launch.text()
        assert ckpt.latest().name == f"step-{status['step']:08d}"
        return status["step"]

    sigterm_at = RNG.randint(3, 6)
    stopped = stop(Launch(args, tmp_path / "1.log"), signal.SIGTERM, sigterm_at)
    before = losses(run)
    assert sorted(before) == list(range(1, stopped + 1))

    # Resume from the checkpoint before the last one: the steps both launches ran must agree bitwise, and the
    # new save of the stop step replaces the first one. SIGUSR1 (which torchrun forwards only when told to)
    # stops this launch.
    earlier = ckpt.complete()[-2]
    resumed_at = int(earlier.name.split("-")[1])
    second = Launch([*args, f"trainer.resume={earlier}"], tmp_path / "2.log")
    stop(second, signal.SIGUSR1, stopped + 1)
    assert f"resumed from {earlier} at step {resumed_at}" in second.text()
    replayed = losses(run)
    assert {s: replayed[s] for s in before} == before, f"SIGTERM at step {sigterm_at}, resumed at {resumed_at}"

    # A requeue runs the same command, trainer.resume included: it goes on from this line's own latest save.
    latest = ckpt.latest()
    requeued = run_cli("train", *args, f"trainer.resume={earlier}", "trainer.stop_after_steps=1")
    assert requeued.returncode == 75, requeued.stderr[-3000:]
    assert f"resumed from {latest} at step {int(latest.name.split('-')[1])}" in requeued.stdout
    assert f"this run has gone on from there and saved since, so it goes on from its latest checkpoint, {latest}" \
        in requeued.stderr, requeued.stderr[-3000:]

    third = run_cli("train", *args, check=True)
    assert "resumed from" in third.stdout
    after = losses(run)
    assert sorted(after) == list(range(1, 13)) and after[12] < after[1]
    # Stopped, rolled back, stopped again and requeued twice, the run computed what one launch computes.
    reference = tmp_path / "reference"
    run_cli("train", *args, f"run.output_dir={reference}", check=True)
    assert after == losses(reference), f"SIGTERM at step {sigterm_at}, resumed at {resumed_at}"
    evals = [r for r in metrics(run) if "val/accuracy" in r]
    assert [r["step"] for r in evals] == [12] and evals == [r for r in metrics(reference) if "val/accuracy" in r]

    # A resume whose config changes what the run computes fails before any rank starts, naming the keys.
    refused = run_cli("train", *args, "model.hidden_size=64", "trainer.max_steps=14")
    assert refused.returncode != 0
    assert "cannot resume from" in refused.stderr and "model.hidden_size: 128 -> 64" in refused.stderr
    assert "trainer.max_steps: 12 -> 14" in refused.stderr and "allow_config_change" in refused.stderr
    assert "DeepSpeed" not in refused.stdout + refused.stderr


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (the SigCgt mask in /proc/<pid>/status)."""
    try:
        mask = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("SigCgt:"))
        return bool(int(mask, 16) >> (sig - 1) & 1)
    except OSError:  # exited meanwhile
        return False


def maps(pid: int, library: bytes) -> bool:
    """Whether process `pid` has `library` mapped (an exited one counts as having it: it is past starting)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return True


def ranks_of(launch: Launch) -> list[int]:
    """The rank processes: torchrun's children (the launcher's grandchildren; loader workers are the ranks'
    children, with the same command line)."""
    table = processes()
    torchrun = [pid for pid, (parent, _) in table.items() if parent == launch.process.pid]
    return [pid for pid, (parent, _) in table.items() if parent in torchrun]


def test_a_stop_signal_while_the_ranks_start_is_honoured_after_the_first_step_and_passed_on_once(tiny_data,
                                                                                               tmp_path):
    """Ranks import torch and DeepSpeed for seconds (minutes on a busy shared file system): a scheduler's signal
    then must neither kill them nor be lost, and a repeated one must not cut torchrun's wait for their save."""
    run = tmp_path / "run"
    launch = Launch(["smoke", *tiny_data, f"run.output_dir={run}", "trainer.max_steps=6",
                     "trainer.checkpoint_every=0"], tmp_path / "launch.log")
    # Caught before torch is loaded (it takes seconds): a rank that installed its handler only after the imports
    # would never be seen so.
    launch.wait_for(lambda: len(ranks := ranks_of(launch)) == 2 and all(catches(pid, signal.SIGUSR1)
                                                                         and not maps(pid, b"libtorch")
                                                                         for pid in ranks),
                    "the ranks' stop handlers, before torch is imported", poll=0.005)
    for _ in range(3):
        launch.process.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
    assert launch.finish() == 75, launch.text()[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "state": "preempted", "step": 1, "reason": "SIGUSR1"}, status
    assert Checkpointer(run, 1, False).latest().name == "step-00000001"
    assert launch.text().count("already stopping on SIGUSR1") == 2
    # torchrun's end is one line, not a traceback that would read as a crash above the verdict.
    assert "torchrun: stopped on SIGUSR1" in launch.text() and "Traceback" not in launch.text()


def test_a_launcher_killed_outright_still_has_the_ranks_checkpoint(tiny_data, tmp_path):
    """torchrun runs in a process group of its own (so a terminal's Ctrl-C reaches it once, through the
    launcher); when the launcher dies without passing anything on, torchrun gets SIGTERM and the ranks save."""
    run = tmp_path / "run"
    launch = Launch(["smoke", *tiny_data, f"run.output_dir={run}", "trainer.max_steps=200",
                     "trainer.checkpoint_every=0"], tmp_path / "launch.log")
    launch.wait_for_step(1)
    launch.process.kill()
    launch.process.wait()
    with pytest.raises(RunInUse):  # the run folder stays taken while torchrun has its ranks save
        check_free(run)
    deadline = time.monotonic() + 120
    while json.loads((run / "status.json").read_text())["state"] == "running":
        assert time.monotonic() < deadline, launch.text()[-3000:]
        time.sleep(0.2)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and status["reason"] == "SIGTERM", status
    assert Checkpointer(run, 1, False).latest().name == f"step-{status['step']:08d}"


def test_a_rank_killed_outright_leaves_the_run_crashed_at_its_last_checkpoint(tiny_data, tmp_path):
    """No rank can write a verdict then: the launcher does, with the step a restart goes on from, which rank 0
    recorded with each checkpoint; torchrun names the killed rank in a line."""
    run = tmp_path / "run"
    launch = Launch(["smoke", *tiny_data, f"run.output_dir={run}", "trainer.max_steps=200",
                     "trainer.checkpoint_every=3", "trainer.log_every=1"], tmp_path / "launch.log")
    launch.wait_for_step(5)
    frozen = launch.freeze()
    try:
        running = json.loads((run / "status.json").read_text())
        assert running["state"] == "running" and running["step"] >= 3 and running["start"] == 0, running
        assert Checkpointer(run, 1, False).latest().name == f"step-{running['step']:08d}"
        rank1 = next(pid for pid in ranks_of(launch)
                     if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except BaseException:  # frozen processes would outlive the test
        launch.kill()
        raise
    send([rank1], signal.SIGKILL)
    launch.resume(frozen)
    code = launch.process.wait(timeout=120)
    status = json.loads((run / "status.json").read_text())
    saved = Checkpointer(run, 1, False).latest().name
    assert status["state"] == "crashed" and saved == f"step-{status['step']:08d}", (status, saved)
    assert status["start"] == 0
    assert f"a restart goes on from step {status['step']}" in launch.text()
    assert re.search(r"torchrun: rank 1 \(local rank 1, pid \d+\) was killed by SIGKILL", launch.text())
    assert code == 137, launch.text()[-3000:]


def test_a_zero0_run_moves_to_another_rank_count_only_when_allowed(tiny_data, tmp_path):
    """ZeRO-0 holds whole weights and optimizer state on every rank, so its checkpoint loads on any number of
    ranks, and the data position goes on from every rank's; but masks and dropout then differ from the run's
    own continuation, so such a move must be asked for."""
    run = tmp_path / "run"
    args = ["smoke", *tiny_data, f"run.output_dir={run}", "trainer.zero_stage=0", "trainer.max_steps=6",
            "trainer.log_every=1", "trainer.checkpoint_every=3", "trainer.eval_every=3"]
    stopped = run_cli("train", *args, "trainer.stop_after_steps=3")
    assert stopped.returncode == 75
    # A stop at an evaluation step saves first: the validation pass comes after, within what grace time is left.
    assert stopped.stdout.index("step 3: checkpoint") < stopped.stdout.index("step 3: val/loss=")
    one_rank = [*args, "launch.nproc_per_node=1"]
    refused = run_cli("train", *one_rank)
    assert refused.returncode != 0 and "ranks (launch.nnodes x launch.nproc_per_node): 2 -> 1" in refused.stderr
    moved = run_cli("train", *one_rank, "trainer.allow_config_change=true", check=True)
    assert f"resumed from {run / 'checkpoints' / 'step-00000003'} at step 3" in moved.stdout
    assert "data position continued from 2 loader slots on 1: of epoch 0, " in moved.stdout
    assert "; RNG states restart (the checkpoint has 2 ranks, this run 1)" in moved.stdout
    assert sorted(losses(run)) == list(range(1, 7))
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_a_mixture_trains_and_goes_on_in_each_source_after_its_weights_change(tiny_data, tmp_path):
    """Two prepared folders, one written with the other's tokenizer, mixed 3:1; resumed at 1:1:1, which only
    trainer.allow_config_change permits, each goes on from its position, and a third source, shards listed as
    `pipe:` commands (as from object storage), is read from its beginning and validated on with its own."""
    data = Path(next(o for o in tiny_data if o.startswith("data.dir=")).partition("=")[2])
    other, run = tmp_path / "other", tmp_path / "run"
    run_cli("data", "shards", "builtin:python-docs", "--max-docs", "300", "--tokenizer", str(data / "tokenizer"),
            "--out", str(other), check=True)
    args = ["smoke", *tiny_data, f"run.output_dir={run}", "trainer.max_steps=6", "trainer.log_every=1",
            "trainer.checkpoint_every=3"]
    mixed = run_cli("train", *args, f"data.mixture=[{{dir: {data}, weight: 3}}, {{dir: {other}}}]",
                    "trainer.stop_after_steps=3")
    assert mixed.returncode == REQUEUE_EXIT
    # 6 steps x 16 rows x 128 tokens: 9216 from data, 3072 from other.
    plan = re.search(rf"\[masktrain\] data: mixture: {data} 75.0% of the rows, ([\d,]+) tokens, read ([\d.]+) times "
                     rf"over the run; {other} 25.0% of the rows, ([\d,]+) tokens, read ([\d.]+) times over the run",
                     mixed.stdout)
    assert plan and float(plan[2]) == round(9216 / int(plan[1].replace(",", "")), 2), mixed.stdout[-3000:]
    assert float(plan[4]) == round(3072 / int(plan[3].replace(",", "")), 2)
    piped = {split: ", ".join(f"'pipe:cat {url}'" for url in manifest_urls(other, split)) for split in ("train", "val")}
    web = f"{{shards: [{piped['train']}], val_shards: [{piped['val']}], name: web}}"
    even = [*args, f"data.mixture=[{{dir: {data}}}, {{dir: {other}}}, {web}]"]
    refused = run_cli("train", *even)
    assert refused.returncode != 0 and "data.mixture: " in refused.stderr
    resumed = run_cli("train", *even, "trainer.allow_config_change=true", check=True)
    assert (f"data position continued: {data}: goes on from its position; {other}: goes on from its position; "
            "web: new or changed, read from its beginning" in resumed.stdout)
    shards = len(manifest_urls(other, "train"))
    assert f"; web 33.3% of the rows, {shards} shards listed by URL (no manifest counts their tokens)" in resumed.stdout
    assert sorted(losses(run)) == list(range(1, 7))
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    # Training validates on data.dir's split and on each other source's own, which eval scores the same.
    final = [row for row in metrics(run) if row["step"] == 6 and "val/loss" in row]
    assert final and final[0]["val/other/tokens"] > 0
    assert final[0]["val/web/loss"] == pytest.approx(final[0]["val/other/loss"])  # the same split, read by pipe
    assert not [key for key in final[0] if key.startswith("val/other/skipped")]
    scored = run_cli("eval", str(run), f"data.dir={other}", check=True)
    assert f"val/loss={final[0]['val/other/loss']:.6g} " in scored.stdout and f"batches of {other}, " in scored.stdout
    listed = run_cli("eval", str(run), f"data.val_shards=[{piped['val']}]", check=True)
    assert f"val/loss={final[0]['val/web/loss']:.6g} " in listed.stdout


LOADED_STATE = Path(__file__).parent / "loaded_state.py"


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_loads_on_another_rank_count_with_the_state_it_loads_on_its_own(tiny_data, tmp_path, stage):
    """DeepSpeed loads a ZeRO 1-3 checkpoint only on the ranks that saved it, except through its universal
    format: one rank given a 2-rank checkpoint gets every weight and Adam moment the 2 ranks get, bit for bit."""
    from masktrain.launcher.launch import rank_environment, write_run_config

    run = tmp_path / "run"
    common = [*tiny_data, f"run.output_dir={run}", f"trainer.zero_stage={stage}", "trainer.max_steps=3",
              "trainer.checkpoint_every=0", "trainer.eval_every=0"]
    assert run_cli("train", "smoke", *common, "trainer.stop_after_steps=2").returncode == REQUEUE_EXIT
    saved = run / "checkpoints" / "step-00000002"
    states = {}
    for ranks in (2, 1):
        cfg = load_config("smoke", [*common, f"launch.nproc_per_node={ranks}"])
        loaded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={ranks}", str(LOADED_STATE), str(write_run_config(cfg)),
                                 str(saved), str(tmp_path / f"{ranks}.pt")],
                                env=rank_environment(cfg, cuda=False), capture_output=True, text=True, timeout=600)
        assert loaded.returncode == 0, loaded.stdout[-3000:] + loaded.stderr[-3000:]
        states[ranks] = torch.load(tmp_path / f"{ranks}.pt")
    assert "writing its universal copy" in loaded.stdout
    assert states[1].keys() == states[2].keys() and len(states[1]) > 30
    for key, value in states[2].items():
        assert torch.equal(states[1][key], value), key
    assert float(states[1]["hf.bert.embeddings.word_embeddings.weight:exp_avg_sq"].abs().sum()) > 0
    assert sorted(p.name for p in saved.parent.iterdir()) == ["latest", "step-00000002", "zero_to_fp32.py",
                                                               "zero_to_torch.py"]  # the copy is gone

    if stage == 2:  # the run itself, moved: refused unless allowed (the rank count is part of the run)
        refused = run_cli("train", "smoke", *common, "launch.nproc_per_node=1")
        assert refused.returncode != 0 and "ranks (launch.nnodes x launch.nproc_per_node): 2 -> 1" in refused.stderr
        # A conversion that fails (on an optimizer shard that is a whole file but none of DeepSpeed's) ends the run
        # crashed, for a restart to convert again (a full disk may be over by then), and says it was the
        # conversion: the ranks do not end without a verdict.
        shard = saved / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        whole = shard.read_bytes()
        torch.save({}, shard)
        broken = run_cli("train", "smoke", *common, "launch.nproc_per_node=1", "trainer.allow_config_change=true")
        status = json.loads((run / "status.json").read_text())
        assert broken.returncode == 1 and status == {**status, "state": "crashed", "step": 2, "start": 2}, status
        assert status["reason"].startswith(f"DeepSpeed's universal conversion of checkpoint {saved} failed (exit 1: ")
        assert status["reason"].endswith("the converter's output is in the log above; once the cause is fixed, the next start converts it afresh")
        assert broken.stderr.endswith(f"masktrain: training crashed at step 2: {status['reason']}\n"), broken.stderr
        assert "DeepSpeed's universal converter exited 1; the end of its output:" in broken.stderr
        assert not list(saved.parent.glob("*.partial"))  # its half-written copy is not left to fill the disk
        shard.write_bytes(whole)
        moved = run_cli("train", "smoke", *common, "launch.nproc_per_node=1", "trainer.allow_config_change=true",
                        check=True)
        assert f"resumed from {saved} at step 2" in moved.stdout
        assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_every_checkpoint_closes_a_logged_interval(tiny_data, tmp_path):
    """A resume starts a new interval at its checkpoint, so the steps since the last log must be logged at the
    checkpoint: here steps 4 (a periodic save) and 5 (a stop), off the log_every=3 grid. One rank, to be quick."""
    run = tmp_path / "run"
    run_cli("train", "smoke", *tiny_data, f"run.output_dir={run}", "launch.nproc_per_node=1",
            "trainer.global_batch_size=8", "model.objective=ntp", "trainer.max_steps=7", "trainer.log_every=3",
            "trainer.checkpoint_every=4", "trainer.stop_after_steps=5", "trainer.eval_every=0")
    assert sorted(losses(run)) == [1, 3, 4, 5]
    # The config is in TensorBoard's text tab too, as indented (code) text.
    (step, text), = config_texts(run)
    assert step == 1 and "    model:\n      objective: ntp\n" in text


def test_a_logged_loss_is_the_mean_over_the_steps_since_the_previous_log(tiny_data, tmp_path):
    """The trainer feeds every step to the logged interval: with log_every=3, step 3's loss is the mean of
    steps 2 and 3 (step 1 is logged on its own, as every launch's first step). NTP on packed rows gives every
    step the same number of targets, so the mean per target is the plain mean of the step losses."""
    args = ["smoke", *tiny_data, "model.objective=ntp", "trainer.max_steps=6", "trainer.checkpoint_every=0",
            "trainer.eval_every=0"]
    every, third = tmp_path / "every", tmp_path / "third"
    logged = run_cli("train", *args, f"run.output_dir={every}", "trainer.log_every=1", check=True)
    run_cli("train", *args, f"run.output_dir={third}", "trainer.log_every=3", check=True)
    step, interval = losses(every), losses(third)
    # NTP masks nothing: no masking rate is logged, whatever the config's masking section holds.
    assert "mask_rate" not in logged.stdout and not any("train/mask_rate" in row for row in metrics(every))
    assert sorted(interval) == [1, 3, 6]
    assert interval[1] == step[1]
    assert interval[3] == pytest.approx((step[2] + step[3]) / 2, rel=1e-6)
    assert interval[6] == pytest.approx((step[4] + step[5] + step[6]) / 3, rel=1e-6)


def test_a_run_whose_console_reader_leaves_trains_to_its_end(tiny_data, tmp_path):
    """`masktrain train ... | head -1`, or a tee that died: every rank met the closed pipe at its next line."""
    run = tmp_path / "run"
    train = subprocess.Popen([MASKTRAIN, "train", "smoke", *tiny_data, f"run.output_dir={run}", "trainer.max_steps=6",
                              "trainer.progress_bar=false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert train.stdout.readline()
    train.stdout.close()  # as head does once it has its line
    code = train.wait(timeout=300)
    assert code in (0, 128 + signal.SIGPIPE)  # the launcher's own last line may meet the pipe too
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert Checkpointer(run, 1, False).latest().name == "step-00000006"


def test_checkpoint_minutes_saves_on_rank_0s_clock_on_every_rank(tiny_data, tmp_path):
    """A save is collective: rank 0's clock decides for both ranks (were they to disagree, the save would hang).
    At 1e-5 minutes (0.6 ms) every step is due, whatever checkpoint_every says."""
    run = tmp_path / "run"
    run_cli("train", "smoke", *tiny_data, f"run.output_dir={run}", "model.objective=ntp", "trainer.max_steps=3",
            "trainer.checkpoint_every=0", "trainer.checkpoint_minutes=1e-5", "trainer.keep_last=5",
            "trainer.eval_every=0", check=True)
    assert [read_meta(path)["step"] for path in Checkpointer(run, 5, False).complete()] == [1, 2, 3]


def config_texts(run: Path) -> list[tuple[int, str]]:
    """(step, text) of the config in TensorBoard's text tab, as its event files hold them."""
    return sorted((event.step, make_ndarray(value.tensor).item().decode())
                  for path in (run / "tb").glob("*tfevents*") for event in EventFileLoader(str(path)).Load()
                  for value in event.summary.value if value.tag == "config/text_summary")


def test_profile_steps_write_a_trace_per_rank_and_the_slowest_operators(tiny_data, tmp_path):
    """A stop inside the window writes what it profiled, named by the steps it holds; the resume profiles the
    window's rest. Each launch's config is in TensorBoard at its first step, so a rollback drops the config of the
    launch it abandons with that launch's other events."""
    run = tmp_path / "run"
    args = ["smoke", *tiny_data, f"run.output_dir={run}", "model.objective=ntp", "trainer.max_steps=5",
            "trainer.checkpoint_every=0", "trainer.eval_every=0", "trainer.profile_steps=[2,4]"]
    first = run_cli("train", *args, "trainer.stop_after_steps=2")
    assert first.returncode == REQUEUE_EXIT, first.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"
    second = run_cli("train", *args, "trainer.log_every=2", check=True)
    assert sorted(p.name for p in (run / "profile").iterdir()) == [
        "steps-2-2-rank0.json", "steps-2-2-rank1.json", "steps-3-4-rank0.json", "steps-3-4-rank1.json"]
    for trace in (run / "profile").iterdir():
        events = json.loads(trace.read_text())["traceEvents"]
        assert any(event.get("name", "").startswith("aten::") for event in events)
    for launch in (first, second):
        assert "Self CPU time total" in launch.stdout and f"profile: {run / 'profile'}" in launch.stdout
    assert [(step, "log_every: 2" in text) for step, text in config_texts(run)] == [(1, False), (3, True)]

    run_cli("train", *args, f"trainer.resume={run / 'checkpoints' / 'step-00000002'}", "trainer.log_every=3",
            "trainer.profile_steps=[]", check=True)
    assert [(step, "log_every: 3" in text) for step, text in config_texts(run)] == [(1, False), (3, True)]
    too_long = run_cli("train", *args, "trainer.max_steps=50", "trainer.profile_steps=[1,11]")
    assert too_long.returncode == 2 and "at most 10 steps (a window is held in memory)" in too_long.stderr
