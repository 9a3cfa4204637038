"""Run configs and DeepSpeed presets shipped with masktrain, found by name from any working directory."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def find(name: str) -> Path | None:
    """The shipped config called `name` (with or without .yaml), or None. Only a bare name: a path that does
    not exist ("exp/smoke.yaml") is an error, never quietly a shipped config of the same file name."""
    if Path(name).name != name:
        return None
    path = HERE / f"{name.removesuffix('.yaml')}.yaml"
    return path if path.is_file() else None


def deepspeed_preset(stage: int) -> Path:
    return HERE / "deepspeed" / f"zero{stage}.json"
