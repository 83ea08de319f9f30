"""The zoo's model names, in the zoo's order, without torch: the commands refuse an unknown name before they import
torch, which takes seconds. tests/unit/test_zoo.py checks the list against the zoo's models."""

from __future__ import annotations

from .errors import UnknownModel

MODEL_NAMES = (
    "face-pros",
    "frontalize-dalgan",
    "grounding-mgsl",
    "grounding-ssrn",
    "grounding-ecrl",
    "grounding-dscnet",
    "grounding-mhst",
    "lns-organs",
    "lns-stations",
    "crowd-csrnet",
)


def known(name: str) -> str:
    """`name`, or UnknownModel naming the models there are."""
    if name not in MODEL_NAMES:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return name
