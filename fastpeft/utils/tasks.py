"""What each task type (``task_type`` in adapter_config.json) means outside the adapter: the one table
that the AutoPeftModel classes, ``fastpeft merge`` and the model card read.

Plain data (class names, not classes), so reading it imports neither transformers nor the models.
The PeftModel task class of each task is fastpeft.peft_model.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.
"""
from __future__ import annotations

from typing import NamedTuple

from fastpeft.utils.peft_types import TaskType

__all__ = ["TASKS", "TaskInfo"]


class TaskInfo(NamedTuple):
    auto_class: str  # transformers auto class that loads the base model
    auto_peft_class: str  # fastpeft class that loads base model + adapter in one call
    pipeline_tag: str  # the Hugging Face Hub's pipeline tag, for the model card


# keyed by the plain string value: TaskType is a str enum, so TASKS[TaskType.X] works as well
TASKS: dict[str, TaskInfo] = {
    TaskType.CAUSAL_LM.value: TaskInfo("AutoModelForCausalLM", "AutoPeftModelForCausalLM", "text-generation"),
    TaskType.SEQ_2_SEQ_LM.value: TaskInfo("AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM",
                                          "text2text-generation"),
    TaskType.SEQ_CLS.value: TaskInfo("AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification",
                                     "text-classification"),
    TaskType.TOKEN_CLS.value: TaskInfo("AutoModelForTokenClassification", "AutoPeftModelForTokenClassification",
                                       "token-classification"),
    TaskType.QUESTION_ANS.value: TaskInfo("AutoModelForQuestionAnswering", "AutoPeftModelForQuestionAnswering",
                                          "question-answering"),
    TaskType.FEATURE_EXTRACTION.value: TaskInfo("AutoModel", "AutoPeftModelForFeatureExtraction",
                                                "feature-extraction"),
}
