"""A short 2-rank DeepSpeed (ZeRO-2, gloo, CPU) training run through the CLI: trains, checkpoints, resumes."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_zero2_trains_checkpoints_and_resumes(tiny_data, tmp_path):
    run = tmp_path / "run"
    common = ["smoke", *tiny_data, f"run.output_dir={run}", "trainer.max_steps=16", "trainer.log_every=1",
              "trainer.checkpoint_every=4", "trainer.keep_last=2"]
    first = run_cli("train", *common, "trainer.stop_after_steps=6")
    assert first.returncode == 75, first.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"
    assert (run / "checkpoints" / "latest").read_text() == "step-00000006"

    second = run_cli("train", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 6" in second.stdout

    rows = [r for r in metrics(run) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.5
    assert any("val/loss" in r for r in metrics(run))
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == ["step-00000012", "step-00000016"]
    assert (run / "tb").is_dir() and any((run / "tb").iterdir())
