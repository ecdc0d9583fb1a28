"""Reading answers out of text: completions (boxed, ``<answer>`` tags, the last number) and gold
references (GSM8K's ``#### N``, MATH's ``\\boxed{}`` inside a worked solution).

Extraction is explicit and ordered (``make_extractor(("boxed", "answer_tag"))``): the first
extractor that finds something wins, and a completion where none does has no answer. "The last
number" is a fallback a config must ask for: a model that has not learnt the answer format
would otherwise be credited for any number it happens to write last.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

Extractor = Callable[[str], "str | None"]

_BOXED_RE = re.compile(r"\\boxed\s*\{")


def _top_level_boxes(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, content)`` of each outermost ``\\boxed{...}``, left to right.

    Braces are counted so ``\\boxed{\\frac{1}{2}}`` yields ``\\frac{1}{2}``; a backslash escapes
    the next character, so ``\\{`` and ``\\}`` (set braces) do not count. An unclosed box is
    not a box.
    """
    boxes = []
    pos = 0
    while True:
        m = _BOXED_RE.search(text, pos)
        if m is None:
            return boxes
        depth, i = 1, m.end()
        while i < len(text) and depth > 0:
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            i += 1
        if depth != 0:
            # Unclosed: its text may still hold a later, well-formed box.
            pos = m.end()
            continue
        boxes.append((m.start(), i, text[m.end():i - 1]))
        pos = i


def count_boxes(text: str) -> int:
    """Number of non-empty outermost boxes (a box nested in a box counts once)."""
    return sum(1 for _, _, b in _top_level_boxes(text) if b.strip()) if isinstance(text, str) else 0


def extract_boxed(text: str) -> str | None:
    """Content of the last outermost ``\\boxed{...}`` in ``text``, or None if there is none.

    Nested braces are handled (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``) and a box that only
    wraps another box is unwrapped (``\\boxed{\\boxed{3}}`` -> ``3``).
    """
    if not isinstance(text, str):
        return None
    boxes = _top_level_boxes(text)
    if not boxes:
        return None
    content = boxes[-1][2].strip()
    inner = _top_level_boxes(content)
    while len(inner) == 1 and inner[0][0] == 0 and inner[0][1] == len(content):
        content = inner[0][2].strip()
        inner = _top_level_boxes(content)
    return content


_ANSWER_TAG_RE = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def extract_answer_tag(text: str) -> str | None:
    """The last ``<answer>...</answer>`` (reasoning-gym's and DeepSeek-R1's convention)."""
    if not isinstance(text, str):
        return None
    tags = _ANSWER_TAG_RE.findall(text)
    return tags[-1].strip() if tags else None


def extract_answer(completion: str) -> str | None:
    """The last ``<answer>...</answer>``, else the last box (reasoning-gym's reading order)."""
    tag = extract_answer_tag(completion)
    return tag if tag is not None else extract_boxed(completion)


# A number as people write it: sign, thousands commas (only in groups of three, so "1,2,3"
# stays three numbers), decimals, a fraction bar.
_NUMBER_RE = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed (``"1,234.5"`` -> ``"1234.5"``)."""
    if not isinstance(text, str):
        return None
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(",", "").replace("−", "-").lstrip("+") if found else None


EXTRACTORS: dict[str, Extractor] = {
    "boxed": extract_boxed,
    "answer_tag": extract_answer_tag,
    "last_number": extract_last_number,
}


def make_extractor(order: str | Sequence[str]) -> Extractor:
    """An extractor trying ``order`` (names from ``EXTRACTORS``) in turn; the first hit wins."""
    names = (order,) if isinstance(order, str) else tuple(order)
    unknown = [n for n in names if n not in EXTRACTORS]
    if not names or unknown:
        raise ValueError(f"answer extractors must be a non-empty list of {sorted(EXTRACTORS)}, got {list(names)}: "
                         'e.g. answer_extractors = ["boxed", "answer_tag", "last_number"]')
    fns = [EXTRACTORS[n] for n in names]

    def extract(text: str) -> str | None:
        for fn in fns:
            found = fn(text)
            if found is not None and found.strip():
                return found.strip()
        return None

    extract.__name__ = "extract_" + "_or_".join(names)
    return extract


# --- gold references ------------------------------------------------------------------------

_GSM8K_FINAL_RE = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_GSM8K_CALC_RE = re.compile(r"<<[^<>]*>>")


def gold_answer(reference: str) -> str:
    """The final answer inside a reference: GSM8K's ``#### 72`` -> ``72`` (commas dropped),
    a worked solution's last ``\\boxed{}`` (MATH), otherwise the stripped text itself."""
    if not isinstance(reference, str):
        reference = str(reference)
    m = _GSM8K_FINAL_RE.search(reference)
    if m is not None:
        final = m.group(1).strip()
        return final.replace(",", "") if re.fullmatch(r"[-+]?[\d,]+(?:\.\d+)?", final) else final
    boxed = extract_boxed(reference)
    return boxed if boxed is not None else reference.strip()


def worked_solution(reference: str, answer: str) -> str:
    """A reference turned into a few-shot reply that ends the way the reward reads answers:
    GSM8K's calculator notes (``<<48/2=24>>``) dropped and ``#### N`` replaced by a boxed
    sentence; a reference that already boxes its answer as it is; a bare answer boxed."""
    text = reference if isinstance(reference, str) else str(reference)
    if _GSM8K_FINAL_RE.search(text):
        body = _GSM8K_CALC_RE.sub("", _GSM8K_FINAL_RE.sub("", text)).strip()
        return (body + "\n" if body else "") + f"The answer is \\boxed{{{answer}}}."
    if extract_boxed(text) is not None:
        return text.strip()
    return f"The answer is \\boxed{{{answer}}}."
