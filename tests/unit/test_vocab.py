from __future__ import annotations

from pathlib import Path

from exporters.vocab import PAD, UNK, build_vocabulary, charades_sentences, load_vocabulary, tokenize


def test_tokenize() -> None:
    assert tokenize("A person's holding a cup, then drinks 2 sips.") == [
        "a",
        "person's",
        "holding",
        "a",
        "cup",
        "then",
        "drinks",
        "2",
        "sips",
    ]
    assert tokenize("   ") == []


def test_committed_vocabulary_is_rebuilt_from_charades(shared: Path) -> None:
    sentences = charades_sentences(shared / "data" / "charades_sta_test.json")
    assert len(sentences) == 3720
    assert build_vocabulary(sentences) == load_vocabulary()


def test_vocabulary_starts_with_pad_and_unk() -> None:
    vocab = load_vocabulary()
    assert vocab[:2] == [PAD, UNK]
    assert len(vocab) == len(set(vocab))
    assert "person" in vocab
