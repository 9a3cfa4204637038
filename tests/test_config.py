"""Typed configs: loading, overrides, and errors that name the key before any process starts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import MASKTRAIN, run_cli
from masktrain.launcher.loading import ConfigError, ConfigLoader, load_config, parse_overrides


def problems_of(*overrides: str, config: str = "smoke") -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(config, list(overrides))
    return err.value.problems


def test_shipped_smoke_config_loads_with_overrides():
    cfg = load_config("smoke", ["trainer.max_steps=40", "data.masking.rate=0.3", "optim.betas=[0.9, 0.95]"])
    assert cfg.trainer.max_steps == 40
    assert cfg.data.masking.rate == 0.3
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.grad_accum == 1
    assert cfg.output_dir == "runs/smoke"


def test_unknown_key_names_it_and_suggests_the_closest():
    (problem,) = problems_of("trainer.max_step=40")
    assert problem.startswith("trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?")


def test_unknown_section_is_reported():
    (problem,) = problems_of("trainr.max_steps=40")
    assert "trainr: unknown key in the top level; did you mean trainer?" in problem


def test_wrong_type_names_key_expected_and_given():
    (problem,) = problems_of("trainer.max_steps=many")
    assert problem == "trainer.max_steps: expected int, got str 'many'"
    (problem,) = problems_of("data.strict=1")
    assert problem == "data.strict: expected bool, got int 1"


def test_out_of_range_values_and_batch_arithmetic_are_all_reported_at_once():
    problems = problems_of("data.masking.rate=1.5", "trainer.global_batch_size=20", "model.objective=mlx",
                           "trainer.zero_stage=4")
    text = "\n".join(problems)
    assert "data.masking.rate: must be within [0, 1], got 1.5" in text
    assert "trainer.global_batch_size: 20 is not a multiple of data.micro_batch_size (8) x world size (2" in text
    assert "model.objective: unknown value 'mlx'; valid: " in text
    assert "trainer.zero_stage: unknown value 4" in text
    assert len(problems) == 4


def test_values_that_would_fail_only_inside_the_ranks_or_the_tokenizer_trainer_are_refused():
    for seed in ("-1", str(2**32)):  # sentencepiece takes 32 bits; numpy no negative seed
        assert problems_of(f"run.seed={seed}") == [f"run.seed: must be within [0, {2**32 - 1}], got {seed}"]
    assert load_config("smoke", ["run.seed=4294967295"]).run.seed == 2**32 - 1
    # A llama head of odd size has no pairs of dimensions for rotary embeddings to turn (120 / 8 = 15).
    assert problems_of("model.objective=ntp", "model.hidden_size=120", "model.num_heads=8") == [
        "model.num_heads: llama needs an even head size (model.hidden_size / model.num_heads), got 120 / 8"]
    load_config("smoke", ["model.hidden_size=120", "model.num_heads=8"])  # BERT has no rotary embeddings


def test_a_mixture_is_a_list_of_folders_or_shard_lists_with_positive_weights_and_no_shard_list_beside_it():
    cfg = load_config("smoke", ["data.mixture=[{dir: a, weight: 3}, {dir: b}, {shards: ['c-{0..3}.tar'], name: c}]"])
    assert [(source.dir, source.shards, source.weight) for source in cfg.data.mixture] == [
        ("a", [], 3.0), ("b", [], 1.0), ("", ["c-{0..3}.tar"], 1.0)]
    assert load_config("smoke", ["data.mixture=[{dir: a}]", "data.mixture="]).data.mixture == []
    assert problems_of("data.mixture=[{dir: a, weight: 0}, {weight: 1}, {dir: ./a}, {dir: c, wieght: 2}]",
                       "data.train_shards=x.tar") == [
        "data.mixture[3].wieght: unknown key in data.mixture[3]; did you mean data.mixture[3].weight? (valid: dir, "
        "shards, val_shards, name, weight)",
        "data.mixture[0].weight: must be a positive number, got 0.0",
        "data.mixture[1]: needs dir (a prepared dataset folder) or shards (shard URLs)",
        "data.mixture: lists a folder twice; give it the sum of the weights",
        "data.mixture: and data.train_shards both say what to train on; keep one"]
    assert problems_of("data.mixture=[{dir: a, shards: [x.tar]}, {dir: b, val_shards: [v.tar], name: b/c}, "
                       "{shards: [x.tar], name: d}, {dir: e, name: d}]") == [
        "data.mixture[0]: has both dir and shards; keep one",
        "data.mixture[1].val_shards: goes with shards; a folder's validation split is the one its manifest lists",
        "data.mixture[1].name: must be letters, digits, '.', '-' or '_', got 'b/c'",
        "data.mixture: lists the same shards twice; give them the sum of the weights",
        "data.mixture: gives two sources the same name"]
    assert problems_of("data.mixture=a") == ["data.mixture: expected a list of mappings, got str 'a'"]
    assert problems_of("data.mixture=5") == ["data.mixture: expected a list of mappings, got int 5"]
    # One source as it is, as every list field takes one item.
    assert problems_of("data.mixture={dir: a, weight: 0}") == [
        "data.mixture[0].weight: must be a positive number, got 0.0"]


def test_mae_lm_decoder_shape_resolves_from_the_encoder_and_is_checked():
    cfg = load_config("mae-lm-base").model
    assert cfg.decoder_shape() == (384, 1536, 6)  # the encoder's FFN ratio and head size (64)
    assert load_config("mae-lm-base", ["model.decoder_hidden_size=0"]).model.decoder_shape() == (768, 3072, 12)
    (problem,) = problems_of("model.objective=mae_lm", "model.decoder_hidden_size=96", "model.decoder_num_heads=5")
    assert problem.startswith("model.decoder_num_heads: the decoder's width 96 must be divisible by its 5 heads")
    (problem,) = problems_of("model.objective=mae_lm", "model.decoder_hidden_size=32")  # smoke's heads are 64 wide
    assert problem == ("model.decoder_hidden_size: the decoder's width 32 is narrower than one of the encoder's "
                       "heads (64); set model.decoder_num_heads")
    (problem,) = problems_of("model.objective=mae_lm", "model.decoder_intermediate_size=-1")
    assert problem == "model.decoder_intermediate_size: must be a finite number >= 0, got -1"


def test_init_and_norm_keys_are_checked():
    assert problems_of("model.residual_init_std=-0.1", "model.norm_eps=-1e-5") == [
        "model.residual_init_std: must be a finite number >= 0, got -0.1",
        "model.norm_eps: must be a finite number >= 0, got -1e-05"]


def test_objective_defaults_sit_beneath_the_yaml():
    meap = load_config("smoke", ["model.objective=meap", "data.masking.policy=random"])
    assert (meap.model.arch, meap.data.masking.mask_prob, meap.data.masking.random_prob) == ("llama", 1.0, 0.0)
    explicit = load_config("smoke", ["model.objective=meap", "data.masking.mask_prob=0.9"])
    assert explicit.data.masking.mask_prob == 0.9


def test_base_files_are_merged_beneath(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "smoke", "trainer": {"max_steps": 7}}))
    cfg = load_config(str(child))
    assert cfg.trainer.max_steps == 7
    assert cfg.model.hidden_size == 128  # from smoke.yaml


def test_missing_config_file_lists_shipped_ones_and_a_missing_base_names_the_file_that_asks_for_it(tmp_path):
    with pytest.raises(ConfigError, match="shipped configs are: .*smoke"):
        load_config("no-such-config")
    with pytest.raises(ConfigError, match="a folder, not a config file; shipped configs are: "):
        load_config(str(tmp_path))
    child = tmp_path / "child.yaml"
    child.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(child))
    assert str(err.value).startswith(f"invalid configuration ({child}):")
    assert err.value.problems[0].startswith("base: 'missing.yaml': no such config file beside it; shipped configs "
                                            "are: ")


def test_a_relative_base_is_read_beside_its_config_or_shipped_never_from_the_working_directory(tmp_path,
                                                                                               monkeypatch):
    (tmp_path / "exp").mkdir()
    child = tmp_path / "exp" / "mine.yaml"
    child.write_text("base: bert-base.yaml\n")
    monkeypatch.chdir(tmp_path)
    Path("bert-base.yaml").write_text("base: smoke\nrun:\n  name: stray\n")  # where the command runs
    cfg = load_config(str(child))
    assert cfg.run.name != "stray" and cfg.model.hidden_size == 768
    (tmp_path / "exp" / "bert-base.yaml").write_text("base: smoke\nrun:\n  name: beside\n")
    assert load_config(str(child)).run.name == "beside"


def test_a_path_that_does_not_exist_is_never_read_as_the_shipped_config_of_that_name(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "exp" / "smoke.yaml"))
    assert load_config("smoke.yaml").run.name == load_config("smoke").run.name


def test_yaml_merge_keys_may_be_overridden_in_the_same_mapping():
    """`<<: *anchor` is YAML's way to share settings; the duplicate-key check must leave it be."""
    merged = yaml.load("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  p: 3\n", Loader=ConfigLoader)
    assert merged["b"] == {"p": 3, "q": 2}


def test_a_section_with_every_key_commented_out_is_an_empty_section(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("base: smoke\ntrainer:\n  # max_steps: 5\nmodel:\n")
    assert load_config(str(path)).trainer == load_config("smoke").trainer
    assert problems_of("trainer=3") == ["trainer: expected a mapping, got int 3"]


@pytest.mark.parametrize("text, problem", [
    (b"base: 3\n", "base: expected a config name or path, or a list of them; got 3"),
    (b"1: 2\n", "1: unknown key in the top level"),
    (b"\xff\xfe: 1\n", "not valid YAML: 'utf-8' codec can't decode"),
    (b"model:\n  objective: [1]\n", "model.objective: expected str, got list [1]"),
    (b"optim:\n  lr: .inf\n", "optim.lr: must be a finite number > 0, got inf"),
    # PyYAML keeps the last of two equal keys: the first section's settings would be lost without a word.
    (b"trainer:\n  max_steps: 1000\noptim:\n  lr: 0.1\ntrainer:\n  keep_last: 2\n",
     "not valid YAML: key 'trainer' appears twice in one mapping\n  in \"<unicode string>\", line 6, column 1"),
    (b"optim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' appears twice in one mapping"),
])
def test_malformed_files_are_config_errors_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"base: smoke\n" + text if b"base" not in text else text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and problem in str(err.value)


def test_bad_override_syntax():
    _, problems = parse_overrides(["trainer.max_steps"])
    assert problems == ["override 'trainer.max_steps' is not of the form section.key=value"]
    # A list YAML cannot read is refused, as in a file: as text it was one shard named "[s3://...]".
    broken = "data.train_shards=[s3://b/shard-{000000..000127}.tar]"
    _, problems = parse_overrides([broken, "data.masking={rate: [0.3}"])
    assert problems[0].startswith(f"override {broken!r}: not a YAML list: expected ',' or ']', but got '{{'")
    assert problems[1].startswith("override 'data.masking={rate: [0.3}': not a YAML mapping")
    quoted, problems = parse_overrides(['data.train_shards=["s3://b/shard-{000000..000127}.tar"]',
                                        "data.val_shards={a,b}/shard.tar", "run.name=[draft"])
    assert problems == [] and quoted["data"] == {"train_shards": ["s3://b/shard-{000000..000127}.tar"],
                                                 "val_shards": "{a,b}/shard.tar"}
    assert quoted["run"]["name"] == "[draft"


def test_config_show_prints_the_resolved_config():
    result = run_cli("config", "show", "smoke", "trainer.max_steps=33", check=True)
    shown = yaml.safe_load(result.stdout)
    assert shown["trainer"]["max_steps"] == 33
    assert shown["model"]["objective"] == "mlm"


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_output_piped_into_a_reader_that_stopped_ends_quietly(unbuffered):
    """`masktrain config show smoke | head -1`: a pipe whose reader has left printed BrokenPipeError's traceback
    (unbuffered: from the print) or an 'Exception ignored' (buffered: from the flush at exit)."""
    read, write = os.pipe()
    os.close(read)  # as `head -1` does once it has its line
    try:
        result = subprocess.run([MASKTRAIN, "config", "show", "smoke"], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr  # 128 + SIGPIPE, as the shell has it


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    from masktrain.launcher import cli

    def child_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_config_show", child_gone)
    with pytest.raises(BrokenPipeError):
        cli.main(["config", "show", "smoke"])


def test_a_dumped_config_reads_back_the_same_as_a_config_file_and_as_a_run_folders_config(tmp_path):
    """`config show` output saved as a file, and the configs written into run folders and checkpoints: text
    that YAML 1.2 (config files) or 1.1 (yaml.safe_load) would read as a number or a bool stays text."""
    from masktrain.launcher.loading import dump_yaml, read_run_config

    cfg = load_config("smoke", ["run.name=1e3", "data.prepare.text_field=on", "run.output_dir=0x10"])
    shown = tmp_path / "shown.yaml"
    shown.write_text(run_cli("config", "show", "smoke", "run.name=1e3", "data.prepare.text_field=on",
                             "run.output_dir=0x10", check=True).stdout)
    assert shown.read_text() == dump_yaml(cfg)
    assert load_config(str(shown)) == cfg and read_run_config(shown) == cfg


def test_train_with_bad_config_fails_before_spawning_anything(tmp_path):
    result = run_cli("train", "smoke", f"run.output_dir={tmp_path / 'run'}", "trainer.max_step=3",
                     "data.masking.rate=2")
    assert result.returncode == 2
    assert "trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?" in result.stderr
    assert "data.masking.rate: must be within [0, 1], got 2" in result.stderr
    assert not (tmp_path / "run").exists()

    # Valid for a SLURM job, but `train` starts this machine's ranks only: the rest would never join.
    result = run_cli("train", "smoke", f"run.output_dir={tmp_path / 'run'}", "launch.nnodes=2",
                     "trainer.global_batch_size=32")
    assert result.returncode == 2 and "launch.nnodes: `masktrain train` runs on this machine only" in result.stderr
    assert not (tmp_path / "run").exists()

    # GPUs asked for on a machine without: one message, not a traceback from every rank.
    result = run_cli("train", "smoke", f"run.output_dir={tmp_path / 'run'}", "launch.accelerator=cuda")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "launch.accelerator: cuda asks for GPUs, but torch" in result.stderr and "sees none" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, problem", [("{\"zero_optimization\": {\"stage\": 2},}", "not valid JSON (Expecting"),
                                           ("[1, 2]", "expected a JSON object, got list")])
def test_a_deepspeed_json_that_does_not_parse_is_refused_naming_it(tmp_path, text, problem):
    path = tmp_path / "ds.json"
    path.write_text(text)
    (found,) = problems_of(f"trainer.deepspeed_config={path}")
    assert found.startswith(f"trainer.deepspeed_config: {path}: {problem}")
    (found,) = problems_of(f"trainer.deepspeed_config={tmp_path / 'none.json'}")
    assert found == f"trainer.deepspeed_config: {tmp_path / 'none.json'}: file not found"


def test_a_deepspeed_json_that_contradicts_the_config_is_refused_before_any_rank_starts(tmp_path):
    """DeepSpeed asserts the batch sizes only inside the ranks, after the queue wait on a cluster; 'auto' (a
    Hugging Face Trainer JSON) it cannot read at all."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8,
                                "bf16": {"enabled": True}, "gradient_clipping": 0.5,
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    assert problems_of(f"trainer.deepspeed_config={path}") == [
        f"trainer.deepspeed_config: {path}: train_batch_size is 32, but trainer.global_batch_size makes it 16; "
        "remove it from the file",
        f"trainer.deepspeed_config: {path}: bf16.enabled: trainer.precision auto chooses on each machine; set "
        "trainer.precision instead",
        f"trainer.deepspeed_config: {path}: zero_optimization.reduce_bucket_size: 'auto' is a Hugging Face "
        "Trainer placeholder, which DeepSpeed cannot read; give a value or remove the key"]
    assert problems_of("trainer.precision=fp32", f"trainer.deepspeed_config={path}")[1] == (
        f"trainer.deepspeed_config: {path}: bf16.enabled is True, but trainer.precision is fp32; remove it from the "
        "file")
    # What agrees with the config (the micro-batch size and bf16 above) or is the JSON's to set (clipping, bf16's
    # other options) is taken.
    path.write_text(json.dumps({"train_batch_size": 16, "gradient_clipping": 0.5, "fp16": {"enabled": False},
                                "bf16": {"enabled": True, "immediate_grad_update": True}}))
    load_config("smoke", ["trainer.precision=bf16", f"trainer.deepspeed_config={path}"])


def test_a_deepspeed_json_that_deepspeed_itself_would_refuse_is_refused_before_any_rank_starts(tmp_path):
    path = tmp_path / "ds.json"
    refusals = {
        "typo": ({"zero_optimization": {"stage": 2, "overlap_com": True}},
                 "DeepSpeedZeroConfig: overlap_com: Extra inputs are not permitted, got True"),
        "bucket": ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}}, "DeepSpeedZeroConfig: "
                   "reduce_bucket_size: Input should be greater than 0, got -1"),
        "its own error": ({"checkpoint": {"tag_validation": "bogus"}}, "DeepSpeedConfigError: "),
        "clipping": ({"gradient_clipping": "abc"}, "gradient_clipping must be a finite number >= 0, got 'abc'"),
    }
    for name, (settings, message) in refusals.items():
        path.write_text(json.dumps(settings))
        (problem,) = problems_of(f"trainer.deepspeed_config={path}")
        assert problem.startswith(f"trainer.deepspeed_config: {path}: ") and message in problem, name
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))
    load_config("smoke", [f"trainer.deepspeed_config={path}"])


def test_a_deepspeed_json_that_deepspeed_reads_otherwise_than_the_trainer_is_refused(tmp_path):
    """DeepSpeed takes `true` for the ZeRO section, "3" for a stage and "false" for a flag, which the trainer
    read as they are: it crashed, built a stage-3 model unpartitioned, or believed it trained in bf16. Offloading
    the optimizer passed until DeepSpeed refused the trainer's AdamW in every rank."""
    path = tmp_path / "ds.json"
    refusals = {
        "section": ({"zero_optimization": True}, "zero_optimization must be a mapping, e.g. {\"stage\": 2}, got True"),
        "not a mapping": ({"zero_optimization": "x"}, "zero_optimization must be a mapping"),
        "text": ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage must be the number 0, 1, 2 or 3, "
                                                         "got '3'"),
        "stage": ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage must be the number 0, 1, 2 or 3"),
        "flag": ({"bf16": {"enabled": "false"}}, "bf16.enabled must be true or false, got 'false'"),
        "offload": ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                    "zero_optimization.offload_optimizer: DeepSpeed offloads the optimizer it prefers"),
    }
    for name, (settings, message) in refusals.items():
        path.write_text(json.dumps(settings))
        (problem,) = problems_of("trainer.precision=bf16", f"trainer.deepspeed_config={path}")
        assert problem.startswith(f"trainer.deepspeed_config: {path}: ") and message in problem, name
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                "zero_force_ds_cpu_optimizer": False}))
    load_config("smoke", [f"trainer.deepspeed_config={path}"])
    path.write_text(json.dumps({"bf16": {"enabled": "auto"}}))  # a Hugging Face JSON: said once, as a placeholder
    assert problems_of(f"trainer.deepspeed_config={path}") == [
        f"trainer.deepspeed_config: {path}: bf16.enabled: 'auto' is a Hugging Face Trainer placeholder, which "
        "DeepSpeed cannot read; give a value or remove the key"]


def test_the_deepspeed_json_is_checked_beside_the_configs_other_problems(tmp_path):
    """One round of fixes: another key's problem hid every problem of the JSON."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 2, "bogus": 1}}))
    assert problems_of("optim.lr=-1", f"trainer.deepspeed_config={path}") == [
        "optim.lr: must be a finite number > 0, got -1.0",
        f"trainer.deepspeed_config: {path}: train_batch_size is 999, but trainer.global_batch_size makes it 16; "
        "remove it from the file"]
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "bogus": 1}}))
    problems = problems_of("optim.lr=-1", f"trainer.deepspeed_config={path}")
    assert problems[0] == "optim.lr: must be a finite number > 0, got -1.0"
    assert "bogus: Extra inputs are not permitted" in problems[1]
    # A batch size the config gets wrong leaves the JSON's batch keys unjudged: the config's own is at fault.
    path.write_text(json.dumps({"train_batch_size": 999}))
    assert problems_of("trainer.global_batch_size=17", f"trainer.deepspeed_config={path}") == [
        "trainer.global_batch_size: 17 is not a multiple of data.micro_batch_size (8) x world size (2 = 1 nodes x "
        "2); try 16"]


def test_values_read_as_yaml_1_2_and_str_fields_keep_the_text_as_typed(tmp_path):
    cfg = load_config("smoke", ["optim.lr=1e-4", "run.name=0312", "run.seed=0012", "data.dir=2024-01-01",
                                "run.output_dir=on", "data.train_shards=data/shard-{000000..000127}.tar"])
    assert cfg.optim.lr == 1e-4 and cfg.run.seed == 12
    assert (cfg.run.name, cfg.data.dir, cfg.run.output_dir) == ("0312", "2024-01-01", "on")
    assert cfg.data.train_shards == ["data/shard-{000000..000127}.tar"]
    cfg = load_config("smoke", ["data.prepare.inputs=2024", "optim.betas=[0.9, 0.95]"])
    assert cfg.data.prepare.inputs == ["2024"] and cfg.optim.betas == [0.9, 0.95]
    # Quotes force text and are not kept; a mapping overrides a section (merged with dotted overrides of it);
    # hex and octal are integers; an empty list override empties the list; null is no list; other text is
    # taken as typed, '#' and ': ' included.
    cfg = load_config("smoke", ["run.name='my run'", "data.masking.rate=0.2",
                                "data.masking={schedule: linear, final_rate: 0.1}", "run.seed=0x10",
                                "trainer.eval_every=0o10", "data.train_shards="])
    assert (cfg.run.name, cfg.data.masking.rate, cfg.data.masking.schedule, cfg.data.masking.final_rate) == (
        "my run", 0.2, "linear", 0.1)
    assert (cfg.run.seed, cfg.trainer.eval_every, cfg.data.train_shards) == (16, 8, [])
    assert problems_of("data.train_shards=null") == ["data.train_shards: expected a list of str, got NoneType None"]
    pipe = "pipe:curl -H 'Authorization: Bearer t' https://h/s-{000..003}.tar # public"
    cfg = load_config("smoke", ["run.name=ablation #3", "run.output_dir=exp: lr sweep", f"data.train_shards={pipe}"])
    assert (cfg.run.name, cfg.run.output_dir, cfg.data.train_shards) == ("ablation #3", "exp: lr sweep", [pipe])
    path = tmp_path / "run.yaml"
    path.write_text("base: smoke\noptim:\n  lr: 3e-4\n  weight_decay: 1E-2\ntrainer:\n  progress_bar: no\n"
                    "run:\n  name: 0312\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert sorted(err.value.problems) == ["run.name: expected str, got int 312; quote it to keep it as written",
                                          "trainer.progress_bar: expected bool, got str 'no'"]
    path.write_text("base: smoke\noptim:\n  lr: 3e-4\n  weight_decay: 1E-2\nrun:\n  name: '0312'\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.run.name) == (3e-4, 1e-2, "0312")
