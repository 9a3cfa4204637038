"""Masking policies and batch functions, checked statistically over many tokens (pure tensor code, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from masktrain.data import batches, masking
from masktrain.data.batches import IGNORE, MaskSpec
from masktrain.data.masking import (POLICIES, PolicyOptions, Vocab, candidates, corrupt, draw, generator, pair_keys,
                                    span_length_probs, take_in_order, take_lowest, target_counts, word_index,
                                    word_table)

SIZE = 1000
PAD, UNK, BOS, EOS, CLS, SEP, MASK = range(7)


def make_vocab(word_start_fraction: float = 0.6) -> Vocab:
    special = torch.zeros(SIZE, dtype=torch.bool)
    special[:7] = True
    word_start = (torch.rand(SIZE, generator=torch.Generator().manual_seed(0)) < word_start_fraction) | special
    return Vocab(size=SIZE, pad_id=PAD, mask_id=MASK, special=special, word_start=word_start)


VOCAB = make_vocab()


def packed_rows(rows: int = 64, length: int = 512, seed: int = 0) -> torch.Tensor:
    """Rows like the loader's: documents between [CLS] ... [SEP], one padded tail, a few unknown tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, SIZE, (rows, length), generator=gen)
    ids[:, 0] = CLS
    ids[:, length // 3] = SEP
    ids[:, length // 3 + 1] = CLS
    ids[torch.rand(ids.shape, generator=gen) < 0.002] = UNK
    ids[0, length - 40:] = PAD
    return ids


def some_collocations(ids: torch.Tensor, every: int = 7) -> torch.Tensor:
    """A collocation table holding every `every`-th adjacent word pair of the batch."""
    _, hashes, real = word_table(ids, VOCAB, candidates(ids, VOCAB))
    both = real[:, :-1] & real[:, 1:]
    return torch.unique(pair_keys(hashes)[both][::every])


def words_of(ids: torch.Tensor, vocab: Vocab) -> list[list[list[int]]]:
    """Per row, the candidate positions of each word, straight from the definition (a plain loop)."""
    cand = candidates(ids, vocab)
    out = []
    for r in range(ids.shape[0]):
        words: list[list[int]] = []
        for t in range(ids.shape[1]):
            if not cand[r, t]:
                words.append([])
            elif t == 0 or bool(vocab.word_start[ids[r, t]]) or not cand[r, t - 1]:
                words.append([t])
            else:
                words[-1].append(t)
        out.append([w for w in words if w])
    return out


def runs_of(mask: torch.Tensor) -> torch.Tensor:
    """Lengths of the maximal runs of True along each row, all rows together."""
    padded = torch.nn.functional.pad(mask.int(), (1, 1))
    edges = padded.diff(dim=1)
    starts = (edges == 1).nonzero()
    ends = (edges == -1).nonzero()
    return ends[:, 1] - starts[:, 1]


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("exact", [True, False])
def test_every_policy_hits_the_rate_and_never_touches_specials_or_padding(policy, exact):
    ids = packed_rows()
    cand = candidates(ids, VOCAB)
    opts = PolicyOptions(exact=exact, importance=torch.rand(SIZE, generator=torch.Generator().manual_seed(1)) + 0.5,
                         collocations=some_collocations(ids))
    for rate in (0.05, 0.15, 0.4):
        selected = POLICIES[policy](ids, VOCAB, rate, generator(7, 0, 3), opts)
        assert not (selected & ~cand).any(), "a special or padding token was selected"
        realized = selected.sum().item() / cand.sum().item()
        # 64 x ~510 candidates: a binomial's sd at 0.4 is 0.0027; whole words and spans add a little.
        assert abs(realized - rate) < 0.012, (policy, exact, rate, realized)
        if exact and policy in ("random", "span", "importance"):
            assert torch.equal(selected.sum(dim=1), target_counts(cand, rate))


def test_independent_importance_draws_keep_the_rate_on_rows_that_are_half_padding():
    """The per-token probability is rate x weight / the mean weight of the row's candidates: a mean over every
    position (padding and specials weigh 0) would inflate the rate of the padded last rows."""
    ids = packed_rows(rows=256, length=256)
    ids[:, 128:] = PAD
    cand = candidates(ids, VOCAB)
    opts = PolicyOptions(exact=False, importance=torch.ones(SIZE))
    selected = POLICIES["importance"](ids, VOCAB, 0.15, generator(2), opts)
    assert abs(selected.sum().item() / cand.sum().item() - 0.15) < 0.006


def test_exact_counts_round_rate_times_candidates_as_bert_does():
    """The exact policies are checked against target_counts: its own rounding needs numbers of its own."""
    rows = torch.ones((3, 126), dtype=torch.bool)
    rows[1, 100:] = False  # 100 candidates
    rows[2, 10:] = False  # 10 candidates
    assert target_counts(rows, 0.05).tolist() == [6, 5, 0]  # 6.3, 5.0, 0.5 (half to even)
    assert target_counts(rows, 0.159).tolist() == [20, 16, 2]  # 20.03, 15.9, 1.59
    assert target_counts(torch.zeros((1, 8), dtype=torch.bool), 0.5).tolist() == [0]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_independent_draws_have_no_rounding_offset_on_short_rows(policy):
    """exact: false promises rate * n on average; round(rate * n) would mask 6 of 126 candidates (4.8%) at 5%."""
    ids = torch.randint(7, SIZE, (4000, 128), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, -1] = CLS, SEP
    cand = candidates(ids, VOCAB)
    opts = PolicyOptions(exact=False, importance=torch.ones(SIZE), collocations=some_collocations(ids))
    selected = POLICIES[policy](ids, VOCAB, 0.05, generator(4), opts)
    # 504,000 candidates: sd 0.0003 per token, ~0.0006 for spans of mean 3.8; the offset is 0.0024.
    assert abs(selected.sum().item() / cand.sum().item() - 0.05) < 0.0015


def test_independent_spans_hit_high_rates_on_short_rows():
    """A span crossing the row's end is cut there, and whether it goes in is drawn on that cut length: drawn on its
    full length, a 16-token row masked 95% of its tokens at rate 1.0 and 91.5% at 0.95."""
    ids = torch.randint(7, SIZE, (4000, 18), generator=torch.Generator().manual_seed(5))
    ids[:, 0], ids[:, -1] = CLS, SEP
    cand = candidates(ids, VOCAB)
    for rate in (0.8, 0.95, 1.0):
        selected = POLICIES["span"](ids, VOCAB, rate, generator(6), PolicyOptions(exact=False))
        assert not (selected & ~cand).any()
        # 64,000 candidates in rows of 16: the realized rate's sd is under 0.002.
        assert abs(selected.sum().item() / cand.sum().item() - rate) < 0.008, rate
    assert torch.equal(selected, cand)


def test_take_lowest_matches_a_full_sort():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 200, generator=gen)
    scores[scores < 0.1] = math.inf
    counts = torch.randint(0, 150, (50,), generator=gen)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(50):
        expected[r, scores[r].argsort()[:counts[r]]] = True
    assert torch.equal(take_lowest(scores, counts), expected)


def test_take_in_order_fills_a_budget_in_score_order_and_exactly_on_average():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 60, generator=gen)
    sizes = torch.randint(0, 6, (200, 60), generator=gen)
    budget = torch.randint(0, 40, (200,), generator=gen)
    taken = take_in_order(scores, sizes, budget, generator(3))
    for r in range(200):
        order = [i for i in scores[r].argsort().tolist() if sizes[r, i] > 0]
        chosen = set(taken[r].nonzero().flatten().tolist())
        assert chosen == set(order[:len(chosen)]), "units go in score order"
        end = 0
        for i in order:
            start, end = end, end + int(sizes[r, i])
            if end <= budget[r]:
                assert i in chosen, "a unit within the budget is taken"
            elif start >= budget[r]:
                assert i not in chosen, "a unit past the budget is not"

    # One row drawn 20,000 times: its crossing unit goes in just often enough that the mean total is the budget.
    sizes = torch.randint(1, 6, (1, 40), generator=gen).expand(20_000, -1)
    scores = torch.rand(sizes.shape, generator=gen)
    totals = (take_in_order(scores, sizes, torch.full((20_000,), 17), generator(4)) * sizes).sum(dim=1)
    assert (totals - 17).abs().max() < 5
    assert totals.double().mean().item() == pytest.approx(17, abs=0.06)


def test_corrupt_splits_80_10_10_and_never_inserts_specials():
    ids = packed_rows(rows=128)
    selected = POLICIES["random"](ids, VOCAB, 0.3, generator(1), PolicyOptions())
    out, labels = corrupt(ids, selected, VOCAB, 0.8, 0.1, generator(2))
    assert torch.equal(out[~selected], ids[~selected])
    assert torch.equal(labels, torch.where(selected, ids, IGNORE))
    n = selected.sum().item()  # ~19,500 tokens: sd of a 10% share is 0.2%
    masked = (out[selected] == MASK).sum().item() / n
    kept = (out[selected] == ids[selected]).sum().item() / n
    replaced = 1 - masked - kept
    # A random replacement equals the original 1 time in ~993: counted as kept.
    assert abs(masked - 0.8) < 0.01 and abs(replaced - 0.1) < 0.01 and abs(kept - 0.1) < 0.01
    assert not VOCAB.special[out[selected & (out != MASK)]].any()

    pure, _ = corrupt(ids, selected, VOCAB, 1.0, 0.0, generator(2))
    assert (pure[selected] == MASK).all()


def test_whole_words_are_never_split():
    ids = packed_rows(rows=16, length=256)
    for exact in (True, False):
        selected = POLICIES["whole_word"](ids, VOCAB, 0.2, generator(5), PolicyOptions(exact=exact))
        for r, words in enumerate(words_of(ids, VOCAB)):
            for word in words:
                states = {bool(selected[r, t]) for t in word}
                assert len(states) == 1, f"row {r}: word at {word} split: {selected[r, word].tolist()}"


def test_word_index_agrees_with_the_definition():
    ids = packed_rows(rows=8, length=128)
    index = word_index(ids, VOCAB, candidates(ids, VOCAB))
    for r, words in enumerate(words_of(ids, VOCAB)):
        for word in words:
            assert len(set(index[r, word].tolist())) == 1
        assert len({int(index[r, w[0]]) for w in words}) == len(words)


def test_whole_word_exact_count_is_within_one_word_of_the_target():
    ids = packed_rows()
    cand = candidates(ids, VOCAB)
    selected = POLICIES["whole_word"](ids, VOCAB, 0.15, generator(9), PolicyOptions())
    longest = max(len(w) for row in words_of(ids, VOCAB) for w in row)
    assert ((selected.sum(dim=1) - target_counts(cand, 0.15)).abs() <= longest).all()


@pytest.mark.parametrize("rate", [0.0, 0.15, 0.5, 1 - 2**-18, 1.0])
def test_independent_draws_have_the_rate_up_to_its_last_bit(rate):
    drawn = draw((200_000,), rate, generator(5)).double().mean().item()
    assert drawn == pytest.approx(rate, abs=0.004)


@pytest.mark.parametrize("mean, longest", [(3.8, 10), (2.0, 5), (6.0, 8)])
def test_span_length_distribution_has_the_configured_mean(mean, longest):
    probs = span_length_probs(mean, longest)
    assert abs(float((probs * torch.arange(1, longest + 1)).sum()) - mean) < 1e-6
    # Geometric: each length is q times as likely as the one before.
    ratios = probs[1:] / probs[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))


def test_spanbert_recipe_is_p_0_2_cut_at_10():
    probs = span_length_probs(3.8, 10)
    assert abs(float(probs[1] / probs[0]) - 0.8) < 0.01


@pytest.mark.parametrize("exact, tolerance", [(False, 0.03), (True, 0.06)])
def test_spans_have_the_configured_mean_length_and_cap(exact, tolerance):
    ids = torch.randint(7, SIZE, (256, 512), generator=torch.Generator().manual_seed(3))
    opts = PolicyOptions(exact=exact, span_mean=3.8, span_max=10)
    selected = POLICIES["span"](ids, VOCAB, 0.15, generator(4), opts)
    runs = runs_of(selected)  # spans never touch, so each run is one span (~5,000 of them)
    assert runs.max() <= 10
    # Exact mode cuts each row's last span to fit the budget: slightly shorter on average.
    assert abs(runs.float().mean().item() - 3.8) < tolerance * 3.8, runs.float().mean()


@pytest.mark.parametrize("exact", [True, False])
def test_spans_mask_both_halves_of_a_row_alike(exact):
    """The last span drawn (cut to the budget, or the one that crossed it) was always laid out rightmost: the
    second half of a row was masked 0.7 points less (exact) or 1.1 more than the first."""
    ids = torch.randint(7, SIZE, (4000, 128), generator=torch.Generator().manual_seed(3))
    selected = POLICIES["span"](ids, VOCAB, 0.15, generator(5), PolicyOptions(exact=exact)).float()
    assert abs(float(selected[:, :64].mean() - selected[:, 64:].mean())) < 0.004


def test_spans_skip_specials_and_still_cover_the_rate_at_high_rates():
    ids = packed_rows(rows=8, length=128)
    cand = candidates(ids, VOCAB)
    for rate in (0.5, 0.9, 1.0):
        selected = POLICIES["span"](ids, VOCAB, rate, generator(1), PolicyOptions())
        assert torch.equal(selected.sum(dim=1), target_counts(cand, rate))
        assert not (selected & ~cand).any()


def test_importance_selects_in_proportion_to_weight():
    ids = torch.randint(7, SIZE, (256, 512), generator=torch.Generator().manual_seed(0))
    weights = torch.ones(SIZE)
    heavy = torch.arange(SIZE) % 2 == 0
    weights[heavy] = 3.0
    for exact in (True, False):
        selected = POLICIES["importance"](ids, VOCAB, 0.05, generator(2), PolicyOptions(exact=exact,
                                                                                           importance=weights))
        rate_heavy = selected[heavy[ids]].float().mean().item()
        rate_light = selected[~heavy[ids]].float().mean().item()
        # Drawing without replacement flattens the ratio a little below 3 at 5%.
        assert 2.6 < rate_heavy / rate_light < 3.2, (exact, rate_heavy / rate_light)
    flat = POLICIES["importance"](ids, VOCAB, 0.05, generator(2), PolicyOptions(importance=weights ** 0))
    assert abs(flat[heavy[ids]].float().mean() / flat[~heavy[ids]].float().mean() - 1) < 0.1


def test_zero_weight_tokens_are_taken_last_and_specials_never():
    ids = packed_rows(rows=16, length=64)
    cand = candidates(ids, VOCAB)
    weights = torch.ones(SIZE)
    zero = torch.arange(SIZE) >= SIZE // 2
    weights[zero] = 0.0
    positive = cand & ~zero[ids]
    for rate in (0.1, 0.8, 1.0):
        selected = POLICIES["importance"](ids, VOCAB, rate, generator(1), PolicyOptions(importance=weights))
        counts = target_counts(cand, rate)
        assert torch.equal(selected.sum(dim=1), counts), rate
        assert not (selected & ~cand).any(), rate
        # A zero-weight token only once every positive-weight one of its row is taken.
        taken_zero = (selected & ~positive).sum(dim=1)
        assert torch.equal(taken_zero, (counts - positive.sum(dim=1)).clamp(min=0)), rate
    # Among themselves, zero-weight tokens are drawn at random, not by position.
    only_zero = torch.where(cand, SIZE - 1 - torch.arange(64) % 100, ids)
    picks = [POLICIES["importance"](only_zero, VOCAB, 0.1, generator(seed), PolicyOptions(importance=weights))
             for seed in range(2)]
    assert not torch.equal(*picks)


def test_importance_without_a_table_says_how_to_build_one():
    with pytest.raises(ValueError, match="masktrain data importance"):
        POLICIES["importance"](packed_rows(2, 16), VOCAB, 0.15, generator(0), PolicyOptions())


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_same_batch_same_key_same_mask_and_a_new_key_changes_it(policy):
    ids = packed_rows(rows=8, length=128)
    spec = MaskSpec(vocab=VOCAB, policy=policy, options=PolicyOptions(importance=torch.rand(SIZE) + 0.1,
                                                                      collocations=some_collocations(ids)))
    first = batches.mlm_batch(ids, spec, 0.2, generator(1234, 0, 17))
    again = batches.mlm_batch(ids.clone(), spec, 0.2, generator(1234, 0, 17))
    other = batches.mlm_batch(ids, spec, 0.2, generator(1234, 0, 18))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["labels"], other["labels"])


def test_mlm_labels_hold_originals_exactly_where_selected():
    ids = packed_rows()
    spec = MaskSpec(vocab=VOCAB)
    batch = batches.mlm_batch(ids, spec, 0.15, generator(3))
    selected = batch["labels"] != IGNORE
    assert torch.equal(batch["labels"][selected], ids[selected])
    assert torch.equal(batch["input_ids"][~selected], ids[~selected])


@pytest.mark.parametrize("share", [False, True])
def test_meap_masks_inputs_only_and_labels_stay_the_original_tokens(share):
    decoder_ids = packed_rows()
    decoder_ids[:, 0] = BOS
    decoder_ids[:, 100] = EOS
    decoder_ids[:, 101] = BOS
    spec = MaskSpec(vocab=VOCAB, mask_prob=1.0, random_prob=0.0, share_across_batch=share)
    batch = batches.meap_batch(decoder_ids, spec, 0.15, generator(11))
    masked = batch["input_ids"] != decoder_ids
    assert (batch["input_ids"][masked] == MASK).all()
    assert torch.equal(batch["labels"], decoder_ids.masked_fill(decoder_ids == PAD, IGNORE))
    boundaries = torch.isin(decoder_ids, torch.tensor([BOS, EOS, PAD, UNK]))
    assert not (masked & boundaries).any(), "BOS, EOS, padding or unknown was masked"
    cand = candidates(decoder_ids, VOCAB)
    realized = masked.sum().item() / cand.sum().item()
    assert abs(realized - 0.15) < 0.01
    rows_alike = (masked[1:] == masked[1:2]).all(dim=1)
    if share:
        # One pattern for the batch (MEAP authors' code): rows differ only where a row has a special token.
        assert torch.equal(masked[2:] & cand[1:2], masked[1:2].expand_as(masked[2:]) & cand[2:])
    else:
        assert not rows_alike.all()


def test_mae_visible_set_is_exactly_the_complement_of_the_removed_set_among_real_tokens():
    ids = packed_rows(rows=32, length=128)
    for mask_prob, random_prob in ((1.0, 0.0), (0.8, 0.1)):
        spec = MaskSpec(vocab=VOCAB, mask_prob=mask_prob, random_prob=random_prob)
        batch = batches.mae_batch(ids, spec, 0.3, generator(8))
        selected = batch["labels"] != IGNORE
        assert torch.equal(batch["labels"][selected], ids[selected])
        assert not (batch["removed"] & ~selected).any()
        if mask_prob == 1.0:
            assert torch.equal(batch["removed"], selected)
        for r in range(ids.shape[0]):
            visible = batch["visible_pos"][r][batch["visible_mask"][r]]
            removed = batch["removed"][r].nonzero().flatten()
            real = torch.nonzero(ids[r] != PAD).flatten()
            assert torch.equal(torch.sort(torch.cat([visible, removed])).values, real), "padding is neither"
            assert (visible.diff() > 0).all(), "visible tokens keep their order"
            shown = batch["visible_ids"][r][batch["visible_mask"][r]]
            assert torch.equal(shown[~selected[r, visible]], ids[r, visible][~selected[r, visible]])
            assert not (shown == MASK).any()
        assert (batch["visible_ids"][~batch["visible_mask"]] == PAD).all()
        assert torch.equal(batch["attention_mask"], ids != PAD), "the decoder is told where the padding is"


def test_mae_80_10_10_removes_the_mask_share_and_shows_the_rest_as_corrupted():
    """Of the selected tokens, the [MASK] share (80%) leaves the encoder input; the other 20% stay visible, half
    of them as a random token and half unchanged, as BERT's corruption would show them."""
    ids = packed_rows(rows=64, length=512)
    batch = batches.mae_batch(ids, MaskSpec(vocab=VOCAB, mask_prob=0.8, random_prob=0.1), 0.3, generator(8))
    selected = batch["labels"] != IGNORE
    assert abs(int(batch["removed"].sum()) / int(selected.sum()) - 0.8) < 0.02
    shown, original = [], []
    for r in range(ids.shape[0]):
        visible = batch["visible_pos"][r][batch["visible_mask"][r]]
        kept_selected = selected[r, visible]
        shown.append(batch["visible_ids"][r][batch["visible_mask"][r]][kept_selected])
        original.append(ids[r, visible][kept_selected])
    shown, original = torch.cat(shown), torch.cat(original)
    assert abs(len(shown) / int(selected.sum()) - 0.2) < 0.02
    assert abs(float((shown != original).double().mean()) - 0.5) < 0.05
    assert not (shown == MASK).any()


def test_pmi_masks_collocated_words_as_one_unit():
    ids = packed_rows(rows=16, length=256)
    cand = candidates(ids, VOCAB)
    words, hashes, real = word_table(ids, VOCAB, cand)
    keys = pair_keys(hashes)
    joinable = (real[:, :-1] & real[:, 1:]).nonzero()
    chosen = joinable[torch.randperm(len(joinable), generator=torch.Generator().manual_seed(0))[:200]]
    table = torch.unique(keys[chosen[:, 0], chosen[:, 1]])
    opts = PolicyOptions(collocations=table)
    selected = POLICIES["pmi"](ids, VOCAB, 0.2, generator(3), opts)
    assert not (selected & ~cand).any()
    assert abs(selected.sum().item() / cand.sum().item() - 0.2) < 0.02
    for r in range(ids.shape[0]):
        state = [bool(selected[r][words[r] == w][cand[r][words[r] == w]].any()) for w in range(int(words[r].max()) + 1)]
        for w in range(len(state) - 1):
            if real[r, w] and real[r, w + 1] and bool(torch.isin(keys[r, w], table)):
                assert state[w] == state[w + 1], f"row {r}: collocation of words {w}, {w + 1} split"
    # Whole words stay whole as well.
    for r, row_words in enumerate(words_of(ids, VOCAB)):
        for word in row_words:
            assert len({bool(selected[r, t]) for t in word}) == 1


def test_word_hashes_identify_a_word_by_its_pieces_wherever_it_is():
    vocab = make_vocab()
    starts = torch.nonzero(vocab.word_start & ~vocab.special).flatten()
    inner = torch.nonzero(~vocab.word_start).flatten()
    word = [int(starts[0]), int(inner[0]), int(inner[1])]
    other = [int(starts[1]), int(inner[1]), int(inner[0])]
    ids = torch.tensor([[CLS] + word + other + word + [SEP], [CLS, *other, *other, *word, *word, SEP][:11]])
    cand = candidates(ids, vocab)
    words, hashes, _ = word_table(ids, vocab, cand)
    first, second = hashes[0, words[0, 1]], hashes[0, words[0, 4]]
    assert first != second and hashes[0, words[0, 7]] == first
    assert hashes[1, words[1, 7]] == first and hashes[1, words[1, 1]] == second


def test_word_hashes_of_a_whole_shard_need_powers_for_the_longest_word_only(monkeypatch):
    """`masktrain data collocations` hashes a shard as one row of millions of tokens: powers for every offset of
    the row took seconds of Python per shard and a cache of gigabytes. The hashes are the definition's."""
    ids = packed_rows(rows=1, length=200_000)
    words = word_index(ids, VOCAB, candidates(ids, VOCAB))
    asked = []
    original = masking.piece_powers
    monkeypatch.setattr(masking, "piece_powers", lambda length: asked.append(length) or original(length))
    hashes = masking.word_hashes(ids, words)
    assert asked and max(asked) <= 64
    # sum of id * M ** (offset in the word), in 64-bit wrap-around, for a few words straight from the definition
    for word in (0, 1, 777, int(words.max())):
        pieces = ids[0][words[0] == word].tolist()
        value = sum(piece * pow(masking.PIECE_MULTIPLIER % 2**64, k, 2**64) for k, piece in enumerate(pieces)) % 2**64
        assert int(hashes[0, word]) % 2**64 == value, word


def test_a_newline_ends_a_word_for_the_real_tokenizer(tmp_path):
    """Sentencepiece marks only spaces: without word breaks "-999", "\n" and ">>>" would form one word."""
    import itertools

    from masktrain.data.corpus import documents
    from masktrain.data.tokenizer import Tokenizer, train_tokenizer

    train_tokenizer(itertools.islice(documents(["builtin:python-docs"]), 300), tmp_path, 400)
    tokenizer = Tokenizer(tmp_path)
    vocab = tokenizer.vocab()
    ids = torch.from_numpy(tokenizer.encode(["x -999\n>>>y\tz"])[0].astype("int64")).unsqueeze(0)
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids[0].tolist()]
    words = word_index(ids, vocab, candidates(ids, vocab))[0].tolist()
    newline, tab = pieces.index("<0x0A>"), pieces.index("<0x09>")
    assert words[newline] != words[newline - 1] and words[newline + 1] != words[newline]
    assert words[tab + 1] != words[tab]
