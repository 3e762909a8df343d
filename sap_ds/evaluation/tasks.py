"""Task metrics: GSM8K exact match, SST-2 accuracy, held-out test loss.

Examples are read with ``sap_ds.data.load_examples`` (the training loaders, so a task
file means the same thing here as in fine-tuning) and test loss reuses ``ChatTokenizer``
and ``encode_all``; the backend sums the response tokens' cross-entropy (transformers:
``collate`` and ``losses.token_logprobs``, as the trainer; vLLM: its prompt
log-probabilities), so the loss reported here is the trainer's eval loss (token-weighted
mean response cross-entropy). A task takes a backend (``sap_ds.evaluation.backends``),
not a model.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

from sap_ds.config.run import DataSource
from sap_ds.data import ChatTokenizer, DataError, Example, encode_all, load_examples
from sap_ds.evaluation.config import GenerationConfig, TaskConfig
from sap_ds.evaluation.generation import GenerationStats, chat_prompts

# A number as written in GSM8K answers: optional sign and $, thousands commas, decimals.
NUMBER = re.compile(r"-?\$?-?\d[\d,]*(?:\.\d+)?")
ANSWER_MARK = "####"


def normalise_number(text: str) -> Optional[Decimal]:
    """"$1,234.50" -> 1234.5, "-7." -> -7, "-$3" -> -3; None when there is no number."""
    match = NUMBER.search(text)
    if match is None:
        return None
    raw = match.group(0)
    negative = "-" in raw
    digits = raw.replace("-", "").replace("$", "").replace(",", "")
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    return (-value if negative else value).normalize() + 0  # + 0 turns -0 into 0


def gsm8k_reference(answer: str) -> Optional[Decimal]:
    """The number after "#### " in a GSM8K reference answer."""
    _, mark, tail = answer.rpartition(ANSWER_MARK)
    return normalise_number(tail) if mark else None


def gsm8k_prediction(text: str) -> Optional[Decimal]:
    """The model's answer: the number after the last "####" if there is one, else the
    last number in the text."""
    _, mark, tail = text.rpartition(ANSWER_MARK)
    if mark:
        found = normalise_number(tail)
        if found is not None:
            return found
    numbers = NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def sst2_prediction(text: str) -> Optional[str]:
    """"positive" or "negative", whichever occurs first in the answer; None if neither."""
    lower = text.lower()
    found = [(lower.find(label), label) for label in ("positive", "negative") if label in lower]
    return min(found)[1] if found else None


def task_examples(task: TaskConfig) -> list[Example]:
    source = DataSource(path=task.path, format=task.data_format, limit=task.limit, offset=task.offset,
                        prompt_column=task.prompt_column, response_column=task.response_column)
    examples = load_examples(source)
    if not examples:
        raise DataError(f"{task.path}: task '{task.label}' has no examples after offset={task.offset}, limit={task.limit}")
    return examples


def accuracy_task(backend, task: TaskConfig, settings: GenerationConfig, seed: int,
                  stats: GenerationStats) -> tuple[dict, list[dict]]:
    """Generate an answer per example and score it (GSM8K exact match or SST-2 label)."""
    examples = task_examples(task)
    prompts = [e.messages[-1][1] for e in examples]
    texts = chat_prompts(backend.tokenizer, prompts, settings.system_prompt)
    if task.batch_size:
        settings = settings.model_copy(update={"batch_size": task.batch_size})
    outputs = backend.generate(texts, settings, seed=seed, max_new_tokens=task.max_new_tokens, desc=task.label, stats=stats)
    records = []
    for example, prompt, output in zip(examples, prompts, outputs):
        if task.kind == "gsm8k_accuracy":
            reference, predicted = gsm8k_reference(example.response), gsm8k_prediction(output.text)
            if reference is None:
                raise DataError(f"{example.origin}: the reference answer has no '#### N' line; is this a GSM8K file?")
            reference, predicted = str(reference), None if predicted is None else str(predicted)
        else:
            reference, predicted = example.response, sst2_prediction(output.text)
        records.append({"prompt": prompt, "response": output.text, "reference": reference,
                        "prediction": predicted, "correct": predicted == reference, "origin": example.origin})
    correct = sum(r["correct"] for r in records)
    return {"accuracy": 100.0 * correct / len(records), "n": len(records)}, records


def test_loss(backend, task: TaskConfig, settings: GenerationConfig, batch_size: int) -> dict:
    """Token-weighted mean cross-entropy of the response tokens (the trainer's eval loss)."""
    chat = ChatTokenizer(backend.tokenizer, task.max_length, settings.system_prompt)
    encoded = encode_all(chat, task_examples(task), f"task '{task.label}'")
    per_example = backend.response_nll(encoded, batch_size)
    tokens = sum(n for _, n in per_example)
    return {"loss": sum(nll for nll, _ in per_example) / tokens, "tokens": tokens, "n": len(encoded)}


def run_task(backend, task: TaskConfig, settings: GenerationConfig, seed: int,
             stats: GenerationStats) -> tuple[dict, list[dict]]:
    if task.kind == "test_loss":
        return test_loss(backend, task, settings, task.batch_size or 4), []
    return accuracy_task(backend, task, settings, seed, stats)
