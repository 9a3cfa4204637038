"""`masktrain data tokenizer`: a sentencepiece model plus Hugging Face files that
`transformers.AutoTokenizer` loads and that encode text exactly as sentencepiece does."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import run_cli
from masktrain.data.tokenizer import SPECIAL_TOKENS, Tokenizer

# Whitespace runs, tabs and new lines, byte-fallback characters, digits (split one by one) and runs of one
# character (equal-score segmentations, where sentencepiece and Hugging Face could break ties differently).
SAMPLES = [
    "Hello, world!",
    "  leading spaces, trailing ones  and   runs of   them",
    "tabs\tand\nnew lines\n\nare kept",
    "Unicode: naïve café, Straße, Ελληνικά, 中文字符, emoji 🚀🎉",
    "digits 1234567890 and 3.14159",
    "====== ****** ------ ______",
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

    sp, hf = Tokenizer(out), AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == len(sp) <= 600
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS.values())) == list(range(len(SPECIAL_TOKENS)))
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 4, 5, 6)

    texts = SAMPLES + corpus.read_text().split("\n\n")[:400]
    for text in texts:
        ids = sp.encode([text])[0].tolist()
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:200]
        assert hf.decode(ids) == sp.decode(ids) == text, text[:200]

    # The templates the objectives train with: [CLS] text [SEP] for encoders, <s> text for decoders.
    ids = sp.encode([SAMPLES[0]])[0].tolist()
    sp.save_hf(tmp_path / "encoder", template="encoder")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "encoder"))(SAMPLES[0])["input_ids"] == [4, *ids, 5]
    sp.save_hf(tmp_path / "decoder", template="decoder")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "decoder"))(SAMPLES[0])["input_ids"] == [2, *ids]


def test_bad_settings_are_refused_naming_the_key(corpus, tmp_path):
    result = run_cli("data", "tokenizer", str(corpus), "--out", str(tmp_path / "t"), "--vocab-size", "10",
                     "--tokenizer-type", "wordpiece")
    assert result.returncode == 2
    assert "data.prepare.vocab_size: must be at least 64, got 10" in result.stderr
    assert "data.prepare.tokenizer_type: unknown value 'wordpiece'; valid: bpe, unigram" in result.stderr
    assert not (tmp_path / "t").exists()
