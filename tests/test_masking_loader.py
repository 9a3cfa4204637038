"""Masking through the real streaming loader on a tiny prepared dataset: the same batch gets the same mask in
loader workers or the main process with any number of workers, resumes exactly, and the importance table is
built by the CLI and used."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import run_cli
from masktrain.data import collocations, importance, inputs
from masktrain.data.batches import IGNORE
from masktrain.data.masking import candidates, word_index
from masktrain.data.reader import DataError, Skips
from masktrain.data.shards import manifest_urls, publish_dataset, write_dataset
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher.loading import load_config
from masktrain.trainer.objectives import OBJECTIVES
from test_masking import runs_of

BATCHES = 10
# Two ranks of 4 rows, grad_accum 2: the rate moves every 2 batches, from 40% down to 10% over 4 steps.
SETTINGS = ["data.seq_len=64", "data.micro_batch_size=4", "trainer.global_batch_size=16", "trainer.max_steps=8",
            "data.masking.schedule=linear", "data.masking.rate=0.4", "data.masking.final_rate=0.1",
            "data.masking.schedule_steps=4"]


def rank_loader(tiny_data, *overrides: str, rank: int = 1):
    cfg = load_config("smoke", [*tiny_data, *SETTINGS, *overrides])
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    return inputs.train_loader(cfg, OBJECTIVES["mlm"].batch, True, tokenizer, rank, cfg.world_size), tokenizer


def originals(batch: dict) -> torch.Tensor:
    """The packed rows before masking: MLM labels hold the original token wherever the input was changed."""
    return torch.where(batch["labels"] != IGNORE, batch["labels"], batch["input_ids"])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("policy", ["span", "whole_word"])
def test_mask_is_the_same_in_workers_or_main_process_with_any_number_of_workers(tiny_data, policy):
    got = {}
    for workers in (0, 2):
        for in_workers in (True, False):
            loader, tokenizer = rank_loader(tiny_data, f"data.num_workers={workers}",
                                            f"data.mask_in_workers={str(in_workers).lower()}",
                                            f"data.masking.policy={policy}")
            batches = [next(loader) for _ in range(BATCHES)]
            special = tokenizer.vocab().special
            for index, batch in enumerate(batches):
                # Recomputed here, in the main process, from nothing but the rows and the batch index.
                assert same(batch, loader.batcher(originals(batch), index)), (workers, in_workers, index)
                assert not special[originals(batch)][batch["labels"] != IGNORE].any()
            got[workers, in_workers] = batches
    # And the masks are the configured policy's, not some other policy's applied alike everywhere.
    vocab = tokenizer.vocab()
    selected = torch.cat([b["labels"] != IGNORE for b in got[0, True]])
    ids = torch.cat([originals(b) for b in got[0, True]])
    if policy == "span":
        assert runs_of(selected).float().mean() > 2.5  # spans of mean 3.8; independent tokens at 40%: 1.7
    else:
        words = word_index(ids, vocab, candidates(ids, vocab))
        for row in range(len(ids)):
            for word in words[row].unique():
                assert selected[row][words[row] == word].unique().numel() == 1, (row, int(word))
        assert (selected & ~vocab.word_start[ids]).any()  # words of several pieces were among those taken
    for workers in (0, 2):
        assert all(same(a, b) for a, b in zip(got[workers, True], got[workers, False]))
    # The masking rate follows the schedule through the loader: 40%, 32.5%, ... by step (= index // 2).
    rates = [(b["labels"] != IGNORE).sum().item() / (b["labels"].numel()) for b in got[2, True]]
    assert rates[0] > rates[-1] + 0.15


def test_masks_resume_exactly_from_the_loader_state(tiny_data):
    loader, _ = rank_loader(tiny_data, "data.num_workers=2", "data.masking.policy=span")
    for _ in range(4):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]

    resumed, _ = rank_loader(tiny_data, "data.num_workers=2", "data.masking.policy=span")
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(expected, [next(resumed) for _ in range(6)]))


def test_the_rate_follows_the_step_the_loader_is_aligned_to(tiny_data):
    """After a resume whose data stream restarted or whose grad_accum changed (trainer.allow_config_change), the
    batch count no longer tells the optimizer step: the trainer aligns the loader, and the schedule goes on."""
    loader, tokenizer = rank_loader(tiny_data, "data.num_workers=1")
    vocab = tokenizer.vocab()

    def realized(batch: dict) -> float:
        return float((batch["labels"] != IGNORE).sum() / candidates(originals(batch), vocab).sum())

    schedule = loader.batcher.schedule
    assert [realized(next(loader)) for _ in range(2)] == pytest.approx([schedule(0)] * 2, abs=0.02)
    loader.align(3)  # batch 2 now opens step 3; two batches per step (grad_accum 2)
    rates = [realized(next(loader)) for _ in range(4)]
    assert rates == pytest.approx([schedule(3), schedule(3), schedule(4), schedule(4)], abs=0.02)
    assert schedule(3) - schedule(4) > 0.05


def test_importance_table_from_the_cli_weights_the_selection(tiny_data, tmp_path):
    table = tmp_path / "idf.npy"
    result = run_cli("data", "importance", "smoke", *tiny_data, f"data.masking.importance_table={table}",
                     check=True)
    assert f"-> {table}" in result.stdout
    idf = np.load(table)
    tokenizer = Tokenizer(inputs.tokenizer_dir(load_config("smoke", tiny_data)))
    assert idf.shape == (len(tokenizer),) and (idf >= 1).all()
    assert idf[tokenizer.sp.piece_to_id("\u2581the")] < np.median(idf)

    loader, _ = rank_loader(tiny_data, "data.num_workers=0", "data.masking.policy=importance",
                            f"data.masking.importance_table={table}", "data.masking.rate=0.15",
                            "data.masking.final_rate=0.15")
    picked, seen = np.zeros(len(idf)), np.zeros(len(idf))
    for _ in range(BATCHES):
        batch = next(loader)
        ids = originals(batch)
        np.add.at(seen, ids.flatten().numpy(), 1)
        np.add.at(picked, ids[batch["labels"] != IGNORE].numpy(), 1)
    rare = (idf >= np.median(idf[seen > 0])) & (seen > 0)
    common = (idf < np.median(idf[seen > 0])) & (seen > 0)
    rare_rate, common_rate = picked[rare].sum() / seen[rare].sum(), picked[common].sum() / seen[common].sum()
    assert rare_rate > 1.5 * common_rate, (rare_rate, common_rate)


def test_a_policy_table_is_needed_by_the_objectives_that_mask_only(tiny_data, tmp_path):
    """A MEAP ablation's NTP baseline is the same config with model.objective=ntp: it selects nothing."""
    table = f"data.masking.importance_table={tmp_path / 'absent.npy'}"
    meap = load_config("smoke", [*tiny_data, "model.objective=meap", "data.masking.policy=importance", table])
    with pytest.raises(DataError, match=r"absent.npy.*masktrain data importance"):
        inputs.check_ready(meap)
    meap.model.objective = "ntp"
    inputs.check_ready(meap)
    assert inputs.mask_spec(meap, Tokenizer(inputs.tokenizer_dir(meap))).options.importance is None


def test_importance_table_problems_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="masktrain data importance"):
        importance.load_table(tmp_path / "missing.npy", 100)
    np.save(tmp_path / "small.npy", np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError, match=r"small.npy: holds \(10,\) values, the tokenizer has 100 ids"):
        importance.load_table(tmp_path / "small.npy", 100)
    # An empty file (a copy cut short) and an .npz under the table's name: said, not a traceback.
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "archive.npz", np.ones(100))
    (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
    for name, said in (("empty", "not a numpy table"), ("archive", "not a numpy table (an .npz archive")):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}.npy: {said}")):
            importance.load_table(tmp_path / f"{name}.npy", 100)
    np.save(tmp_path / "complex.npy", np.ones(100, dtype=np.complex64))
    with pytest.raises(ValueError, match=r"complex.npy: importance weights must be finite real numbers >= 0"):
        importance.load_table(tmp_path / "complex.npy", 100)


def test_a_policy_table_built_with_another_tokenizer_is_refused(tiny_data, tmp_path):
    """Shards written again into a data folder with a tokenizer of the same size left its tables, whose ids
    then meant other tokens, and nothing compared them."""
    overrides = [*tiny_data, "data.masking.policy=importance", f"data.masking.importance_table={tmp_path / 'idf.npy'}"]
    cfg = load_config("smoke", overrides)
    importance.build_for_config(cfg, log=lambda text: None)
    inputs.check_ready(cfg)
    record = json.loads((tmp_path / "idf.npy.json").read_text())
    assert record["tokenizer_sha256"] == Tokenizer(inputs.tokenizer_dir(cfg)).fingerprint()
    (tmp_path / "idf.npy.json").write_text(json.dumps({**record, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'idf.npy'}: built for another tokenizer (sha256 "
                                                  "000000000000, the run's is ")):
        inputs.check_ready(cfg)
    (tmp_path / "idf.npy.json").unlink()  # no record: a table of one's own, or an old one, can't tell
    inputs.check_ready(cfg)


def test_idf_counts_each_document_once_per_id_and_skips_ids_outside_the_vocabulary(tmp_path):
    docs = [[7, 7, 7, 8], [7, 9], [8, 8], [7], [7, 12]]  # 12 is no id of a 12-id tokenizer
    publish_dataset(tmp_path, write_dataset(((f"doc {i}", d) for i, d in enumerate(docs)), tmp_path, vocab_size=12,
                                            shard_bytes=4096, val_fraction=0.0))
    skips = Skips(strict=False)
    frequencies, documents, tokens = importance.document_frequencies(manifest_urls(tmp_path, "train"), 12, skips)
    assert skips.counts == {"bad sample": 1}
    with pytest.raises(DataError, match="member .* token id 12 outside the vocabulary"):
        importance.document_frequencies(manifest_urls(tmp_path, "train"), 12, Skips(strict=True))
    assert (documents, tokens) == (4, 9)
    assert frequencies[[7, 8, 9, 10]].tolist() == [3, 2, 1, 0]
    weights = importance.idf(frequencies, documents)
    assert weights[7] == pytest.approx(np.log(5 / 4) + 1) and weights[10] == pytest.approx(np.log(5) + 1)
    assert weights[7] < weights[8] < weights[9] < weights[10]


def test_collocations_keep_the_pairs_that_occur_together_far_more_than_chance(tmp_path):
    from test_masking import VOCAB

    starts = torch.nonzero(VOCAB.word_start & ~VOCAB.special).flatten().tolist()
    inner = torch.nonzero(~VOCAB.word_start).flatten().tolist()
    new, york = [starts[0], inner[0]], [starts[1]]
    gen = np.random.default_rng(0)
    docs = []
    for i in range(300):
        filler = [[starts[2 + int(w)]] for w in gen.integers(0, 200, 12)]
        filler.insert(int(gen.integers(0, 12)), new + york)
        docs.append((f"doc {i}", [t for word in filler for t in word]))
    docs.append(("from another tokenizer", [*new, VOCAB.size + 3]))
    publish_dataset(tmp_path, write_dataset(docs, tmp_path, vocab_size=len(VOCAB.special), shard_bytes=8192,
                                            val_fraction=0.0))
    record = collocations.build_table(manifest_urls(tmp_path, "train"), VOCAB, lambda ids: " ".join(map(str, ids)),
                                      tmp_path / "pairs.npy", min_count=20, keep=10)
    assert record["strongest"][0]["text"] == " ".join(map(str, new + york))
    assert record["words"] == 300 * 14 and record["pairs"] == 300 * 13  # 12 fillers + 2 words per document
    assert record["skipped"] == {"bad sample": 1}
    table = collocations.load_table(tmp_path / "pairs.npy")
    assert 1 <= len(table) <= 10 and bool((table[1:] > table[:-1]).all())
    with pytest.raises(FileNotFoundError, match="masktrain data collocations"):
        collocations.load_table(tmp_path / "missing.npy")
    # Keys are hashes over all of int64: two far apart are sorted although their difference wraps around.
    np.save(tmp_path / "far.npy", np.array([-8854378049987593670, 8883786455086679568], dtype=np.int64))
    assert collocations.load_table(tmp_path / "far.npy").tolist() == [-8854378049987593670, 8883786455086679568]
    np.save(tmp_path / "unsorted.npy", np.array([5, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="unsorted.npy: expected sorted, distinct int64 pair keys"):
        collocations.load_table(tmp_path / "unsorted.npy")


def test_pmi_policy_through_the_loader_with_collocations_of_the_tiny_corpus(tiny_data, tmp_path):
    table = tmp_path / "collocations.npy"
    overrides = [f"data.masking.collocation_table={table}", "data.masking.collocation_min_count=5",
                 "data.masking.policy=pmi"]
    collocations.build_for_config(load_config("smoke", [*tiny_data, *overrides]), log=lambda text: None)
    assert len(collocations.load_table(table)) > 100
    loader, tokenizer = rank_loader(tiny_data, "data.num_workers=0", *overrides)
    special = tokenizer.vocab().special
    for index in range(4):
        batch = next(loader)
        assert same(batch, loader.batcher(originals(batch), index))
        assert not special[originals(batch)][batch["labels"] != IGNORE].any()
    assert loader.batcher.spec.policy == "pmi" and loader.batcher.spec.options.collocations is not None


def test_real_tokenizer_marks_every_special_token_unmaskable(tiny_data):
    tokenizer = Tokenizer(inputs.tokenizer_dir(load_config("smoke", tiny_data)))
    vocab = tokenizer.vocab()
    for token in ("pad", "unk", "bos", "eos", "cls", "sep", "mask"):
        assert vocab.special[getattr(tokenizer, f"{token}_id")], token
    assert vocab.word_start[tokenizer.sp.piece_to_id("\u2581the")]
    assert not vocab.special[vocab.regular_ids].any()


def test_eval_policy_gives_runs_of_other_policies_the_same_validation_masks(tiny_data):
    """Validation losses of runs that train with different policies compare only under one evaluation policy."""
    def labels(*overrides: str) -> list[torch.Tensor]:
        cfg = load_config("smoke", [*tiny_data, *SETTINGS, "trainer.eval_batches=3", *overrides])
        tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
        batches, _ = inputs.validation_set(cfg, OBJECTIVES["mlm"].batch, True, tokenizer, 0, 1, Skips(False))
        return [batch["labels"] for batch in batches]

    random = labels("data.masking.policy=random")
    span = labels("data.masking.policy=span")
    span_judged_as_random = labels("data.masking.policy=span", "data.masking.eval_policy=random")
    assert len(random) == 3 and all(torch.equal(a, b) for a, b in zip(random, span_judged_as_random))
    assert not all(torch.equal(a, b) for a, b in zip(random, span))
    with pytest.raises(Exception, match="data.masking.eval_policy: unknown masking policy 'spans': one of importance, "
                                        "pmi, random, span, whole_word"):
        load_config("smoke", [*tiny_data, "data.masking.eval_policy=spans"])
