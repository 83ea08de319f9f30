"""The grounding models' word vocabulary and tokeniser.

The vocabulary is every word of the Charades-STA test queries
(`shared/data/charades_sta_test.json`), most frequent first, after `<pad>` and
`<unk>`. It is committed as `exporters/data/charades_sta_vocab.txt` and copied
into each grounding artifact, whose embedding table is indexed by it; the
gateway tokenises with the same pattern (the contract records both).

    python -m exporters.vocab ../shared/data/charades_sta_test.json > exporters/data/charades_sta_vocab.txt
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

TOKEN_PATTERN = r"[a-z0-9]+(?:'[a-z]+)?"
PAD, UNK = "<pad>", "<unk>"
VOCAB_FILE = Path(__file__).parent / "data" / "charades_sta_vocab.txt"


def tokenize(sentence: str) -> list[str]:
    return re.findall(TOKEN_PATTERN, sentence.lower())


def build_vocabulary(sentences: Iterable[str]) -> list[str]:
    counts = Counter(word for s in sentences for word in tokenize(s))
    return [PAD, UNK, *sorted(counts, key=lambda w: (-counts[w], w))]


def charades_sentences(annotations: Path) -> list[str]:
    data = json.loads(annotations.read_text())
    return [s for video in data.values() for s in video["sentences"]]


def load_vocabulary(path: Path = VOCAB_FILE) -> list[str]:
    return path.read_text().splitlines()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m exporters.vocab CHARADES_STA_JSON", file=sys.stderr)
        return 2
    sys.stdout.write("\n".join(build_vocabulary(charades_sentences(Path(argv[0])))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
