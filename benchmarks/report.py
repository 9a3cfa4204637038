"""The README's results section, generated from the result files' `summary` lists.

Benchmark results (`<name>.json`, from `make bench`) and experiment reports (`repro-<name>.json`, from
`masktrain repro`) follow the same convention (see benchmarks/common.py). The section sits between two markers
in the README and is replaced whole; a README without them gets it appended under a "Results" heading.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

START = "<!-- results:start -->"
END = "<!-- results:end -->"
GENERATED = "<!-- generated from benchmarks/results/*.json by benchmarks/report.py: edit that, not this -->"
TARGET = re.compile(r"^(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
COMPARISON_START = ("<", ">", "=", "!", "\u2264", "\u2265")
KEYS = {"metric": str, "value": (int, float), "target": str, "unit": str}


@dataclass
class Result:
    name: str
    data: dict
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def experiment(self) -> bool:
        return "experiment" in self.data


def entry_problems(entry, where: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: expected a mapping with {', '.join(KEYS)}, got {entry!r}"]
    problems = [f"{where}: missing key {key!r}" for key in KEYS if key not in entry]
    problems += [f"{where}: unknown key {key!r} (valid: {', '.join(KEYS)})" for key in entry if key not in KEYS]
    for key, kind in KEYS.items():
        value = entry.get(key)
        if key in entry and (not isinstance(value, kind) or isinstance(value, bool)):
            problems.append(f"{where}.{key}: expected {'a number' if key == 'value' else 'a string'}, got {value!r}")
    if isinstance(entry.get("value"), (int, float)) and not math.isfinite(entry["value"]):
        problems.append(f"{where}.value: must be finite, got {entry['value']!r}")
    target = entry.get("target")
    # Free text is a remark; text that starts like a comparison but does not parse is a typo, not a remark.
    if isinstance(target, str) and target.strip()[:1] in COMPARISON_START and not TARGET.match(target.strip()):
        problems.append(f"{where}.target: {target!r} is not a comparison like '>= 2' (ops: <, <=, >, >=)")
    return problems


def read_result(path: Path) -> Result:
    """A result file with its summary checked; problems name the file and the entry."""
    result = Result(path.stem, {})
    try:
        result.data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        result.problems.append(f"{path}: unreadable: {err}")
        return result
    if not isinstance(result.data, dict):
        result.problems.append(f"{path}: expected a JSON object, got {type(result.data).__name__}")
        result.data = {}
        return result
    if "error" in result.data:
        return result
    summary = result.data.get("summary")
    if not isinstance(summary, list) or not summary:
        result.problems.append(f"{path}: no 'summary' list of {{metric, value, target, unit}} entries "
                               "(see benchmarks/common.py)")
        return result
    for index, entry in enumerate(summary):
        problems = entry_problems(entry, f"{path}: summary[{index}]")
        result.problems += problems
        if not problems:
            result.rows.append(entry)
    return result


def read_results(folder: Path) -> list[Result]:
    return [read_result(path) for path in sorted(folder.glob("*.json"))]


def met(value: float, target: str) -> str:
    match = TARGET.match(target.strip())
    if not match:
        return ""
    op, bound = match.group(1), float(match.group(2))
    ok = {"<": value < bound, "<=": value <= bound, ">": value > bound, ">=": value >= bound}[op]
    return "yes" if ok else "**no**"


def number(value: float, significant: int = 3) -> str:
    """`significant` digits, thousands separated: 0.0123, 1.23, 12.3, 1,235, 181,000."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    digits = max(0, significant - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def shown(value: float, unit: str, target: str) -> str:
    """The value as the table shows it: three significant digits, more where rounding would put it on the other
    side of its target (0.7003 against <= 0.7 shows as 0.7003x, not as a 0.700x that is marked not met)."""
    significant = 3
    while (met(float(number(value, significant).replace(",", "")), target) != met(value, target)
           and significant < 17):
        significant += 1
    text = number(value, significant)
    return f"{text}x" if unit == "x" else f"{text} {unit}".rstrip()


def describe(machine: dict) -> str:
    # Every benchmark and experiment here runs on CPU (one thread for the model timings): a GPU in the machine
    # is named, but as unused, so the figures are not read as its.
    device = f"{machine['cuda']} present but unused" if machine.get("cuda") else "no GPU"
    return (f"{machine.get('cores', '?')} cores {machine.get('cpu', '?')}, {device}, "
            f"torch {machine.get('torch', '?')}, "
            f"deepspeed {machine.get('deepspeed', '?')}, transformers {machine.get('transformers', '?')}")


def table(results: list[Result], first_column: str) -> list[str]:
    lines = [f"| {first_column} | metric | value | target | met |", "|---|---|---:|---|---|"]
    for result in results:
        if "error" in result.data:
            lines.append(f"| {result.name} | **failed**: {result.data['error']} | | | |")
        elif not result.rows:
            lines.append(f"| {result.name} | **no valid summary** (see `make bench` output) | | | |")
        for row in result.rows:
            target = row["target"].strip()
            lines.append(f"| {result.name} | {row['metric']} | {shown(row['value'], row['unit'], target)} | "
                         f"{target} | {met(row['value'], target)} |")
    return lines


def commits(results: list[Result]) -> str:
    """", code at <commit>" (several when the files came from different runs; "+ changes" when the tree
    differed from the commit): a figure older than the code it describes shows as such."""
    seen = []
    for result in results:
        code = result.data.get("code")
        label = f"{code['commit'][:10]}{' + changes' if code.get('dirty') else ''}" if code else "unknown"
        if label not in seen:
            seen.append(label)
    return f", code at {', '.join(seen)}" if seen else ""


def provenance(results: list[Result]) -> list[str]:
    """When and where the figures were measured: one line per distinct machine."""
    machines: dict[str, list[Result]] = {}
    for result in results:
        machines.setdefault(describe(result.data.get("machine", {})), []).append(result)
    lines = []
    for text, group in machines.items():
        dates = sorted(r.data.get("date", "?")[:10] for r in group)
        when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        quick = [r.name for r in group if r.data.get("quick") or r.data.get("run", {}).get("quick")]
        note = f" Quick mode (not comparable): {', '.join(quick)}." if quick else ""
        names = f" ({', '.join(r.name for r in group)})" if len(machines) > 1 else ""
        lines.append(f"Measured {when} on {text}{names}{commits(group)}.{note}")
    return lines


def section(results: list[Result], folder: Path, readme_dir: Path) -> str:
    """The markdown between the markers."""
    link = Path(os.path.relpath(folder, readme_dir)).as_posix()
    benchmarks = [r for r in results if not r.experiment]
    experiments = [r for r in results if r.experiment]
    lines = [START, GENERATED, ""]
    if not results:
        lines += [f"No results yet in `{link}/`: run `make bench`.", ""]
    if benchmarks:
        lines += ["### Benchmarks", "",
                  "`make bench` runs every `benchmarks/bench_*.py`; ratios compare the two sides measured in the same "
                  f"process, one after the other. Raw figures: `{link}/<name>.json`.", ""]
        lines += provenance(benchmarks) + [""] + table(benchmarks, "benchmark") + [""]
    if experiments:
        lines += ["### Reproductions", "",
                  "`masktrain repro meap`, `schedule` and `mae-decoder`: toy-scale experiments trained through the "
                  "real 2-rank DeepSpeed path. Targets state the papers' claims; rows without one are measurements "
                  "for context.", ""]
        lines += provenance(experiments) + [""] + table(experiments, "experiment") + [""]
        for result in experiments:
            plot = result.data.get("plot")
            if plot:
                lines += [f"![{result.name}]({link}/{plot})", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, text: str) -> None:
    current = readme.read_text() if readme.is_file() else ""
    if START in current and END in current:
        before = current[:current.index(START)]
        after = current[current.index(END) + len(END):].removeprefix("\n")
        updated = before + text + after
    else:
        updated = current.rstrip("\n") + ("\n\n" if current else "") + "## Results\n\n" + text
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(updated)
    tmp.replace(readme)
