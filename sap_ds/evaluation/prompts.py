"""Evaluation prompts (harmful or benign) from local files, through ``sap_ds.data.read_rows`` (CSV, TSV, JSON,
JSONL, TXT, gzip).

The prompt column defaults to the first present of ``sap_ds.data.PROMPT_COLUMNS``, which
covers AdvBench (``goal``), HarmBench (``Behavior``), the refusal-direction splits
(``instruction``) and TXT files (``text``, one prompt a line).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sap_ds.data import PROMPT_COLUMNS, DataError, read_rows
from sap_ds.evaluation.config import PromptSet


@dataclass(frozen=True)
class EvalPrompt:
    set_name: str
    prompt: str
    origin: str  # "file:row"
    max_new_tokens: Optional[int] = None  # the set's, if it overrides generation.max_new_tokens


def set_name(source: PromptSet) -> str:
    return source.name or Path(source.path).name


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def _prompts_in(path: Path) -> set[str]:
    """Every prompt-column cell of a file (any of ``PROMPT_COLUMNS``), for ``drop_if_in``."""
    return {_cell(row, c) for row in read_rows(path) for c in PROMPT_COLUMNS if _cell(row, c)}


def load_prompts(source: PromptSet) -> list[EvalPrompt]:
    path = Path(source.path)
    rows = read_rows(path)
    columns = [source.column] if source.column else list(PROMPT_COLUMNS)
    column = next((c for c in columns if c in rows[0]), None)
    if column is None:
        raise DataError(
            f"{path}: no prompt column: looked for {', '.join(map(repr, columns))}, the file has "
            f"{', '.join(map(repr, rows[0]))}; set 'column' in the prompt set"
        )
    for name in [source.context_column, *source.exclude]:
        if name and name not in rows[0]:
            raise DataError(f"{path}: no column '{name}' (the file has {', '.join(map(repr, rows[0]))})")
    prompts = []
    for number, row in enumerate(rows, start=1):
        if any(_cell(row, col) in values for col, values in source.exclude.items()):
            continue
        prompt = _cell(row, column)
        if not prompt:
            continue  # blank lines of TXT files, empty cells
        context = _cell(row, source.context_column) if source.context_column else ""
        if context:
            prompt = f"{context}\n\n---\n\n{prompt}"  # HarmBench's own layout for contextual behaviours
        prompts.append(EvalPrompt(set_name(source), prompt, f"{path}:{number}", source.max_new_tokens))
    end = None if source.limit is None else source.offset + source.limit
    prompts = prompts[source.offset : end]
    if source.drop_if_in:
        seen = set().union(*(_prompts_in(Path(f)) for f in source.drop_if_in))
        prompts = [p for p in prompts if p.prompt not in seen]
    if not prompts:
        raise DataError(f"{path}: no prompts left after offset={source.offset}, limit={source.limit} and exclude")
    return prompts
