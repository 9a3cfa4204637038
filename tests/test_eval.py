"""`masktrain eval` after real 2-rank DeepSpeed runs (gloo, CPU): a checkpoint scored on one process gives the
validation loss the run logged at that step, and scores it on other masking or data only where asked."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from test_export import train

from masktrain.launcher import cli
from masktrain.trainer import evaluation


def logged(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "val/loss" in row}


def evaluated(*args: str) -> list[dict]:
    out = Path(args[0]).parent / "eval.json"
    done = run_cli("eval", *args, "--out", str(out), check=True)
    results = json.loads(out.read_text())["results"]
    # stdout is the summaries and the file written, nothing else (DeepSpeed's consolidation notes go to stderr).
    assert done.stdout.splitlines() == [evaluation.summary(r) for r in results] + [f"wrote {out}"]
    return results


@pytest.fixture(scope="module")
def mlm_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "mlm"
    train(tiny_data, run, "trainer.zero_stage=2", "trainer.max_steps=4", "trainer.checkpoint_every=2",
          "trainer.eval_every=2")
    return run


def test_every_checkpoint_of_a_run_scores_what_training_logged(mlm_run):
    results = evaluated(str(mlm_run), "--all")
    assert [r["step"] for r in results] == [2, 4]
    for result in results:
        row = logged(mlm_run)[result["step"]]
        assert result["val/loss"] == pytest.approx(row["val/loss"], rel=1e-6)
        assert result["val/accuracy"] == pytest.approx(row["val/accuracy"], rel=1e-6)
        assert result["val/tokens"] == row["val/tokens"]
        assert (result["objective"], result["policy"], result["rate"], result["skipped"]) == ("mlm", "random", 0.15, {})
    # Without --all, a run folder means its newest checkpoint.
    assert evaluated(str(mlm_run))[0]["step"] == 4


def test_masking_and_batches_change_only_where_asked(mlm_run):
    usual = evaluated(str(mlm_run))[0]
    (changed,) = evaluated(str(mlm_run), "data.masking.eval_rate=0.45", "trainer.eval_batches=2")
    assert changed["rate"] == 0.45 and changed["batches"] == 2 < usual["batches"]
    per_batch = (changed["val/tokens"] / changed["batches"]) / (usual["val/tokens"] / usual["batches"])
    assert 2.4 < per_batch < 3.6  # three times the masked targets per batch, within the draw's spread
    assert changed["val/loss"] != usual["val/loss"]


def test_what_would_change_the_model_is_refused_before_any_weights_are_read(mlm_run):
    refused = run_cli("eval", str(mlm_run), "model.hidden_size=64", "optim.lr=1", "data.masking.eval_rate=0.2")
    assert refused.returncode == 2 and "Processing zero checkpoint" not in refused.stderr
    assert "model.hidden_size: an evaluation can change only what it reads and how that is masked" in refused.stderr
    assert "optim.lr:" in refused.stderr and "data.masking.eval_rate" not in refused.stderr.split("(")[0]
    bad_value = run_cli("eval", str(mlm_run), "data.masking.eval_rate=2")
    assert bad_value.returncode == 2 and "data.masking.eval_rate" in bad_value.stderr
    assert "config.yaml with the changes given)" in bad_value.stderr  # not the saved config's own problem
    # An --out that could not be written is refused before hours of scoring, not after.
    for out, why in ((mlm_run.parent / "none" / "e.json", "no folder"), (mlm_run.parent, "a folder")):
        unwritable = run_cli("eval", str(mlm_run), "--out", str(out))
        assert unwritable.returncode == 1 and f"--out {out}: {why}" in unwritable.stderr
        assert "Processing zero checkpoint" not in unwritable.stderr
    assert not list(mlm_run.parent.parent.glob("*.tmp"))


def test_any_micro_batch_size_scores_the_validation_split(mlm_run):
    """The training job's batch size had to be a multiple of it; one process scoring has no such bound. The same
    rows, in more batches, each masked by its own draw."""
    usual = evaluated(str(mlm_run))[0]
    (odd,) = evaluated(str(mlm_run), "data.micro_batch_size=3")
    assert odd["batches"] > 2 * usual["batches"] and odd["rate"] == usual["rate"]
    assert odd["val/tokens"] == pytest.approx(usual["val/tokens"], rel=0.1)


def test_a_folder_named_like_an_override_is_a_folder(mlm_run, tmp_path):
    odd = tmp_path / "sweep.lr=high"
    shutil.copytree(mlm_run, odd)
    done = run_cli("eval", odd.name, cwd=tmp_path, check=True)
    assert "(step 4)" in done.stdout


def test_another_data_folder_must_share_the_checkpoints_tokenizer(mlm_run, tiny_data, tmp_path):
    data_dir = Path(next(o for o in tiny_data if o.startswith("data.dir=")).split("=", 1)[1])
    copy = tmp_path / "held-out"
    shutil.copytree(data_dir, copy)
    (same,) = evaluated(str(mlm_run), f"data.dir={copy}")
    assert same["data"] == str(copy) and same["val/loss"] == evaluated(str(mlm_run))[0]["val/loss"]

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other = run_cli("eval", str(mlm_run), f"data.dir={copy}")
    assert other.returncode == 1 and f"the shards in {copy} were written with another tokenizer" in other.stderr
    missing = run_cli("eval", str(mlm_run), f"data.dir={tmp_path / 'none'}")
    assert missing.returncode == 1 and "manifest.json: no manifest" in missing.stderr


def test_another_data_folder_is_masked_with_the_runs_own_tables(mlm_run, tiny_data, tmp_path):
    """A policy's table (IDF, collocations) defaults to the data folder's: scored on another folder, the run
    masks as it trained, with its own, unless one is named."""
    from masktrain.trainer.export import trained_config

    data_dir = Path(next(o for o in tiny_data if o.startswith("data.dir=")).split("=", 1)[1])
    _, cfg, _ = trained_config(mlm_run, {"data": {"dir": str(tmp_path)}})
    masking = cfg.data.masking
    assert (masking.importance_table, masking.collocation_table) == (str(data_dir / "idf.npy"),
                                                                     str(data_dir / "collocations.npy"))
    named = {"data": {"dir": str(tmp_path), "masking": {"importance_table": "mine.npy"}}}
    assert trained_config(mlm_run, named)[1].data.masking.importance_table == "mine.npy"
    assert named == {"data": {"dir": str(tmp_path), "masking": {"importance_table": "mine.npy"}}}  # left as given


def test_another_data_folder_is_read_for_a_run_trained_on_listed_shards(tiny_data, tmp_path):
    """Such a run's shard lists win over data.dir, so the override would have scored its own shards again."""
    data_dir = Path(next(o for o in tiny_data if o.startswith("data.dir=")).split("=", 1)[1])
    listed = tmp_path / "listed"
    shutil.copytree(data_dir, listed)
    run = tmp_path / "run"
    train(tiny_data, run, f"data.train_shards=[{listed}/train/shard-000000.tar]",
          f"data.val_shards=[{listed}/train/shard-000001.tar]")
    (own,) = evaluated(str(run))
    assert own["data"] == [f"{listed}/train/shard-000001.tar"]
    (other,) = evaluated(str(run), f"data.dir={data_dir}")
    assert other["data"] == str(data_dir) and other["val/tokens"] != own["val/tokens"]
    (emptied,) = evaluated(str(run), f"data.dir={data_dir}", "data.val_shards=[]")  # [] means the manifest's
    assert emptied["val/loss"] == other["val/loss"]
    gone = run_cli("eval", str(run), f"data.dir={tmp_path / 'none'}")
    assert gone.returncode == 1 and "manifest.json: no manifest" in gone.stderr


def test_a_checkpoint_pruned_while_the_others_are_scored_is_skipped(mlm_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(mlm_run, run)
    score = evaluation.evaluate_checkpoint

    def pruned_first(checkpoint, changes, device):
        if checkpoint.name == "step-00000002":
            shutil.rmtree(checkpoint)  # as keep_last does in a run still training
        return score(checkpoint, changes, device)

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", pruned_first)
    monkeypatch.setattr(sys, "argv", ["masktrain", "eval", str(run), "--all"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    out, err = capsys.readouterr()
    assert ended.value.code == 0
    assert "step-00000002 was removed while it was read (pruned): skipped" in err
    assert [line.split(" (step ")[1].split(")")[0] for line in out.splitlines()] == ["4"]


def test_a_decoder_under_zero3_with_document_attention_scores_what_training_logged(tiny_data, tmp_path):
    run = tmp_path / "meap"
    train(tiny_data, run, "trainer.zero_stage=3", "model.objective=meap", "data.document_attention=true")
    (result,) = evaluated(str(run))
    row = logged(run)[result["step"]]
    assert result["val/loss"] == pytest.approx(row["val/loss"], rel=1e-6)
    assert result["val/ppl"] == pytest.approx(row["val/ppl"], rel=1e-6)
    assert result["objective"] == "meap" and result["policy"] is not None
