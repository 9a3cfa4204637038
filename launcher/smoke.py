"""`masktrain smoke`: the whole path on this machine in minutes.

Raw text shipped with Python -> tokenizer -> shards -> 2 CPU ranks under DeepSpeed ZeRO-2 -> checkpoint and
leave half-way (as a preempted job would) -> a second launch resumes and finishes -> export.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from masktrain.launcher.launch import REQUEUE_EXIT, launch_local
from masktrain.launcher.loading import load_config
from masktrain.launcher.run_lock import start_afresh
from masktrain.trainer.status import read_status


def series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged `key` that was finite (the log writes null for one that was not)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def smoke(config: str = "smoke", overrides: list[str] | None = None, fresh_data: bool = False) -> int:
    from masktrain.data.prepare import prepare
    from masktrain.trainer.export import export

    started = time.perf_counter()
    cfg = load_config(config, overrides or [])
    run_dir = Path(cfg.output_dir)
    start_afresh(run_dir)  # first: a run of it in progress may be reading the data too
    if fresh_data:
        shutil.rmtree(cfg.data.dir, ignore_errors=True)
    prepare(cfg, log=lambda text: print(f"[smoke] {text}", flush=True))

    half = cfg.trainer.max_steps // 2
    print(f"[smoke] launch 1: {cfg.launch.nproc_per_node} ranks, ZeRO-{cfg.trainer.zero_stage}, "
          f"stops after {half} of {cfg.trainer.max_steps} steps", flush=True)
    first = load_config(config, (overrides or []) + [f"trainer.stop_after_steps={half}"])
    code = launch_local(first)
    if code == REQUEUE_EXIT and read_status(run_dir).get("reason") != "stop_after_steps":
        print("[smoke] launch 1 was stopped by a signal; run the smoke test again", flush=True)
        return code
    if code != REQUEUE_EXIT:
        print(f"[smoke] FAILED: launch 1 exited with {code}, expected the requeue code {REQUEUE_EXIT}")
        return 1
    print("[smoke] launch 2: resumes from the checkpoint and finishes", flush=True)
    code = launch_local(cfg)
    if code != 0:
        print(f"[smoke] FAILED: launch 2 exited with {code}")
        return 1

    from masktrain.trainer.checkpoint import Checkpointer

    checkpoint = Checkpointer(run_dir, 1, False).latest()
    exported = export(checkpoint, run_dir / "export")
    curve = series(run_dir, "train/loss")
    (first_step, first_loss), (last_step, last_loss) = curve[0], curve[-1]
    val_step, val_loss = series(run_dir, "val/loss")[-1]
    print(f"[smoke] train loss: {first_loss:.4f} at step {first_step} -> {last_loss:.4f} at step {last_step}; "
          f"validation loss {val_loss:.4f} at step {val_step}")
    print(f"[smoke] resumed at step {half} (see 'resumed from' above)")
    print(f"[smoke] TensorBoard logs: {run_dir / 'tb'}  (tensorboard --logdir {run_dir / 'tb'})")
    print(f"[smoke] checkpoint:       {checkpoint}")
    print(f"[smoke] exported model:   {exported}")
    print(f"[smoke] total time:       {time.perf_counter() - started:.0f}s")
    if not last_loss < first_loss:
        print("[smoke] FAILED: the loss did not fall")
        return 1
    return 0
