"""The benchmark runner and the README results table: discovery, one process per benchmark, failures recorded
in place of results, the `summary` convention checked, the README section replaced between its markers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks import common, report
from masktrain.launcher.machine import code_version
from conftest import MASKTRAIN, run_cli

ROOT = Path(__file__).resolve().parent.parent

GOOD = '''
from benchmarks.common import write_result

def main(quick: bool = False) -> dict:
    result = {"quick_seen": quick, "summary": [
        {"metric": "fast / slow time", "value": 0.25, "target": "< 1", "unit": "x"},
        {"metric": "tokens/s", "value": 181234.5, "target": ">= 200000", "unit": "tokens/s"},
        {"metric": "peak memory", "value": 12.5, "target": "", "unit": "MiB"}]}
    write_result("good", result, quick)
    return result
'''
BROKEN = '''
def main(quick: bool = False) -> dict:
    raise RuntimeError("boom")
'''
SILENT = '''
def main(quick: bool = False) -> dict:
    return {}
'''
MALFORMED = '''
from benchmarks.common import write_result

def main(quick: bool = False) -> dict:
    return write_result("malformed", quick=quick, result={"summary": [
        {"metric": "ratio", "value": "fast", "target": "=> 2", "unit": "x"},
        {"metric": "ok", "value": 2.0, "target": "> 1", "unit": "x"},
        {"metric": "remark", "value": 3.0, "target": "(context)", "unit": "x"}]})
'''

SLOW = '''
import os
import time
from pathlib import Path

def main(quick: bool = False) -> dict:
    Path(os.environ["SLOW_STARTED"]).touch()
    time.sleep(120)
'''


@pytest.fixture
def fake_checkout(tmp_path) -> Path:
    """A benchmarks/ folder with one benchmark of each kind, sharing the real common.py."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    shutil.copy(ROOT / "benchmarks" / "common.py", folder / "common.py")
    for name, source in {"good": GOOD, "broken": BROKEN, "silent": SILENT, "malformed": MALFORMED}.items():
        (folder / f"bench_{name}.py").write_text(source)
    (folder / "helper.py").write_text("raise AssertionError('not a benchmark: never run')\n")
    return tmp_path


def test_runner_runs_each_benchmark_and_rebuilds_the_readme(fake_checkout):
    results, readme = fake_checkout / "results", fake_checkout / "README.md"
    readme.write_text("# Project\n\nIntro.\n\n## Results\n\n" + report.START + "\nold table\n" + report.END +
                      "\n\n## After\n\nKept.\n")
    run = run_cli("bench", "--quick", "--dir", str(fake_checkout / "benchmarks"), "--results", str(results),
                  "--readme", str(readme), timeout=300)
    assert run.returncode == 1, run.stderr
    assert "bench: 4 benchmark(s)" in run.stdout and "helper" not in run.stdout

    good = json.loads((results / "good.json").read_text())
    assert good["quick_seen"] is True and good["quick"] is True and good["run"]["quick"] is True
    assert len(good["code"]["commit"]) == 40  # the masktrain checkout whose code was measured
    assert good["machine"]["cores"] >= 1 and good["machine"]["torch"]
    broken = json.loads((results / "broken.json").read_text())
    assert broken["error"].startswith("exited with code 1")
    assert "RuntimeError: boom" in Path(broken["run"]["log"]).read_text()
    assert "without writing silent.json" in json.loads((results / "silent.json").read_text())["error"]
    assert "malformed.json: summary[0].value: expected a number, got 'fast'" in run.stderr
    assert "summary[0].target: '=> 2' is not a comparison" in run.stderr

    text = readme.read_text()
    assert text.startswith("# Project\n\nIntro.\n\n## Results\n\n" + report.START)
    assert text.endswith(report.END + "\n\n## After\n\nKept.\n") and "old table" not in text
    assert "| good | fast / slow time | 0.250x | < 1 | yes |" in text
    assert "| good | tokens/s | 181,234 tokens/s | >= 200000 | **no** |" in text
    assert "| good | peak memory | 12.5 MiB |  |  |" in text
    assert "| broken | **failed**: exited with code 1 (log: broken.log) | | | |" in text
    assert "| malformed | ok | 2.00x | > 1 | yes |" in text
    assert "| malformed | remark | 3.00x | (context) |  |" in text
    assert "Quick mode (not comparable)" in text

    # The section is replaced, never appended twice; only the chosen benchmark runs.
    again = run_cli("bench", "good", "--quick", "--dir", str(fake_checkout / "benchmarks"), "--results",
                    str(results), "--readme", str(readme), timeout=300)
    assert "bench: 1 benchmark(s)" in again.stdout and "broken: FAILED" not in again.stdout
    assert readme.read_text().count(report.START) == 1


def test_a_runner_stopped_during_a_benchmark_keeps_the_published_result(fake_checkout):
    """The result file was removed when its benchmark started: a Ctrl-C during a half-hour benchmark lost the
    published figure, and the README table then dropped its rows."""
    (fake_checkout / "benchmarks" / "bench_slow.py").write_text(SLOW)
    results, started = fake_checkout / "results", fake_checkout / "started"
    results.mkdir()
    published = '{"benchmark": "slow", "summary": [{"metric": "m", "value": 1, "target": "", "unit": "x"}]}\n'
    (results / "slow.json").write_text(published)
    runner = subprocess.Popen([MASKTRAIN, "bench", "slow", "--quick", "--dir", str(fake_checkout / "benchmarks"),
                               "--results", str(results)], env={**os.environ, "SLOW_STARTED": str(started)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and runner.poll() is None:
        time.sleep(0.1)
    assert started.exists(), runner.communicate()
    os.killpg(runner.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    runner.communicate(timeout=60)
    assert runner.returncode != 0
    assert (results / "slow.json").read_text() == published
    assert sorted(path.name for path in results.iterdir()) == ["slow.json"]


def test_unknown_benchmark_name_lists_the_found_ones(fake_checkout):
    run = run_cli("bench", "nope", "--quick", "--dir", str(fake_checkout / "benchmarks"), timeout=120)
    assert run.returncode != 0 and "no benchmark 'nope'" in run.stderr and "found: broken, good" in run.stderr
    missing = fake_checkout / "nowhere"
    for args, message in ((["--quick", "--dir", str(missing)], f"--dir {missing}: no such folder"),
                          (["--table-only", "--results", str(missing)], f"--results {missing}: no such folder"),
                          (["--table-only", "--readme", str(missing)], f"--readme {missing}: no such file"),
                          (["--quick", "--timeout", "-1"], "--timeout: must be > 0 seconds, got -1")):
        run = run_cli("bench", *args, timeout=120)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
    assert not missing.exists()


def test_bench_started_beside_another_projects_benchmarks_runs_masktrains(tmp_path):
    """The working folder went first on the runner's path: another project's benchmarks/ package shadowed ours."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text("# Other\n")
    run = run_cli("bench", "--table-only", "--results", "results", "--readme", "README.md", cwd=tmp_path,
                  timeout=120)
    assert run.returncode == 0, run.stderr
    assert report.START in (tmp_path / "README.md").read_text()


def test_readme_without_markers_gets_a_results_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    summary = [{"metric": "m", "value": 3, "target": ">= 3", "unit": ""}]
    (results / "x.json").write_text(json.dumps({"benchmark": "x", "date": "2026-01-02", "summary": summary}))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.update_readme(readme, report.section(report.read_results(results), results, tmp_path))
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Results\n\n" + report.START) and "| x | m | 3.00 | >= 3 | yes |" in text


def test_shipped_benchmarks_run_at_test_size_and_report_their_figures(tmp_path):
    """Every benchmarks/bench_*.py runs under the runner in quick mode against the current package, so an
    interface it measures cannot change under it unnoticed, and writes a summary the table can show."""
    results = tmp_path / "results"
    run = run_cli("bench", "--quick", "--results", str(results), timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    names = sorted(path.stem.removeprefix("bench_") for path in (ROOT / "benchmarks").glob("bench_*.py"))
    found = report.read_results(results)
    assert sorted(result.name for result in found) == names
    for result in found:
        assert "error" not in result.data and not result.problems, (result.name, result.problems)
        assert result.data["summary"] and result.data["run"]["quick"] is True


def test_readme_table_is_the_one_the_published_results_make():
    """A result file changed without `masktrain bench --table-only`, or a README edited by hand, shows here."""
    results = ROOT / "benchmarks" / "results"
    text = (ROOT / "README.md").read_text()
    shown = text[text.index(report.START):text.index(report.END) + len(report.END)]
    assert shown == report.section(report.read_results(results), results, ROOT).strip()


def test_targets_compare_inclusively_and_to_the_last_digit():
    assert report.met(0.7, "<= 0.7") == "yes" and report.met(0.7004, "<= 0.7") == "**no**"
    assert report.met(4.996, ">= 5") == "**no**" and report.met(5, ">= 5") == "yes"
    # A value that rounds onto its bound shows the digits that tell which side it is on.
    assert report.shown(0.7003, "x", "<= 0.7") == "0.7003x" and report.shown(0.6996, "x", "< 0.7") == "0.6996x"
    assert report.shown(0.6996, "x", "<= 0.7") == "0.700x"  # met either way
    assert report.shown(0.7, "x", "<= 0.7") == "0.700x" and report.shown(0.723, "x", "<= 0.7") == "0.723x"
    assert report.shown(4.996, "nats", ">= 5") == "4.996 nats" and report.shown(181234.5, "tokens/s", "") == \
        "181,234 tokens/s"


def test_a_quick_run_started_by_hand_never_replaces_published_results(monkeypatch, tmp_path):
    monkeypatch.delenv(common.RESULTS_ENV, raising=False)
    assert common.results_dir(quick=True) == common.QUICK_RESULTS != common.RESULTS
    assert common.results_dir(quick=False) == common.RESULTS
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    assert common.results_dir(quick=True) == common.results_dir(quick=False) == tmp_path


def test_provenance_names_the_measured_commit_and_local_changes():
    machine = {"cores": 2, "cpu": "cpu", "torch": "t"}
    clean = report.Result("a", {"date": "2026-11-29", "machine": machine, "code": {"commit": "a" * 40, "dirty": False}})
    dirty = report.Result("b", {"date": "2026-11-29", "machine": machine, "code": {"commit": "b" * 40, "dirty": True}})
    line, = report.provenance([clean, dirty])
    assert f"code at {'a' * 10}, {'b' * 10} + changes." in line
    older = report.Result("c", {"date": "2026-11-29", "machine": machine})
    assert "code at unknown" in report.provenance([older])[0]
    # The figures are CPU measurements wherever they ran: a GPU in the machine is not what they measured.
    assert "on 2 cores cpu, no GPU, torch t" in report.provenance([clean])[0]
    gpu = report.Result("d", {"date": "2026-11-29", "machine": {**machine, "cuda": "NVIDIA H200"}})
    assert "on 2 cores cpu, NVIDIA H200 present but unused, torch t" in report.provenance([gpu])[0]


def test_a_stamp_says_when_where_what_and_how_busy_the_machine_was():
    from masktrain.launcher.machine import stamp

    before = os.getloadavg()[0]
    header = stamp()
    after = os.getloadavg()[0]
    assert {"date", "machine", "code", "command"} <= set(header)
    assert header["machine"]["cores"] == len(os.sched_getaffinity(0))
    assert min(before, after) - 0.01 <= header["machine"]["load_average"] <= max(before, after) + 0.01


def test_code_version_reads_the_commit_and_whether_files_changed(tmp_path):
    assert code_version(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("1")
    (tmp_path / ".gitignore").write_text("out/\n")
    subprocess.run([*git, "add", "f", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "log").write_text("x")  # ignored outputs are no code
    (tmp_path / "README.md").write_text("table")  # nor are results a benchmark run rewrites
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "new.json").write_text("{}")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "helper.py").write_text("x = 1")  # a new module a benchmark may import is
    assert code_version(tmp_path) == {"commit": head, "dirty": True}
    (tmp_path / "helper.py").unlink()
    (tmp_path / "f").write_text("2")
    assert code_version(tmp_path) == {"commit": head, "dirty": True}


def test_the_engine_benchmark_refuses_to_time_two_different_steps():
    from benchmarks.bench_engine import SAME_STEP_CHECKED, early_gap

    drifting = [1e-8] * SAME_STEP_CHECKED + [0.3]  # late drift is the dynamics amplifying rounding
    assert early_gap(drifting) == 1e-8
    for different in ([0.0, 1e-2] + drifting, [0.0, float("nan")] + drifting, []):
        with pytest.raises(SystemExit, match="steps differ"):
            early_gap(different)
