"""`masktrain smoke`, the README's first command, on the tiny dataset: two launches of 2 CPU ranks (the first
leaves half-way with the requeue code, the second resumes), then export; what it prints is where to look."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_smoke_trains_stops_resumes_exports_and_says_where_everything_is(tiny_data, tmp_path):
    run, temp = tmp_path / "run", tmp_path / "temp"
    temp.mkdir()
    result = run_cli("smoke", "smoke", *tiny_data, f"run.output_dir={run}", "trainer.max_steps=8",
                     "trainer.checkpoint_every=0", check=True, env={"TMPDIR": str(temp)})
    out = result.stdout
    assert not list(temp.glob("torchelastic_*"))  # torchrun's folder of error files, one each launch
    assert "stops after 4 of 8 steps" in out and f"resumed from {run / 'checkpoints' / 'step-00000004'}" in out

    first, last = (float(x) for x in re.search(r"train loss: (\S+) at step 1 -> (\S+) at step 8", out).groups())
    assert last < first
    places = dict(re.findall(r"^\[smoke\] (TensorBoard logs|checkpoint|exported model): +(\S+)", out, re.M))
    assert Path(places["TensorBoard logs"]) == run / "tb" and any(run.joinpath("tb").glob("*tfevents*"))
    assert Path(places["checkpoint"]) == run / "checkpoints" / "step-00000008"
    exported = Path(places["exported model"])
    assert (exported / "config.json").is_file() and (exported / "tokenizer.json").is_file()
    assert any(exported.glob("*.safetensors"))
