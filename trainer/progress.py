"""Rank 0's console output (a progress bar on a terminal, plain lines in batch logs) and the devices' peak
FLOP/s for the MFU estimate."""

from __future__ import annotations

import sys

import torch

from masktrain.launcher.config import Config

# Dense peak TFLOP/s per device (vendor datasheets, no sparsity) as (bf16 tensor cores, fp32): fp32 training
# runs its matmuls on the fp32 units, since torch leaves TF32 off for them by default. V100 has no bf16
# units (0: no estimate). Matched in GPU names longest first, so that "L4" does not take the L40S, nor "H100"
# the H100 PCIe.
PEAK_TFLOPS = {"H100 PCIe": (756.0, 51.2), "H100 NVL": (835.0, 60.0), "H100": (989.0, 66.9),
               "H200 NVL": (835.0, 60.0), "H200": (989.0, 66.9), "A100": (312.0, 19.5), "A10G": (125.0, 31.2),
               "L40S": (362.0, 91.6), "L40": (181.0, 90.5), "L4": (121.0, 30.3), "V100": (0.0, 15.7)}


def peak_tflops(device_name: str, precision: str) -> float:
    """The table's peak for a GPU name at the training precision (bf16 or fp32); 0 when not in the table."""
    key = next((key for key in sorted(PEAK_TFLOPS, key=len, reverse=True) if key in device_name), None)
    return PEAK_TFLOPS[key][precision == "fp32"] if key else 0.0


def peak_flops(cfg: Config, runtime, precision: str) -> float:
    """Per-device peak FLOP/s, from the config or the GPU's name and the precision the run trains in; 0 (no
    MFU) when unknown, as on CPU."""
    if cfg.trainer.peak_tflops:
        return cfg.trainer.peak_tflops * 1e12
    if runtime.device.type == "cuda":
        return peak_tflops(torch.cuda.get_device_name(runtime.device), precision) * 1e12
    return 0.0


class Progress:
    def __init__(self, enabled: bool, bar: bool, start: int, total: int):
        self.enabled = enabled
        self.bar = None
        if enabled and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, values: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['train/lr']:.2e}")
            return
        rate = f" mask_rate {values['train/mask_rate']:.3f}" if "train/mask_rate" in values else ""
        print(f"[masktrain] step {step} loss {loss:.4f} lr {values['train/lr']:.3e}{rate} "
              f"tokens/s {values['train/tokens_per_s']:.0f}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"[masktrain] {text}")
        else:
            print(f"[masktrain] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
