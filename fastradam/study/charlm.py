"""The character-level language-model task: Python's own source text and a small MLP language model.

The text ships with every Python: the source files of a fixed list of standard-library modules
(:data:`MODULES`), concatenated, cut to :data:`CHARACTERS` characters. It changes only when
those files change between Python versions; :func:`corpus_digest` names the exact text a run
used. The model reads the previous :data:`CONTEXT` characters and predicts the next one
(Bengio et al. 2003's MLP language model), so it fits the study's classification interface:
inputs are int64 windows, targets the next character's index.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import string

import torch
from torch import nn

from fastradam.study.tasks import Split, Task

#: Standard-library modules whose source is the text, in order.
MODULES = ("textwrap", "heapq", "bisect", "fractions", "colorsys", "calendar", "difflib", "statistics")
#: Characters of text used (the first ones of the concatenation).
CHARACTERS = 120_000
#: Every tenth block of this many characters is the test split; the rest is training text.
BLOCK = 2_000
#: Characters of context the model reads.
CONTEXT = 12
#: The alphabet: printable ASCII (with newline and tab); anything else reads as "?".
ALPHABET = "".join(sorted(set(string.printable) - {"\x0b", "\x0c", "\r"}))


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """The text: the sources of :data:`MODULES`, characters outside :data:`ALPHABET` as ``?``."""
    text = "".join(inspect.getsource(importlib.import_module(name)) for name in MODULES)[:CHARACTERS]
    known = set(ALPHABET)
    return "".join(c if c in known else "?" for c in text)


def corpus_digest() -> str:
    """The first 12 hex digits of the text's SHA-256 (names the exact text in a report)."""
    return hashlib.sha256(corpus().encode()).hexdigest()[:12]


def _windows(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (CONTEXT characters, next character) pair inside one block of character codes."""
    x = codes.unfold(0, CONTEXT + 1, 1)
    return x[:, :CONTEXT].contiguous(), x[:, CONTEXT].contiguous()


@functools.lru_cache(maxsize=1)
def load_charlm_split() -> Split:
    """Windows of the text, a fixed split by blocks: every tenth block of :data:`BLOCK` characters
    is test, the others train (no window crosses a block boundary)."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    codes = torch.tensor([index[c] for c in corpus()], dtype=torch.int64)
    parts: dict[bool, list[tuple[torch.Tensor, torch.Tensor]]] = {True: [], False: []}
    for k, start in enumerate(range(0, len(codes) - CONTEXT, BLOCK)):
        parts[k % 10 == 9].append(_windows(codes[start:start + BLOCK]))
    x_train, y_train = (torch.cat(t) for t in zip(*parts[False]))
    x_test, y_test = (torch.cat(t) for t in zip(*parts[True]))
    return Split(x_train, y_train, x_test, y_test)


class CharMLP(nn.Module):
    """Embed each of the :data:`CONTEXT` characters (16 wide), concatenate, one hidden layer
    (192, tanh), logits over :data:`ALPHABET` (~60k parameters)."""

    def __init__(self, embedding: int = 16, hidden: int = 192) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET), embedding)
        self.hidden = nn.Linear(CONTEXT * embedding, hidden)
        self.out = nn.Linear(hidden, len(ALPHABET))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(x).flatten(1))))


CHARLM = Task(
    title="a character-level language model",
    data_note=f"the source text of Python's `{'`, `'.join(MODULES)}` modules, the first {CHARACTERS:,} "
    f"characters, {len(ALPHABET)} symbols (printable ASCII, others as `?`); each window of {CONTEXT} "
    f"characters predicts the next; every tenth block of {BLOCK:,} characters is the test split",
    model_note=f"an MLP language model (embedding 16 per character, {CONTEXT} characters, tanh hidden "
    "layer 192, logits over the alphabet)",
    load=load_charlm_split,
    make_model=CharMLP,
)
