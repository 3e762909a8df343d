"""Task metrics: GSM8K exact match, SST-2 accuracy, held-out test loss.

Examples are read with ``sap_ds.data.load_examples`` (the training loaders, so a task
file means the same thing here as in fine-tuning) and test loss encodes with
``ChatTokenizer.encode`` (as training's ``encode_all``); the backend sums the response
tokens' cross-entropy (transformers: ``collate`` and ``losses.token_logprobs``, as the
trainer; vLLM: its prompt log-probabilities), so the loss reported here is the trainer's
eval loss (token-weighted mean response cross-entropy). Every task also returns one
record per example (accuracy: the answer and whether it is correct; test loss: the summed
cross-entropy and its token count), which eval.json keeps for paired comparisons. A task
takes a backend (``sap_ds.evaluation.backends``), not a model.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

from sap_ds.config.run import DataSource
from sap_ds.data import ChatTokenizer, DataError, Example, load_examples
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


def test_loss(backend, task: TaskConfig, settings: GenerationConfig, batch_size: int) -> tuple[dict, list[dict]]:
    """Token-weighted mean cross-entropy of the response tokens (the trainer's eval loss),
    and one record per example kept (prompt, origin, summed ``nll`` and its ``tokens``):
    the per-example values a paired comparison of two models resamples
    (``sap_ds.experiments.paired``). An example whose prompt leaves no response token
    under ``max_length`` is dropped, as in training."""
    chat = ChatTokenizer(backend.tokenizer, task.max_length, settings.system_prompt)
    examples = task_examples(task)
    encoded = [chat.encode(e.messages, e.response, e.origin) for e in examples]
    kept = [(e, t) for e, t in zip(examples, encoded) if t is not None]
    if not kept:
        raise DataError(f"task '{task.label}': every example's prompt is longer than max_length={task.max_length} "
                        f"tokens, so no response token is left to score; raise the task's max_length "
                        f"(first: {examples[0].origin})")
    per_example = backend.response_nll([t for _, t in kept], batch_size)
    tokens = sum(n for _, n in per_example)
    records = [{"prompt": e.messages[-1][1], "origin": e.origin, "nll": nll, "tokens": n}
               for (e, _), (nll, n) in zip(kept, per_example, strict=True)]
    return {"loss": sum(nll for nll, _ in per_example) / tokens, "tokens": tokens, "n": len(kept)}, records


def run_task(backend, task: TaskConfig, settings: GenerationConfig, seed: int,
             stats: GenerationStats) -> tuple[dict, list[dict]]:
    if task.kind == "test_loss":
        return test_loss(backend, task, settings, task.batch_size or 4)
    return accuracy_task(backend, task, settings, seed, stats)
