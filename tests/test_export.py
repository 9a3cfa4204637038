"""Export after real 2-rank DeepSpeed runs (gloo, CPU): the Hugging Face folder, loaded with stock Auto classes,
computes what the trained module computed.

"What the trained module computed" comes from the run itself: the validation loss the DeepSpeed engine logged at
its last step, over every rank's validation batches. The exported model must reproduce it from the exported
files alone. ZeRO-2 also keeps the engine's module weights whole, which the MLM test compares logits against;
the ZeRO-3 runs check that the model was built partitioned and that DeepSpeed's consolidation restores it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run_cli
from test_models import NARROW_DECODER, TINY_MODEL
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from masktrain.data import inputs
from masktrain.data.batches import IGNORE
from masktrain.data.reader import Skips
from masktrain.trainer.checkpoint import Checkpointer
from masktrain.trainer.export import export, load_trained
from masktrain.trainer.models import TokenIds, build_model
from masktrain.trainer.objectives import OBJECTIVES

TEXT = ["Return a new sorted list from the items in iterable.", "The with statement wraps a block."]


def train(tiny_data, run_dir: Path, *overrides: str) -> str:
    result = run_cli("train", "smoke", *tiny_data, *TINY_MODEL, f"run.output_dir={run_dir}", "trainer.max_steps=3",
                     "trainer.checkpoint_every=0", "trainer.progress_bar=false", "optim.warmup_steps=1", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def logged_val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "val/loss" in row][-1]["val/loss"]


def val_loss(cfg, tokenizer, losses) -> float:
    """Mean loss over every rank's validation batches; `losses(batch)` returns (loss sum, target count)."""
    objective = OBJECTIVES[cfg.model.objective]
    total, count = 0.0, 0
    with torch.no_grad():
        for rank in range(cfg.world_size):
            batches, _ = inputs.validation_set(cfg, objective.batch, objective.encoder, tokenizer, rank,
                                               cfg.world_size, Skips(False))
            for batch in batches:
                loss_sum, targets = losses(batch)
                total, count = total + float(loss_sum), count + int(targets)
    return total / count


def target_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    where = labels != IGNORE
    return F.cross_entropy(logits[where], labels[where], reduction="sum"), where.sum()


def assert_partitioned(stdout: str) -> None:
    """The rank-0 line printed at start: a ZeRO-3 rank holds about half of the parameters of 2 ranks."""
    found = re.search(r"\(([\d,]+)\).*this rank holds ([\d,]+)", stdout)
    assert found, stdout[-2000:]
    total, held = (int(group.replace(",", "")) for group in found.groups())
    assert held < 0.6 * total


def assert_plain_transformers_folder(out: Path, architecture: str) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("stage", [0, 1])
def test_a_bf16_export_takes_the_fp32_weights_the_optimizer_updated(tiny_data, tmp_path, stage):
    """In bf16, DeepSpeed's module file holds the weights rounded to bf16, and the optimizer the fp32 weights it
    updates, which ZeRO 1-3 exports consolidate. ZeRO-0 (FP16_UnfusedOptimizer's fp32 groups) and bf16 ZeRO-1 with
    fp32 gradient accumulation (BF16_Optimizer's partitions, which zero_to_fp32 refuses) exported the rounded
    ones."""
    run = tmp_path / "run"
    overrides = ["trainer.precision=bf16", f"trainer.zero_stage={stage}"]
    if stage == 1:
        (tmp_path / "ds.json").write_text(json.dumps({"data_types": {"grad_accum_dtype": "fp32"}}))
        overrides.append(f"trainer.deepspeed_config={tmp_path / 'ds.json'}")
    train(tiny_data, run, *overrides)
    checkpoint = Checkpointer(run, 1, False).latest()
    assert len(list(checkpoint.glob("bf16_zero_pp_rank_*"))) == 2 * stage
    _, _, model = load_trained(checkpoint)
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    weights = model.state_dict()
    assert weights.keys() == module.keys() and {w.dtype for w in weights.values() if w.is_floating_point()} == {
        torch.float32}
    # The weights the module's were rounded from, not those: Adam's updates are too small to leave many on the
    # bf16 grid.
    assert all(torch.equal(weights[name].to(saved.dtype), saved) for name, saved in module.items())
    params = dict(model.named_parameters())
    on_grid = sum(int((param == module[name].float()).sum()) for name, param in params.items())
    assert on_grid < 0.05 * sum(param.numel() for param in params.values())


def test_mlm_zero2_export_reproduces_the_trained_module(tiny_data, tmp_path):
    run = tmp_path / "mlm"
    train(tiny_data, run, "trainer.zero_stage=2")
    checkpoint = Checkpointer(run, 1, False).latest()
    run_cli("export", str(checkpoint), str(run / "export"), check=True)
    out = run / "export"
    assert_plain_transformers_folder(out, "BertForMaskedLM")
    assert "document attention" not in (out / "README.md").read_text()
    assert "never had as an input" not in (out / "README.md").read_text()  # fill-mask: [MASK] is its input

    exported = AutoModelForMaskedLM.from_pretrained(out).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    cfg, tokenizer, _ = load_trained(checkpoint)
    # ZeRO-2 saves the engine's module whole: the trained weights, independent of the fp32 consolidation.
    trained = build_model(OBJECTIVES["mlm"], cfg.model, cfg.data.seq_len, TokenIds.of(tokenizer)).eval()
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    trained.load_state_dict(states["module"])

    encoded = hf_tokenizer(TEXT, padding=True, return_tensors="pt")
    assert encoded["input_ids"][0].tolist()[:-1] == [tokenizer.cls_id, *tokenizer.encode(TEXT[:1])[0]]
    # The model's positions bound the tokenizer: truncation cuts there (a longer input fails in the model).
    assert hf_tokenizer.model_max_length == cfg.data.seq_len
    assert len(hf_tokenizer(" ".join(TEXT) * 50, truncation=True)["input_ids"]) == cfg.data.seq_len
    with torch.no_grad():
        torch.testing.assert_close(exported(**encoded).logits, trained.hf(**encoded).logits, rtol=1e-5, atol=1e-5)
    loss = val_loss(cfg, tokenizer, lambda b: target_loss(exported(input_ids=b["input_ids"]).logits, b["labels"]))
    assert loss == pytest.approx(logged_val_loss(run), rel=1e-5)

    # Readable by the group as the umask allows (safetensors alone would write 0600); an existing folder is
    # never written into.
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_cli("export", str(checkpoint), str(out))
    assert again.returncode == 1 and f"{out}: exists and is not an empty folder" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".export.tmp")] == []
    # A run folder, or its checkpoints/latest (a file naming the newest), means the newest complete checkpoint.
    for given in (run, run / "checkpoints" / "latest"):
        run_cli("export", str(given), str(tmp_path / f"via-{given.name}"), check=True)
        assert {p.name: p.read_bytes() for p in (tmp_path / f"via-{given.name}").iterdir()} == before
    missing = run_cli("export", str(run / "checkpoints" / "step-00000099"), str(tmp_path / "none"))
    assert missing.returncode == 1 and "step-00000099: no such file or folder; give a checkpoint folder" in (
        missing.stderr)
    here = tmp_path / "empty-working-folder"
    here.mkdir()
    done = run_cli("export", os.path.relpath(checkpoint, here), ".", cwd=here, check=True)
    assert {p.name: p.read_bytes() for p in here.iterdir()} == before
    assert f"exported {checkpoint} to {here}" in done.stdout  # named without the "..", as in its card
    # A folder under a file cannot be made: said before the checkpoint is consolidated (minutes when large).
    (tmp_path / "a-file").write_text("")
    under_file = run_cli("export", str(checkpoint), str(tmp_path / "a-file" / "out"))
    assert under_file.returncode == 1 and f"{tmp_path / 'a-file'} is a file, not a folder" in under_file.stderr
    assert "Processing zero checkpoint" not in under_file.stdout + under_file.stderr

    # The checkpoint carries its tokenizer: it exports the same without the data folder, even after the data
    # folder's tokenizer was replaced or its config points elsewhere (a relative data.dir, another machine).
    # Files only training reads may be gone too: a pruned rollback target, a DeepSpeed JSON relative to where
    # training ran.
    assert tokenizer.dir == checkpoint / "tokenizer"
    assert tokenizer.model_bytes == (inputs.tokenizer_dir(cfg) / "spm.model").read_bytes()
    copied = tmp_path / "copied" / checkpoint.name
    shutil.copytree(checkpoint, copied)
    config = yaml.safe_load((copied / "config.yaml").read_text())
    config["data"].update(dir=str(tmp_path / "gone"), tokenizer="")
    config["trainer"].update(resume=str(tmp_path / "pruned" / "step-00000001"), deepspeed_config="ds.json")
    # Saved before validation refused a final_rate under the constant schedule, where it had no effect.
    config["data"]["masking"].update(schedule="constant", final_rate=0.1)
    (copied / "config.yaml").write_text(yaml.safe_dump(config))
    run_cli("export", str(copied), str(tmp_path / "moved"), check=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "moved").iterdir() if p.name != "README.md"} == {
        name: content for name, content in before.items() if name != "README.md"}
    # Never another tokenizer: its own gone (the data folder's may have been replaced since), or not the one its
    # meta.json names.
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == tokenizer.fingerprint()
    (copied / "tokenizer" / "spm.model").unlink()
    for problem in (f"{copied / 'tokenizer' / 'spm.model'}, the tokenizer it was trained with, is missing",
                    f"{copied / 'tokenizer' / 'spm.model'} is not the tokenizer it was trained with (sha256 "
                    f"{tokenizer.fingerprint()[:12]}, not 000000000000)"):
        result = run_cli("export", str(copied), str(tmp_path / "wrong-tokenizer"))
        assert result.returncode == 1 and problem in result.stderr and "Traceback" not in result.stderr, problem
        (copied / "tokenizer" / "spm.model").write_bytes(tokenizer.model_bytes)
        (copied / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))

    # A checkpoint damaged after it was published (by a disk, or a hand) is refused naming the file: by export,
    # and by a resume before any rank starts.
    damages = {
        "cut model": (lambda ckpt: os.truncate(ckpt / "mp_rank_00_model_states.pt", 1000),
                      "mp_rank_00_model_states.pt: cut short or damaged"),
        "lost rank": (lambda ckpt: (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
                      "the optimizer state of ZeRO rank(s) 1 of the 2 that saved it is missing"),
        "config": (lambda ckpt: (ckpt / "config.yaml").write_text("- 1\n"), "config.yaml: damaged"),
        # Cut short before its last section, it still parses as YAML.
        "cut config": (lambda ckpt: (ckpt / "config.yaml").write_text(
            (ckpt / "config.yaml").read_text().split("\nlaunch:")[0]), "config.yaml: damaged (a section"),
        "meta": (lambda ckpt: (ckpt / "meta.json").write_text("{"), "meta.json: damaged"),
    }
    for name, (damage, message) in damages.items():
        damaged_run = tmp_path / name.replace(" ", "-")
        shutil.copytree(run, damaged_run, ignore=shutil.ignore_patterns("export"))
        damage(damaged_run / "checkpoints" / checkpoint.name)
        for args in (["export", str(damaged_run / "checkpoints" / checkpoint.name), str(damaged_run / "out")],
                     ["train", "smoke", *tiny_data, *TINY_MODEL, f"run.output_dir={damaged_run}",
                      "trainer.max_steps=3", "trainer.checkpoint_every=0", "optim.warmup_steps=1",
                      "trainer.zero_stage=2"]):
            result = run_cli(*args)
            if name == "meta" and args[0] == "export":  # export reads the state files alone, which are whole
                assert result.returncode == 0, result.stderr[-2000:]
                continue
            assert result.returncode == 1 and message in result.stderr, (name, args[0], result.stderr[-2000:])
            assert "Traceback" not in result.stderr and "[rank" not in result.stderr, (name, args[0])
    no_config = tmp_path / "no-config" / checkpoint.name
    shutil.copytree(checkpoint, no_config)
    (no_config / "config.yaml").unlink()
    result = run_cli("export", str(no_config), str(tmp_path / "no-config" / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{no_config / 'config.yaml'}: missing; it is the run's config as saved" in result.stderr


def test_mae_lm_zero3_exports_the_encoder_alone(tiny_data, tmp_path):
    """With a decoder narrower than the encoder: its maps to and from the encoder's width are not transformers
    modules, so they are built under zero.Init by masktrain itself, and consolidation must bring them back too.
    Trained with document attention, which the exported encoder (one document at a time) does not need."""
    run = tmp_path / "mae"
    stdout = train(tiny_data, run, "trainer.zero_stage=3", "model.objective=mae_lm", "model.arch=roberta",
                   NARROW_DECODER, "data.document_attention=true")
    assert_partitioned(stdout)
    checkpoint = Checkpointer(run, 1, False).latest()
    out = export(checkpoint, run / "export")
    assert_plain_transformers_folder(out, "RobertaModel")
    card = (out / "README.md").read_text()
    assert "AutoModel.from_pretrained" in card and "fill-mask does not apply" in card
    assert "with document attention: each attended only to itself" in card
    assert "So does [MASK], which this model never had as an input." in card

    # Consolidating the ZeRO-3 shards gives back the trained model: it reproduces the logged validation loss.
    cfg, tokenizer, trained = load_trained(checkpoint)
    # Initialized gathered, as BERT's layers (std 0.02), not left at torch's default (std 0.1 at this width).
    assert trained.to_decoder.weight.shape == (16, 32) and float(trained.to_decoder.weight.detach().std()) < 0.03
    assert val_loss(cfg, tokenizer, lambda b: (lambda o: (o["loss_sum"], o["tokens"]))(trained(**b))) == \
        pytest.approx(logged_val_loss(run), rel=1e-5)

    exported = AutoModel.from_pretrained(out).eval()
    # The tokenizer's special ids, not RobertaConfig's defaults (bos 0, eos 2), which are other tokens here.
    assert (exported.config.bos_token_id, exported.config.eos_token_id, exported.config.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert sum(p.numel() for p in exported.base_model.encoder.parameters()) == \
        sum(p.numel() for p in trained.hf.base_model.encoder.parameters())
    encoded = AutoTokenizer.from_pretrained(out)(TEXT, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**encoded).last_hidden_state,
                                   trained.hf.base_model(**encoded).last_hidden_state, rtol=1e-5, atol=1e-5)

    # ZeRO-3 splits the model's state over the ranks too: a rank's file gone is named, not met by DeepSpeed.
    (checkpoint / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(SystemExit, match="the model state of ZeRO rank\\(s\\) 1 of the 2 that saved it is missing"):
        load_trained(checkpoint)


def test_meap_zero3_export_reproduces_the_trained_module(tiny_data, tmp_path, disk_journal):
    run = tmp_path / "meap"
    stdout = train(tiny_data, run, "trainer.zero_stage=3", "model.objective=meap")
    assert_partitioned(stdout)
    checkpoint = Checkpointer(run, 1, False).latest()
    out = export(checkpoint, run / "export").resolve()
    assert_plain_transformers_folder(out, "LlamaForCausalLM")
    # Every file is on disk before the folder is named the export (its checkpoints may be deleted next).
    named = next(i for i, event in enumerate(disk_journal) if event[0] == "rename" and event[2] == str(out))
    staging = disk_journal[named][1]
    assert {("fsync", f"{staging}/{path.name}") for path in out.iterdir()} <= set(disk_journal[:named])
    assert ("fsync", staging) in disk_journal[:named] and ("fsync", str(out.parent)) in disk_journal[named:]

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg, tokenizer, trained = load_trained(checkpoint)
    loss = val_loss(cfg, tokenizer, lambda b: target_loss(exported(input_ids=b["input_ids"]).logits[:, :-1],
                                                          b["labels"][:, 1:]))
    assert loss == pytest.approx(logged_val_loss(run), rel=1e-5)
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = hf_tokenizer(TEXT[:1], return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == [tokenizer.bos_id, *tokenizer.encode(TEXT[:1])[0]]
    assert hf_tokenizer.padding_side == "left"  # batched generation continues every row from its last token
    with torch.no_grad():
        torch.testing.assert_close(exported(**encoded).logits, trained.hf(**encoded).logits, rtol=1e-5, atol=1e-5)
