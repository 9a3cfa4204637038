"""`masktrain export CHECKPOINT OUTDIR`: a checkpoint -> a Hugging Face model folder (safetensors + tokenizer)
that `transformers` loads with no masktrain import.

ZeRO 1-3 checkpoints are consolidated to fp32 with DeepSpeed's own zero_to_fp32 utilities; ZeRO-0 keeps the
full module state in one file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from masktrain.data.inputs import tokenizer_dir
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher.loading import config_from_dict
from masktrain.trainer.checkpoint import saved_config
from masktrain.trainer.models import build_model
from masktrain.trainer.objectives import OBJECTIVES


def consolidated_state_dict(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 0:
        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return states["module"]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def load_trained(checkpoint: str | Path):
    """(config, tokenizer, objective model with the checkpoint's weights) for a complete checkpoint folder."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "meta.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete masktrain checkpoint (no meta.json)")
    cfg = config_from_dict(saved_config(checkpoint), str(checkpoint / "config.yaml"))
    tokenizer = Tokenizer(tokenizer_dir(cfg))
    model = build_model(OBJECTIVES[cfg.model.objective], cfg.model, cfg.data.seq_len, tokenizer)
    model.load_state_dict(consolidated_state_dict(checkpoint, cfg.trainer.zero_stage))
    return cfg, tokenizer, model.eval()


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    cfg, tokenizer, model = load_trained(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.exported().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_hf(out_dir, "encoder" if OBJECTIVES[cfg.model.objective].encoder else "decoder")
    return out_dir
