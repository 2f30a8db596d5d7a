"""Prompt sets from plain files, no TensorFlow needed: GenEval metadata JSONL, OCR and plain line files.

A `PromptSet` is a sequence of `PromptRecord(prompt, metadata)`; rewards get the texts or the metadata
dicts of a batch (`texts(idx)`, `metadata(idx)`), and `KRepeatSampler` indices pick that batch.

File formats (as the references write them):
- GenEval metadata JSONL (GenEval's `prompts/evaluation_metadata.jsonl`, Flow-GRPO's
  `dataset/geneval/{split}_metadata.jsonl`): one JSON object per line with `tag`, `include` (a list
  of {class, count, color?, position: [relation, group index]?}), optional `exclude` ({class, count})
  and `prompt`. The record's metadata is the whole object, as the GenEval reward server takes it.
- OCR lines (Flow-GRPO's `dataset/ocr/{split}.txt`): one prompt per line; the text to render is the
  first double-quoted span, `A sign that says "Open 24 Hours"` -> metadata {"text": "Open 24 Hours"}.
- Plain lines (Flow-GRPO's `dataset/pickscore/{split}.txt`): one caption per line, metadata {}.
Blank lines are skipped everywhere; line numbers in errors count them (1-based, as editors do).

A prompt folder holds one file per split, `{split}_metadata.jsonl` or `{split}.txt` (`train`, `test`),
and `load_prompt_folder(path, split)` reads one.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import re
import warnings
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from flowjax.data.geneval import CLASSES, COLORS, RELATIONS, TASKS

KINDS = ("geneval", "ocr", "plain")
_QUOTED = re.compile(r'"([^"]*)"')


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    prompt: str
    metadata: dict[str, Any]


def ocr_target(prompt: str) -> str | None:
    """The text an OCR prompt asks to render: its first double-quoted span (Flow-GRPO's
    `prompt.split('"')[1]` on every prompt that has a closed pair of quotes); None if there is none."""
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


class PromptSet(Sequence):
    """An immutable list of `PromptRecord`s. Index with an int (a record), or with a slice, a list or an
    integer array (a `PromptSet`), e.g. the prompt indices of a `KRepeatSampler` batch."""

    def __init__(self, records: Iterable[PromptRecord], source: str = ""):
        self._records = tuple(records)
        self.source = source
        for r in self._records:
            if not isinstance(r, PromptRecord):
                raise TypeError(f"PromptSet holds PromptRecords, got {type(r).__name__}")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, *, geneval: bool = True) -> PromptSet:
        """Read a metadata JSONL file, validating every line.

        geneval=True: each line must be a GenEval record (`prompt`, `tag`, a non-empty `include` of
        {class, count, color?, position?} with GenEval's class, colour and relation names, optional
        `exclude`); unknown keys in a clause are errors, as a misspelt `colour` would silently go
        unchecked by the scorer. geneval=False: any JSON object with a non-empty string `prompt`.
        """
        path = os.fspath(path)
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    snippet = line.strip()[:120]
                    raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): {snippet!r}") from None
                problem = validate_record(row, geneval=geneval)
                if problem:
                    raise ValueError(f"{where}: {problem}")
                records.append(PromptRecord(row["prompt"], row))
        return cls(records, source=path)

    @classmethod
    def from_lines(cls, path: str | os.PathLike, kind: str = "plain", *, strict: bool = True) -> PromptSet:
        """One prompt per line. kind="ocr": metadata {"text": the first double-quoted span}; a line with
        no quoted (non-empty) target is an error naming it, or, with strict=False, skipped with a warning.
        kind="plain": metadata {}."""
        if kind not in ("ocr", "plain"):
            raise ValueError(f"kind must be 'ocr' or 'plain' for a line file, got {kind!r}")
        path = os.fspath(path)
        records, skipped = [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text:
                    continue
                if kind == "plain":
                    records.append(PromptRecord(text, {}))
                    continue
                target = ocr_target(text)
                if not target:
                    if strict:
                        raise ValueError(f"{path}, line {lineno}: an OCR prompt needs its target text inside double "
                                         f'quotes (e.g. A sign that says "Open"), got {text[:120]!r}; '
                                         "pass strict=False to skip such lines")
                    skipped.append(lineno)
                    continue
                records.append(PromptRecord(text, {"text": target}))
        if skipped:
            warnings.warn(f"{path}: skipped {len(skipped)} line(s) without a quoted OCR target: lines {skipped[:10]}"
                          + (" ..." if len(skipped) > 10 else ""), stacklevel=2)
        return cls(records, source=path)

    @classmethod
    def from_metadata(cls, rows: Iterable[Mapping], source: str = "") -> PromptSet:
        """From GenEval-style dicts, each with its `prompt` (the dict is the metadata)."""
        return cls((PromptRecord(r["prompt"], dict(r)) for r in rows), source=source)

    @classmethod
    def from_texts(cls, texts: Iterable[str], kind: str = "plain", source: str = "") -> PromptSet:
        """From prompt strings, with the metadata `from_lines` would give them (OCR targets required)."""
        if kind not in ("ocr", "plain"):
            raise ValueError(f"kind must be 'ocr' or 'plain', got {kind!r}")
        records = []
        for i, text in enumerate(texts):
            target = ocr_target(text) if kind == "ocr" else None
            if kind == "ocr" and not target:
                raise ValueError(f"prompt {i} has no double-quoted OCR target: {text[:120]!r}")
            records.append(PromptRecord(text, {"text": target} if kind == "ocr" else {}))
        return cls(records, source=source)

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PromptSet(self._records[index], self.source)
        if isinstance(index, (Sequence, np.ndarray)) and not isinstance(index, str):
            return self.take(index)
        return self._records[operator.index(index)]

    def take(self, indices) -> PromptSet:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"indices must be a 1-D sequence of ints, got {idx.dtype} of shape {idx.shape}")
        return PromptSet((self._records[int(i)] for i in idx), self.source)

    def texts(self, indices=None) -> list[str]:
        records = self._records if indices is None else self.take(indices)._records
        return [r.prompt for r in records]

    def metadata(self, indices=None) -> list[dict[str, Any]]:
        records = self._records if indices is None else self.take(indices)._records
        return [r.metadata for r in records]

    def __eq__(self, other) -> bool:
        return isinstance(other, PromptSet) and self._records == other._records

    def __repr__(self) -> str:
        first = f", first={self._records[0].prompt!r}" if self._records else ""
        return f"PromptSet({len(self)} prompts{', from ' + self.source if self.source else ''}{first})"


# ---------------------------------------------------------------------------------------------- validation


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _clause_problem(clause, i: int, field: str) -> str | None:
    at = f"{field}[{i}]"
    if not isinstance(clause, Mapping):
        return f"{at} must be an object like {{\"class\": \"dog\", \"count\": 1}}, got {clause!r}"
    allowed = {"class", "count"} | ({"color", "position"} if field == "include" else set())
    if extra := sorted(set(clause) - allowed):
        return f"{at} has unknown key(s) {extra}; {field} clauses take {sorted(allowed)}"
    if "class" not in clause:
        return f"{at} has no 'class'"
    if clause["class"] not in CLASSES:
        return f"{at}: class {clause['class']!r} is not one of GenEval's 80 object names"
    if "count" not in clause:
        return f"{at} has no 'count'"
    if not _is_count(clause["count"]):
        return f"{at}: 'count' must be a positive integer, got {clause['count']!r}"
    if "color" in clause and clause["color"] not in COLORS:
        return f"{at}: color {clause['color']!r} is not one of {list(COLORS)}"
    if "position" in clause:
        pos = clause["position"]
        if not (isinstance(pos, (list, tuple)) and len(pos) == 2):
            return f"{at}: 'position' must be [relation, group index], got {pos!r}"
        relation, target = pos
        if relation not in RELATIONS:
            return f"{at}: relation {relation!r} is not one of {list(RELATIONS)}"
        if not (isinstance(target, int) and not isinstance(target, bool) and 0 <= target < i):
            return f"{at}: position target {target!r} must index an earlier include clause (0..{i - 1})"
    return None


def validate_record(row, *, geneval: bool = True) -> str | None:
    """None if `row` is a valid record, else what is wrong with it (see `PromptSet.from_jsonl`)."""
    if not isinstance(row, Mapping):
        return f"each line must be a JSON object, got {type(row).__name__}"
    if "prompt" not in row:
        return f"no 'prompt' (keys: {sorted(row)})"
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        return f"'prompt' must be a non-empty string, got {row['prompt']!r}"
    if not geneval:
        return None
    if not isinstance(row.get("tag"), str):
        return f"a GenEval record needs a string 'tag' (one of {list(TASKS)}), got {row.get('tag')!r}"
    include = row.get("include")
    if not isinstance(include, list) or not include:
        return f"a GenEval record needs a non-empty 'include' list, got {include!r}"
    for i, clause in enumerate(include):
        if problem := _clause_problem(clause, i, "include"):
            return problem
    exclude = row.get("exclude", [])
    if not isinstance(exclude, list):
        return f"'exclude' must be a list, got {exclude!r}"
    for i, clause in enumerate(exclude):
        if problem := _clause_problem(clause, i, "exclude"):
            return problem
    return None


# ---------------------------------------------------------------------------------------------- folders


def prompt_folder_splits(path: str | os.PathLike) -> dict[str, str]:
    """{split: file} for every `{split}_metadata.jsonl` and `{split}.txt` in a prompt folder."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith("_metadata.jsonl"):
            out[name[: -len("_metadata.jsonl")]] = full
        elif name.endswith(".txt"):
            out.setdefault(name[: -len(".txt")], full)
    return out


def load_prompt_folder(path: str | os.PathLike, split: str = "train", kind: str | None = None) -> PromptSet:
    """The `split` of a prompt folder: `{split}_metadata.jsonl` (GenEval) or `{split}.txt` (lines).

    kind: "geneval", "ocr" or "plain"; None picks "geneval" when the JSONL file exists, else "plain"
    (an OCR folder must say kind="ocr" to get its targets).
    """
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    jsonl = os.path.join(path, f"{split}_metadata.jsonl")
    txt = os.path.join(path, f"{split}.txt")
    if kind in (None, "geneval") and os.path.isfile(jsonl):
        return PromptSet.from_jsonl(jsonl)
    if kind != "geneval" and os.path.isfile(txt):
        return PromptSet.from_lines(txt, kind=kind or "plain")
    wanted = os.path.basename(jsonl) if kind == "geneval" else (
        os.path.basename(txt) if kind else f"{os.path.basename(jsonl)} or {os.path.basename(txt)}")
    found = sorted(prompt_folder_splits(path)) if os.path.isdir(path) else "no such folder"
    raise FileNotFoundError(f"no {wanted} in {path} (splits there: {found})")


def load_prompts(folder: str | None, kind: str = "geneval", *, train_split: str = "train",
                 eval_split: str = "test", generate_train: int = 5000, generate_test: int = 500,
                 generate_seed: int = 0) -> tuple[PromptSet, PromptSet | None]:
    """(train prompts, eval prompts or None) of a prompt folder, or generated GenEval prompts.

    folder: a folder with `{split}_metadata.jsonl` (GenEval) or `{split}.txt` (OCR / plain lines), as
      Flow-GRPO's `dataset/{geneval,ocr,pickscore}`; the eval split is read when the folder has it.
      Empty / None with kind "geneval": `generate_train` + `generate_test` GenEval-style prompts
      (`generate_geneval`: flowjax.data.geneval's generator, disjoint splits, deterministic in `generate_seed`).
    kind: "geneval", "ocr" or "plain".
    """
    if kind not in ("geneval", "ocr", "plain"):
        raise ValueError(f"prompt kind must be 'geneval', 'ocr' or 'plain', got {kind!r}")
    if not folder:
        if kind != "geneval":
            raise ValueError(f"no prompt folder given for {kind!r} prompts: set config.world.prompts to a folder "
                             f"with {train_split}.txt (and {eval_split}.txt), e.g. Flow-GRPO's dataset/"
                             f"{'ocr' if kind == 'ocr' else 'pickscore'}")
        return generate_geneval(int(generate_train), int(generate_test), seed=int(generate_seed))
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"prompt folder {folder} does not exist (config.world.prompts); give a folder with "
                                f"{train_split}_metadata.jsonl or {train_split}.txt")
    train = load_prompt_folder(folder, train_split, kind)
    evaluation = None
    if eval_split and eval_split in prompt_folder_splits(folder):
        evaluation = load_prompt_folder(folder, eval_split, kind)
    return train, evaluation


def generate_geneval(n_train: int, n_test: int, seed: int = 0) -> tuple[PromptSet, PromptSet | None]:
    """GenEval-style (train, test) prompts, the six tasks in turn, deterministic in `seed`.

    The test prompts are distinct (at most 480: single_object has 80); the training prompts are drawn
    with repetition allowed (counting has only 240 distinct prompts, single_object 80), never a test
    prompt, so any number can be asked for.
    """
    from flowjax.data import geneval

    test = geneval.generate(n_test, seed=seed) if n_test > 0 else None
    avoid = set(test.texts()) if test is not None else set()
    rows, k = [], 0
    while len(rows) < n_train:
        batch = geneval.generate(n_train, seed=seed + 1 + k, unique=False)
        rows += [m for m in batch.metadata() if m["prompt"] not in avoid][:n_train - len(rows)]
        k += 1
    return PromptSet.from_metadata(rows, source="generated"), test


def reward_prompts(prompts: PromptSet) -> list[dict]:
    """What a reward sees of each prompt: `{"prompt": text, **metadata}`."""
    return [{"prompt": r.prompt, **{k: v for k, v in r.metadata.items() if k != "prompt"}} for r in prompts]
