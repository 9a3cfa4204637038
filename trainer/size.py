"""Model size: parameter counts of a built model (ZeRO-3 partitioned or not), and of a config's model without
building it for real (`masktrain model info`): the model is constructed on the meta device (shapes, no
storage), so even a billion-parameter preset is counted in seconds with no memory.
"""

from __future__ import annotations

import torch
from torch import nn

from masktrain.data.tokenizer import MASK_ID, RESERVED_IDS
from masktrain.launcher.config import Config
from masktrain.trainer.engine import deepspeed_config
from masktrain.trainer.models import TokenIds, build_model, zero_stage


def state_bytes(precision: str, zero_stage: int) -> tuple[int, int, int]:
    """Bytes per parameter of the training state, split by what ZeRO partitions (Rajbhandari et al., ZeRO,
    sec. 3): (weights, gradients, optimizer state). Mixed precision keeps bf16 weights and gradients plus an
    fp32 master copy and two AdamW moments. fp32 training keeps fp32 weights and gradients and the two moments,
    and under ZeRO-1/2 a master copy as well: DeepSpeed clones its fp32 partition from the fp32 weights
    (stage_1_and_2.py, single_partition_of_fp32_groups), where ZeRO-3 steps the weights' own partition
    (unless the optimizer is offloaded, which this estimate does not cover)."""
    if precision == "bf16":
        return 2, 2, 12
    return 4, 4, 12 if zero_stage in (1, 2) else 8

# The ids data/tokenizer.py gives its special tokens; used only when the tokenizer is not built yet, and they
# do not change any parameter count beyond RoBERTa's position offset.
UNBUILT_TOKENIZER_IDS = dict(pad_id=RESERVED_IDS["pad_id"], bos_id=RESERVED_IDS["bos_id"],
                             eos_id=RESERVED_IDS["eos_id"], mask_id=MASK_ID)


def parameter_count(module: nn.Module) -> int:
    """Distinct parameters (tied ones once); ZeRO-3 partitioned parameters count at their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def held_here(module: nn.Module) -> int | None:
    """Parameter elements this rank holds if ZeRO-3 partitioned the module (alignment padding included),
    else None."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_tensor") for p in params):
        return None
    return sum(p.ds_tensor.numel() for p in params)


def millions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def describe(model: nn.Module) -> str:
    """'110.7M parameters (110,650,112)' and, when the model was built partitioned, what this rank holds."""
    total = parameter_count(model)
    text = f"{millions(total)} parameters ({total:,})"
    held = held_here(model)
    if held is not None:
        text += f"; built ZeRO-3 partitioned, this rank holds {held:,}"
    return text


def exported_size(model: nn.Module) -> str:
    """The exported model's class and size when it is not the whole model (MAE-LM's encoder), else ''."""
    exported = model.exported()
    count = parameter_count(exported)
    if count == parameter_count(model):
        return ""
    return f", exported {type(exported).__name__} {millions(count)} ({count:,})"


def state_bytes_per_rank(params: int, precision: str, zero_stage: int, world_size: int) -> float:
    """Weights, gradients and optimizer state one rank holds (activations and buffers not included)."""
    def share(nbytes: int, partitioned_from_stage: int) -> float:
        return nbytes / world_size if zero_stage >= partitioned_from_stage else nbytes

    weights, grads, optim = state_bytes(precision, zero_stage)
    return params * (share(weights, 3) + share(grads, 2) + share(optim, 1))


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def held_bytes(engine) -> dict[str, int]:
    """What a DeepSpeed engine holds on this rank, measured: parameters as the module holds them (ZeRO-3: its
    partition in ds_tensor, plus parameters it keeps whole), the master weights the torch optimizer steps on,
    and that optimizer's state. `state_bytes_per_rank` predicts these plus gradients."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    params = [t for p in engine.module.parameters() for t in (p.data, getattr(p, "ds_tensor", None)) if t is not None]
    params += [p for group in inner.param_groups for p in group["params"]]
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"parameters": storage_bytes(params), "optimizer_state": storage_bytes(state),
            "total": storage_bytes(params + state)}


def token_ids(cfg: Config) -> tuple[TokenIds, str]:
    """The run's tokenizer ids if it is built, else the configured vocabulary size; and where they came from."""
    from masktrain.data.inputs import tokenizer_dir
    from masktrain.data.tokenizer import MODEL_FILE, Tokenizer

    path = tokenizer_dir(cfg)
    if (path / MODEL_FILE).is_file():
        return TokenIds.of(Tokenizer(path)), f"tokenizer {path}"
    return (TokenIds(size=cfg.data.prepare.vocab_size, **UNBUILT_TOKENIZER_IDS),
            "data.prepare.vocab_size (tokenizer not built yet)")


def model_info(cfg: Config) -> str:
    """What `masktrain model info` prints: the model's size and the training state it needs per rank."""
    from masktrain.trainer.objectives import OBJECTIVES

    ids, source = token_ids(cfg)
    # The meta device rather than accelerate.init_empty_weights: the latter re-registers every parameter it
    # sees assigned, which unties tied embeddings and would count them twice.
    with torch.device("meta"):
        model = build_model(OBJECTIVES[cfg.model.objective], cfg.model, cfg.data.seq_len, ids)
    m = cfg.model
    shape = f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, ffn {m.intermediate_size}"
    if m.objective == "mae_lm":
        shape += f", decoder {m.decoder_layers} layers"
        width, feed_forward, heads = m.decoder_shape()
        if width != m.hidden_size:
            shape += f" of hidden {width}, {heads} heads, ffn {feed_forward}"
    # As engine.precision resolves it, except that auto's answer depends on the GPU the ranks get.
    precision, assumed = cfg.trainer.precision, ""
    if precision == "auto":
        precision = "fp32" if cfg.launch.accelerator == "cpu" else "bf16"
        assumed = "" if precision == "fp32" else "; trainer.precision auto: fp32 on GPUs without native bf16"
    # The stage the run will use: a trainer.deepspeed_config JSON may set another than trainer.zero_stage.
    stage = zero_stage(deepspeed_config(cfg, precision))
    per_rank = state_bytes_per_rank(parameter_count(model), precision, stage, cfg.world_size)
    return "\n".join([
        f"objective:  {m.objective} on {m.arch} ({shape}), sequence length {cfg.data.seq_len}",
        f"vocabulary: {ids.size} from {source}",
        f"parameters: {describe(model)}{exported_size(model)}",
        f"training state per rank: {per_rank / 2**30:.2f} GiB ({precision} weights/gradients/AdamW under "
        f"ZeRO-{stage} over {cfg.world_size} ranks; activations not included{assumed})",
    ])
