"""The eval config: one YAML file plus dotted ``key=value`` overrides, strictly typed.

It mirrors ``sap_ds.config`` (extra keys forbidden, every error names the key and lists
the valid ones), so a typo in an eval config fails in the first second, not after the
model has generated for ten minutes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sap_ds.config import INPUT_PATH, DataFormat, read_config_file, validate_tree

# BeaverDam-7B's input format (PKU-Alignment/beavertails, QAModeration).
BEAVERDAM_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PromptSet(_Section):
    """One local file of harmful instructions (AdvBench CSV, HarmBench CSV, JSON, TXT...)."""

    path: str = Field(json_schema_extra=INPUT_PATH)  # relative to the eval config's folder
    name: Optional[str] = Field(None, description="Label in the report (default: the file name).")
    column: Optional[str] = Field(None, description="Prompt column (default: first of goal, Behavior, instruction, prompt, ...).")
    context_column: Optional[str] = Field(None, description="Prepended to the prompt when non-empty (HarmBench: ContextString).")
    exclude: dict[str, list[str]] = Field(default_factory=dict, description="Drop rows whose column value is listed.")
    limit: Optional[int] = Field(None, gt=0)
    offset: int = Field(0, ge=0)
    drop_if_in: list[str] = Field(default_factory=list, json_schema_extra=INPUT_PATH, description="Files (e.g. training sets) whose prompts are "
                                  "dropped from this set, after offset and limit: keeps training prompts out of the score.")


class ClassifierConfig(_Section):
    path: str = Field(description="Local Hugging Face folder of the moderation model.")
    kind: Literal["sequence", "generative"] = "sequence"
    unsafe_label: Optional[str] = Field(None, description="Sequence classifiers: the id2label name meaning unsafe.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    template: str = Field(BEAVERDAM_TEMPLATE, description="Sequence classifiers: input text with {prompt} and {response}.")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(1024, gt=8)
    max_new_tokens: int = Field(10, gt=0, description="Generative judges: verdict length.")


class ScorerConfig(_Section):
    kind: Literal["refusal", "classifier"] = "refusal"
    refusal_window: int = Field(200, ge=0, description="Characters from the start searched for refusal markers; 0: all.")
    classifier: Optional[ClassifierConfig] = None

    @model_validator(mode="after")
    def _classifier_needs_path(self) -> "ScorerConfig":
        if self.kind == "classifier" and self.classifier is None:
            raise ValueError("scorer.kind 'classifier' needs scorer.classifier.path (a local moderation model folder)")
        return self


class GenerationConfig(_Section):
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    do_sample: bool = Field(False, description="Greedy by default: deterministic and comparable across runs.")
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    system_prompt: Optional[str] = None


TaskKind = Literal["gsm8k_accuracy", "sst2_accuracy", "test_loss"]
DEFAULT_FORMAT = {"gsm8k_accuracy": "gsm8k", "sst2_accuracy": "sst2", "test_loss": "instruction"}


class TaskConfig(_Section):
    kind: TaskKind
    path: str = Field(json_schema_extra=INPUT_PATH)
    name: Optional[str] = Field(None, description="Label in the report (default: kind).")
    format: Optional[DataFormat] = Field(None, description="sap_ds.data format (default: gsm8k, sst2, instruction by kind).")
    limit: Optional[int] = Field(None, gt=0)
    offset: int = Field(0, ge=0)
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    max_new_tokens: Optional[int] = Field(None, gt=0, description="Overrides generation.max_new_tokens for this task.")
    max_length: int = Field(512, gt=8, description="test_loss: tokens per example (prompt + response).")
    batch_size: Optional[int] = Field(None, gt=0, description="Examples per forward (default: 4 for test_loss, "
                                      "whose logits over the whole vocabulary are large; else generation.batch_size).")

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def data_format(self) -> str:
        return self.format or DEFAULT_FORMAT[self.kind]


class EvalConfig(_Section):
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="fp32 on CPU: bf16 matmuls are ~100x slower there.")
    seed: int = 0
    harmful: list[PromptSet] = Field(default_factory=list)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    tasks: list[TaskConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something_to_do(self) -> "EvalConfig":
        if not self.harmful and not self.tasks:
            raise ValueError("nothing to evaluate: give harmful prompt sets ('harmful') and/or 'tasks'")
        labels = [t.label for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"tasks: two tasks share a name {labels}; set 'name' on each")
        return self


def load_eval_config(path: str | Path, overrides: list[str] = ()) -> EvalConfig:
    return validate_tree(EvalConfig, read_config_file(path, schema=EvalConfig), list(overrides), str(path))


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
