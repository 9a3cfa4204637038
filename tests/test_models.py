"""Objective models on real (tiny) batches: what MAE-LM's encoder and decoder receive, that gathering before the
head leaves the loss unchanged, that NTP -> MEAP changes only the inputs, and the presets' sizes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from masktrain import configs
from masktrain.data import inputs
from masktrain.data.batches import IGNORE
from masktrain.data.reader import Skips
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher import cli
from masktrain.launcher.loading import ConfigError, load_config, to_dict
from masktrain.trainer.checkpoint import config_changes
from masktrain.trainer.models import BUILDERS, RESIDUAL_OUTPUTS, TokenIds, build_model, token_loss
from masktrain.trainer.objectives import OBJECTIVES
from masktrain.trainer.size import model_info, parameter_count

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
              "model.decoder_layers=1"]


def setup(tiny_data, *overrides: str):
    """(config, tokenizer ids, model, validation batches) for the smoke config shrunk to a tiny model."""
    cfg = load_config("smoke", [*tiny_data, *TINY_MODEL, *overrides])
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    objective = OBJECTIVES[cfg.model.objective]
    torch.manual_seed(0)
    model = build_model(objective, cfg.model, cfg.data.seq_len, TokenIds.of(tokenizer))
    batches, _ = inputs.validation_set(cfg, objective.batch, objective.encoder, tokenizer, 0, 1, Skips(False))
    return cfg, TokenIds.of(tokenizer), model, batches


def capture_kwargs(module: torch.nn.Module, seen: list[dict]):
    return module.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)


NARROW_DECODER = "model.decoder_hidden_size=16"  # half of TINY_MODEL's width


@pytest.mark.parametrize("arch,corruption", [
    ("bert", ["data.masking.mask_prob=1.0", "data.masking.random_prob=0"]),
    ("roberta", ["data.masking.mask_prob=0.8", "data.masking.random_prob=0.1"]),
    ("bert", ["data.masking.mask_prob=1.0", "data.masking.random_prob=0", NARROW_DECODER])])
def test_mae_encoder_sees_visible_tokens_at_original_positions(tiny_data, arch, corruption):
    cfg, ids, model, batches = setup(tiny_data, "model.objective=mae_lm", f"model.arch={arch}",
                                     "data.masking.rate=0.4", *corruption)
    batch = batches[0]
    encoder_in, decoder_in, head_in, looked_up = [], [], [], []
    capture_kwargs(model.hf.base_model.embeddings, encoder_in)
    model.hf.get_input_embeddings().register_forward_hook(lambda _, args, out: looked_up.append(args[0]))
    capture_kwargs(model.decoder.embeddings, decoder_in)
    model.hf.get_output_embeddings().register_forward_hook(lambda _, args, out: head_in.append(args[0]))
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        encoded = model.encode(batch["visible_ids"], batch["visible_pos"], batch["visible_mask"])

    removed, visible = batch["removed"], batch["visible_mask"]
    assert removed.any() and (batch["visible_ids"].shape[1] < removed.shape[1])
    # The encoder's words and the decoder's [MASK] are looked up in one call, [MASK] last; the encoder is given
    # the others' embeddings only.
    seen_ids, seen_pos = batch["visible_ids"], encoder_in[0]["position_ids"]
    assert torch.equal(looked_up[0][:-1], seen_ids.reshape(-1)) and looked_up[0][-1] == ids.mask_id
    with torch.no_grad():
        torch.testing.assert_close(encoder_in[0]["inputs_embeds"], model.hf.get_input_embeddings()(seen_ids))
    assert not (seen_ids == ids.mask_id).any(), "the encoder was given a [MASK] id"
    offset = ids.pad_id + 1 if arch == "roberta" else 0
    for row in range(removed.shape[0]):
        kept = torch.nonzero(~removed[row]).flatten()
        assert torch.equal(seen_pos[row][visible[row]], kept + offset)
        assert seen_ids[row][visible[row]].shape == kept.shape

    # Decoder input: the encoder outputs back at their positions, the [MASK] embedding in every removed slot,
    # each mapped to the decoder's width when that is narrower (the same-width map has nothing to learn).
    width = cfg.model.decoder_shape()[0]
    assert isinstance(model.to_decoder, torch.nn.Identity) == (width == cfg.model.hidden_size)
    slots = decoder_in[0]["inputs_embeds"]
    assert slots.shape == (*removed.shape, width)
    with torch.no_grad():
        mask_embedding = model.to_decoder(model.hf.get_input_embeddings().weight[ids.mask_id])
        torch.testing.assert_close(slots[removed], mask_embedding.expand(int(removed.sum()), -1))
        for row in range(removed.shape[0]):
            torch.testing.assert_close(slots[row, batch["visible_pos"][row][visible[row]]],
                                       model.to_decoder(encoded[row][visible[row]]))
    # The head runs only where a label is, on the encoder's width.
    targets = int((batch["labels"] != -100).sum())
    assert head_in[0].shape == (targets, cfg.model.hidden_size) and targets == int(out["tokens"])


@pytest.mark.parametrize("arch,width", [("bert", []), ("roberta", []), ("bert", [NARROW_DECODER])])
def test_mae_decoder_computes_its_last_layer_only_where_it_predicts_and_gets_the_full_decoders_outputs(
        tiny_data, arch, width):
    _, _, model, _ = setup(tiny_data, "model.objective=mae_lm", f"model.arch={arch}", "model.decoder_layers=3",
                           *width)
    model.eval()
    slots = torch.randn(3, 16, model.decoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    where = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    feed_forward_rows = []
    model.decoder.encoder.layer[-1].intermediate.register_forward_hook(
        lambda _, args, out: feed_forward_rows.append(args[0].shape[0]))
    with torch.no_grad():
        full = model.decoder(inputs_embeds=slots).last_hidden_state[where]
        feed_forward_rows.clear()
        decoded = model.decode(slots, where)
    assert feed_forward_rows == [int(where.sum())]
    torch.testing.assert_close(decoded, full)


@pytest.mark.parametrize("objective", ["mlm", "mae_lm"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_encoders_do_not_attend_to_padding(tiny_data, objective, arch):
    """The same tokens and masks with 24 or 8 padding tokens after them give the same loss: the padded last
    validation row is scored on its real tokens only. An all-padding batch runs and scores nothing."""
    cfg, ids, model, _ = setup(tiny_data, f"model.objective={objective}", f"model.arch={arch}",
                               "data.masking.rate=0.4")
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    rows = inputs.validation_set(cfg, lambda rows, *_: rows, True, tokenizer, 0, 1, Skips(False))[0][0][:2]
    length = rows.shape[1]
    padded = rows.clone()
    padded[:, length - 24:] = ids.pad_id
    spec = inputs.mask_spec(cfg, tokenizer)
    long = OBJECTIVES[objective].batch(padded, spec, 0.4, torch.Generator().manual_seed(0))
    assert long["attention_mask"].sum() == 2 * (length - 24)
    # The same batch, cut 16 padding tokens shorter: per-position tensors lose their last 16 columns.
    short = {k: v if k.startswith("visible_") else v[:, :length - 16] for k, v in long.items()}
    model.eval()
    # What ranks with fewer validation rows run meanwhile: all padding, nothing to score.
    empty = OBJECTIVES[objective].batch(torch.full((1, length), ids.pad_id), spec, 0.4, torch.Generator())
    with torch.no_grad():
        torch.testing.assert_close(model(**short)["loss"], model(**long)["loss"], rtol=1e-5, atol=1e-6)
        assert int(model(**empty)["tokens"]) == 0


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_mae_rows_of_a_padded_batch_compute_what_each_row_computes_alone(tiny_data, arch):
    """Rows keep different numbers of visible tokens (80/10/10 removes only the [MASK] share) and the last
    validation row ends in padding, so the encoder's visible slots and the decoder's positions are padded in a
    batch. Neither may attend to that padding: each row's encoder outputs, decoder outputs and loss are those
    of the row run alone, cut to its real length (no padding at all). A loss comparison on an untrained model
    moved by 1e-6 when either attended to padding; the outputs move by 1e-3."""
    cfg, ids, model, _ = setup(tiny_data, "model.objective=mae_lm", f"model.arch={arch}", "data.masking.rate=0.4",
                               "data.masking.mask_prob=0.8", "data.masking.random_prob=0.1")
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    rows = inputs.validation_set(cfg, lambda rows, *_: rows, True, tokenizer, 0, 1, Skips(False))[0][0][:3].clone()
    rows[2, -24:] = ids.pad_id
    batch = OBJECTIVES["mae_lm"].batch(rows, inputs.mask_spec(cfg, tokenizer), 0.4, torch.Generator().manual_seed(3))
    visible_counts = batch["visible_mask"].sum(dim=1).tolist()
    assert len(set(visible_counts)) == 3 and "attention_mask" in batch
    decoded = []
    model.from_decoder.register_forward_hook(lambda _, args, out: decoded.append(args[0]))
    model.eval()
    with torch.no_grad():
        together = model(**batch)
        encoded = model.encode(batch["visible_ids"], batch["visible_pos"], batch["visible_mask"])
        targets = (batch["labels"] != IGNORE).sum(dim=1).tolist()
        per_row = decoded[0].split(targets)
        loss_sums = []
        for row, (visible, real) in enumerate(zip(visible_counts, rows.ne(ids.pad_id).sum(dim=1).tolist())):
            alone = {"visible_ids": batch["visible_ids"][row:row + 1, :visible],
                     "visible_pos": batch["visible_pos"][row:row + 1, :visible],
                     "visible_mask": batch["visible_mask"][row:row + 1, :visible],
                     "removed": batch["removed"][row:row + 1, :real], "labels": batch["labels"][row:row + 1, :real]}
            torch.testing.assert_close(model.encode(alone["visible_ids"], alone["visible_pos"],
                                                    alone["visible_mask"])[0], encoded[row, :visible])
            loss_sums.append(model(**alone)["loss_sum"])
            torch.testing.assert_close(decoded[-1], per_row[row])
    torch.testing.assert_close(sum(loss_sums), together["loss_sum"])


def test_token_loss_counts_targets_and_correct_predictions():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    out = token_loss(logits, torch.tensor([0, 1, 2, 1]))  # the last one is wrong
    assert int(out["tokens"]) == 4 and int(out["correct"]) == 3
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 1]), reduction="sum")
    torch.testing.assert_close(out["loss_sum"], expected)
    torch.testing.assert_close(out["loss"], expected / 4)


@pytest.mark.parametrize("objective,arch", [("mlm", "bert"), ("mlm", "roberta"), ("ntp", "llama"),
                                            ("meap", "llama")])
def test_gathering_before_the_head_leaves_the_loss_unchanged(tiny_data, objective, arch):
    """The wrapper's loss equals transformers' own loss over full-length logits."""
    _, _, model, batches = setup(tiny_data, f"model.objective={objective}", f"model.arch={arch}")
    model.eval()
    batch = batches[0]
    with torch.no_grad():
        ours = model(**batch)["loss"]
        theirs = model.hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_ntp_to_meap_changes_only_the_inputs(tiny_data):
    ntp_cfg, ids, ntp_model, ntp_batches = setup(tiny_data, "model.objective=ntp")
    meap_cfg, _, meap_model, meap_batches = setup(tiny_data, "model.objective=meap")
    changed = {line.split(":")[0] for line in config_changes(to_dict(ntp_cfg), to_dict(meap_cfg))}
    assert "model.objective" in changed
    assert all(key == "model.objective" or key.startswith("data.masking.") for key in changed), changed

    assert type(ntp_model) is type(meap_model)
    ntp_state, meap_state = ntp_model.state_dict(), meap_model.state_dict()
    assert ntp_state.keys() == meap_state.keys()
    assert all(torch.equal(ntp_state[k], meap_state[k]) for k in ntp_state)

    for ntp, meap in zip(ntp_batches, meap_batches, strict=True):
        assert ntp.keys() == meap.keys() == {"input_ids", "labels"}
        assert torch.equal(ntp["labels"], meap["labels"])
        differs = ntp["input_ids"] != meap["input_ids"]
        assert differs.any()
        assert (meap["input_ids"][differs] == ids.mask_id).all()
    # Plain next-token loss: the masked inputs predict the untouched next tokens, [MASK] positions included.
    meap_model.eval()
    batch = meap_batches[0]
    with torch.no_grad():
        meap_loss = meap_model(**batch)["loss"]
        logits = meap_model.hf(input_ids=batch["input_ids"]).logits
    next_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(meap_loss, next_token, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective,arch", [("mlm", "bert"), ("mae_lm", "bert"), ("mae_lm", "roberta"),
                                            ("ntp", "llama")])
def test_every_parameter_learns(tiny_data, objective, arch):
    """One backward reaches every parameter: DeepSpeed partitions and steps all of them."""
    _, _, model, batches = setup(tiny_data, f"model.objective={objective}", f"model.arch={arch}")
    model(**batches[0])["loss"].backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent


RESIDUAL_STD = 0.001  # far from init_std's 0.02: each weight's spread tells which draw it got


def weight_stds(model: torch.nn.Module) -> dict[str, float]:
    """The spread of each weight matrix large enough for its spread to be measured to a few percent."""
    return {name: float(p.detach().std()) for name, p in model.named_parameters() if p.dim() == 2 and p.numel() >= 256}


def assert_residual_init(stds: dict[str, float], outputs: int) -> None:
    residual = {name for name in stds if RESIDUAL_OUTPUTS.search(name.removesuffix(".weight"))}
    assert len(residual) == outputs, sorted(residual)
    for name, std in stds.items():
        assert std == pytest.approx(RESIDUAL_STD if name in residual else 0.02, rel=0.15), name


# Two per layer: TINY_MODEL's 2 layers, plus MAE-LM's 1 decoder layer.
@pytest.mark.parametrize("objective,arch,outputs", [("ntp", "llama", 4), ("mlm", "bert", 4),
                                                    ("mae_lm", "roberta", 6)])
def test_residual_init_std_draws_the_layers_that_write_into_the_residual_stream(tiny_data, objective, arch,
                                                                                  outputs):
    """GPT-NeoX's init as TinyLlama and MEAP use it; model.norm_eps reaches every norm, the exported config too."""
    _, _, model, _ = setup(tiny_data, f"model.objective={objective}", f"model.arch={arch}", NARROW_DECODER,
                           f"model.residual_init_std={RESIDUAL_STD}", "model.norm_eps=1e-5")
    assert_residual_init(weight_stds(model), outputs)
    norms = [module for module in model.modules() if "Norm" in type(module).__name__]
    assert norms and {getattr(n, "eps", None) or getattr(n, "variance_epsilon", None) for n in norms} == {1e-5}
    config = model.exported().config
    assert getattr(config, "rms_norm_eps" if arch == "llama" else "layer_norm_eps") == 1e-5


def build_partitioned(rank: int, tiny_data: list[str], out: str) -> None:
    """One rank builds a model under ZeRO-3 and saves its weights' spreads, gathered."""
    import deepspeed
    from torch.distributed.elastic.utils.distributed import get_free_port

    from masktrain.trainer.engine import deepspeed_config, init_distributed

    cfg = load_config("smoke", [*tiny_data, *TINY_MODEL, "model.objective=mae_lm", NARROW_DECODER,
                                f"model.residual_init_std={RESIDUAL_STD}", "trainer.zero_stage=3",
                                "launch.nproc_per_node=1"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(get_free_port()))
    init_distributed(cfg)
    torch.manual_seed(0)
    model = build_model(OBJECTIVES["mae_lm"], cfg.model, cfg.data.seq_len,
                        TokenIds.of(Tokenizer(inputs.tokenizer_dir(cfg))), deepspeed_config(cfg, "fp32"))
    assert all(hasattr(p, "ds_id") for p in model.parameters())  # partitioned, not built whole
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        torch.save(weight_stds(model), out)


def test_residual_init_std_draws_the_gathered_weights_under_zero3(tiny_data, tmp_path):
    out = tmp_path / "stds.pt"
    mp.start_processes(build_partitioned, args=(tiny_data, str(out)), nprocs=1,
                       start_method="fork")
    assert_residual_init(torch.load(out), 6)


def test_every_objective_has_a_builder():
    assert {o.model for o in OBJECTIVES.values()} <= set(BUILDERS)
    broken = OBJECTIVES["mlm"].__class__("x", ("bert",), None, True, True, model="nope")
    with pytest.raises(KeyError, match="known builders: causal_lm, mae_lm, masked_lm"):
        build_model(broken, load_config("smoke").model, 16, TokenIds(100, 0, 2, 3, 6))


def meta_size(config: str, *overrides: str) -> tuple[int, int]:
    cfg = load_config(config, list(overrides))
    with torch.device("meta"):
        model = build_model(OBJECTIVES[cfg.model.objective], cfg.model, cfg.data.seq_len,
                            TokenIds(cfg.data.prepare.vocab_size, 0, 2, 3, 6))
    return parameter_count(model), parameter_count(model.exported())


# Published sizes. BERT-base / -large (vocab 30522, with the pooler and two token types): 109,482,240 /
# 335,141,888; masktrain's encoders have neither pooler nor a second token type. MEAP's 1.1B (tiny_LLaMA_1b_mask):
# 24 layers of attention (2 of 32 heads for keys and values) and a SwiGLU FFN of 5632, untied embeddings.
MEAP_1B_LAYER = 2 * 2048 * 2048 + 2 * 2048 * 128 + 3 * 2048 * 5632 + 2 * 2048
BERT_BASE_ENCODER = 109_482_240 - (768 * 768 + 768) - 768
BERT_LARGE_ENCODER = 335_141_888 - (1024 * 1024 + 1024) - 1024


def test_presets_have_their_published_sizes():
    meap_1b = 24 * MEAP_1B_LAYER + 2 * 32000 * 2048 + 2048
    assert meta_size("ntp-1b") == (meap_1b, meap_1b) == (1_175_554_048,) * 2
    assert meta_size("meap-1b") == meta_size("ntp-1b")
    bert_vocab = "data.prepare.vocab_size=30522"
    mae_total, mae_encoder = meta_size("mae-lm-base", bert_vocab, "model.decoder_hidden_size=0")  # the reference's
    assert mae_encoder == BERT_BASE_ENCODER
    # The decoder adds 4 layers and its own positions; it borrows the encoder's token table and head.
    layer = 12 * 768 * 768 + 13 * 768
    assert mae_total - meta_size("bert-base", bert_vocab)[0] == 4 * layer + 512 * 768 + 768 + 2 * 768
    # The preset's half-width decoder: its layers and positions at 384, plus the maps in (with bias) and out.
    narrow_total, narrow_encoder = meta_size("mae-lm-base", bert_vocab)
    narrow_layer = 12 * 384 * 384 + 13 * 384
    assert narrow_encoder == BERT_BASE_ENCODER
    assert narrow_total - meta_size("bert-base", bert_vocab)[0] == (4 * narrow_layer + 512 * 384 + 384 + 2 * 384
                                                                    + 768 * 384 + 384 + 384 * 768)
    mlm_total, mlm_exported = meta_size("bert-large", bert_vocab)
    assert mlm_total == mlm_exported == BERT_LARGE_ENCODER + (1024 * 1024 + 3 * 1024) + 30522


def test_model_info_counts_without_building(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["model", "info", "mae-lm-base"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "decoder 4 layers" in printed and "exported BertModel 110.0M" in printed
    assert "decoder 4 layers of hidden 384, 6 heads, ffn 1536" in printed
    assert "ZeRO-3 over 8 ranks" in model_info(load_config("ntp-1b"))
    # The stage the run uses: a DeepSpeed JSON of the user's overrides trainer.zero_stage.
    zero3 = "trainer.deepspeed_config=" + str(configs.deepspeed_preset(3))
    assert "ZeRO-3 over 2 ranks" in model_info(load_config("smoke", ["trainer.zero_stage=2", zero3]))
    # The precision the run trains in: an explicit one wherever it runs; auto's depends on the GPU.
    assert "(bf16 weights" in model_info(load_config("smoke", ["trainer.precision=bf16"]))
    assert "(fp32 weights" in model_info(load_config("smoke", ["launch.accelerator=cpu"]))
    auto = model_info(load_config("smoke", ["launch.accelerator=cuda", "trainer.precision=auto"]))
    assert "(bf16 weights" in auto and "trainer.precision auto: fp32 on GPUs without native bf16" in auto


def test_mae_lm_refuses_a_corruption_that_removes_nothing():
    with pytest.raises(ConfigError, match="data.masking.mask_prob: mae_lm removes"):
        load_config("mae-lm-base", ["data.masking.mask_prob=0"])


# mask_prob 0.8: the random and kept tenths of the targets stay in MAE-LM's encoder input.
@pytest.mark.parametrize("objective,extra", [("mlm", []), ("mae_lm", []), ("mae_lm", [NARROW_DECODER]),
                                             ("mae_lm", ["data.masking.mask_prob=0.8", "data.masking.random_prob=0.1"]),
                                             ("meap", []), ("ntp", [])])
def test_flops_per_token_is_what_torch_counts_for_a_training_step(tiny_data, objective, extra):
    """The MFU numerator: heads run at the targets only and MAE-LM's encoder on the visible tokens, so 6 x params
    would overstate encoders by 20-40%. Eager attention, whose matmuls torch's counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, _, model, batches = setup(tiny_data, f"model.objective={objective}", "data.masking.rate=0.4",
                                   "model.dropout=0", *extra)
    for module in model.modules():
        if hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("eager")
    batch = batches[0]
    with FlopCounterMode(display=False) as counter:
        model(**batch)["loss"].backward()
    tokens = batch["labels"].numel()
    share = float((batch["labels"] != -100).float().mean())
    assert share == pytest.approx(0.4 if objective in ("mlm", "mae_lm") else 1.0, abs=0.02)
    assert model.flops_per_token(share, cfg.data.seq_len, cfg.data.masking.mask_prob) == pytest.approx(
        counter.get_total_flops() / tokens, rel=0.02)


def test_peak_flops_match_the_longest_gpu_name_and_the_training_precision(monkeypatch):
    from types import SimpleNamespace

    from masktrain.trainer.progress import peak_flops, peak_tflops

    assert peak_tflops("NVIDIA L40S", "bf16") == 362 and peak_tflops("NVIDIA L40", "bf16") == 181
    assert peak_tflops("NVIDIA L4", "bf16") == 121 and peak_tflops("NVIDIA H100 PCIe", "bf16") == 756
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835 and peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == 835 and peak_tflops("NVIDIA H200", "bf16") == 989
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") == 0
    # fp32 (what precision=auto picks on a V100) is measured against the fp32 units, not the tensor cores.
    assert peak_tflops("Tesla V100-SXM2-32GB", "fp32") == 15.7 and peak_tflops("Tesla V100-SXM2-32GB", "bf16") == 0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    runtime, cfg = SimpleNamespace(device=torch.device("cuda", 0)), load_config("smoke")
    assert peak_flops(cfg, runtime, "fp32") == pytest.approx(66.9e12) and peak_flops(cfg, runtime, "bf16") == 989e12
    cfg.trainer.peak_tflops = 100.0
    assert peak_flops(cfg, runtime, "fp32") == 100e12
