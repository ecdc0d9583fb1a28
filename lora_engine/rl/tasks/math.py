"""Math problems from local data: ``task = "math:PATH"``.

PATH is a JSONL, JSON (a list of records), parquet or CSV file, or a folder written by
``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose ``train`` split is
trained on and whose ``test`` split, if any, is held out). Files are read with Hugging Face
``datasets`` from disk only (no hub).

Fields, with defaults that fit GSM8K, MATH and most of their derivatives (override with
``task_options``: ``question_field``, ``answer_field``, ``solution_field``):

- question: the first of ``question``, ``problem``, ``prompt``;
- answer: the first of ``answer``, ``solution``, ``gold``; the gold is read out of it, so
  GSM8K's ``"...#### 72"`` gives ``72`` and a MATH worked solution gives its last ``\\boxed{}``;
- solution (worked reasoning for few-shot turns): the first of ``solution``, ``answer``.

Held-out problems: ``eval_data`` (another path, same formats and fields), else the data's own
``test`` split, else a fixed split of the questions by a seeded hash (``task_options.eval_fraction``
of them, 0.1 by default). ``eval_data = "champ"`` holds out the 270 competition problems of
``champ-dataset`` (MIT) when that package is installed.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lora_engine.rl.answers import gold_answer
from lora_engine.rl.tasks.base import EVAL_FRACTION, DataTask, check_fraction, in_eval_split

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution", "gold")
SOLUTION_FIELDS = ("solution", "answer")
OPTIONS = ("question_field", "answer_field", "solution_field", "split", "eval_split", "eval_fraction")


def read_table(path: str | Path, split: str | None = None):
    """A ``datasets.Dataset`` from a local file or ``save_to_disk`` folder; a ``DatasetDict``
    folder gives ``split`` (default ``train``)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"math data {str(path)!r} does not exist: give a local JSONL, JSON, parquet or CSV file "
                         "or a save_to_disk folder (no hub downloads)")
    try:
        import datasets
    except ImportError as e:
        raise ValueError("math tasks read data with Hugging Face datasets: pip install datasets") from e
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(f"{path} is a folder but not a datasets save_to_disk folder: point task = \"math:...\" "
                             "at a data file or at the folder save_to_disk wrote") from None
        if isinstance(data, datasets.DatasetDict):
            split = split or "train"
            if split not in data:
                raise ValueError(f"{path} has splits {sorted(data)}, not {split!r}: set task_options.split")
            return data[split]
        return data
    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(FILE_FORMATS)} "
                         "or a save_to_disk folder")
    # A split name is only read from a DatasetDict folder; a file is one table.
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a malformed file
        raise ValueError(f"{path}: could not read it as {builder} ({type(e).__name__}: {e})") from None


def _pick(columns, wanted: str | None, defaults: tuple[str, ...], role: str, path) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{path}: no field {wanted!r} (task_options.{role}_field); its fields: {sorted(columns)}")
        return wanted
    return next((c for c in defaults if c in columns), None)


def problems_from_table(table, path, question_field=None, answer_field=None, solution_field=None) -> list[dict]:
    """Problem dicts (prompt, answer = the gold read out of the answer field, solution) of a table."""
    columns = list(table.column_names)
    q = _pick(columns, question_field, QUESTION_FIELDS, "question", path)
    a = _pick(columns, answer_field, ANSWER_FIELDS, "answer", path)
    if q is None or a is None:
        role = "question" if q is None else "answer"
        raise ValueError(f"{path}: no {role} field among {sorted(columns)}: name it with task_options.{role}_field = "
                         f"\"...\" (defaults: {QUESTION_FIELDS if q is None else ANSWER_FIELDS})")
    s = _pick(columns, solution_field, SOLUTION_FIELDS, "solution", path) or a
    out = []
    for row in table:
        question, reference = row[q], row[a]
        if question is None or reference is None or not str(question).strip():
            continue
        gold = gold_answer(str(reference))
        if gold:
            out.append({"prompt": str(question).strip(), "answer": gold,
                        "solution": str(row[s]) if row[s] is not None else str(reference)})
    if not out:
        raise ValueError(f"{path}: no row has both a question ({q!r}) and an answer ({a!r})")
    return out


def champ_problems() -> list[dict]:
    """The 270 problems of champ-dataset (MIT) with their answers, read from the package's data
    file (importing the package needs natsort, which we do not need)."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("eval_data = \"champ\" needs champ-dataset: pip install --no-deps champ-dataset")
    data = json.loads((Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json").read_text())
    return [{"prompt": p["_text"], "answer": p["_answer"], "solution": p["_answer"]}
            for p in data["problems"].values()]


def load_eval_problems(source: str, fields: dict) -> list[dict]:
    """Held-out problems from ``eval_data``: ``"champ"`` or a local path (same formats and fields)."""
    if source == "champ":
        return champ_problems()
    return problems_from_table(read_table(source, fields.get("eval_split")), source,
                               **{k: fields.get(k) for k in ("question_field", "answer_field", "solution_field")})


class MathTask(DataTask):
    """Problems from a local math dataset, scored by math-verify on the extracted answer."""

    def __init__(self, path: str, seed: int = 0, options: dict | None = None, *, prompt=None, scorer=None,
                 few_shot: int = 0, eval_data: str = ""):
        from lora_engine.rl.tasks.scoring import AnswerScorer

        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown task_options {unknown} for a math task; known: {list(OPTIONS)}")
        fields = {k: options.get(k) for k in ("question_field", "answer_field", "solution_field")}
        problems = problems_from_table(read_table(path, options.get("split")), path, **fields)
        if eval_data:
            self.train, self.eval = problems, load_eval_problems(eval_data, options)
        elif Path(path).is_dir() and self._has_split(path, options.get("eval_split", "test")):
            self.train = problems
            self.eval = problems_from_table(read_table(path, options.get("eval_split", "test")), path, **fields)
        else:
            fraction = check_fraction(options.get("eval_fraction", EVAL_FRACTION))
            held = [in_eval_split(p["prompt"], seed, fraction) for p in problems]
            self.train = [p for p, h in zip(problems, held) if not h]
            self.eval = _distinct([p for p, h in zip(problems, held) if h])
        self._finish(f"math:{path}", prompt, scorer or AnswerScorer(), few_shot, seed)

    @staticmethod
    def _has_split(path, split: str) -> bool:
        import datasets

        data = datasets.load_from_disk(str(path))
        return isinstance(data, datasets.DatasetDict) and split in data


def _distinct(problems: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in problems:
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out
