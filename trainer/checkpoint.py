"""Atomic checkpoints around DeepSpeed's save/load.

Layout: `<run>/checkpoints/step-00000040/` (DeepSpeed's files, the resolved config.yaml, the run's tokenizer
model in tokenizer/, and meta.json) and
`<run>/checkpoints/latest` (the tag of the newest complete one). A save goes to `step-N.partial` on every
rank; every rank flushes the files it wrote to disk, and only after all ranks finished does rank 0 rename the
folder and then replace `latest` in one `os.replace`. A crash mid-save therefore leaves the previous checkpoint
as `latest` and a `.partial` folder that the next start removes.

"Newest" means last published, not highest step: after a rollback (trainer.resume from an older checkpoint)
the new line's saves are the ones kept and resumed from. Pruning takes the oldest publications first: the
rollback target and what was saved before it, then the abandoned line's later steps. meta.json's `serial`
counts publications in this folder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import yaml

from masktrain.data.files import fsync_path, sync_tree, write_atomic
from masktrain.launcher.config import Config, TrainerConfig
from masktrain.launcher.loading import merge, to_dict, to_yaml
from masktrain.trainer.status import shell_code

LATEST = "latest"
PARTIAL = ".partial"
UNIVERSAL = ".universal" + PARTIAL
"""Suffix of the universal copy a checkpoint is loaded through on another rank count: a .partial, so that the
next start removes one a crash left behind."""
CONVERSION_TIMEOUT = datetime.timedelta(hours=3)
"""How long the other ranks wait for rank 0's conversion (the collectives' own is launch.collective_timeout)."""
CLIENT_KEY = "masktrain"

# Keys whose change does not alter what a resumed run computes.
RESUME_SAFE = {
    "run.name", "run.output_dir",
    "trainer.checkpoint_every", "trainer.checkpoint_minutes", "trainer.keep_last", "trainer.keep_every",
    "trainer.eval_every", "trainer.eval_batches",
    "trainer.log_every", "trainer.max_bad_steps", "trainer.resume", "trainer.allow_config_change",
    "trainer.peak_tflops", "trainer.progress_bar", "trainer.stop_after_steps", "trainer.profile_steps",
    "data.strict", "data.mask_in_workers", "launch.master_port", "launch.shutdown_timeout",
    "launch.collective_timeout", "launch.threads_per_rank",
}


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def save_due(step: int, trainer: TrainerConfig) -> bool:
    """Whether `step` saves on schedule: every checkpoint_every steps, and at the kept milestones."""
    return any(every and step % every == 0 for every in (trainer.checkpoint_every, trainer.keep_every))


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def comparable(config: dict) -> dict[str, object]:
    """The flattened config, with the job's shape reduced to its world size: ranks and their data and RNG
    state are restored by global rank, so 4 nodes x 8 ranks resume exactly as 8 x 4."""
    flat = flatten(config)
    nodes, per_node = flat.pop("launch.nnodes", None), flat.pop("launch.nproc_per_node", None)
    flat[WORLD_SIZE] = nodes * per_node if nodes is not None and per_node is not None else None
    return flat


WORLD_SIZE = "ranks (launch.nnodes x launch.nproc_per_node)"


DATA_POSITION_KEYS = ("data.shuffle_block", "run.seed")
"""Keys a saved data position belongs to: after a change allowed in one, the data stream starts again. (Other
ranks or loader workers continue it, and the same shards in another folder resume it: `Loader.resume`.)"""


def config_changes(saved: dict, current: dict) -> list[str]:
    """Keys (outside RESUME_SAFE and data.prepare) whose value differs, as 'key: old -> new'. A key the saved
    config lacks, added to masktrain since, counts as its default: what the code that saved it did. (Otherwise
    every new key would stop every running job from resuming after an upgrade.)"""
    old, new = comparable(merge(to_dict(Config()), saved)), comparable(current)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and key not in RESUME_SAFE and not key.startswith("data.prepare.")]


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int, is_main: bool, keep_every: int = 0):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.is_main = is_main
        self.damaged: set[Path] = set()

    def published(self) -> list[tuple[int, Path]]:
        """(serial, folder) of the complete checkpoints in the order they were published, oldest first. One whose
        meta.json was damaged since is left out (and kept), with a warning: it must not stop a run that goes on
        from another."""
        found = []
        for path in self.dir.glob("step-*"):
            if path.name.endswith(PARTIAL) or not is_complete(path):
                continue
            if (meta := meta_or_none(path)) is not None:
                found.append((meta.get("serial", 0), path.name, path))
            elif self.is_main and path not in self.damaged:
                self.damaged.add(path)
                print(f"[masktrain] {path / 'meta.json'} is damaged: that checkpoint is left out", file=sys.stderr)
        return [(serial, path) for serial, _, path in sorted(found)]

    def complete(self) -> list[Path]:
        """Complete checkpoints in the order they were published, oldest first (see `published`)."""
        return [path for _, path in self.published()]

    def lines(self) -> tuple[list[Path], list[Path]]:
        """The complete checkpoints of the run's current line, oldest first, and those of lines a rollback
        abandoned: each checkpoint that a later one went back past (saved after it at no later step)."""
        # One pruned meanwhile (a run still training) is left out, as it would be a moment later.
        metas = [(meta_or_none(path), path) for _, path in self.published()]
        published = [(meta.get("step", 0), path) for meta, path in metas if meta is not None]
        current, abandoned = [], []
        for index, (step, path) in enumerate(published):
            gone_back = any(later <= step for later, _ in published[index + 1:])
            (abandoned if gone_back else current).append(path)
        return current, abandoned

    def latest(self) -> Path | None:
        """The checkpoint `latest` names or, when a crash came between publishing a checkpoint and pointing
        `latest` at it (or `latest` was removed), the last published one; None when there is none."""
        published = self.published()
        pointer = self.dir / LATEST
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            # Published after the pointer's: a crash (or a full disk) came before `latest` was moved to it.
            # The pointer's own meta.json must be whole: resuming from an older one instead would lose steps.
            if is_complete(path) and (not published or read_meta(path).get("serial", 0) >= published[-1][0]):
                return path
        return published[-1][1] if published else None

    def clean_partial(self) -> None:
        """Remove saves a crash interrupted (rank 0, before anyone saves again)."""
        if self.is_main and self.dir.is_dir():
            for stale in self.dir.glob(f"*{PARTIAL}"):
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, engine, step: int, client_state: dict, config: dict, meta: dict,
             files: dict[str, bytes] | None = None) -> Path:
        """Collective: every rank calls it with the same step; returns the published checkpoint. `files` are
        small files rank 0 adds (relative path: content)."""
        import torch.distributed as dist

        tag = tag_for(step)
        staging = self.dir / (tag + PARTIAL)
        with recording_writes(engine) as written:
            engine.save_checkpoint(str(self.dir), tag=staging.name, client_state={CLIENT_KEY: client_state},
                                   save_latest=False)
        # Each rank flushes what it wrote: on a shared file system one node's fsync says nothing of another's,
        # and a rank fsyncing every rank's files would cost ranks x files round trips per save.
        for file in written:
            fsync_path(file)
        writers: list[list[Path] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(writers, written)  # returns once every rank's files are on disk
        if self.is_main:
            # What DeepSpeed writes outside its checkpoint engine (the zero_to_fp32.py scripts) rank 0 wrote.
            sync_tree(staging, done={file for files in writers for file in files})
            self.publish(staging, step, config, meta, files)
        dist.barrier()
        return self.dir / tag

    def publish(self, staging: Path, step: int, config: dict, meta: dict,
                files: dict[str, bytes] | None = None) -> None:
        """Rank 0, once the files in `staging` are on disk: complete it, make it `step-N` and `latest`, prune."""
        tag = tag_for(step)
        final = self.dir / tag
        published = self.published()
        serial = published[-1][0] + 1 if published else 1
        for name, content in (files or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(staging / name, content)
        write_atomic(staging / "config.yaml", to_yaml(config))
        # Recorded, not judged later from keep_every: a resume may change it (it is resume-safe), and must not
        # prune the milestones saved before.
        milestone = bool(self.keep_every) and step % self.keep_every == 0
        write_atomic(staging / "meta.json", json.dumps({"tag": tag, "step": step, "serial": serial,
                                                        "milestone": milestone, **meta}, indent=2))
        if final.exists():
            # A run resumed from an older checkpoint passes this step again: the new state replaces the
            # old one. Renamed as a partial first, so a crash here leaves nothing that looks complete.
            stale = self.dir / (tag + ".replaced" + PARTIAL)
            final.rename(stale)
            shutil.rmtree(stale)
        staging.rename(final)
        fsync_path(self.dir)
        write_atomic(self.dir / LATEST, tag)
        self.prune()

    def prune(self) -> None:
        for old in self.complete()[:-self.keep_last]:
            if not self.milestone(old):
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def milestone(path: Path) -> bool:
        """A save keep_every kept when it was saved. One of a line a rollback abandoned stays until the new line
        saves its step over it, which it does under the same keep_every: milestones are saved whatever
        checkpoint_every says."""
        return bool((meta_or_none(path) or {}).get("milestone"))

    def load(self, engine, path: Path) -> dict:
        """Restore engine state (model, optimizer) and return masktrain's client state. A ZeRO 1-3 checkpoint
        saved by another number of ranks (see `needs_universal`; the engine built with `load_universal`) is
        loaded through DeepSpeed's universal format: rank 0 writes that copy beside it, every rank loads it, and
        it is removed again, as the run's next save is in its own layout. A failed conversion raises
        ConversionFailed in every rank."""
        import torch.distributed as dist

        if not engine.load_universal_checkpoint():
            return self.load_tag(engine, path.parent, path.name)
        # One level down: the converter also writes a `latest_universal` file beside the folder it writes.
        staging = self.dir / (path.name + UNIVERSAL)
        # The others wait on a group of their own: a large model's conversion outlasts the collectives' timeout.
        patient = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
        failure = [None]
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                to_universal(path, staging / "universal")
            except ConversionFailed as err:
                shutil.rmtree(staging, ignore_errors=True)  # a full disk is freed now, not at the next start
                failure = [str(err)]
        # Every rank ends alike when there is nothing to load, rather than in a collective rank 0 left.
        dist.broadcast_object_list(failure, src=0, group=patient)
        dist.destroy_process_group(patient)
        if failure[0] is not None:
            raise ConversionFailed(failure[0])
        # DeepSpeed's ZeRO-3 universal load gives every group the settings of the checkpoint's first: the weight
        # decay each group was built with (none on biases and norms) is put back.
        decays = [group["weight_decay"] for group in engine.optimizer.param_groups]
        try:
            client = self.load_tag(engine, staging, "universal")
        finally:
            dist.barrier()
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
        for group, decay in zip(engine.optimizer.param_groups, decays):
            group["weight_decay"] = decay
        return client

    @staticmethod
    def load_tag(engine, folder: Path, tag: str) -> dict:
        _, client = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if client is None or CLIENT_KEY not in client:
            raise RuntimeError(f"{folder / tag}: not a masktrain checkpoint (no {CLIENT_KEY!r} client state)")
        return client[CLIENT_KEY]


def is_complete(path: Path) -> bool:
    """meta.json is written last, just before the folder is published."""
    return (path / "meta.json").is_file()


def resolve_checkpoint(given: str | Path) -> Path:
    """The checkpoint a user names: a checkpoint folder, or a run folder, its checkpoints/ folder or the `latest`
    file there, which mean the newest complete checkpoint."""
    path = Path(os.path.abspath(given))  # `latest` or `.` inside checkpoints/ have parents to find; no ".."
    if is_complete(path):
        return path
    if path.name == LATEST and path.is_file():
        run = path.parent.parent
    elif path.name == "checkpoints" and path.is_dir():
        run = path.parent
    elif (path / "checkpoints").is_dir():
        run = path
    else:
        run = None
    newest = Checkpointer(run, 1, False).latest() if run is not None else None
    if newest is not None:
        return newest
    what = "no such file or folder" if not path.exists() else (
        "no complete checkpoint in it" if run is not None else "not a complete masktrain checkpoint (no meta.json)")
    raise FileNotFoundError(f"{given}: {what}; give a checkpoint folder (<run>/checkpoints/step-XXXXXXXX) or a run "
                            "folder, whose newest complete checkpoint is taken")


def meta_or_none(path: Path) -> dict | None:
    """meta.json's record, or None when it is damaged (written whole: a disk or a hand did that) or gone (pruned
    by the launch that runs while another process looks)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (ValueError, UnicodeDecodeError, FileNotFoundError):
        return None
    whole = isinstance(meta, dict) and isinstance(meta.get("serial", 0), int)  # the serial orders publications
    return meta if whole else None


def read_meta(path: Path) -> dict:
    meta = meta_or_none(path)
    if meta is None:
        what = "damaged (not a JSON object)" if (path / "meta.json").exists() else "missing"
        raise SystemExit(f"{path / 'meta.json'}: {what}; move {path} aside (its other files may still be whole) to go "
                         "on from the checkpoint before it")
    return meta


def line_start(ckpt: Checkpointer) -> str | None:
    """The explicit trainer.resume the run's latest checkpoint descends from (None: none, or no checkpoint)."""
    latest = ckpt.latest()
    return read_meta(latest).get("resumed_from") if latest is not None else None


def taken_rollback(resume: str, run_dir: str | Path) -> bool:
    """Whether the run in `run_dir` has already started from trainer.resume `resume` and saved since: its
    requeues go on from their own saves, so `resume` may be gone (keep_last prunes it like any other)."""
    return line_start(Checkpointer(run_dir, 1, False)) == str(Path(resume).resolve())


def resume_point(resume: str, ckpt: Checkpointer) -> tuple[Path | None, str | None]:
    """For trainer.resume `resume`: (the checkpoint to resume from, where its line of checkpoints began: the
    explicit trainer.resume it started from, which every later save inherits)."""
    if resume == "never":
        return None, None
    latest = ckpt.latest()
    inherited = line_start(ckpt)
    if resume == "auto":
        return latest, inherited
    explicit = str(Path(resume).resolve())  # validated: a complete checkpoint, or this line's start
    # A requeued or relaunched job carries the same trainer.resume. Once this run has saved since it started
    # from there, its own latest checkpoint is where it goes on; starting over from `explicit` would loop.
    if inherited == explicit:
        return latest, explicit
    return Path(resume), explicit


def rollback_note(resume: str, ckpt: Checkpointer) -> str | None:
    """What to say when an explicit trainer.resume gives way to the run's own latest checkpoint (see
    `resume_point`): a second rollback to the same checkpoint looks like a requeue, and would go on silently."""
    if resume in ("auto", "never"):
        return None
    source, explicit = resume_point(resume, ckpt)
    if str(source.resolve()) == explicit:
        return None
    note = (f"trainer.resume={resume}: this run has gone on from there and saved since, so it goes on from its "
            f"latest checkpoint, {source}")
    if not is_complete(Path(resume)):
        return f"{note} ({resume} itself has been pruned)"
    since = [path.name for _, path in ckpt.published() if (meta_or_none(path) or {}).get("resumed_from") == explicit]
    return (f"{note}. To roll back to {resume} again, move aside the checkpoints saved since ({', '.join(since)}) "
            "or train into a new run.output_dir")


def saved_config(path: Path) -> dict:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        config = None
    except FileNotFoundError:
        raise SystemExit(f"{path / 'config.yaml'}: missing; it is the run's config as saved, which resuming and "
                         "exporting need") from None
    # Saved whole (to_dict of a Config): a file cut short still parses, without its last sections or keys.
    if (not isinstance(config, dict) or any(not isinstance(config.get(f.name), dict) for f in fields(Config))
            or comparable(config)[WORLD_SIZE] is None):
        raise SystemExit(f"{path / 'config.yaml'}: damaged (a section or launch.nnodes / launch.nproc_per_node "
                         "missing, or no YAML mapping); it is the run's config as saved, which resuming and exporting "
                         "need")
    masking = config.get("data", {}).get("masking", {})
    if masking.get("schedule") == "constant":
        # A final_rate had no effect there, and validation refuses one since: checkpoints saved before that still
        # export and resume, and dropping it from the config is no change to the run.
        masking["final_rate"] = None
    return config


def needs_universal(path: Path, world_size: int) -> bool:
    """Whether a checkpoint loads on `world_size` ranks only through DeepSpeed's universal format: its ZeRO 1-3
    optimizer state is split over another number of ranks."""
    return partitioned_over(path) not in (0, world_size)


def regrouped(path: Path, groups: int) -> bool:
    """Whether checkpoint `path`'s optimizer holds the parameters in another number of groups than `groups`
    (this run's): its state then loads only through the universal format, which maps it parameter by parameter.
    A ZeRO-3 checkpoint that records none is from a masktrain that read partitioned parameters as 1-D, so that
    none had weight decay, and its optimizer state does not load into this run's groups as it is."""
    meta = read_meta(path)
    return meta.get("optimizer_groups", 1 if meta.get("zero_stage") == 3 else groups) != groups


class ConversionFailed(RuntimeError):
    """`to_universal` failed; the message is one line, and the converter's output went to the rank's stderr."""


def to_universal(path: Path, target: Path) -> None:
    """Convert checkpoint `path` into DeepSpeed's universal format in `target` (one file per parameter and
    state, whole; loadable on any rank count) with DeepSpeed's own converter, in a process of its own: its
    worker pool forked from a rank (threads of torch and the process group running) hangs. The process ignores
    the stop signals and dies with the rank (`masktrain.trainer.converter`)."""
    import subprocess
    import time

    from masktrain.trainer.signals import stops_deferred

    ranks = partitioned_over(path)
    print(f"[masktrain] {path}: saved by {ranks} rank{'s' if ranks != 1 else ''}; writing its universal copy "
          f"{target}", flush=True)
    started = time.monotonic()
    workers = str(max(1, min(4, len(os.sched_getaffinity(0)))))
    # masktrain records no universal_checkpoint_info (no tensor or pipeline parallelism): the converter injects it.
    command = [sys.executable, "-m", "masktrain.trainer.converter", str(os.getpid()), "--input_folder", str(path),
               "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", workers,
               "--num_merge_workers", workers]
    with stops_deferred():
        converter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = converter.communicate()
    if converter.returncode != 0:
        code = shell_code(converter.returncode)
        # The output goes to the log; the reason, which status.json keeps, is one line that points there.
        print(f"[masktrain] DeepSpeed's universal converter exited {code}; the end of its output:\n"
              f"{(stdout + stderr)[-4000:]}", file=sys.stderr, flush=True)
        said = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no message")
        raise ConversionFailed(f"DeepSpeed's universal conversion of checkpoint {path} failed (exit {code}: {said}); "
                               "the converter's output is in the log above; once the cause is fixed, the next start "
                               "converts it afresh")
    print(f"[masktrain] universal copy written in {time.monotonic() - started:.0f} s", flush=True)


def partitioned_over(path: Path) -> int:
    """The ranks a ZeRO 1-3 checkpoint's optimizer state is split over (one file each, named with a bf16_ prefix
    in bf16); 0 for ZeRO-0."""
    return len(list(path.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def check_intact(path: Path, saved: dict) -> None:
    """Refuse a checkpoint with a state file gone or cut short since it was published whole (saves are atomic: a
    disk or a hand did it), naming the file, before torch.load or DeepSpeed meet it, in every rank. torch.save
    writes zip archives, whose directory is at the end: a cut file has none. `saved`: its `saved_config`."""
    states = sorted(path.glob("*_states.pt"))
    # ZeRO 1-3 leave an optimizer file per rank that saved; ZeRO-3 a model file per rank too.
    per_rank = {kind: {int(file.name.split("zero_pp_rank_")[1].split("_")[0]) for file in states
                       if "zero_pp_rank_" in file.name and file.name.endswith(f"_{kind}_states.pt")}
                for kind in ("model", "optim")}
    saved_by = set(range(comparable(saved)[WORLD_SIZE])) if per_rank["optim"] else set()
    gap = next(((kind, sorted(saved_by - ranks)) for kind, ranks in per_rank.items()
                if (ranks or kind == "optim") and saved_by - ranks), None)
    problem = None
    if not any(file.name.endswith("model_states.pt") for file in states):
        problem = f"{path}: no model state file (*model_states.pt)"
    elif gap is not None:
        kind, ranks = gap
        problem = (f"the {dict(optim='optimizer').get(kind, kind)} state of ZeRO rank(s) "
                   f"{', '.join(map(str, ranks))} of the {len(saved_by)} that saved it is missing")
    else:
        problem = next((f"{file}: cut short or damaged (no zip directory at its end)" for file in states
                        if not zipfile.is_zipfile(file)), None)
    if problem is not None:
        raise SystemExit(f"cannot use checkpoint {path}: {problem}; use another (to resume from one: "
                         "trainer.resume=<its folder>)")


STAGE_LAYOUTS = {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
"""The state-file layout each ZeRO stage saves; DeepSpeed loads a checkpoint only under a stage of its layout."""


def deepspeed_json(config: dict) -> dict | None:
    """The contents of the run's trainer.deepspeed_config file, None without one. Kept in meta.json: the file
    can be edited between launches, which changes the run under an unchanged config."""
    from masktrain.launcher.validate import read_json_object

    path = config.get("trainer", {}).get("deepspeed_config")
    if not path:
        return None
    value, error = read_json_object(path)
    if error is not None:
        raise SystemExit(f"trainer.deepspeed_config: {path}: {error}")
    return value


def check_resumable(path: Path, config: dict, allowed: bool, stage: int, precision: str | None,
                    tokenizer: tuple[Path, str] | None = None) -> None:
    """Refuse to resume from `path` with a config that would change what the run computes (the rank count among
    it), and, whatever is allowed, weights trained with another tokenizer than the run's `tokenizer` (its folder
    and sha256; None: not yet known) and what DeepSpeed cannot load: a ZeRO stage of another layout, another
    precision. `stage` and `precision` are the run's as its DeepSpeed config resolves them (precision None where
    not yet known: auto, before the ranks see their device); checkpoints saved before meta.json recorded them
    are not checked for these."""
    saved = saved_config(path)
    check_intact(path, saved)
    even = "even with trainer.allow_config_change"
    meta = read_meta(path)
    saved_stage, saved_precision = meta.get("zero_stage"), meta.get("precision")
    if saved_stage in STAGE_LAYOUTS and STAGE_LAYOUTS[saved_stage] != STAGE_LAYOUTS.get(stage):
        raise SystemExit(f"cannot resume from {path} under ZeRO-{stage}: it was saved under ZeRO-{saved_stage}, and "
                         f"DeepSpeed loads its state files only under {STAGE_LAYOUTS[saved_stage]}; set "
                         f"trainer.zero_stage={saved_stage} (and no other stage in trainer.deepspeed_config), {even}")
    if tokenizer is not None and meta.get("tokenizer_sha256") not in (None, tokenizer[1]):
        raise SystemExit(f"cannot resume from {path}: it was trained with another tokenizer (sha256 "
                         f"{meta['tokenizer_sha256'][:12]}) than the run's, {tokenizer[0]} ({tokenizer[1][:12]}): its "
                         f"ids mean other tokens; point data.dir (or data.tokenizer) at the one it had, {even}")
    if saved_precision and precision and saved_precision != precision:
        raise SystemExit(f"cannot resume from {path} in {precision}: it was saved in {saved_precision}, and DeepSpeed "
                         f"loads its optimizer state only in {saved_precision}; set "
                         f"trainer.precision={saved_precision}, {even}")
    changes = config_changes(saved, config)
    if "deepspeed_json" in meta:
        old, new = flatten(meta["deepspeed_json"] or {}), flatten(deepspeed_json(config) or {})
        changes += [f"trainer.deepspeed_config contents: {key}: {old.get(key)!r} -> {new.get(key)!r}"
                    for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if changes and not allowed:
        restart = [key for key in DATA_POSITION_KEYS if any(change.startswith(f"{key}: ") for change in changes)]
        raise SystemExit(f"cannot resume from {path}: the config differs in keys that change the run:\n  "
                         + "\n  ".join(changes)
                         + "\nrestore them, use a new run.output_dir, or set trainer.allow_config_change=true"
                         + (f" (with {', '.join(restart)} changed, the data stream then starts again from its "
                            "beginning: its position holds only for one order of the documents, so those of the "
                            "steps done so far are read again)" if restart else ""))


@contextlib.contextmanager
def recording_writes(engine) -> Iterator[list[Path]]:
    """The files DeepSpeed writes through `engine`'s checkpoint engine (every state file) on this rank."""
    checkpoint_engine = engine.checkpoint_engine
    save = checkpoint_engine.save
    written: list[Path] = []

    def recorded(state_dict, path):
        save(state_dict, path)
        written.append(Path(path).resolve())

    checkpoint_engine.save = recorded
    try:
        yield written
    finally:
        del checkpoint_engine.save  # the class's own method again
