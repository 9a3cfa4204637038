"""`masktrain data tokenizer`: a sentencepiece model plus Hugging Face files that
`transformers.AutoTokenizer` loads and that encode text exactly as sentencepiece does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import run_cli
from masktrain.data.tokenizer import MAX_PIECE_INPUT, SPECIAL_TOKENS, Tokenizer, training_lines

# Whitespace runs, tabs and new lines, byte-fallback characters, digits (split one by one) and runs of one
# character (equal-score segmentations, where sentencepiece and Hugging Face could break ties differently).
SAMPLES = [
    "Hello, world!",
    "  leading spaces, trailing ones  and   runs of   them",
    "tabs\tand\nnew lines\n\nare kept",
    "Unicode: naïve café, Straße, Ελληνικά, 中文字符, emoji 🚀🎉",
    "digits 1234567890 and 3.14159",
    "====== ****** ------ ______",
    # A byte piece's spelling is text to sentencepiece, which uses byte pieces only for what it cannot spell.
    "bytes <0x41> and <0x0A> spelled out",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_text("\n\n".join([topics[name].strip() for name in sorted(topics)] + SAMPLES[:-1]) + "\n")
    return path


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_autotokenizer_loads_the_folder_and_encodes_exactly_like_sentencepiece(corpus, tmp_path, kind):
    out = tmp_path / "tokenizer"
    run_cli("data", "tokenizer", str(corpus), "--out", str(out), "--vocab-size", "600", "--tokenizer-type", kind,
            "--seed", "3", check=True)
    assert {"spm.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    # The class name transformers 4 knows too (5 writes "TokenizersBackend", which 4 cannot load).
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    sp, hf = Tokenizer(out), AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == len(sp) <= 600
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS.values())) == list(range(len(SPECIAL_TOKENS)))
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 4, 5, 6)

    texts = SAMPLES + corpus.read_text().split("\n\n")[:400]
    for text in texts:
        ids = sp.encode([text])[0].tolist()
        # Text that begins with a space is the exception: sentencepiece prefixes a lone "\u2581" even there.
        lone_prefix = int(text.startswith(" "))
        assert not lone_prefix or sp.sp.id_to_piece(ids[0]) == "\u2581"
        assert hf(text, add_special_tokens=False)["input_ids"] == ids[lone_prefix:], text[:200]
        assert hf.decode(ids) == sp.decode(ids) == text, text[:200]

    # Fill-mask: "[MASK]" in text stands where a word was, as training put it, before a space or punctuation.
    def tail(text: str) -> list[int]:
        """The ids of `text` as it encodes after a word."""
        return sp.encode(["Z" + text])[0].tolist()[len(sp.encode(["Z"])[0]):]

    assert hf("Iterate over the [MASK] of a sequence.", add_special_tokens=False)["input_ids"] == [
        *sp.encode(["Iterate over the"])[0].tolist(), sp.mask_id, *tail(" of a sequence.")]
    assert hf("[MASK] is [MASK].", add_special_tokens=False)["input_ids"] == [
        sp.mask_id, *tail(" is"), sp.mask_id, *tail(".")]
    # It takes the one space a word holds, no more: a newline, a tab or a second space before it stay.
    assert hf("a\n\t[MASK]\nb", add_special_tokens=False)["input_ids"] == [
        *sp.encode(["a\n\t"])[0].tolist(), sp.mask_id, *tail("\nb")]
    assert hf("a  [MASK] b", add_special_tokens=False)["input_ids"] == [
        *sp.encode(["a "])[0].tolist(), sp.mask_id, *tail(" b")]

    # The templates the objectives train with: [CLS] text [SEP] for encoders, <s> text for decoders.
    ids = sp.encode([SAMPLES[0]])[0].tolist()
    sp.save_hf(tmp_path / "encoder", template="encoder")
    encoder = AutoTokenizer.from_pretrained(str(tmp_path / "encoder"))
    assert encoder(SAMPLES[0])["input_ids"] == [4, *ids, 5]
    # The models have one token type: none is returned (transformers 4 did, which a decoder's generate()
    # refuses), and a pair's second text, asked for, is type 0 too (1 indexed past the model's table).
    assert set(encoder("a question", "an answer")) == {"input_ids", "attention_mask"}
    assert set(encoder("a question", "an answer", return_token_type_ids=True)["token_type_ids"]) == {0}
    sp.save_hf(tmp_path / "decoder", template="decoder")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "decoder"))(SAMPLES[0])["input_ids"] == [2, *ids]


def test_bad_settings_are_refused_naming_the_key(corpus, tmp_path):
    result = run_cli("data", "tokenizer", str(corpus), "--out", str(tmp_path / "t"), "--vocab-size", "10",
                     "--tokenizer-type", "wordpiece")
    assert result.returncode == 2
    assert "data.prepare.vocab_size: must be at least 263 (256 byte pieces and the special tokens), got 10" in result.stderr
    assert "data.prepare.tokenizer_type: unknown value 'wordpiece'; valid: bpe, unigram" in result.stderr
    assert not (tmp_path / "t").exists()


def test_a_vocabulary_too_small_for_the_corpus_and_a_model_that_is_no_tokenizer_are_one_line_errors(corpus,
                                                                                                  tmp_path):
    result = run_cli("data", "tokenizer", str(corpus), "--out", str(tmp_path / "t"), "--vocab-size", "270")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"vocab_size 270 \(data.prepare.vocab_size\) is below the \d+ pieces these documents need",
                     result.stderr)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "spm.model").write_bytes(b"not a model")
    result = run_cli("data", "shards", str(corpus), "--tokenizer", str(tmp_path / "bad"), "--out", str(tmp_path / "s"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'bad' / 'spm.model'}: not a readable sentencepiece model" in result.stderr


def test_the_same_recipe_gives_the_same_tokenizer_whatever_the_thread_count(corpus, tmp_path, monkeypatch):
    models = []
    for workers in ("1", "2"):
        out = tmp_path / workers
        run_cli("data", "tokenizer", str(corpus), "--out", str(out), "--vocab-size", "600", "--workers", workers,
                check=True)
        models.append((out / "spm.model").read_bytes())
    assert models[0] == models[1]
    # Nor the machine's cores: sentencepiece's result depends on its thread count, which they must not set.
    from masktrain.data.prepare import build_tokenizer
    from masktrain.launcher.config import PrepareConfig

    built = []
    for cores in (1, 64):
        monkeypatch.setattr("os.cpu_count", lambda: cores)
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
        out = tmp_path / f"cores-{cores}"
        build_tokenizer(PrepareConfig(inputs=[str(corpus)], vocab_size=600), out, seed=3, log=lambda text: None)
        built.append((out / "spm.model").read_bytes())
    assert built[0] == built[1]


def test_the_tokenizer_sample_is_drawn_from_every_input_not_the_first_files(tmp_path):
    from masktrain.data.prepare import build_tokenizer
    from masktrain.launcher.config import PrepareConfig

    (tmp_path / "a.txt").write_text("\n\n".join(f"plain words of document {i} in the first file" for i in range(400)))
    (tmp_path / "b.txt").write_text("\n\n".join(f"zyzzyva quixotry zyzzyva {i}" for i in range(400)))
    settings = PrepareConfig(inputs=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], vocab_size=400,
                             tokenizer_sample_docs=200)
    logged = []
    tokenizer = build_tokenizer(settings, tmp_path / "tok", seed=0, log=logged.append)
    assert "on 200 of 800 documents" in logged[0]
    # Characters only the second file holds are pieces, not byte fallbacks.
    assert all(tokenizer.sp.piece_to_id(char) != tokenizer.unk_id for char in "zyvqx")


def test_a_sample_is_uniform_seeded_and_keeps_input_order_when_it_holds_everything():
    from masktrain.data.tokenizer import sample_documents

    docs = [f"a{i}" for i in range(1000)] + [f"b{i}" for i in range(1000)]
    sample = sample_documents(iter(docs), 400, seed=1)
    assert len(sample) == len(set(sample)) == 400 and set(sample) <= set(docs)
    assert 160 < sum(d.startswith("b") for d in sample) < 240
    assert sample == sample_documents(docs, 400, seed=1) != sample_documents(docs, 400, seed=2)
    assert sample_documents(docs[:300], 400, seed=1) == docs[:300]
    # A cap on characters shrinks the sample: documents from both halves, the cap kept; the same sample when it
    # does not bind. One long document early on does not shrink it to nothing.
    capped = sample_documents(iter(docs), 400, seed=1, max_chars=1000)
    assert sum(map(len, capped)) <= 1000 and 200 < len(capped) < 400 and len(set(capped)) == len(capped)
    assert 0.3 < sum(d.startswith("b") for d in capped) / len(capped) < 0.7
    assert sample_documents(docs, 400, seed=1, max_chars=10**9) == sample
    long_first = sample_documents(["x" * 1500, *docs], 400, seed=1, max_chars=1000)
    assert "x" * 1500 not in long_first and 200 < len(long_first) < 400
    assert sample_documents(["x" * 1500, "y" * 2000], 5, seed=1, max_chars=1000) == ["x" * 1000]


def test_long_lines_reach_the_tokenizer_trainer_in_order_in_pieces_it_keeps():
    """A 200 MB line (one document without newlines) once took hours here; each piece is cut by index now."""
    line = "".join(f"word{i} " for i in range(400_000))
    pieces = list(training_lines([f"  {line}\nshort line\n\n"]))
    assert "".join(pieces[:-1]) == line.strip() and pieces[-1] == "short line"
    assert all(0 < len(piece) <= MAX_PIECE_INPUT for piece in pieces)


def test_ctrl_c_stops_tokenizer_training_without_waiting_for_it(tmp_path, monkeypatch):
    """Sentencepiece trains in C++ for minutes on a large sample, during which the main thread runs no bytecode
    and so never takes a Ctrl-C. A sleep stands in for it (both release the GIL); interrupt_main delivers Ctrl-C
    as the signal handler does, at the main thread's next bytecode."""
    import _thread
    import threading
    import time

    import sentencepiece as spm

    from masktrain.data.tokenizer import train_tokenizer

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda **settings: time.sleep(10))
    threading.Timer(0.3, _thread.interrupt_main).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(["some text"], tmp_path / "tok")
    assert time.monotonic() - started < 5  # not the 10 s the training takes
    assert not (tmp_path / "tok" / "spm.model").exists()
