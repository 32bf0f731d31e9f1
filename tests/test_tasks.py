"""The task table (fastpeft.utils.tasks.TASKS) is the only place a task's classes are named: the
AutoPeftModel classes, `fastpeft merge` and the model card all read it, so check it is complete and
that what it names exists."""
from __future__ import annotations

import transformers

import fastpeft
from fastpeft.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from fastpeft.utils.model_card import render_model_card
from fastpeft.utils.peft_types import TaskType
from fastpeft.utils.tasks import TASKS


def test_every_task_type_has_one_row():
    assert set(TASKS) == {t.value for t in TaskType} == set(MODEL_TYPE_TO_PEFT_MODEL_MAPPING)


def test_named_classes_exist_and_agree():
    for task, info in TASKS.items():
        assert hasattr(transformers, info.auto_class), info.auto_class
        auto_peft = getattr(fastpeft, info.auto_peft_class)
        assert auto_peft._target_class == info.auto_class
        assert auto_peft._target_peft_class is MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task]
    assert fastpeft.AutoPeftModel._target_class is None  # task-less adapters


def test_model_card_reads_the_table():
    cfg = fastpeft.LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["q"])
    card = render_model_card([("default", cfg)], "some/base")
    assert "pipeline_tag: text-classification" in card
    assert "from fastpeft import AutoPeftModelForSequenceClassification" in card
    card = render_model_card([("default", fastpeft.LoraConfig(r=2, target_modules=["q"]))], "some/base")
    assert "pipeline_tag" not in card and "from fastpeft import AutoPeftModel\n" in card
