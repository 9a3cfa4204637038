"""The typed run configuration: one dataclass per YAML section.

Every field has a default so that a YAML file only states what differs. Types are enforced and values are
checked by `masktrain.launcher.validate`; loading and overrides live in `masktrain.launcher.loading`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: used in log lines and as the default output folder `runs/<name>`."""
    output_dir: str = ""
    """Run folder (checkpoints/, tb/, metrics.jsonl, export/). Empty means `runs/<name>`."""
    seed: int = 1234
    """Seeds model init, data order, masking and dropout. Part of what makes a resume exact."""


@dataclass
class PrepareConfig:
    """How `masktrain data prepare` turns raw text into the tokenizer and shards this run reads."""

    inputs: list[str] = field(default_factory=lambda: ["builtin:python-docs"])
    """Text sources: files (.txt, .gz, .jsonl, .jsonl.gz), directories, globs, or `builtin:python-docs`
    (the documentation that ships with Python itself)."""
    text_field: str = "text"
    """Field holding the text in JSON-lines inputs."""
    vocab_size: int = 8000
    """Sentencepiece vocabulary size, special tokens included: at most, since a corpus with fewer distinct pieces
    gets a smaller one (the tokenizer log says how many)."""
    tokenizer_type: str = "unigram"
    """Sentencepiece model type: unigram or bpe."""
    tokenizer_sample_docs: int = 200_000
    """The tokenizer trains on a uniform sample of this many documents, drawn (seeded by run.seed) from all of
    the inputs: prepare reads the whole corpus once for it."""
    tokenizer_sample_chars: int = 200_000_000
    """... holding at most this many characters (fewer documents when they are long): sentencepiece needs about
    20 bytes of memory per character it trains on, ~4 GB here."""
    shard_bytes: int = 64 * 2**20
    """Target size of one shard in bytes (the last shard of each split is smaller)."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (chosen by a hash of the document, not its order)."""
    workers: int = 0
    """Threads that encode documents into shards; 0: one per available core. The shards are the same whatever
    the count (tokenizer training always uses a fixed count, so it also gives the same tokenizer everywhere)."""
    shuffle_buffer: int = 100_000
    """Documents held back and written in a random order seeded by run.seed, so each shard mixes the input's
    files and sources (the loader shuffles within a shard only); 0 keeps input order."""
    max_docs: int = 0
    """Stop after this many input documents (0: all). Keeps smoke runs small. A .gz is then read only as far as
    needed, not checked whole first: a fault in it keeps the documents before it (the skip count says how many)."""


@dataclass
class MaskingConfig:
    """Which tokens an objective corrupts and how many, as a pure function of the global step."""

    policy: str = "random"
    """Selection policy: random, whole_word, span, importance or pmi (see `masktrain.data.masking.POLICIES`), or
    your own as `module:function` (see `masktrain.data.batches.policy_function`)."""
    rate: float = 0.15
    """Fraction of maskable tokens selected (the schedule's start value)."""
    schedule: str = "constant"
    """Rate schedule: constant, linear, cosine or step (see `masktrain.data.schedules.SCHEDULES`). Rate,
    final_rate and schedule form one unit: setting any of them drops all three of the objective's defaults, and
    a moving schedule or a final_rate needs the rate set too."""
    final_rate: float | None = None
    """Schedule end value, which linear, cosine and step need; the constant schedule takes none (or `rate`)."""
    schedule_steps: int = 0
    """Steps over which the schedule moves from `rate` to `final_rate`, after `warmup_steps`; 0 means until
    trainer.max_steps (max_steps - warmup_steps)."""
    warmup_steps: int = 0
    """Steps before the schedule starts moving (the rate holds at `rate` until then)."""
    step_count: int = 4
    """Number of equal plateaus for the step schedule (at least 2: the first holds `rate`, the last
    `final_rate`)."""
    mask_prob: float = 0.8
    """Of the selected tokens, the fraction replaced by [MASK]."""
    random_prob: float = 0.1
    """Of the selected tokens, the fraction replaced by a random token (the rest are kept as they are)."""
    exact: bool = True
    """Select round(rate * maskable) tokens per row (as BERT counts): exactly (random, importance, span) or to
    within one unit and exactly on average (whole_word: a word, pmi: a word or collocation). False draws
    independently instead: each token (random, importance) or unit (whole_word, pmi) with probability rate, or
    whole spans only, the last one kept or dropped so the count is right on average (span). Short rows: see
    `masking.target_counts`."""
    span_mean: float = 3.8
    """Span policy: mean span length in tokens (a geometric distribution cut at span_max and solved for this
    mean; SpanBERT's p = 0.2 cut at 10 has mean 3.8)."""
    span_max: int = 10
    """Span policy: longest span."""
    share_across_batch: bool = False
    """Use one mask pattern for every row of a batch (parity with the MEAP authors' code; random policy only)."""
    importance_table: str = ""
    """Importance policy: path of the table built by `masktrain data importance` (default <data.dir>/idf.npy)."""
    importance_power: float = 1.0
    """Importance policy: selection weight is importance ** power (0 gives uniform selection)."""
    collocation_table: str = ""
    """Pmi policy: path of the table built by `masktrain data collocations` (default
    <data.dir>/collocations.npy)."""
    collocation_min_count: int = 20
    """`masktrain data collocations`: keep only word pairs seen at least this often (PMI overrates rare pairs)."""
    collocation_pairs: int = 100_000
    """`masktrain data collocations`: keep at most this many pairs, those of highest PMI."""
    eval_rate: float | None = None
    """Rate used by evaluation; None uses the schedule's final value, so evaluations stay comparable."""
    eval_policy: str = ""
    """Policy used by evaluation; empty uses `policy`. Runs that train with different policies compare their
    validation losses only when they evaluate with the same one (e.g. random)."""


@dataclass
class MixtureSource:
    dir: str = ""
    """A prepared dataset folder (its manifest's train split), written with the run's tokenizer."""
    shards: list[str] = field(default_factory=list)
    """Instead of `dir`: shard URLs, as data.train_shards takes them (paths, brace patterns, `pipe:` commands,
    e.g. from object storage). No manifest comes with them, so nothing checks their sizes (nor their tokenizer,
    unless they are paths inside a prepared folder), and the log cannot say how often the run reads them over."""
    val_shards: list[str] = field(default_factory=list)
    """With `shards`: this source's validation shard URLs, validated on as val/<name>; empty: none."""
    name: str = ""
    """What the log and validation metrics (val/<name>) call the source; empty: the folder's name, or
    source<i> (its place in the mixture) for `shards`."""
    weight: float = 1.0
    """Its share of the training rows, relative to the other sources' weights."""


@dataclass
class DataConfig:
    dir: str = "runs/data/smoke"
    """Prepared dataset folder (tokenizer/, train/, val/, manifest.json); the default for the fields below."""
    tokenizer: str = ""
    """Tokenizer folder (sentencepiece model plus Hugging Face files) to use as it is, made by `masktrain data
    tokenizer` or another prepare. Empty means `<dir>/tokenizer`, which prepare trains when it is missing."""
    train_shards: list[str] = field(default_factory=list)
    """Shard URLs: paths, brace patterns (shard-{000000..000127}.tar) or `pipe:` commands. Empty: manifest."""
    val_shards: list[str] = field(default_factory=list)
    """Validation shard URLs; empty: from the manifest in `dir`, or no validation when train_shards is set."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Train on several datasets at once, each row from one of them in proportion to the weights (e.g.
    [{dir: runs/data/wiki, weight: 3}, {dir: runs/data/books, weight: 1}]), each a prepared folder or a list of
    shard URLs; a source read through runs another epoch while the others go on. `dir` still gives the
    tokenizer and the validation split (val/); each other source's own split is validated on too (val/<name>/).
    Empty: the train split of `dir` (or train_shards). Changed in a resumed run (trainer.allow_config_change),
    sources kept go on from their positions, new or changed ones start at their beginning, and the new weights
    hold from there."""
    seq_len: int = 128
    """Tokens per packed sequence."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    num_workers: int = 1
    """Loader worker processes per rank (0 loads in the training process)."""
    shuffle_block: int = 1000
    """Documents shuffled together. A block is permuted whole, which keeps resume exact and cheap."""
    mask_in_workers: bool = True
    """Mask in loader workers (true) or in the training process; both give the same masks."""
    strict: bool = False
    """Fail on the first corrupt shard, bad sample or empty document instead of skipping and counting it."""
    document_attention: bool = False
    """Each token attends only to the tokens of its own document, and positions restart at each document's start
    token, so a packed row trains as the separate documents it holds (as the MAE-LM reference's document-bounded
    samples, and intra-document causal masking for decoders). Off: a row is one sequence, as BERT and GPT pack
    them. A mask per row costs memory (batch x seq_len^2) and keeps GPUs off their fastest attention kernel."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)


@dataclass
class ModelConfig:
    objective: str = "mlm"
    """Training objective: mlm, mae_lm, ntp or meap (see `masktrain.trainer.objectives.OBJECTIVES`)."""
    arch: str = "bert"
    """Transformers architecture: bert or roberta for encoders, llama for decoders (the decoders' default)."""
    hidden_size: int = 128
    """Width of the model (of MAE-LM's encoder)."""
    num_layers: int = 2
    """Transformer layers (of MAE-LM's encoder)."""
    num_heads: int = 2
    """Attention heads; hidden_size must be a multiple of it."""
    num_kv_heads: int = 0
    """Decoders: key/value heads for grouped-query attention; 0 means num_heads."""
    intermediate_size: int = 512
    """Feed-forward size of each layer."""
    max_position_embeddings: int = 0
    """0 means data.seq_len."""
    dropout: float = 0.1
    """Encoders: hidden and attention dropout (transformers' BERT/RoBERTa); decoders: attention dropout."""
    decoder_layers: int = 4
    """MAE-LM: depth of the shallow bidirectional decoder (the reference's run_pretrain.sh uses 4 under a
    12-layer encoder). Only MAE-LM has a decoder; other objectives ignore it."""
    decoder_hidden_size: int = 0
    """MAE-LM: width of the decoder; 0 means hidden_size, as the reference trains. A narrower decoder (the
    reference's --decoder-embed-dim; vision MAE's decoders are half width) is linked to the encoder by a
    projection each way and makes the decoder's share of a step about width^2 smaller."""
    decoder_intermediate_size: int = 0
    """MAE-LM: the decoder's feed-forward size; 0 keeps the encoder's ratio to the width."""
    decoder_num_heads: int = 0
    """MAE-LM: the decoder's attention heads; 0 keeps the encoder's head size."""
    tie_embeddings: bool = True
    """Tie the output projection to the input embedding."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization of every embedding and linear weight (transformers')."""
    residual_init_std: float = 0.0
    """Of the layers that write into the residual stream (attention output and feed-forward output projections),
    as GPT-NeoX's init scales them down with depth (TinyLlama and MEAP: 1 / sqrt(hidden_size) / num_layers);
    0 means init_std."""
    norm_eps: float = 0.0
    """Epsilon of the model's LayerNorm or RMSNorm; 0 means the architecture's transformers default (BERT and
    RoBERTa 1e-12, Llama 1e-6)."""

    def decoder_shape(self) -> tuple[int, int, int]:
        """MAE-LM's decoder (width, feed-forward size, heads), the 0s resolved."""
        width = self.decoder_hidden_size or self.hidden_size
        feed_forward = self.decoder_intermediate_size or self.intermediate_size * width // self.hidden_size
        heads = self.decoder_num_heads or width // (self.hidden_size // self.num_heads)
        return width, feed_forward, heads


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: str = "cosine"
    """LR schedule after warmup: constant, linear, cosine, damped_cosine, wsd (see trainer.lr.LR_SCHEDULES)."""
    warmup_steps: int = 10
    """Steps of linear warmup to lr: step k (from 1) runs at lr * k / warmup_steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    cycles: int = 4
    """damped_cosine: number of cosine cycles after warmup."""
    damping: float = 0.5
    """damped_cosine: each cycle's peak is the previous one's times this."""
    decay_fraction: float = 0.2
    """wsd (warmup-stable-decay): the last fraction of the steps after warmup, over which the LR falls from the
    peak to min_lr; before it the LR stays at the peak."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay, on matrices and embeddings only (not biases or norm weights)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW's (beta1, beta2)."""
    eps: float = 1e-6
    """AdamW's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass
class TrainerConfig:
    max_steps: int = 50
    """Optimizer steps in the whole run (a resumed run continues to the same total)."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks: micro_batch_size * grad accumulation * world size."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (presets in configs/deepspeed/)."""
    deepspeed_config: str = ""
    """A DeepSpeed JSON whose keys override the generated configuration."""
    precision: str = "auto"
    """auto (bf16 on a GPU that supports it, fp32 on CPU), fp32 or bf16."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (transformers' gradient checkpointing): less
    memory for about a third more compute."""
    checkpoint_every: int = 20
    """Save every N steps (0: only at the end and on a signal)."""
    checkpoint_minutes: float = 0.0
    """Also save once this many minutes have passed since the launch's last save (or its start), whatever the
    step (0: off). Bounds the work that a node lost without a signal costs, in time rather than steps, which
    change speed with the node count, the model or the data."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    keep_every: int = 0
    """Also save at every multiple of this many steps, and never prune those saves (0: none): the model as it
    trained, to export, probe or evaluate later."""
    eval_every: int = 0
    """Evaluate every N steps on the validation shards (0: only at the end)."""
    eval_batches: int = 0
    """Validation batches per evaluation, shared by all ranks (0: the whole validation split): the same
    batches, with the same masks, at any world size."""
    log_every: int = 1
    """Log every N steps (and each launch's first step, skipped steps, each checkpoint's step, the last one). Loss,
    tokens/s, data wait and MFU cover all the steps since the previous log: loss per target over the steps with
    a finite loss, speed over the time in training steps (evaluation and checkpoints left out). lr, grad norm
    and counts are the logged step's."""
    max_bad_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss (each one is skipped and counted)."""
    resume: str = "auto"
    """auto (resume from the run folder's latest checkpoint if there is one), never (start from scratch, in a
    run folder without checkpoints), or a checkpoint path."""
    stop_after_steps: int = 0
    """Checkpoint and leave (with the requeue exit code) after this many steps of one launch; 0 runs on.
    For fixed-size pieces of a long run, and for trying resumption."""
    allow_config_change: bool = False
    """Resume even when the checkpoint's config differs in keys that change the run's meaning. Another rank count
    (at ZeRO 1-3 through DeepSpeed's universal checkpoint format) or data.num_workers continues the data position;
    after a change of data.shuffle_block, run.seed or to other shards, the data stream starts again from its
    beginning."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: profile these steps (1-based, inclusive, at most 10: a window is held in memory) with
    torch.profiler on every rank; Chrome traces go to <run>/profile/, the slowest operators to the log. Empty: no
    profiling."""
    peak_tflops: float = 0.0
    """Per-device peak TFLOP/s for the MFU estimate; 0 looks the device up (CPU: no estimate)."""
    progress_bar: bool = True
    """A tqdm bar on rank 0 when its stderr is a terminal; otherwise, or off, a line per logged step."""


@dataclass
class LaunchConfig:
    nproc_per_node: int = 2
    """Ranks per node (GPUs per node, or CPU processes)."""
    nnodes: int = 1
    """Nodes (set by `masktrain slurm` from --nodes)."""
    accelerator: str = "auto"
    """auto, cpu or cuda. cpu uses gloo and DS_ACCELERATOR=cpu."""
    master_port: int = 0
    """Rendezvous port for local launches; 0 picks a free one. A port in use is refused."""
    shutdown_timeout: int = 300
    """Seconds torchrun waits for ranks to checkpoint after a signal before killing them."""
    collective_timeout: int = 600
    """Seconds a rank waits in a collective (a step, validation, a checkpoint save) for the others before it fails
    and the run ends as crashed (a SLURM job that saved a checkpoint since it started is then requeued). 600 is
    DeepSpeed's default; raise it when a large model's save on a slow file system takes longer, lower it to
    notice a hung rank sooner. It applies to DeepSpeed's groups too, in place of DEEPSPEED_TIMEOUT."""
    threads_per_rank: int = 0
    """OMP/MKL threads per rank; 0 divides the cores evenly. OMP_NUM_THREADS or MKL_NUM_THREADS set in the
    environment (a job script's) take precedence, each for its library."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def world_size(self) -> int:
        return self.launch.nproc_per_node * self.launch.nnodes

    @property
    def grad_accum(self) -> int:
        return self.trainer.global_batch_size // (self.data.micro_batch_size * self.world_size)

    def deepspeed_batch(self) -> dict[str, int]:
        """The DeepSpeed batch keys this config sets, which DeepSpeed asserts in every rank."""
        return {"train_batch_size": self.trainer.global_batch_size,
                "train_micro_batch_size_per_gpu": self.data.micro_batch_size,
                "gradient_accumulation_steps": self.grad_accum}

    @property
    def output_dir(self) -> str:
        return self.run.output_dir or f"runs/{self.run.name}"


# Paper defaults per objective, applied beneath the user's YAML so an explicit value always wins.
# MLM: BERT's 80/10/10 with the masking-rate schedule MosaicML found best for BERT pre-training (Ankner et al.,
# 2305.15096: linear 30% -> 15%). MEAP (scitix/MEAP) replaces inputs with [MASK] only at 15%; MAE-LM
# (yumeng5/MAE-LM) uses pure <mask> at 15%.
OBJECTIVE_DEFAULTS: dict[str, dict] = {
    "mlm": {"data": {"masking": {"rate": 0.3, "final_rate": 0.15, "schedule": "linear", "mask_prob": 0.8,
                                 "random_prob": 0.1}}},
    "mae_lm": {"data": {"masking": {"rate": 0.15, "mask_prob": 1.0, "random_prob": 0.0}}},
    "meap": {"model": {"arch": "llama"}, "data": {"masking": {"rate": 0.15, "mask_prob": 1.0, "random_prob": 0.0}}},
    "ntp": {"model": {"arch": "llama"}, "data": {"masking": {"rate": 0.0}}},
}

RATE_KEYS = ("rate", "final_rate", "schedule")


def raw_masking(raw: dict) -> dict:
    """The data.masking section of a config tree (YAML, overrides or OBJECTIVE_DEFAULTS), {} when it has none."""
    data = raw.get("data")
    masking = data.get("masking") if isinstance(data, dict) else None
    return masking if isinstance(masking, dict) else {}


def objective_defaults(objective: str, raw: dict) -> dict:
    """The defaults of `objective` to lay beneath `raw` (the YAML with overrides). A rate schedule is taken
    whole: when `raw` sets any of rate, final_rate or schedule, none of the objective's three apply, so
    `rate: 0.2` alone means a constant 0.2, not a schedule from 0.2 to the paper's end value."""
    defaults = copy.deepcopy(OBJECTIVE_DEFAULTS.get(objective, {}))
    if any(key in raw_masking(raw) for key in RATE_KEYS):
        for key in RATE_KEYS:
            raw_masking(defaults).pop(key, None)
    return defaults


def unset_start_rate(objective: str, raw: dict) -> str | None:
    """Why `raw` must set data.masking.rate: it sets a moving schedule or a final_rate, which replace the
    objective's rate schedule whole, so the start would silently be the class default (bert-base's
    `schedule: linear, final_rate: 0.15` ran flat at 0.15, not from mlm's 0.3)."""
    masking = raw_masking(raw)
    if "rate" in masking or ("final_rate" not in masking and masking.get("schedule") in (None, "constant")):
        return None
    default = raw_masking(OBJECTIVE_DEFAULTS.get(objective, {})).get("rate")
    theirs = f" (the {objective} default starts at {default})" if default else ""
    return (f"data.masking.rate: unset, while data.masking.final_rate or schedule is set; the three replace the "
            f"objective's rate schedule together{theirs}, so set the rate to start from")
