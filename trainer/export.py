"""`masktrain export CHECKPOINT OUTDIR`: a checkpoint -> a Hugging Face model folder (safetensors + tokenizer)
that `transformers` loads with no masktrain import.

ZeRO 1-3 checkpoints are consolidated to fp32 with DeepSpeed's own zero_to_fp32 utilities; ZeRO-0 keeps the
full module state in one file, and in bf16 the fp32 weights in its optimizer state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from masktrain.data.files import fsync_path, sync_tree
from masktrain.data.inputs import collocation_path, importance_path, tokenizer_dir
from masktrain.data.tokenizer import MODEL_FILE, Tokenizer
from masktrain.launcher.config import Config
from masktrain.launcher.loading import config_from_dict, merge
from masktrain.trainer.checkpoint import (check_intact, meta_or_none, partitioned_over, resolve_checkpoint,
                                          saved_config)
from masktrain.trainer.engine import param_groups
from masktrain.trainer.models import TokenIds, build_model, max_positions
from masktrain.trainer.objectives import OBJECTIVES


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load the checkpoint's fp32 weights into `model`, built as its run built it. The checkpoint's own files tell
    how it was saved (a DeepSpeed JSON can set another stage than trainer.zero_stage): ZeRO 1-3 leave one
    zero_pp_rank_* file per rank (bf16_zero_pp_rank_* in bf16), consolidated by DeepSpeed's zero_to_fp32. In bf16
    the module file holds the weights rounded to bf16 (what the forward pass ran on); the fp32 weights the
    optimizer updates are its state, which ZeRO 1-3 exports take and so do these."""
    partitions = partitioned_over(checkpoint)
    if partitions:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            # Its progress prints go to stderr: the commands' own stdout stays what they report (`eval | jq`).
            with contextlib.redirect_stdout(sys.stderr):
                model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent),
                                                                                tag=checkpoint.name))
            return
        except ValueError as err:
            # DeepSpeed's BF16_Optimizer (bf16 ZeRO-1 with fp32 gradient accumulation) partitions like ZeRO but
            # records no stage, which zero_to_fp32 refuses.
            if not str(err).endswith("is not a zero checkpoint"):
                raise
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(states["module"])  # the buffers; in fp32 at ZeRO-0, the weights themselves
    if partitions:
        master = bf16_optimizer_weights(checkpoint)
    elif master_groups := (states.get("optimizer") or {}).get("fp32_groups"):
        # bf16 at ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer keeps a copy of each parameter of each optimizer group,
        # in the groups `param_groups` made and in their order; they hold no names.
        names = {param: name for name, param in model.named_parameters()}
        trained = [names[param] for group in param_groups(model, 0.0) for param in group["params"]]
        weights = [weight for group in master_groups for weight in group]
        if len(weights) != len(trained):
            raise ValueError(f"{checkpoint}: its optimizer holds {len(weights)} fp32 weights, but the model trains "
                             f"{len(trained)} parameters")
        master = dict(zip(trained, weights))
    else:
        return
    copy_weights(model, master, checkpoint)


def bf16_optimizer_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights in the bf16_zero_pp_rank_* files of DeepSpeed's BF16_Optimizer: each rank holds a slice of
    each group's flat copy, and records where each parameter's piece lies in it (`param_slice_mappings`)."""
    files = sorted(checkpoint.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda file: int(file.name.split("zero_pp_rank_")[1].split("_")[0]))
    pieces: dict[str, list[torch.Tensor]] = {}
    for file in files:
        part = torch.load(file, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        for flat, slices in zip(part["single_partition_of_fp32_groups"], part["param_slice_mappings"]):
            for name, where in slices.items():
                pieces.setdefault(name, []).append(flat.narrow(0, where.start, where.numel))
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def copy_weights(model: torch.nn.Module, master: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Each of `model`'s parameters from `master` (flat or shaped), refusing one missing or of another size."""
    params = dict(model.named_parameters())
    wrong = sorted(name for name, param in params.items()
                   if name not in master or master[name].numel() != param.numel())
    if wrong or len(master) != len(params):
        raise ValueError(f"{checkpoint}: its fp32 weights do not match the model's parameters (missing or another "
                         f"size: {', '.join(wrong[:5]) or 'none'}; {len(master)} weights for {len(params)} "
                         "parameters)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(master[name].reshape(param.shape))


def trained_config(checkpoint: str | Path, changes: dict | None = None,
                   scoring: bool = False) -> tuple[Path, Config, Tokenizer]:
    """(the complete checkpoint folder, its config, its tokenizer) for a checkpoint or run folder; the config
    with `changes` (a nested dict of keys that do not change the model) merged in and validated. `scoring`: the
    validation set will be masked, with the evaluation's policy (only its module need be importable here)."""
    checkpoint = resolve_checkpoint(checkpoint)
    raw = saved_config(checkpoint)
    check_intact(checkpoint, raw)
    # Exported, not trained from: files only training reads may be gone, as a rollback target keep_last pruned
    # or a DeepSpeed JSON named relative to where training ran, or a masking policy's module.
    raw.setdefault("trainer", {}).update(resume="auto", deepspeed_config="")
    masking = merge(merge({}, raw), changes or {}).get("data", {}).get("masking", {})  # raw itself unchanged
    policies = ("eval_policy" if masking.get("eval_policy") else "policy",) if scoring else ()
    saved = config_from_dict(raw, str(checkpoint / "config.yaml"), () if changes else policies)
    if changes and "dir" in changes.get("data", {}):
        # Another folder's data, masked as the run was: its masking tables default to its data folder's.
        tables = {"importance_table": str(importance_path(saved)), "collocation_table": str(collocation_path(saved))}
        changes = merge({"data": {"masking": tables}}, changes)
    cfg = saved
    if changes:  # a problem now is the changes' (the saved config was valid): the message says so
        cfg = config_from_dict(merge(raw, changes), f"{checkpoint / 'config.yaml'} with the changes given", policies)
    return checkpoint, cfg, trained_tokenizer(checkpoint, saved)


def trained_tokenizer(checkpoint: Path, saved: Config) -> Tokenizer:
    """The tokenizer saved with the checkpoint, which its meta.json names by sha256. Checkpoints from before
    either fall back to the data folder's, which may have been replaced since: what they name is compared."""
    embedded, recorded = checkpoint / "tokenizer" / MODEL_FILE, (meta_or_none(checkpoint) or {}).get("tokenizer_sha256")
    if embedded.is_file():
        tokenizer = Tokenizer(embedded.parent)
    elif recorded is not None:
        raise SystemExit(f"cannot use checkpoint {checkpoint}: {embedded}, the tokenizer it was trained with, is "
                         "missing; restore it (a copy of the run's data.dir tokenizer, if that was not replaced)")
    else:
        tokenizer = Tokenizer(tokenizer_dir(saved))
    if recorded not in (None, actual := tokenizer.fingerprint()):
        raise SystemExit(f"cannot use checkpoint {checkpoint}: {tokenizer.dir / MODEL_FILE} is not the tokenizer it "
                         f"was trained with (sha256 {actual[:12]}, not {recorded[:12]})")
    return tokenizer


def trained_model(checkpoint: Path, cfg: Config, tokenizer: Tokenizer) -> torch.nn.Module:
    """The objective model with the checkpoint's weights, in eval mode."""
    model = build_model(OBJECTIVES[cfg.model.objective], cfg.model, cfg.data.seq_len, TokenIds.of(tokenizer))
    load_weights(model, checkpoint)
    return model.eval()


def load_trained(checkpoint: str | Path):
    """(config, tokenizer, objective model with the checkpoint's weights) for a complete checkpoint folder."""
    checkpoint, cfg, tokenizer = trained_config(checkpoint)
    return cfg, tokenizer, trained_model(checkpoint, cfg, tokenizer)


def model_card(cfg, model, checkpoint: Path) -> str:
    """README.md of an exported folder: what it is and how to load it without masktrain."""
    auto = model.auto_class
    what = ("The encoder of an MAE-LM model (its shallow decoder and LM head are pre-training only)"
            if cfg.model.objective == "mae_lm" else f"A {cfg.model.objective} model")
    mae = ("\nPre-training removed the masked tokens before the encoder: [MASK] was never an input of this encoder, "
           "and there is no masked-LM head, so fill-mask does not apply (`AutoModelForMaskedLM` would start one "
           "untrained).\n" if cfg.model.objective == "mae_lm" else "")
    documents = ("\nPre-training packed documents back to back with document attention: each attended only to "
                 "itself, numbered from position 0, as one document alone in an input is.\n"
                 if cfg.data.document_attention else "")
    pooler = ("\nLoaded with `AutoModel`, the encoder gets a pooler that pre-training never had: transformers "
              "reports it missing and it starts untrained.\n" if OBJECTIVES[cfg.model.objective].encoder else "")
    return (f"# {cfg.run.name}\n\n"
            f"{what}, pre-trained with masktrain ({cfg.model.objective} on "
            f"{cfg.model.arch}) and exported from `{checkpoint}`.\n\n"
            f"```python\nfrom transformers import AutoTokenizer, {auto}\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained(PATH)\nmodel = {auto}.from_pretrained(PATH)\n```\n"
            + pooler + mae + documents
            + f"\nInputs longer than {max_positions(cfg.model, cfg.data.seq_len)} tokens (the model's positions) "
            "must be cut (`truncation=True`). Text that holds the special tokens' spelling (<s>, </s>, [CLS], [SEP], "
            "[PAD], <unk>) encodes it as those tokens; pre-training's tokenizer spelled it out."
            + (" So does [MASK], which this model never had as an input." if cfg.model.objective in ("ntp", "mae_lm")
               else "") + "\n")


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's exported model (safetensors), its tokenizer and a model card to `out_dir`, a new
    folder, which appears whole or not at all, or an empty one."""
    out_dir = Path(out_dir).resolve()  # "." has no name to stage beside
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty folder; export writes a new one")
    # Said before consolidating the checkpoint, which takes minutes for a large model.
    if not (existing := next(p for p in out_dir.parents if p.exists())).is_dir():
        raise NotADirectoryError(f"{out_dir}: {existing} is a file, not a folder to export into")
    checkpoint = resolve_checkpoint(checkpoint)  # a run folder, or its `latest`: the card names the checkpoint
    cfg, tokenizer, model = load_trained(checkpoint)
    # Staged on the same file system: beside a new folder, or inside an existing empty one (a mount point, a
    # volume whose parent is not ours), whose files then move up.
    filling = out_dir.is_dir()
    staging = (out_dir / f".export.tmp-{os.getpid()}" if filling
               else out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}"))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.exported().save_pretrained(staging, safe_serialization=True)
        tokenizer.save_hf(staging, "encoder" if OBJECTIVES[cfg.model.objective].encoder else "decoder",
                          max_positions(cfg.model, cfg.data.seq_len))
        (staging / "README.md").write_text(model_card(cfg, model, checkpoint))
        # safetensors writes its file 0600; colleagues on a shared file system read the rest with the umask.
        mode = 0o666 & ~current_umask()
        for path in staging.iterdir():
            path.chmod(mode)
        sync_tree(staging)  # on disk before it is named the export: the checkpoints may be deleted next
        if filling:  # maybe a shell's working folder: filled, not replaced
            for path in staging.iterdir():
                os.replace(path, out_dir / path.name)
        else:
            os.replace(staging, out_dir)
        fsync_path(out_dir if filling else out_dir.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
