"""Masking speed: masktrain's batch functions against transformers' DataCollatorForLanguageModeling (plain and
whole-word) on the same packed token batches, side by side in one process, one thread.

Both sides get the same batches of real text ([CLS] doc [SEP] packed into rows, as the loader does). The
collator gets every advantage the transformers docs offer: the special-tokens mask (transformers#17595) and,
for whole words, offsets that group pieces into exactly masktrain's words, computed before timing. Two of its
entry points are timed: calling the collator on a list of examples (what a DataLoader does) and its masking
method alone on the ready batch tensor. Its selection is Bernoulli per token (or per word), so masktrain's
Bernoulli mode (`exact: false`) is the like-for-like comparison; masktrain's default draws exact counts per row.

Timing: median CPU seconds of this thread per call, calls interleaved; the machine is shared, and CPU time is
what "per core" means. Wall-clock medians are kept in the JSON.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import medians, timings, write_result
from masktrain.data import batches, collocations, importance
from masktrain.data.batches import MaskSpec
from masktrain.data.inputs import collocation_path, importance_path, shard_urls, tokenizer_dir
from masktrain.data.masking import PolicyOptions, candidates, generator, word_index
from masktrain.data.prepare import prepare
from masktrain.data.reader import Skips, Unit, read_unit
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher.loading import load_config

OUT = Path(__file__).parent / "out"
RATE = 0.15


def dataset(quick: bool):
    """A small prepared dataset of Python's documentation (tokenizer, shards, IDF and collocation tables), built
    once and reused; quick runs use a smaller one that builds in seconds."""
    docs, vocab_size, min_count = (300, 1000, 3) if quick else (3000, 8000, 20)
    cfg = load_config("smoke", [f"data.dir={OUT / ('masking-data-quick' if quick else 'masking-data')}",
                                f"data.prepare.max_docs={docs}", f"data.prepare.vocab_size={vocab_size}",
                                "data.prepare.shard_bytes=1048576", f"data.masking.collocation_min_count={min_count}"])
    prepare(cfg, log=lambda text: None)
    for path, build in ((importance_path(cfg), importance.build_for_config),
                        (collocation_path(cfg), collocations.build_for_config)):
        if not path.is_file():
            build(cfg, log=lambda text: None)
    return cfg, Tokenizer(tokenizer_dir(cfg))


def packed_batches(cfg, tokenizer: Tokenizer, count: int, rows: int, length: int) -> list[torch.Tensor]:
    """`count` batches of `rows` x `length` tokens: documents as [CLS] doc [SEP], packed end to end."""
    need = count * rows * length
    pieces, total = [], 0
    for url in shard_urls(cfg, "train"):
        for doc in read_unit(Unit(url), Skips(strict=True)):
            pieces.append(np.concatenate(([tokenizer.cls_id], doc, [tokenizer.sep_id])).astype(np.int64))
            total += len(pieces[-1])
        if total >= need:
            break
    if total < need:
        raise SystemExit(f"{cfg.data.dir}: {total} tokens, the benchmark needs {need}")
    flat = torch.from_numpy(np.concatenate(pieces)[:need])
    return list(flat.view(count, rows, length))


def hf_inputs(ids: torch.Tensor, vocab, tokenizer: Tokenizer) -> dict:
    """What the collator needs besides ids, precomputed: special-tokens mask and word-grouping offsets."""
    special = vocab.special[ids]
    # Offsets with a one-character gap before every word start make the collator group pieces into exactly the
    # words masktrain uses (it starts a word where an offset does not continue the previous piece).
    words = word_index(ids, vocab, ~special)
    start = torch.arange(ids.shape[1]) + words
    offsets = torch.stack([start, start + 1], dim=-1)
    examples = [{"input_ids": row.tolist(), "special_tokens_mask": mask.long().tolist()}
                for row, mask in zip(ids, special)]
    word_examples = [{**example, "offset_mapping": offset.tolist()} for example, offset in zip(examples, offsets)]
    return {"special": special.long(), "offsets": offsets, "examples": examples, "word_examples": word_examples}


def measure(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median CPU seconds of this thread per call, median wall seconds per call), calls interleaved."""
    samples = timings(fns, repeats, cpu_clock=time.thread_time)
    return medians(samples["cpu"]), medians(samples["wall"])


def contenders(cfg, tokenizer: Tokenizer, data: list[torch.Tensor]) -> dict[str, callable]:
    """Each side's batch function over `data` (one batch per call, in turn), by name."""
    from transformers import DataCollatorForLanguageModeling

    vocab = tokenizer.vocab()
    extras = [hf_inputs(ids, vocab, tokenizer) for ids in data]
    idf = importance.load_table(importance_path(cfg), len(tokenizer), tokenizer.fingerprint())
    pairs = collocations.load_table(collocation_path(cfg), tokenizer.fingerprint())

    def ours(make, **spec) -> callable:
        options = PolicyOptions(exact=spec.pop("exact", True), importance=idf, collocations=pairs)
        mask_spec = MaskSpec(vocab=vocab, options=options, **spec)
        calls = itertools.count()

        def call():
            # A fresh batch index each call, as in the loader: new random draws, seeded the loader's way.
            index = next(calls)
            return make(data[index % len(data)], mask_spec, RATE, generator(cfg.run.seed, 0, index))
        return call

    hf = tokenizer.hf_tokenizer("encoder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whole-word masking announces that it sets mask_replace_prob to 1
        plain = DataCollatorForLanguageModeling(hf, mlm_probability=RATE, seed=cfg.run.seed)
        whole = DataCollatorForLanguageModeling(hf, mlm_probability=RATE, whole_word_mask=True, seed=cfg.run.seed)

    def theirs(fn) -> callable:
        calls = itertools.count()

        def call():
            index = next(calls) % len(data)
            return fn(data[index], extras[index])
        return call

    return {
        "mlm exact (default)": ours(batches.mlm_batch),
        "mlm bernoulli": ours(batches.mlm_batch, exact=False),
        "whole_word exact": ours(batches.mlm_batch, policy="whole_word", mask_prob=1.0, random_prob=0.0),
        "whole_word bernoulli": ours(batches.mlm_batch, policy="whole_word", mask_prob=1.0, random_prob=0.0,
                                     exact=False),
        "span exact": ours(batches.mlm_batch, policy="span"),
        "importance exact": ours(batches.mlm_batch, policy="importance"),
        "pmi exact": ours(batches.mlm_batch, policy="pmi"),
        "meap exact": ours(batches.meap_batch, mask_prob=1.0, random_prob=0.0),
        "mae_lm exact": ours(batches.mae_batch, mask_prob=1.0, random_prob=0.0),
        # The collator's fastest input: equal-length tensor rows are stacked, not padded through the tokenizer
        # (which converts tensors to lists); it then finds special tokens itself. Lists of ids with the
        # special-tokens mask, as a tokenized dataset yields them, take twice as long.
        "hf collator": theirs(lambda ids, extra: plain(list(ids))),
        "hf collator, list examples": theirs(lambda ids, extra: plain(extra["examples"])),
        "hf torch_mask_tokens": theirs(lambda ids, extra: plain.torch_mask_tokens(
            ids.clone(), special_tokens_mask=extra["special"])),
        "hf whole-word collator": theirs(lambda ids, extra: whole(extra["word_examples"])),
        "hf whole-word torch_mask_tokens": theirs(lambda ids, extra: whole.torch_mask_tokens(
            ids.clone(), special_tokens_mask=extra["special"], offset_mapping=extra["offsets"])),
    }


def realized_rates(fns: dict, calls: int) -> dict[str, float]:
    """The fraction of tokens each compared function selected over `calls` calls (each call takes the next
    batch, so `calls` = the number of batches covers each once): the comparison must be of like work."""
    def labels(out) -> torch.Tensor:
        return out[1] if isinstance(out, tuple) else out["labels"]  # torch_mask_tokens: (inputs, labels)
    return {name: float(torch.stack([(labels(fn()) != -100).float().mean() for _ in range(calls)]).mean())
            for name, fn in fns.items() if name.startswith(("mlm", "whole_word", "hf"))}


def rate_tolerance(tokens: int) -> float:
    """How far a realized fraction may stray from the rate: 8 standard deviations of independent draws over
    `tokens` tokens, doubled for whole words (a word is ~1.5 tokens, chosen or not as one)."""
    return 16 * math.sqrt(RATE * (1 - RATE) / tokens)

# A second, small shape shows the fixed cost per batch (masktrain runs more, smaller tensor operations).
SMALL = ("mlm exact (default)", "mlm bernoulli", "hf torch_mask_tokens", "hf collator")


def main(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    shapes = {"large": (8, 128), "small": (8, 32)} if quick else {"large": (64, 512), "small": (8, 512)}
    count, repeats = (2, 5) if quick else (8, 30)
    cfg, tokenizer = dataset(quick)
    measured = {}
    for shape, (rows, length) in shapes.items():
        data = packed_batches(cfg, tokenizer, count, rows, length)
        fns = contenders(cfg, tokenizer, data)
        if shape == "small":
            fns = {name: fns[name] for name in SMALL}
        cpu, wall = measure(fns, repeats)
        rates = realized_rates(fns, count)
        vocab = tokenizer.vocab()
        maskable = torch.stack([candidates(ids, vocab).float().mean() for ids in data])
        expected = RATE * float(maskable.mean())
        tolerance = rate_tolerance(count * rows * length)
        unequal = {name: rate for name, rate in rates.items() if abs(rate - expected) > tolerance}
        if unequal:
            raise SystemExit(f"{rows}x{length}: selected fractions {unequal} are not {RATE} of the maskable tokens "
                             f"({expected:.4f} of all) within {tolerance:.4f}: the sides would do unequal work")
        measured[shape] = {"rows": rows, "length": length, "realized_rate": rates, "expected_rate": expected,
                           "tokens_per_s_per_core": {name: round(rows * length / s) for name, s in cpu.items()},
                           "cpu_s_per_batch": cpu, "wall_s_per_batch": wall}
    speed = measured["large"]["tokens_per_s_per_core"]
    small = measured["small"]["tokens_per_s_per_core"]

    def ratio(a: str, b: str, of: dict = speed) -> float:
        return of[a] / of[b]

    rows, length = shapes["large"]
    summary = [
        {"metric": f"MLM masking per core (80/10/10, exact count per row, {rows}x{length})",
         "value": speed["mlm exact (default)"], "target": ">= 20000000", "unit": "tokens/s"},
        {"metric": "MLM bernoulli / HF collator call (tensor rows)", "value": ratio("mlm bernoulli", "hf collator"),
         "target": ">= 5", "unit": "x"},
        {"metric": "MLM exact / HF collator call (tensor rows)", "value": ratio("mlm exact (default)", "hf collator"),
         "target": ">= 5", "unit": "x"},
        {"metric": "MLM bernoulli / HF torch_mask_tokens (masking only)",
         "value": ratio("mlm bernoulli", "hf torch_mask_tokens"), "target": ">= 5", "unit": "x"},
        {"metric": "MLM exact / HF torch_mask_tokens (masking only)",
         "value": ratio("mlm exact (default)", "hf torch_mask_tokens"), "target": "", "unit": "x"},
        {"metric": "whole-word bernoulli / HF whole-word collator call",
         "value": ratio("whole_word bernoulli", "hf whole-word collator"), "target": ">= 5", "unit": "x"},
        {"metric": "whole-word bernoulli / HF whole-word torch_mask_tokens (masking only)",
         "value": ratio("whole_word bernoulli", "hf whole-word torch_mask_tokens"), "target": ">= 5", "unit": "x"},
        {"metric": "MLM exact / HF torch_mask_tokens, small batch {}x{}".format(*shapes["small"]),
         "value": ratio("mlm exact (default)", "hf torch_mask_tokens", small), "target": "", "unit": "x"},
    ]
    result = {"summary": summary, "rate": RATE, "batches": count, "repeats": repeats, "shapes": measured,
              "torch_threads": torch.get_num_threads()}
    path = write_result("masking", result, quick)
    for name, value in speed.items():
        print(f"{name:36s} {value / 1e6:8.1f} M tokens/s per core")
    for entry in summary:
        print(f"{entry['metric']}: {entry['value']:.3g} {entry['unit']} (target {entry['target'] or '-'})")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
