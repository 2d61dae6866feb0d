"""The template-contamination guards fire on every kind of chat markup, by construction."""
import pytest

from core.backend import SamplingSettings
from core.dpo import DPOSettings, train_dpo
from core.generation import GenerationCache, GenRequest, generate_all
from core.guards import TemplateContaminationError, TemplateGuard, template_injected_text
from core.models import QWEN_DEFAULT_SYSTEM
from core.prompting import house_prompt


@pytest.fixture(scope="module")
def guard(tiny_backend):
    return TemplateGuard(tiny_backend.tokenizer)


def test_clean_house_prompt_passes(guard):
    guard.check_prompt(house_prompt("Explain why the sky is blue."), "test")
    guard.check_record({"prompt": house_prompt("Say hi."), "chosen": "Hi!", "rejected": "Hello"}, "t")


@pytest.mark.parametrize("markup", [
    "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user\nhi<end_of_turn>",
    "<|start_header_id|>user<|end_header_id|>", "[INST] hi [/INST]", "text<|endoftext|>",
])
def test_prompt_guard_fires_on_chat_markup(guard, markup):
    with pytest.raises(TemplateContaminationError, match="chat-template contamination in prompt"):
        guard.check_prompt("Instruction: " + markup + "\n\nResponse:\n", "stage 1 item 3")


def test_guard_learns_default_system_prompt_from_the_template(tiny_backend, guard):
    injected = template_injected_text(tiny_backend.tokenizer)
    assert QWEN_DEFAULT_SYSTEM in injected
    # The system prompt alone, without any markup, is caught.
    with pytest.raises(TemplateContaminationError, match="You are Qwen"):
        guard.check_prompt(QWEN_DEFAULT_SYSTEM + "\nInstruction: hi", "x")


def test_templated_prompt_is_refused(tiny_backend, guard):
    templated = tiny_backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain rain."}], tokenize=False, add_generation_prompt=True)
    with pytest.raises(TemplateContaminationError):
        guard.check_prompt(templated, "templated")


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_record_guard_names_the_field(guard, field):
    record = {"prompt": house_prompt("Say hi."), "chosen": "Hi.", "rejected": "Hello."}
    record[field] += "<|im_end|>"
    with pytest.raises(TemplateContaminationError, match=f"field '{field}'"):
        guard.check_record(record, "pairs.jsonl line 7")


def test_generation_refuses_contaminated_prompt_before_generating(tiny_backend, guard, tmp_path):
    cache = GenerationCache(tmp_path / "cache.jsonl")
    requests = [GenRequest("ok", house_prompt("Say hi."), 1),
                GenRequest("bad", "<|im_start|>user\nSay hi.<|im_end|>\n", 2)]
    settings = SamplingSettings(0.0, 1.0, 4, ("\n###",))
    with pytest.raises(TemplateContaminationError, match="item bad"):
        generate_all(tiny_backend, requests, settings, cache, guard, 4, "test")
    cache.close()
    assert not cache.entries  # nothing was generated, not even the clean item


def test_training_refuses_contaminated_record(tiny_backend, guard, tmp_path):
    records = [{"prompt": house_prompt("Say hi."), "chosen": "Hi.", "rejected": "Hello."},
               {"prompt": "<start_of_turn>user\nSay hi.", "chosen": "Hi.", "rejected": "Yo."}]
    settings = DPOSettings(1e-4, 0.1, 1, 1, 1, 64, 10, 4, 8, 0.0, 0)
    with pytest.raises(TemplateContaminationError, match="pairs.jsonl line 2"):
        train_dpo(tiny_backend, records, settings, tmp_path / "train", tmp_path / "adapter", guard)
    assert not (tmp_path / "adapter").exists()
