"""`masktrain data shards`: every kind of input, deterministic output that plain `webdataset` and `tar` read,
the target shard size, and bad input counted, or failing under --strict with the file and line."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from conftest import MASKTRAIN, run_cli
from masktrain.data.corpus import CorpusStats, DataError, InputError, documents, expand_inputs
from masktrain.data.files import write_atomic
from masktrain.data.prepare import build_tokenizer, input_changes, input_sizes, refuse_output_in_inputs
from masktrain.data.shards import manifest_urls
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher import cli
from masktrain.launcher.config import PrepareConfig


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Distinct one-line documents from Python's own documentation."""
    from pydoc_data.topics import topics

    paragraphs = (" ".join(p.split()) for name in sorted(topics) for p in topics[name].split("\n\n"))
    return list(dict.fromkeys(p for p in paragraphs if len(p) >= 40))[:120]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    settings = PrepareConfig(inputs=["builtin:python-docs"], max_docs=200, vocab_size=500, tokenizer_type="bpe")
    build_tokenizer(settings, out, seed=0, log=lambda text: None)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, docs) -> tuple[Path, list[str]]:
    """Text, .gz, JSON lines (plain and .gz, matched by a glob) and a directory tree; the arguments."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "a.txt").write_text("\n\n".join(docs[0:30]) + "\n")
    (root / "b.txt.gz").write_bytes(gzip.compress(("\n\n".join(docs[30:60]) + "\n").encode()))
    (root / "json").mkdir()
    (root / "json" / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[60:80]))
    (root / "json" / "e.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"body": d}) + "\n" for d in docs[80:100]).encode()))
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "sub" / "d.md").write_text("\n\n".join(docs[100:110]))
    (root / "tree" / "e.rst").write_text("\n\n".join(docs[110:120]))
    (root / "tree" / "picture.png").write_bytes(b"\x89PNG not text")
    return root, [str(root / "a.txt"), str(root / "b.txt.gz"), str(root / "json" / "*.jsonl*"), str(root / "tree")]


def shards(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "shards", *args])
    return exit_.value.code


def build(inputs, tokenizer, out: Path, *extra: str) -> dict:
    assert shards(*inputs[1], "--tokenizer", str(tokenizer), "--out", str(out), "--text-field", "body",
                  "--val-fraction", "0.25", "--shard-bytes", "4096", *extra) == 0
    return json.loads((out / "manifest.json").read_text())


def split_urls(out: Path, manifest: dict, split: str) -> list[str]:
    return [str(out / shard["path"]) for shard in manifest["splits"][split]["shards"]]


def test_every_input_kind_is_read_and_plain_webdataset_reads_it_back(inputs, tokenizer, docs, tmp_path):
    out = tmp_path / "out"
    manifest = build(inputs, tokenizer, out, "--seed", "5")
    assert manifest["input_documents"] == len(docs) and manifest["input_skipped"] == {"file of another kind": 1}
    sp = Tokenizer(tokenizer)
    decoded: Counter = Counter()
    for split in ("train", "val"):
        assert manifest["splits"][split]["documents"] > 0
        for shard in manifest["splits"][split]["shards"]:
            dataset = wds.WebDataset(str(out / shard["path"]), shardshuffle=False).decode()
            arrays = [sample["tokens.npy"] for sample in dataset]
            assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
            assert (len(arrays), sum(map(len, arrays))) == (shard["documents"], shard["tokens"])
            assert shard["bytes"] == (out / shard["path"]).stat().st_size
            decoded.update(sp.decode(a.tolist()) for a in arrays)
    assert decoded == Counter(docs)


def test_a_data_folder_named_like_a_url_is_written_and_read_as_a_folder(inputs, tokenizer, tmp_path, monkeypatch):
    """webdataset's gopen reads `run-06-01T12:30/...` as a URL of scheme `run-06-01t12`: shards are written and
    listed by absolute path."""
    monkeypatch.chdir(tmp_path)
    out = Path("run-06-01T12:30")
    manifest = build(inputs, tokenizer, out)
    for split in ("train", "val"):
        urls = manifest_urls(out, split)
        assert urls == [str(tmp_path / out / shard["path"]) for shard in manifest["splits"][split]["shards"]]
        read = [sample["tokens.npy"] for url in urls for sample in wds.WebDataset(url, shardshuffle=False).decode()]
        assert len(read) == manifest["splits"][split]["documents"]


def test_shards_reach_the_target_size_and_tar_lists_and_extracts_them(inputs, tokenizer, tmp_path):
    out = tmp_path / "out"
    manifest = build(inputs, tokenizer, out, "--shard-bytes", "20000")
    train = manifest["splits"]["train"]["shards"]
    assert len(train) >= 3
    assert all(shard["bytes"] >= 20000 for shard in train[:-1])
    # Past the target by at most one document (~1.5 KiB here) and tar's end padding to a 10 KiB record.
    assert all(shard["bytes"] <= 20000 + 1536 + 10240 for shard in train)
    path = out / train[0]["path"]
    names = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == train[0]["documents"] and all(n.endswith(".tokens.npy") for n in names)
    member = subprocess.run(["tar", "xOf", str(path), names[0]], capture_output=True, check=True).stdout
    first = next(iter(wds.WebDataset(str(path), shardshuffle=False).decode()))["tokens.npy"]
    assert np.array_equal(np.load(__import__("io").BytesIO(member)), first)


def test_same_input_and_seed_give_byte_identical_shards_whatever_the_thread_count(inputs, tokenizer, tmp_path):
    runs = {name: build(inputs, tokenizer, tmp_path / name, *args) for name, args in
            {"one": ("--workers", "1"), "two": ("--workers", "2"), "seed": ("--seed", "99")}.items()}
    files = {name: {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*.tar")}
             for name in runs}
    assert files["one"] == files["two"]
    assert runs["one"]["splits"] == runs["two"]["splits"]
    # Another seed writes the same documents in another order; the split does not depend on the seed.
    assert files["seed"] != files["one"]
    for split in ("train", "val"):
        contents = {name: Counter(bytes(a) for url in split_urls(tmp_path / name, runs[name], split)
                                  for a in (s["tokens.npy"] for s in wds.WebDataset(url, shardshuffle=False)))
                    for name in ("one", "seed")}
        assert contents["one"] == contents["seed"]


def test_bad_input_is_counted_and_strict_fails_naming_file_and_line(tokenizer, tmp_path, capsys):
    bad_text = tmp_path / "bad.txt"
    bad_text.write_bytes(b"a fine paragraph of text\n\ncaf\xe9 in latin-1, not UTF-8\n\nanother fine one\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_bytes(b'{"text": "a fine document"}\n{"text": "   "}\nnot json at all\n{"other": "x"}\n'
                         b'{"text": "\xff\xfe"}\n{"text": "a lone surrogate \\ud800 escape"}\n')
    out = tmp_path / "out"
    assert shards(str(bad_text), str(bad_json), "--tokenizer", str(tokenizer), "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_documents"] == 3
    assert manifest["input_skipped"] == {"invalid UTF-8": 3, "empty document": 1, "invalid JSON": 1,
                                         "missing text field": 1}
    logged = capsys.readouterr().out
    assert "skipped 1 empty document, 1 invalid JSON, 3 invalid UTF-8, 1 missing text field" in logged
    # Without --strict too, each kind of skip can be found: the first of each is named.
    assert (f"skipped, the first of each kind: empty document at {bad_json}:2; invalid JSON at {bad_json}:3:1 "
            f"(Expecting value); invalid UTF-8 at {bad_text}:3 (in the document that starts at line 3); missing text "
            f"field at {bad_json}:4 (no string field 'text')") in logged

    assert shards(str(bad_text), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "strict"), "--strict") == 1
    assert f"masktrain: {bad_text}:3: invalid UTF-8" in capsys.readouterr().err
    assert shards(str(bad_json), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "strict2"), "--strict") == 1
    assert f"masktrain: {bad_json}:2: empty document" in capsys.readouterr().err
    # A file of one document per line (read as one document: no blank lines) names the bad byte's own line.
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"".join(b"line %d\n" % n for n in range(1, 40)) + b"caf\xe9\n" + b"last line\n")
    with pytest.raises(InputError, match=rf"{lines}:40: invalid UTF-8 \(in the document that starts at line 1\)"):
        list(documents([str(lines)], strict=True))


def test_a_corrupt_or_truncated_gz_is_skipped_whole_not_read_up_to_its_error(tmp_path):
    """Gzip finds a corrupt file only by its CRC, at the end: its garbage text reached the tokenizer and the
    shards while the file was counted as an unreadable file skipped."""
    text = "".join(f"document number {n} of the file\n\n" for n in range(200)).encode()
    packed = gzip.compress(text, compresslevel=0)  # stored: a changed byte decompresses to other text
    middle = packed.index(b"document number 100")
    (tmp_path / "corrupt.txt.gz").write_bytes(packed[:middle] + b"X" + packed[middle + 1:])
    (tmp_path / "truncated.txt.gz").write_bytes(packed[:middle])
    for name in ("corrupt.txt.gz", "truncated.txt.gz"):
        stats = CorpusStats()
        assert list(documents([str(tmp_path / name)], stats=stats)) == []
        assert stats.skipped == {"unreadable file": 1} and stats.first["unreadable file"].startswith(
            str(tmp_path / name))
    # A trial on the first documents (data.prepare.max_docs) reads only as far as it needs; where that reaches
    # the fault, the count says how many documents before it were kept.
    assert next(documents([str(tmp_path / "truncated.txt.gz")], check_gz=False)) == "document number 0 of the file"
    stats = CorpusStats()
    assert len(list(documents([str(tmp_path / "truncated.txt.gz")], stats=stats, check_gz=False))) == 100
    assert stats.first["unreadable file"].endswith("; the 100 documents read before it were kept)")
    # An empty .gz (a download cut at its start) is no gzip file, although gzip reads it as empty text.
    (tmp_path / "empty.txt.gz").write_bytes(b"")
    for check_gz in (True, False):
        stats = CorpusStats()
        assert list(documents([str(tmp_path / "empty.txt.gz")], stats=stats, check_gz=check_gz)) == []
        assert stats.skipped == {"unreadable file": 1}
    with pytest.raises(InputError, match=r"empty\.txt\.gz: unreadable file \(an empty file, where gzip's header"):
        list(documents([str(tmp_path / "empty.txt.gz")], strict=True))


def test_inputs_are_read_once_each_and_through_linked_folders(tmp_path):
    """A folder and a glob inside it name its files twice; a folder linked into the corpus is part of it, and
    a link back up to the corpus ends there."""
    corpus, other = tmp_path / "corpus", tmp_path / "other"
    corpus.mkdir()
    other.mkdir()
    (corpus / "a.txt").write_text("document a\n")
    (other / "b.txt").write_text("document b\n")
    (corpus / "linked").symlink_to(other)
    (other / "back-up").symlink_to(corpus)
    assert expand_inputs([str(corpus), str(corpus / "*.txt"), str(corpus / "a.txt")]) == [
        str(corpus / "a.txt"), str(corpus / "linked" / "b.txt")]
    assert list(documents([str(corpus), str(corpus / "a.txt")])) == ["document a", "document b"]
    # A folder under two names is read by the first in sorted order, whatever order the file system lists;
    # a broken link in a folder is an input that cannot be read, counted as such.
    (corpus / "zsub").mkdir()
    (corpus / "zsub" / "c.txt").write_text("document c\n")
    (corpus / "alias").symlink_to(corpus / "zsub")
    (corpus / "broken.txt").symlink_to(tmp_path / "nowhere.txt")
    assert expand_inputs([str(corpus)]) == [str(corpus / name) for name in (
        "a.txt", "alias/c.txt", "broken.txt", "linked/b.txt")]
    stats = CorpusStats()
    assert list(documents([str(corpus)], stats=stats)) == ["document a", "document c", "document b"]
    assert stats.skipped == {"unreadable file": 1}
    # Named as an input, a loop of links is said to be one, where resolving it raised a RuntimeError.
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    refuse_output_in_inputs(tmp_path / "out", [str(tmp_path / "loop-a")])
    with pytest.raises(InputError, match=f"^{tmp_path / 'loop-a'}: a link to no file \\(broken, or a loop"):
        expand_inputs([str(tmp_path / "loop-a")])
    with pytest.raises(InputError, match="^builtin:python: no such built-in corpus; the one there is: builtin:"):
        expand_inputs(["builtin:python"])


def test_files_of_other_kinds_in_a_folder_are_counted_and_the_first_named(tmp_path):
    """A folder of compressed or tabular parts beside a README trained on the README alone, "skipped nothing"."""
    (tmp_path / "data").mkdir()
    (tmp_path / "README.md").write_text("the corpus, in parts\n")
    (tmp_path / "data" / "part-0.jsonl.xz").write_bytes(b"\xfd7zXZ")
    (tmp_path / "data" / "part-1.csv").write_text("text\na document\n")
    stats = CorpusStats()
    assert list(documents([str(tmp_path)], strict=True, stats=stats)) == ["the corpus, in parts"]
    assert stats.skipped == {"file of another kind": 2}
    assert stats.first["file of another kind"].startswith(f"{tmp_path / 'data' / 'part-0.jsonl.xz'} (read are .txt")


def test_a_file_whose_name_looks_like_a_glob_is_read_as_that_file(tmp_path):
    named = tmp_path / "notes [draft].txt"
    named.write_text("the only document\n")
    assert expand_inputs([str(named)]) == [str(named)]
    assert list(documents([str(named)])) == ["the only document"]
    assert expand_inputs([str(tmp_path / "*.txt")]) == [str(named)]


def test_a_glob_may_match_folders_without_text_but_must_find_some(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "images").mkdir(parents=True)
    (corpus / "images" / "cat.png").write_bytes(b"\x89PNG")
    (corpus / "text").mkdir()
    (corpus / "text" / "a.txt").write_text("document a\n")
    other: list[str] = []
    assert expand_inputs([str(corpus / "*")], other) == [str(corpus / "text" / "a.txt")]
    assert other == [str(corpus / "images" / "cat.png")]  # counted as a file of another kind, as in a folder input
    with pytest.raises(InputError, match=re.escape(f"{corpus / 'im*'}: the pattern matches no text file")):
        expand_inputs([str(corpus / "im*")])


def test_inputs_that_name_no_file_are_refused_in_a_line(tmp_path, monkeypatch):
    """An unset shell variable gives an empty input, which named the working directory; a pipe (or a shell's
    `<(zcat ...)`) was called missing, and the passes over the inputs would have read it once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray.txt").write_text("not meant to be read\n")
    with pytest.raises(InputError, match=re.escape("'': an empty input path (a shell variable that is not set?)")):
        expand_inputs([""])
    result = run_cli("data", "tokenizer", "", "--out", "out", cwd=tmp_path)  # out/ lies in the working directory
    assert result.returncode == 2 and "data.prepare.inputs: holds an empty path" in result.stderr, result.stderr
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'pipe'}: not a file or folder (a pipe or a device")):
        expand_inputs([str(tmp_path / "pipe")])


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Windows editors start UTF-8 files with one: it made a .jsonl file's first record invalid JSON and
    prefixed a text file's first document."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_bytes(bom + b"first paragraph\n\nsecond \xef\xbb\xbf kept inside\n")
    assert list(documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], strict=True)) == [
        "first", "second", "first paragraph", "second \ufeff kept inside"]


def test_a_windows_text_file_gives_the_documents_of_its_unix_copy(tmp_path):
    text = "first line\nof the first\n\n\nsecond \r inside\n"
    (tmp_path / "unix.txt").write_text(text)
    (tmp_path / "windows.txt").write_bytes(text.replace("\n", "\r\n").encode())
    unix, windows = (list(documents([str(tmp_path / name)], strict=True)) for name in ("unix.txt", "windows.txt"))
    assert windows == unix == ["first line\nof the first", "second \r inside"]


def test_a_corpus_without_documents_is_an_error_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "tokenizer", str(empty), "--out", str(tmp_path / "tok")])
    assert exit_.value.code == 1
    assert f"{empty}: no documents to train on" in capsys.readouterr().err


def test_documents_that_all_go_to_validation_are_said_to(tokenizer, tmp_path, capsys):
    few = tmp_path / "few.txt"
    few.write_text("one document only")
    assert shards(str(few), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out"), "--val-fraction",
                  "0.999999") == 1
    assert capsys.readouterr().err == (f"masktrain: {few}: no documents to train on: all 1 went to validation "
                                       "(data.prepare.val_fraction=0.999999)\n")


def test_an_input_removed_once_sharded_leaves_the_others_compared(tmp_path):
    from masktrain.data.prepare import changed_inputs

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first")
    b.write_text("second")
    manifest = {"input_sizes": input_sizes([str(a), str(b)])}
    a.unlink()
    assert changed_inputs(manifest, [str(a), str(b)]) == ""
    b.write_text("second, grown")
    assert changed_inputs(manifest, [str(a), str(b)]) == f"{b}: 6 -> 13 bytes"
    # A file named twice (by itself and in its folder) is one input, now as when it was recorded.
    twice = [str(tmp_path), str(b)]
    assert changed_inputs({"input_sizes": input_sizes(twice)}, twice) == ""
    assert changed_inputs({"input_sizes": input_sizes(twice)}, [*twice, str(a)]) == ""


def test_train_fails_before_any_rank_starts_when_the_data_is_missing_or_mismatched(tiny_data, tmp_path):
    """One message naming the path and the fix, no rank tracebacks, nothing written to the run folder."""
    data = Path(next(o for o in tiny_data if o.startswith("data.dir=")).partition("=")[2])
    cases = {
        "no data": ([f"data.dir={tmp_path / 'none'}"], f"{tmp_path / 'none' / 'tokenizer' / 'spm.model'}: no "
                                                        "sentencepiece model"),
        "no table": ([*tiny_data, "data.masking.policy=importance"], f"{data / 'idf.npy'}: no importance table"),
    }
    mismatched = tmp_path / "mismatched"
    subprocess.run(["cp", "-r", str(data), str(mismatched)], check=True)
    manifest = json.loads((mismatched / "manifest.json").read_text())
    manifest["vocab_size"] += 1
    (mismatched / "manifest.json").write_text(json.dumps(manifest))
    cases["other tokenizer"] = ([*tiny_data, f"data.dir={mismatched}", f"data.tokenizer={data / 'tokenizer'}"],
                                f"written with a {manifest['vocab_size']}-id tokenizer")
    cases["mixture of another tokenizer"] = (
        [*tiny_data, f"data.mixture=[{{dir: {data}}}, {{dir: {mismatched}}}]"],
        f"the shards in {mismatched} were written with a {manifest['vocab_size']}-id tokenizer")
    # Shards listed by path inside a prepared folder: its manifest tells their tokenizer too.
    listed = [str(mismatched / shard["path"]) for shard in manifest["splits"]["train"]["shards"][:2]]
    cases["listed shards of another tokenizer"] = (
        [*tiny_data, f"data.train_shards=[{listed[0]}]"],
        f"the shards in {mismatched.resolve()} were written with a {manifest['vocab_size']}-id tokenizer")
    cases["mixture source of listed shards of another tokenizer"] = (
        [*tiny_data, f"data.mixture=[{{dir: {data}}}, {{shards: {listed}, name: web}}]"],
        f"the shards in {mismatched.resolve()} were written with a {manifest['vocab_size']}-id tokenizer")
    none = tmp_path / "none"
    cases["mixture without a manifest"] = ([*tiny_data, f"data.mixture=[{{dir: {none}}}]"],
                                           f"train shards of {none}: {none / 'manifest.json'}: no manifest")
    emptied = tmp_path / "emptied"
    subprocess.run(["cp", "-r", str(data), str(emptied)], check=True)
    manifest = json.loads((emptied / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = []
    (emptied / "manifest.json").write_text(json.dumps(manifest))
    cases["mixture source without train shards"] = ([*tiny_data, f"data.mixture=[{{dir: {data}}}, {{dir: {emptied}}}]"],
                                                    f"no train shards in {emptied}: its manifest lists none")
    no_val = tmp_path / "no-val"
    subprocess.run(["cp", "-r", str(data), str(no_val)], check=True)
    lost = no_val / json.loads((no_val / "manifest.json").read_text())["splits"]["val"]["shards"][0]["path"]
    lost.unlink()  # validated on too, at every evaluation
    cases["mixture source without its validation shard"] = (
        [*tiny_data, f"data.mixture=[{{dir: {data}}}, {{dir: {no_val}}}]"], f"val shards of {no_val} missing: {lost}")
    cases["mixture source of shard URLs missing"] = (
        [*tiny_data, f"data.mixture=[{{dir: {data}}}, {{shards: ['{tmp_path}/web-{{0..1}}.tar'], name: web}}]"],
        f"train shards of web missing: {tmp_path}/web-0.tar, {tmp_path}/web-1.tar")
    malformed = tmp_path / "malformed"
    subprocess.run(["cp", "-r", str(data), str(malformed)], check=True)
    manifest = json.loads((malformed / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = [shard["path"] for shard in manifest["splits"]["train"]["shards"]]
    (malformed / "manifest.json").write_text(json.dumps(manifest))
    cases["malformed manifest"] = ([*tiny_data, f"data.dir={malformed}", f"data.tokenizer={data / 'tokenizer'}"],
                                   f"{malformed / 'manifest.json'}: not a masktrain manifest (it needs splits.train "
                                   "and splits.val, each with a list of shards that have a path, and a whole number "
                                   "of bytes and a sha256 text where they record them); remove it, then run "
                                   "`masktrain data prepare` again")
    for name, (overrides, message) in cases.items():
        run = tmp_path / name.replace(" ", "-")
        result = run_cli("train", "smoke", *overrides, f"run.output_dir={run}")
        assert result.returncode == 1 and message in result.stderr, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and not run.exists(), name


def test_verify_finds_shards_cut_short_changed_or_missing_and_training_stops_on_them_under_strict(
        tiny_data, tmp_path, capsys):
    """A copy to a cluster's file system checked before a run of days: size and sha256 against the manifest."""
    from masktrain.data.inputs import check_ready, shard_contents
    from masktrain.launcher.loading import load_config

    data = tmp_path / "data"
    shutil.copytree(Path(next(o for o in tiny_data if o.startswith("data.dir=")).partition("=")[2]), data)
    manifest = json.loads((data / "manifest.json").read_text())
    train, val = manifest["splits"]["train"]["shards"], manifest["splits"]["val"]["shards"]
    assert len(train) >= 3
    for shard in train + val:
        assert shard["sha256"] == hashlib.sha256((data / shard["path"]).read_bytes()).hexdigest()

    def verify() -> tuple[int, list[str]]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["data", "verify", str(data), "--workers", "2"])
        return exit_.value.code, capsys.readouterr().out.splitlines()

    total = len(train) + len(val)
    size = sum(s["bytes"] for s in train + val)
    assert verify() == (0, [f"{data}: {total} of {total} shards as the manifest records them (size and sha256; "
                            f"{size:,} bytes)"])

    changed, cut, gone = (data / train[i]["path"] for i in range(3))
    payload = bytearray(changed.read_bytes())
    payload[2000] ^= 1
    changed.write_bytes(bytes(payload))
    cut.write_bytes(cut.read_bytes()[:-4096])
    cfg = load_config("smoke", [*tiny_data, f"data.dir={data}"])
    check_ready(cfg)  # not strict: said, and the run may start
    assert (f"1 shard(s) in {data} differ in size from what its manifest records, e.g. {cut} "
            f"({train[1]['bytes'] - 4096:,} bytes, {train[1]['bytes']:,} recorded)") in capsys.readouterr().err
    cfg.data.strict = True
    with pytest.raises(DataError, match=re.escape(f"{cut} ({train[1]['bytes'] - 4096:,} bytes")):
        check_ready(cfg)
    # Only the shards the run reads count: validation shards listed from elsewhere leave data.dir's val split alone.
    cut_val = data / val[0]["path"]
    cut_val.write_bytes(cut_val.read_bytes()[:-4096])
    cfg.data.strict, cfg.data.val_shards = False, [str(data / train[-1]["path"])]
    capsys.readouterr()
    check_ready(cfg)
    said = capsys.readouterr().err
    assert f"1 shard(s) in {data} differ in size" in said and str(cut_val) not in said  # the train shard alone

    gone.unlink()
    code, lines = verify()
    assert code == 1 and sorted(lines[:-1]) == sorted([
        f"{changed}: sha256 {hashlib.sha256(bytes(payload)).hexdigest()[:16]}..., the manifest records "
        f"{train[0]['sha256'][:16]}...: its bytes changed since it was written",
        f"{cut}: {train[1]['bytes'] - 4096:,} bytes, the manifest records {train[1]['bytes']:,}: cut short or "
        "changed since it was written",
        f"{cut_val}: {val[0]['bytes'] - 4096:,} bytes, the manifest records {val[0]['bytes']:,}: cut short or "
        "changed since it was written",
        f"{gone}: missing"])
    assert lines[-1].startswith(f"{data}: {total - 4} of {total} shards as the manifest records them")

    # Shards written before manifests recorded a sha256 are checked by size, and opened; a run's data position
    # recorded on such a manifest resumes on the same shards prepared again, which have one.
    contents = shard_contents(cfg, "train")
    for shard in train + val:
        del shard["sha256"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert shard_contents(cfg, "train") == contents
    code, lines = verify()
    assert code == 1 and len(lines) == 4 and sum("changed since" in line for line in lines) == 2
    assert any(line == f"{gone}: missing" for line in lines)
    assert lines[-1].endswith("(size only: the manifest records no sha256 (written before manifests did); "
                              f"{size:,} bytes)")
    for folder, said in ((tmp_path / "absent", "no such folder"), (data / "train", "no manifest.json, so not a dataset")):
        with pytest.raises(SystemExit):
            cli.main(["data", "verify", str(folder)])
        assert f"masktrain: {folder}: {said}" in capsys.readouterr().err
    # A record edited by hand is refused as a whole, not met by a traceback while the message is written.
    for field, value in (("bytes", "abc"), ("bytes", None), ("sha256", 5)):
        edited = json.loads(json.dumps(manifest))
        edited["splits"]["val"]["shards"][0][field] = value
        (data / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(SystemExit):
            cli.main(["data", "verify", str(data)])
        assert f"masktrain: {data / 'manifest.json'}: not a masktrain manifest" in capsys.readouterr().err
    for split in ("train", "val"):
        manifest["splits"][split]["shards"] = []
    (data / "manifest.json").write_text(json.dumps(manifest))
    code, lines = verify()
    assert code == 1 and lines == [f"{data / 'manifest.json'}: lists no shard"]  # and no "-1 of 0 shards"


def test_prepare_reuses_only_a_tokenizer_and_shards_that_belong_together(tmp_path):
    from masktrain.data.inputs import check_ready
    from masktrain.data.prepare import prepare
    from masktrain.data.reader import DataError
    from masktrain.launcher.loading import load_config
    from sentencepiece import sentencepiece_model_pb2

    root, logged = tmp_path / "data", []
    settings = ["data.prepare.max_docs=300", "data.prepare.vocab_size=400", f"data.dir={root}"]
    config = lambda *extra: load_config("smoke", [*settings, *extra])  # noqa: E731
    tok = root / "tokenizer"
    manifest = prepare(config(), log=logged.append)
    assert manifest["tokenizer_sha256"] == Tokenizer(tok).fingerprint()
    prepare(config("data.prepare.workers=1"), log=logged.append)  # threads change nothing that was built
    assert logged[-1].startswith(f"data: reusing {root}")
    with pytest.raises(SystemExit, match=r"other data.prepare settings \(data.prepare.val_fraction: 0.02 -> 0.1\)"):
        prepare(config("data.prepare.val_fraction=0.1"))

    # A prepare that died after the tokenizer: its tokenizer is reused only for the settings it was made with.
    (root / "manifest.json").unlink()
    with pytest.raises(SystemExit, match=f"{tok}: a tokenizer trained with other data.prepare settings"):
        prepare(config("data.prepare.vocab_size=500"))
    prepare(config("data.prepare.shard_bytes=100000"), log=logged.append)
    assert f"data: reusing the tokenizer in {tok}" in logged
    prepare(config("data.prepare.vocab_size=500", f"data.dir={tmp_path / 'other'}", f"data.tokenizer={tok}"),
            log=logged.append)
    assert f"data: using the tokenizer in {tok} (data.tokenizer)" in logged
    # data.tokenizer names a tokenizer to use: at a mistyped path, none is trained in its place.
    typo = tmp_path / "tokenzier"
    with pytest.raises(SystemExit, match=f"{typo / 'spm.model'}: missing \\(data.tokenizer\\); train one there"):
        prepare(config(f"data.dir={tmp_path / 'third'}", f"data.tokenizer={typo}"))
    assert not typo.exists() and not (tmp_path / "third").exists()
    # Settings that only train a tokenizer say nothing of shards cut with a given one (`data shards
    # --tokenizer` records their defaults): that tokenizer is compared by fingerprint instead.
    prepare(config("data.prepare.vocab_size=600", f"data.dir={tmp_path / 'other'}", f"data.tokenizer={tok}"),
            log=logged.append)
    assert logged[-1].startswith(f"data: reusing {tmp_path / 'other'}")

    # Another tokenizer of the same size maps ids to other pieces: both prepare and the pre-launch check refuse.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tok / "spm.model").read_bytes())
    proto.pieces[300].score -= 1
    original = (tok / "spm.model").read_bytes()
    (tok / "spm.model").write_bytes(proto.SerializeToString())
    with pytest.raises(SystemExit, match="were written with another tokenizer than"):
        prepare(config("data.prepare.shard_bytes=100000"))
    with pytest.raises(DataError, match="were written with another tokenizer than"):
        check_ready(config("data.prepare.shard_bytes=100000"))
    (tok / "spm.model").unlink()
    with pytest.raises(SystemExit, match=f"{tok / 'spm.model'}: missing, and the shards in {root} were written"):
        prepare(config("data.prepare.shard_bytes=100000"))
    (tok / "spm.model").write_bytes(original)
    check_ready(config("data.prepare.shard_bytes=100000"))


def test_a_prepare_killed_before_the_tokenizer_recipe_leaves_no_tokenizer_to_reuse(tmp_path, monkeypatch):
    """The model was written first and its recipe last: a prepare killed in between left a model that the next
    prepare, with other settings, reused unchecked (a model without a recipe may be one of before recipes)."""
    from masktrain.data import prepare
    from masktrain.launcher.loading import load_config

    def config(size: int):
        return load_config("smoke", ["data.prepare.max_docs=300", f"data.prepare.vocab_size={size}",
                                     f"data.dir={tmp_path}"])

    def killed(path, record):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(config(400), log=lambda text: None)
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["tokenizer"]
    monkeypatch.undo()
    logged = []
    prepare.prepare(config(500), log=logged.append)
    assert logged[0].startswith("data: trained a 500-piece") and len(Tokenizer(tmp_path / "tokenizer")) == 500
    assert not (tmp_path / "tokenizer" / ".writing").exists()


def test_prepare_refuses_a_data_folder_inside_an_input_folder(tmp_path):
    """It read its own tokenizer's JSON files back as documents, and its next run refused the folder: its
    manifest was a new input file."""
    from masktrain.data.prepare import prepare
    from masktrain.launcher.loading import load_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(f"document {n} is about the number {n}" for n in range(300)))
    for inputs in (corpus, corpus / "*"):
        config = load_config("smoke", [f"data.prepare.inputs=[{inputs}]", "data.prepare.vocab_size=400",
                                       f"data.dir={corpus / 'prepared'}"])
        (corpus / "prepared").mkdir(exist_ok=True)  # a glob matches it once it is there
        with pytest.raises(InputError, match=re.escape(f"{corpus / 'prepared'}: inside the input {inputs}, which")):
            prepare(config, log=lambda text: None)


def test_prepare_reads_inputs_kept_in_the_data_folder_but_not_what_it_wrote_there(tmp_path):
    """data.dir holding its raw text (`data.dir/raw`) was refused as 'inside the input', the wrong way round;
    a glob over data.dir would read the tokenizer prepare wrote there, and is refused."""
    from masktrain.data.prepare import prepare
    from masktrain.launcher.loading import load_config

    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "a.txt").write_text("\n\n".join(f"document {n} is about the number {n}" for n in range(300)))
    settings = ["data.prepare.vocab_size=400", f"data.dir={data}"]
    prepare(load_config("smoke", [f"data.prepare.inputs=[{data / 'raw'}]", *settings]), log=lambda text: None)
    assert (data / "manifest.json").is_file()
    with pytest.raises(InputError, match=re.escape(f"{data / '*'}: {data}/") + r"\S+ lies in"):
        prepare(load_config("smoke", [f"data.prepare.inputs=[{data / '*'}]", *settings]), log=lambda text: None)


def test_prepare_refuses_a_folder_whose_input_files_changed_since(tmp_path):
    from masktrain.data.prepare import prepare
    from masktrain.launcher.loading import load_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "\n\n".join(f"document {n} is about the number {n} and nothing else" for n in range(300))
    (corpus / "a.txt").write_text(text)
    logged = []
    config = load_config("smoke", [f"data.prepare.inputs=[{corpus}]", "data.prepare.vocab_size=400",
                                   f"data.dir={tmp_path / 'data'}"])
    assert prepare(config, log=logged.append)["input_sizes"] == {str(corpus / "a.txt"): len(text)}
    (corpus / "a.txt").write_text(text + "\n\nmore text appended later")
    (corpus / "b.txt").write_text("a new file")
    with pytest.raises(SystemExit, match=rf"prepared from other input files than there are now \({corpus}/a.txt: "
                                         rf"{len(text):,} -> {len(text) + 26:,} bytes; {corpus}/b.txt: new\)"):
        prepare(config)
    (corpus / "b.txt").unlink()
    (corpus / "a.txt").write_text(text)
    prepare(config, log=logged.append)
    # Prepared before a setting existed (here the tokenizer sample's character cap): it had the default.
    manifest_file = tmp_path / "data" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["recipe"]["prepare"]["tokenizer_sample_chars"]
    manifest_file.write_text(json.dumps(manifest))
    prepare(config, log=logged.append)
    assert logged[-1].startswith(f"data: reusing {tmp_path / 'data'}")
    # A tokenizer left by a prepare that stopped before its shards is reused only for the inputs it saw.
    for path in [manifest_file, *(tmp_path / "data").glob("*/*.tar")]:
        path.unlink()
    (corpus / "a.txt").write_text(text + "\n\nmore text appended later")
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'data' / 'tokenizer'}: a tokenizer trained on other input "
                                         rf"files than there are now \({corpus}/a.txt: {len(text):,} -> "):
        prepare(config)
    (corpus / "a.txt").write_text(text)
    prepare(config, log=logged.append)
    assert any(line == f"data: reusing the tokenizer in {tmp_path / 'data' / 'tokenizer'}" for line in logged)
    # Raw text removed once sharded: the shards are what training reads, so the folder is still used.
    shutil.rmtree(corpus)
    prepare(config, log=logged.append)
    assert logged[-1].startswith(f"data: reusing {tmp_path / 'data'}")


def test_rewriting_shards_leaves_no_shard_of_the_earlier_write_and_a_failed_rewrite_loses_nothing(
        inputs, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    many = build(inputs, tokenizer, out)
    few = build(inputs, tokenizer, out, "--shard-bytes", "1000000")
    assert len(many["splits"]["train"]["shards"]) > len(few["splits"]["train"]["shards"]) == 1

    def files() -> dict[str, bytes]:
        return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    assert sorted(files()) == ["manifest.json"] + [s["path"] for split in ("train", "val")
                                                   for s in few["splits"][split]["shards"]]
    before = files()

    def broken():
        yield from [("a document", np.arange(5))] * 3
        raise KeyboardInterrupt

    from masktrain.data.shards import write_dataset
    with pytest.raises(KeyboardInterrupt):
        write_dataset(broken(), out, 1000, 4096, 0.0)
    assert files() == before
    # A rerun that reads no document (JSON lines without the text field asked for) fails and keeps the folder.
    assert shards(str(inputs[0] / "json" / "c.jsonl"), "--tokenizer", str(tokenizer), "--out", str(out),
                  "--text-field", "text") == 1
    assert "no documents to train on" in capsys.readouterr().err
    assert files() == before


def test_a_split_folder_linked_to_another_file_system_is_written_and_rewritten_there(inputs, tokenizer, tmp_path):
    """Shards are staged inside the split folder, so their renames stay on its file system."""
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or elsewhere.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(f"no other file system than {tmp_path}'s at {elsewhere}")
    linked = tmp_path / "linked"
    linked.mkdir()
    target = Path(tempfile.mkdtemp(dir=elsewhere))
    try:
        (linked / "train").symlink_to(target)
        for _ in range(2):  # writing, then replacing
            manifest = build(inputs, tokenizer, linked)
            assert sorted(p.name for p in target.iterdir()) == sorted(
                Path(shard["path"]).name for shard in manifest["splits"]["train"]["shards"])
    finally:
        shutil.rmtree(target)


def test_shards_and_the_manifest_reach_the_disk_before_what_names_them(inputs, tokenizer, tmp_path, disk_journal):
    """A power loss keeps data and renames in any order unless an fsync comes between: the manifest must never be
    on disk over shards whose bytes or names are not, nor the earlier manifest over shards it does not list."""
    from masktrain.data.shards import staged

    out = (tmp_path / "out").resolve()
    build(inputs, tokenizer, out)
    disk_journal.clear()
    manifest = build(inputs, tokenizer, out, "--shard-bytes", "8192")  # replaces the first
    events = disk_journal
    published = events.index(("rename", f"{out}/manifest.json.new", f"{out}/manifest.json"))
    taken_out = events.index(("unlink", f"{out}/manifest.json"))
    # The new manifest is whole on disk before the earlier dataset is taken out: a disk too full for it stops there.
    written = events.index(("rename", f"{out}/manifest.json.new.tmp", f"{out}/manifest.json.new"))
    assert ("fsync", f"{out}/manifest.json.new.tmp") in events[:written]
    assert ("fsync", str(out)) in events[written:taken_out]
    first_removal = next(i for i, event in enumerate(events) if event[0] == "unlink" and "/shard-" in event[1])
    assert ("fsync", str(out)) in events[taken_out:first_removal]
    for split in ("train", "val"):
        renames = []
        for shard in manifest["splits"][split]["shards"]:
            written, final = str(staged(out, shard["path"])), str(out / shard["path"])
            renames.append(events.index(("rename", written, final)))
            assert ("fsync", written) in events[:renames[-1]], shard
        assert ("fsync", str(out / split)) in events[max(renames):published], split
    assert ("fsync", str(out)) in events[published:]


def test_a_new_tokenizer_reaches_the_disk_before_its_model_is_named(tmp_path, disk_journal):
    """prepare reuses a tokenizer folder's model by the recipe beside it: on disk, the earlier model is gone
    before a new recipe is there, and every new file is whole before the model names the folder a tokenizer."""
    out = (tmp_path / "tokenizer").resolve()
    settings = PrepareConfig(inputs=["builtin:python-docs"], max_docs=100, vocab_size=400, tokenizer_type="bpe")
    build_tokenizer(settings, out, seed=0, log=lambda text: None)
    disk_journal.clear()
    build_tokenizer(settings, out, seed=1, log=lambda text: None)
    events = disk_journal
    moves = [i for i, event in enumerate(events) if event[0] == "rename" and Path(event[2]).parent == out]
    model = events.index(("unlink", f"{out}/spm.model"))
    assert model < moves[0] and ("fsync", str(out)) in events[model:moves[0]]
    assert events[moves[-1]][2] == f"{out}/spm.model"
    for index in moves:
        staged_file = events[index][1]
        assert ("fsync", staged_file) in events[:index], staged_file
        assert ("fsync", str(out)) in events[index:index + 2], events[index:]
    assert sorted(Path(events[i][2]).name for i in moves) == sorted(p.name for p in out.iterdir())


def test_training_shards_given_without_validation_shards_mean_no_validation(tiny_data, tmp_path):
    from masktrain.data.inputs import check_ready, shard_urls
    from masktrain.launcher.loading import load_config

    data = Path(next(o for o in tiny_data if o.startswith("data.dir=")).partition("=")[2])
    overrides = [f"data.dir={tmp_path / 'no-manifest-here'}", f"data.tokenizer={data / 'tokenizer'}",
                 f"data.train_shards={data / 'train' / 'shard-000000.tar'}"]
    cfg = load_config("smoke", overrides)
    check_ready(cfg)
    assert shard_urls(cfg, "train") == [str(data / "train" / "shard-000000.tar")] and shard_urls(cfg, "val") == []
    cfg = load_config("smoke", [*overrides, f"data.val_shards={data / 'val' / 'shard-000000.tar'}"])
    assert shard_urls(cfg, "val") == [str(data / "val" / "shard-000000.tar")]


def test_an_unreadable_input_is_recorded_so_that_a_reuse_after_the_fix_is_refused(tmp_path):
    """Skipped and counted, it stayed missing for good: the folder's recorded sizes matched the next time."""
    (tmp_path / "a.txt").write_text("document a\n")
    (tmp_path / "b.txt").symlink_to(tmp_path / "b.dat")  # a broken link: unreadable, as a mode-000 file is
    pattern = str(tmp_path / "*.txt")
    stats = CorpusStats()
    assert list(documents([pattern], stats=stats)) == ["document a"]
    assert stats.skipped == {"unreadable file": 1}
    assert stats.first["unreadable file"].startswith(f"{tmp_path / 'b.txt'} ([Errno 2]")
    before = input_sizes([pattern])
    assert before == {str(tmp_path / "a.txt"): 11, str(tmp_path / "b.txt"): "unreadable"}
    (tmp_path / "b.dat").write_text("document b\n")
    assert input_changes(before, input_sizes([pattern])) == f"{tmp_path / 'b.txt'}: unreadable -> 11 bytes"


def test_ctrl_c_during_shards_is_one_line_and_leaves_the_folder_as_it_was(tokenizer, tmp_path):
    out = tmp_path / "out"
    assert shards("builtin:python-docs", "--max-docs", "50", "--tokenizer", str(tokenizer), "--out", str(out)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # Its text comes through a pipe that this test holds open, so the job cannot end before the signal comes,
    # however long this process waits for a core: the Python docs it read before, a few seconds' work, now and
    # then were done first under load. A glob names it, as a pipe is no regular file.
    text = tmp_path / "text"
    text.mkdir()
    os.mkfifo(text / "docs.txt")
    writer = os.open(text / "docs.txt", os.O_RDWR)  # O_RDWR: open without waiting for the job to open it
    try:
        os.write(writer, b"A document the job reads.\n\nAnd another, before it waits for more.\n")
        job = subprocess.Popen([MASKTRAIN, "data", "shards", str(text / "*.txt"), "--tokenizer", str(tokenizer),
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (out / "train" / ".writing").exists():  # writing the new shards
            assert job.poll() is None, job.communicate()
            time.sleep(0.01)
        job.send_signal(signal.SIGINT)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        os.close(writer)
    assert job.returncode == 130 and stderr.strip() == "masktrain: interrupted", stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_full_disk_while_writing_shards_is_one_line_naming_the_folder(tokenizer, tmp_path):
    """Its OSError names no file, and came as a traceback, then a second one from tarfile flushing the shard."""
    out = tmp_path / "out"
    job = subprocess.run([MASKTRAIN, "data", "shards", "builtin:python-docs", "--max-docs", "50", "--tokenizer",
                          str(tokenizer), "--out", str(out)], capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)))
    assert job.returncode == 1 and job.stderr == (f"masktrain: {out}: writing the shards failed ([Errno 27] File too "
                                                  "large); the folder is as it was\n"), job.stderr
    assert not list(out.rglob("*.tar"))


def test_a_disk_too_full_for_the_manifest_leaves_the_folder_as_it_was(inputs, tokenizer, tmp_path, capsys,
                                                                      monkeypatch):
    """The manifest is written before the earlier dataset is taken out: a full disk there lost that dataset and
    left no manifest, in a traceback."""
    from masktrain.data import shards as shards_module

    out = tmp_path / "out"
    build(inputs, tokenizer, out)
    before = {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards_module, "write_json", full)
    assert shards(*inputs[1], "--tokenizer", str(tokenizer), "--out", str(out), "--text-field", "body",
                  "--shard-bytes", "8192") == 1
    assert capsys.readouterr().err == (f"masktrain: {out}: writing the manifest failed ([Errno 28] No space left on "
                                       "device); the folder is as it was\n")
    assert {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} \
        == before


def test_a_file_replaced_whole_is_left_as_it_was_by_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    path.write_text("before")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_atomic(path, "after")
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"] and path.read_text() == "before"


def test_a_text_file_of_one_document_per_line_is_pointed_out(tokenizer, tmp_path, capsys):
    """Read as one document (plain text separates them by blank lines), it would go whole to train or to
    validation: kept, and said."""
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"sentence number {n} of the file\n" for n in range(10_001)))
    assert shards(str(lines), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")) == 0
    assert (f"documents of more than 10,000 lines in {lines} (10,001 lines): plain-text documents are separated "
            "by blank lines; for one document per line, write JSON lines (.jsonl)") in capsys.readouterr().out


def test_each_other_mixture_source_is_validated_on_under_its_name(tiny_data, tmp_path, monkeypatch):
    """data.dir's split is `val`; another folder's is `val/<its name>` (as resolved: `.` has one too), or
    `val/source<i>` by its place in the mixture when two share a name; one without a split is not validated.
    Shards listed by URL are validated on with their val_shards, under their `name` or by place."""
    from masktrain.data.inputs import validation_splits
    from masktrain.launcher.loading import load_config

    data = Path(next(o for o in tiny_data if o.startswith("data.dir=")).partition("=")[2])
    for folder in ("a/books", "b/books", "other", "none"):
        shutil.copytree(data, tmp_path / folder)
    manifest = json.loads((tmp_path / "none" / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = []
    (tmp_path / "none" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path / "other")
    folders = ", ".join(f"{{dir: {folder}}}" for folder in (data, tmp_path / "a/books", "../b/books", ".", "../none"))
    listed = "{shards: [w.tar], val_shards: [v.tar], name: web}, {shards: [x.tar], val_shards: [y.tar]}, {shards: [z.tar]}"
    cfg = load_config("smoke", [*tiny_data, f"data.mixture=[{folders}, {listed}]"])
    splits = validation_splits(cfg)
    assert [prefix for prefix, _ in splits] == ["val", "val/source1", "val/source2", "val/other", "val/web",
                                                "val/source6"]
    copied = json.loads((data / "manifest.json").read_text())
    assert splits[0][1] is None and splits[3][1] == split_urls(tmp_path / "other", copied, "val")  # those of `other`
    assert splits[4][1] == ["v.tar"] and splits[5][1] == ["y.tar"]
