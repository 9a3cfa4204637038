"""The MAE-LM encoder probe: which encoder states describe a removed token, and what a linear fit of them
scores; `masktrain repro mae-decoder` end to end at test size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from masktrain.data import inputs
from masktrain.data.batches import mae_batch
from masktrain.data.reader import Skips
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher.loading import load_config
from masktrain.trainer.encoder_probe import fit_and_score, neighbour_features, paired_stderr


def test_a_removed_token_is_described_by_its_nearest_visible_neighbours():
    # Positions 0..6 of one row: 1, 2 and 5 removed, 6 padding; a second row with nothing visible on the left;
    # a third with two tokens, both removed, and padding.
    removed = torch.tensor([[False, True, True, False, False, True, False],
                            [True, False, False, False, False, False, False],
                            [True, True, False, False, False, False, False]])
    visible_pos = torch.tensor([[0, 3, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]])
    visible_mask = torch.tensor([[True, True, True, False, False, False], [True] * 6, [False] * 6])
    encoded = torch.arange(1.0, 19.0).reshape(3, 6, 1)  # the state of visible token k of a row is its value
    labels = torch.full((3, 7), -100)
    labels[removed] = torch.tensor([11, 12, 15, 20, 30, 31])
    features, targets = neighbour_features(encoded, {"removed": removed, "visible_pos": visible_pos,
                                                     "visible_mask": visible_mask, "labels": labels})
    # Positions 1 and 2 lie between visible 0 and 3; 5 has 4 on its left and nothing real on its right; the
    # second row's position 0 has nothing on its left and position 1 (state 7) on its right; the third row's
    # tokens have no visible neighbour at all.
    assert features.tolist() == [[1.0, 2.0], [1.0, 2.0], [3.0, 0.0], [0.0, 7.0], [0.0, 0.0], [0.0, 0.0]]
    assert targets.tolist() == [11, 12, 15, 20, 30, 31]


def test_the_probe_fits_on_training_rows_and_scores_on_validation_rows(tiny_data):
    cfg = load_config("repro-mae-decoder", tiny_data)
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))

    def rows(**where):
        batches, _ = inputs.validation_set(cfg, mae_batch, True, tokenizer, 0, 1, Skips(True), **where)
        return [batch["labels"] for batch in batches]

    fit, scored = rows(split="train", limit=3), rows()
    assert len(fit) == 3 and len(scored) > 0
    assert not torch.equal(fit[0], scored[0])  # other tokens: the same masks would give equal labels
    assert len(rows(split="train", limit=5)) == 5


def test_the_probe_reads_what_the_features_say_and_starts_from_the_token_frequencies():
    gen = torch.Generator().manual_seed(0)
    vocab, n = 20, 6000
    targets = torch.multinomial(torch.linspace(1, 3, vocab), n, replacement=True, generator=gen)
    informative = torch.nn.functional.one_hot(targets, vocab).float() + 0.1 * torch.randn(n, vocab, generator=gen)
    noise = torch.randn(n, vocab, generator=gen)
    fit, scored = slice(0, 5000), slice(5000, n)

    def score(features):
        return fit_and_score((features[fit], targets[fit]), (features[scored], targets[scored]), vocab,
                             epochs=20, seed=1, lr=1e-2)

    read, blind, unrelated = score(informative), score(informative[:, :0]), score(noise)
    assert read.accuracy > 0.95 and read.loss < 0.5 * blind.loss
    # Reading nothing scores the fit's smoothed token frequencies, exactly.
    counts = torch.bincount(targets[fit][torch.randperm(5000, generator=torch.Generator().manual_seed(1))[500:]],
                            minlength=vocab)
    log_freq = (counts + 1.0).div(counts.sum() + vocab).log()
    assert blind.loss == pytest.approx(-log_freq[targets[scored]].mean().item(), rel=1e-5)
    assert blind.accuracy == pytest.approx((targets[scored] == log_freq.argmax()).double().mean().item())
    # Features unrelated to the tokens cannot beat the frequencies by much: the held-out tenth stops the fit.
    assert unrelated.loss < blind.loss + 0.05
    assert (read.targets, read.fit_targets) == (1000, 4500) and len(read.nll) == len(read.correct) == 1000
    assert read.loss == pytest.approx(read.nll.mean().item()) and read.accuracy == read.correct.mean().item()
    assert set(read.as_dict()) == {"loss", "accuracy", "accuracy_stderr", "targets", "fit_targets"}
    assert read.accuracy_stderr == pytest.approx(math.sqrt(read.accuracy * (1 - read.accuracy) / 1000))


def test_two_probes_on_the_same_targets_differ_by_the_spread_of_their_per_target_difference():
    a, b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert paired_stderr(a, b) == pytest.approx(math.sqrt(0.1875 / 4))  # differences 0, 1, 0, 0
    assert paired_stderr(a, a) == 0.0  # agreeing everywhere leaves no doubt about the difference


def test_repro_mae_decoder_trains_three_decoders_and_probes_each_encoder(tiny_data, tmp_path):
    out = tmp_path / "mae"
    run = run_cli("repro", "mae-decoder", *tiny_data, "trainer.max_steps=3", "trainer.eval_every=3",
                  "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
                  "--probe-batches", "20", "--probe-epochs", "2", "--out", str(out), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "repro-mae-decoder.json").read_text())
    names = ["2 layers x 32 (reference shape)", "2 layers x 16", "1 layers x 32"]
    assert list(report["arms"]) == names
    assert [report["arms"][name]["config_changes"] for name in names] == [
        [], ["model.decoder_hidden_size=16"], ["model.decoder_layers=1"]]
    # The saved configs are what each arm trained.
    saved = {name: (out / report["arms"][name]["run_dir"].split("/")[-1] / "config.yaml").read_text()
             for name in names}
    assert "decoder_hidden_size: 16" in saved[names[1]] and "decoder_layers: 1" in saved[names[2]]
    probes = [report["arms"][name]["probe"] for name in names]
    # One config, one seed: every encoder is probed on the same removed tokens.
    assert len({(p["targets"], p["fit_targets"]) for p in probes}) == 1 and probes[0]["targets"] > 0
    assert report["probe_reading_nothing"]["targets"] == probes[0]["targets"]
    # Other decoders leave other encoders, whose probe losses differ target by target (their argmax, at this toy
    # size, may not); each noise figure is the one its summary row shows.
    noise = [report["arms"][name]["probe_difference_stderr"] for name in names[1:]]
    assert all(n["loss"] > 0 and n["accuracy"] >= 0 for n in noise)
    assert [row["metric"].split("+-")[1] for row in report["summary"] if "scoring noise" in row["metric"]] == [
        f"{value})" for n in noise for value in (f"{n['loss']:.3f}", f"{100 * n['accuracy']:.2f}")]
    differences = [row for row in report["summary"] if " - " in row["metric"]]
    assert [row["value"] for row in differences] == pytest.approx(
        [value for p in probes[1:] for value in (p["loss"] - probes[0]["loss"],
                                                  100 * (p["accuracy"] - probes[0]["accuracy"]))])
    assert (out / report["plot"]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("override,message", [("model.decoder_layers=1", "model.decoder_layers must be at least 2"),
                                               ("model.objective=mlm", "model.objective must be mae_lm")])
def test_repro_mae_decoder_refuses_what_it_cannot_compare_before_training(tmp_path, override, message):
    run = run_cli("repro", "mae-decoder", override, "--out", str(tmp_path), timeout=120)
    assert run.returncode != 0 and message in run.stderr
    assert not list(tmp_path.iterdir())
