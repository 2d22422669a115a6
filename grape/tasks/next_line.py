"""Items of the "which line comes next" multiple-choice task, built from plain text.

An item shows a few consecutive lines of a held-out document and asks which of several
candidate lines really follows them. The wrong candidates are real lines from far away in the
same text (or from another document), so every candidate is fluent text of the same kind and
only the context tells them apart. This is the closest analogue of the zero-shot
multiple-choice tasks pruning papers report (HellaSwag, PIQA, ...) that can be built offline
from text every machine has: a model that lost knowledge of code or documentation structure
picks the real continuation less often.

Choices that differ only in indentation would give the answer away, so every candidate is
stripped and the context ends with the newline and the *true* line's indentation: all
candidates are scored in the same position. Lines that are too short to say anything (``)``,
``else:``) or too long are not used as targets or distractors, and a target whose text already
occurs in its context is skipped (copying it would be enough).

Everything is drawn from one ``random.Random(seed)``, whose integer seeding and
``sample``/``shuffle`` are stable across Python versions, so the same text and seed give the
same items on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["NextLineSpec", "next_line_items"]


@dataclass(frozen=True)
class NextLineSpec:
    """How items are cut.

    Attributes:
        num_items: items to draw (fewer if the text does not have that many eligible lines).
        num_choices: candidates per item, the real line included.
        context_lines: lines of context before the target.
        min_chars, max_chars: length bounds of eligible (stripped) lines.
        min_distance: distractors come from at least this many lines away (or another document).
    """

    num_items: int = 500
    num_choices: int = 4
    context_lines: int = 6
    min_chars: int = 12
    max_chars: int = 100
    min_distance: int = 200

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.num_choices < 2 or self.context_lines < 1:
            raise ValueError(f"need num_items >= 1, num_choices >= 2, context_lines >= 1; got {self}")
        if not 0 < self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 < min_chars <= max_chars; got {self}")


def _eligible(text: str, spec: NextLineSpec) -> bool:
    return spec.min_chars <= len(text) <= spec.max_chars


def next_line_items(documents: Sequence[str], spec: NextLineSpec | None = None, *, seed: int = 0) -> list[dict]:
    """Items ``{"context", "choices", "label"}`` from ``documents`` (see module docs; default spec if None).

    Raises:
        ValueError: the documents hold no line that can be a target with enough distractors.
    """
    spec = spec or NextLineSpec()
    lines: list[tuple[int, int, str]] = []  # (document, line number, raw line)
    for doc, text in enumerate(documents):
        lines.extend((doc, number, raw.rstrip()) for number, raw in enumerate(text.splitlines()))
    stripped = [raw.strip() for _, _, raw in lines]
    pool = [i for i, text in enumerate(stripped) if _eligible(text, spec)]
    targets = []
    for i in pool:
        doc, number, _ = lines[i]
        if number < spec.context_lines or lines[i - spec.context_lines][0] != doc:
            continue
        context = stripped[i - spec.context_lines : i]
        if sum(1 for c in context if c) >= 2 and stripped[i] not in context:
            targets.append(i)
    rng = random.Random(seed)
    # In draw order, not text order: lm-eval's ``limit`` then takes a uniform random subset.
    chosen = rng.sample(targets, min(spec.num_items, len(targets)))
    items = []
    for i in chosen:
        doc, number, raw = lines[i]
        answer = stripped[i]
        context_raw = [line for _, _, line in lines[i - spec.context_lines : i]]
        context_text = set(stripped[i - spec.context_lines : i])
        distractors: list[str] = []
        for _ in range(100 * spec.num_choices):
            j = pool[rng.randrange(len(pool))]
            far = lines[j][0] != doc or abs(j - i) >= spec.min_distance
            text = stripped[j]
            if far and text != answer and text not in distractors and text not in context_text:
                distractors.append(text)
                if len(distractors) == spec.num_choices - 1:
                    break
        if len(distractors) < spec.num_choices - 1:
            continue
        choices = [answer, *distractors]
        rng.shuffle(choices)
        indent = raw[: len(raw) - len(raw.lstrip())]
        items.append({"context": "\n".join(context_raw) + "\n" + indent, "choices": choices, "label": choices.index(answer)})
    if not items:
        raise ValueError(
            f"the text has no line usable as a next-line item ({len(pool)} eligible lines, {len(targets)} with context)"
        )
    return items
