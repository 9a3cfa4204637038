"""The toy reproductions at test size: both arms train through the real 2-rank path, the report carries the
measurements and a summary in the benchmarks' convention, and the plot is a PNG. The task generator and the
probe's answer check are tested directly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import run_cli
from masktrain.data.synthetic import RetrievalTask, probe_examples, training_documents
from masktrain.trainer import probe

TINY_DECODER = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
                "data.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.max_steps=3",
                "optim.warmup_steps=1", "data.prepare.vocab_size=400"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_retrieval_documents_and_probes():
    task = RetrievalTask(pairs=6, queries=3, keys=20, values=10)
    doc = next(training_documents(task, 1, seed=7))
    words, queries = doc.split(" ? ", 1)[0].split(" "), doc.split(" ? ")[1:]
    assert len(words) == 12 and len(queries) == 3
    context = dict(zip(words[0::2], words[1::2]))
    assert len(context) == 6 and set(context) <= set(task.key_words) and set(context.values()) <= set(task.value_words)
    for query in queries:  # every query asks a key of its own context and gives its value
        key, value = query.split(" ")
        assert context[key] == value
    assert list(training_documents(task, 3, seed=7)) == list(training_documents(task, 3, seed=7))
    assert list(training_documents(task, 3, seed=7)) != list(training_documents(task, 3, seed=8))

    examples = probe_examples(task, position=4, count=5, seed=7)
    for example in examples:
        words = example.prompt.split(" ? ")[0].split(" ")
        key, value = words[8], words[9]
        assert example.prompt.endswith(f" ? {key}") and example.answer == f" {value}"
        assert example.answer in example.choices
        assert set(example.choices) == {f" {v}" for v in words[1::2]}
    with pytest.raises(ValueError, match="position must be within"):
        probe_examples(task, position=6, count=1, seed=7)
    with pytest.raises(ValueError, match="queries must be within"):
        RetrievalTask(pairs=4, queries=5)


def test_repro_meap_trains_both_decoders_and_probes_retrieval(tmp_path):
    out, results = tmp_path / "meap", tmp_path / "results"
    run = run_cli("repro", "meap", *TINY_DECODER, "--out", str(out), "--results", str(results),
                  "--documents", "400", "--pairs", "4", "--queries", "2", "--keys", "16", "--values", "16",
                  "--probe-examples", "6", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((results / "repro-meap.json").read_text())
    assert report["experiment"] == "meap" and report["task"]["pairs"] == 4
    for name in ("ntp", "meap"):
        arm = report["arms"][name]
        assert arm["steps"] == 3 and arm["config_changes"] == [f"model.objective={name}"]
        for key in ("accuracy_by_position", "copied_by_position"):
            assert len(arm[key]) == 4 and all(0 <= a <= 1 for a in arm[key])
        # A retrieved answer is a value of the context.
        assert all(a <= c for a, c in zip(arm["accuracy_by_position"], arm["copied_by_position"]))
        assert (out / name / "checkpoints" / "step-00000003").is_dir()
        # What the arm really trained, as its run folder records it.
        assert yaml.safe_load((out / name / "config.yaml").read_text())["model"]["objective"] == name
    # The arms see different inputs from the same seed, data and weights: their losses part.
    curves = [[r["train/loss"] for r in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines())
               if "train/loss" in r] for name in ("ntp", "meap")]
    assert len(curves[0]) == len(curves[1]) >= 2 and curves[0] != curves[1]
    assert [row["target"] for row in report["summary"]] == ["", "", "", "", "", "> 0", "> 0"]
    assert report["summary"][5]["value"] == pytest.approx(
        100 * (report["arms"]["meap"]["mean_accuracy"] - report["arms"]["ntp"]["mean_accuracy"]))
    assert (results / report["plot"]).read_bytes().startswith(PNG_MAGIC)


def test_repro_schedule_trains_both_arms_and_compares_validation_loss(tiny_data, tmp_path):
    out = tmp_path / "schedule"
    # A rate given on the command line changes neither arm (each sets its own); the evaluation rate is reported.
    run = run_cli("repro", "schedule", *tiny_data, "trainer.max_steps=4", "trainer.eval_every=2",
                  "model.hidden_size=32", "model.intermediate_size=64", "data.masking.rate=0.2",
                  "data.masking.eval_rate=0.25", "--out", str(out), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "repro-schedule.json").read_text())
    constant, linear = report["arms"]["constant 15%"], report["arms"]["linear 30%->15%"]
    assert report["summary"][0]["metric"] == "MLM validation loss at 25% masking, constant 15%"
    assert [step for step, _ in constant["val_loss"]] == [2, 4] == [step for step, _ in linear["val_loss"]]
    # Same seed, data and evaluation masks; only the training rate differs: 0.3 falling to 0.15 vs 0.15.
    assert linear["mask_rate"][0] == [1, pytest.approx(0.3)] and constant["mask_rate"][0] == [1, pytest.approx(0.15)]
    assert linear["mask_rate"][-1][1] < 0.3
    assert report["summary"][2]["value"] == pytest.approx(linear["final_val_loss"] - constant["final_val_loss"])
    assert (out / report["plot"]).read_bytes().startswith(PNG_MAGIC)


class ScriptedDecoder(torch.nn.Module):
    """Predicts, at every position, the token given by `next_token[current token]`."""

    def __init__(self, next_token: dict[int, int], vocab: int = 16):
        super().__init__()
        self.table = torch.zeros(vocab, vocab)
        for token, following in next_token.items():
            self.table[token, following] = 1.0

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


def test_an_answer_counts_only_when_every_token_is_the_greedy_continuation():
    model = ScriptedDecoder({3: 7, 7: 8, 5: 9})
    examples = [probe.Encoded([1, 2, 3], [7, 8], {7, 11}),  # both answer tokens predicted: retrieved
                probe.Encoded([1, 2, 3], [7, 9], {7, 11}),  # the second one wrong, the first a context value
                probe.Encoded([1, 5], [7], {7, 11}),        # wrong, and no value of the context
                probe.Encoded([1, 5], [11], {9, 11}),       # wrong, but another value of the context
                probe.Encoded([4, 2, 5], [9], {9})]         # right, in a batch padded to the longest row
    assert probe.greedy_answers(model, examples, pad_id=0, batch_size=3) == [[7, 8], [7, 8], [9], [9], [9]]
    scores = probe.score(model, examples, pad_id=0)
    assert scores.retrieved == pytest.approx(2 / 5) and scores.copied == pytest.approx(4 / 5)


def test_repro_refuses_an_output_path_that_is_a_file_before_any_work(tmp_path):
    """Found after the data and the runs, an hour in: the report's folder could not be made."""
    taken = tmp_path / "taken"
    taken.write_text("")
    for experiment in ("schedule", "meap"):
        run = run_cli("repro", experiment, "--out", str(taken), timeout=120)
        assert run.returncode == 1 and f"--out {taken}: a file, not a folder" in run.stderr, run.stderr
    run = run_cli("repro", "mae-decoder", "--out", str(tmp_path / "out"), "--results", str(taken), timeout=120)
    assert run.returncode == 1 and f"--results {taken}: a file, not a folder" in run.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "taken"]
