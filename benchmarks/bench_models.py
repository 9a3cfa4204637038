"""Training step time of the objectives' models, side by side in one process at the same hidden size and depth.

- MAE-LM vs MLM at 15% and 40% masking: MAE-LM's encoder reads only the visible tokens, its decoder (4 layers,
  as the reference) reads all of them; MLM's encoder reads all. Also 40% with 2- and 1-layer decoders, which
  shows where the decoder's cost lands.
- MEAP vs NTP: the same Llama model; MEAP only masks inputs.

A step is what the training loop does per micro-batch: the objective's batch function on packed rows
(masking included, although training does it in loader workers), forward, backward, AdamW step, on one thread
(the machine is shared). Steps of the variants alternate so drift hits all alike. Ratios use the median CPU
time of the process per step: on this machine other processes take the cores for seconds at a time, which
wall-clock time counts and CPU time does not (wall-clock medians are reported too). The untimed warm-up step of
each variant runs under torch's FLOP counter, so every time ratio comes with the FLOP ratio it should track.

The full run uses the bert-base preset's shape (12 layers, hidden 768, 12 heads, FFN 3072, 512 tokens, 32k
vocabulary) for every model; `--quick` a small one. Run: `.venv/bin/python -m benchmarks.bench_models`.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import write_result
from masktrain.data.batches import MaskSpec
from masktrain.data.masking import Vocab
from masktrain.launcher.config import OBJECTIVE_DEFAULTS, ModelConfig
from masktrain.trainer.models import TokenIds, build_model
from masktrain.trainer.objectives import OBJECTIVES

SPECIAL_IDS = 7  # masktrain's tokenizer puts its 7 special tokens first
FULL = dict(model=ModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
            vocab=32_000, seq_len=512, batch=1, repeats=5)
QUICK = dict(model=ModelConfig(hidden_size=128, num_layers=12, num_heads=2, intermediate_size=512),
             vocab=4_000, seq_len=128, batch=4, repeats=3)
# name: (objective, masking rate, decoder layers)
VARIANTS = {
    "mlm_15": ("mlm", 0.15, 0), "mae_lm_15": ("mae_lm", 0.15, 4),
    "mlm_40": ("mlm", 0.40, 0), "mae_lm_40": ("mae_lm", 0.40, 4),
    "mae_lm_40_decoder2": ("mae_lm", 0.40, 2), "mae_lm_40_decoder1": ("mae_lm", 0.40, 1),
    "ntp": ("ntp", 0.0, 0), "meap": ("meap", 0.15, 0),
}
# (variant, baseline, target, what the target says)
RATIOS = [
    ("mae_lm_15", "mlm_15", None, "MAE-LM / MLM step time at 15% masking"),
    ("mae_lm_40", "mlm_40", 0.70, "MAE-LM / MLM step time at 40% masking"),
    ("mae_lm_40_decoder2", "mlm_40", None, "MAE-LM (2-layer decoder) / MLM step time at 40% masking"),
    ("mae_lm_40_decoder1", "mlm_40", None, "MAE-LM (1-layer decoder) / MLM step time at 40% masking"),
    ("meap", "ntp", 1.02, "MEAP / NTP step time"),
]


def mask_spec(objective: str, vocab: int) -> MaskSpec:
    """The objective's default corruption (launcher/config.py OBJECTIVE_DEFAULTS) over a synthetic vocabulary."""
    masking = OBJECTIVE_DEFAULTS[objective]["data"]["masking"]
    special = torch.arange(vocab) < SPECIAL_IDS
    return MaskSpec(vocab=Vocab(size=vocab, pad_id=0, mask_id=6, special=special, word_start=~special),
                    mask_prob=masking.get("mask_prob", 0.8), random_prob=masking.get("random_prob", 0.1))


def train_step(name: str, shape: dict, rows: torch.Tensor) -> Callable[[], None]:
    objective, rate, decoder_layers = VARIANTS[name]
    arch = "llama" if objective in ("ntp", "meap") else "bert"
    cfg = replace(shape["model"], objective=objective, arch=arch, decoder_layers=decoder_layers or 1)
    torch.manual_seed(0)
    model = build_model(OBJECTIVES[objective], cfg, shape["seq_len"], TokenIds(shape["vocab"], 0, 2, 3, 6)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    spec, make_batch = mask_spec(objective, shape["vocab"]), OBJECTIVES[objective].batch
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        model(**make_batch(rows, spec, rate, gen))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    shape = QUICK if quick else FULL
    rows = torch.randint(SPECIAL_IDS, shape["vocab"], (shape["batch"], shape["seq_len"]),
                         generator=torch.Generator().manual_seed(0))
    steps = {name: train_step(name, shape, rows) for name in VARIANTS}
    flops = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    wall: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(shape["repeats"]):
        for name, step in steps.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            step()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    median = {name: statistics.median(values) for name, values in cpu.items()}
    median_wall = {name: statistics.median(values) for name, values in wall.items()}

    summary, ratios = [], {}
    for variant, baseline, target, metric in RATIOS:
        ratio = median[variant] / median[baseline]
        ratios[f"{variant}_vs_{baseline}"] = {"cpu_time": round(ratio, 3),
                                              "wall_time": round(median_wall[variant] / median_wall[baseline], 3),
                                              "flops": round(flops[variant] / flops[baseline], 3)}
        summary.append({"metric": metric, "value": round(ratio, 3), "unit": "x",
                        "target": f"<= {target}" if target else "(context)"})
    m = shape["model"]
    result = {
        "setup": {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
                  "intermediate_size": m.intermediate_size, "vocab_size": shape["vocab"],
                  "seq_len": shape["seq_len"], "micro_batch_size": shape["batch"], "repeats": shape["repeats"],
                  "torch_threads": torch.get_num_threads(), "quick": quick,
                  "step": "batch function + forward + backward + AdamW, fp32, dropout on",
                  "time": "median process CPU time per step"},
        "summary": summary,
        "ratios": ratios,
        "cpu_ms_per_step": {name: round(1000 * value, 1) for name, value in median.items()},
        "wall_ms_per_step": {name: round(1000 * value, 1) for name, value in median_wall.items()},
        "gflops_per_step": {name: round(value / 1e9, 2) for name, value in flops.items()},
        "cpu_ms_runs": {name: [round(1000 * v, 1) for v in values] for name, values in cpu.items()},
    }
    path = write_result("models", result)
    for row in summary:
        print(f"{row['metric']}: {row['value']}x (target {row['target']})")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
