"""A masking policy of the researcher's own, named `module:function`: checked before any process starts, held to
the built-in policies' contract (never a special token), and used by the ranks and their loader workers."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import run_cli
from masktrain.data import inputs
from masktrain.data.batches import IGNORE
from masktrain.data.reader import DataError, Skips
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher.loading import ConfigError, load_config
from masktrain.trainer.objectives import OBJECTIVES

MODULE = '''
import torch

def every_third(ids, vocab, rate, gen, options):
    """By position alone: the start token at 0 too, which the caller must leave out."""
    return (torch.arange(ids.shape[1]) % 3 == 0).expand_as(ids).clone()

def drawn(ids, vocab, rate, gen, options):
    return torch.rand(ids.shape, generator=gen) < rate

def one_row_only(ids, vocab, rate, gen, options):
    return torch.zeros(ids.shape[1], dtype=torch.bool)
'''


@pytest.fixture
def my_masks(tmp_path, monkeypatch):
    (tmp_path / "my_masks.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_policy_of_ones_own_selects_what_it_returns_but_never_a_special_token(tiny_data, my_masks):
    cfg = load_config("smoke", [*tiny_data, "data.masking.policy=my_masks:every_third"])
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    spec = inputs.mask_spec(cfg, tokenizer)
    regular = tokenizer.vocab().regular_ids[:10]
    ids = torch.cat([torch.tensor([tokenizer.cls_id]), regular, torch.tensor([tokenizer.sep_id, tokenizer.pad_id])])
    selected = spec.select(ids.unsqueeze(0), 0.15, torch.Generator())[0]
    assert selected.tolist() == [False] + [i % 3 == 0 for i in range(1, 11)] + [False, False]


def test_a_policy_that_cannot_be_found_or_breaks_the_contract_stops_the_run_before_it_starts(tiny_data, my_masks):
    (my_masks / "broken_masks.py").write_text("def select(ids:\n")  # its import raises a SyntaxError
    for name, said in [("no_such_module:f", "cannot import no_such_module (No module named 'no_such_module')"),
                       ("broken_masks:select", "cannot import broken_masks (SyntaxError: "),
                       ("my_masks:absent", "my_masks has no absent"), ("my_masks", "unknown masking policy")]:
        with pytest.raises(ConfigError, match=f"data.masking.policy: .*{re.escape(said)}"):
            load_config("smoke", [*tiny_data, f"data.masking.policy={name}"])
    cfg = load_config("smoke", [*tiny_data, "data.masking.eval_policy=my_masks:one_row_only"])
    with pytest.raises(DataError, match=r"masking policy 'my_masks:one_row_only' fails on a batch of 2 rows: "
                                        r"ValueError: .* returned torch.bool \(64,\); a policy returns a bool tensor "
                                        r"shaped as its ids, \(2, 64\)"):
        inputs.check_ready(cfg)
    # Options that only a built-in policy reads are the researcher's to use.
    assert load_config("smoke", [*tiny_data, "data.masking.policy=my_masks:drawn", "data.masking.span_mean=5"])


def test_the_ranks_and_their_loader_workers_train_with_it(tiny_data, my_masks, tmp_path):
    """Training batches are masked in a loader worker, which must import the policy too (a failure there ends
    the run); validation masks as the same policy does in this process, target for target."""
    run = tmp_path / "run"
    overrides = [*tiny_data, "data.masking.policy=my_masks:drawn", "data.masking.rate=0.4"]
    run_cli("train", "smoke", *overrides, f"run.output_dir={run}", "data.num_workers=1", "trainer.max_steps=2",
            "trainer.eval_every=2", env={"PYTHONPATH": str(my_masks)}, check=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = next(row["val/tokens"] for row in rows if "val/tokens" in row)

    cfg = load_config("smoke", overrides)
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    objective = OBJECTIVES[cfg.model.objective]
    batches, _ = inputs.validation_set(cfg, objective.batch, objective.encoder, tokenizer, 0, 1, Skips(False))
    assert logged == sum(int((batch["labels"] != IGNORE).sum()) for batch in batches) > 0

    # Exporting masks nothing, and scoring with another policy masks with that one: neither needs the module.
    exported = run_cli("export", str(run), str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    scored = run_cli("eval", str(run), "data.masking.eval_policy=random")
    assert scored.returncode == 0 and "random masking at" in scored.stdout, scored.stderr[-3000:]
    unscored = run_cli("eval", str(run))
    assert unscored.returncode == 2 and "data.masking.policy: masking policy 'my_masks:drawn': cannot import " \
        "my_masks" in unscored.stderr, unscored.stderr[-3000:]
