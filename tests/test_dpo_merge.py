"""DPO changes the adapter's parameters; the merge reproduces the adapter model or refuses."""
import pytest
import torch
from safetensors.torch import load_file

from core.backend import load_backend
from core.dpo import DPOSettings, train_dpo
from core.guards import TemplateGuard
from core.merge import MergeParityError, merge_adapter
from core.prompting import house_prompt
from registry.models import profile_by_name

RECORDS = [
    {"prompt": house_prompt("Describe rain. Your entire response must be in lowercase letters."),
     "chosen": "rain falls from clouds when droplets grow heavy.",
     "rejected": "Rain Falls From Clouds When Droplets Grow Heavy."},
    {"prompt": house_prompt("Name a fruit. Do not use any commas in your response."),
     "chosen": "An apple is a fine fruit.", "rejected": "Apples, pears, and plums."},
    {"prompt": house_prompt("Greet a friend. End your response with the exact phrase \"See you soon.\""),
     "chosen": "Hello there, it is good to see you. See you soon.",
     "rejected": "Hello there, it is good to see you."},
]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("dpo")
    profile = profile_by_name("tiny-qwen2")
    backend = load_backend(str(tiny_dir), profile)
    guard = TemplateGuard(backend.tokenizer)
    settings = DPOSettings(learning_rate=1e-3, beta=0.1, epochs=2, batch_size=1, grad_accum=1,
                           max_length=128, save_steps=2, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0, seed=0)
    metrics = train_dpo(backend, RECORDS, settings, work / "train", work / "adapter", guard)
    return work, metrics


def test_dpo_trains_the_adapter_and_logs_metrics(trained):
    work, metrics = trained
    assert metrics["steps"] == 6
    assert all("loss" in s and "rewards/accuracies" in s for s in metrics["per_step"])
    weights = load_file(str(work / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(float(w.abs().max()) > 0 for w in lora_b)  # B starts at zero
    assert list((work / "train" / "tensorboard").glob("events.out.tfevents.*"))
    assert (work / "train" / "dpo_log.jsonl").read_text().count("\n") == 6


def test_merge_reproduces_the_adapter_model(trained, tiny_dir):
    work, _ = trained
    probes = [r["prompt"] for r in RECORDS]
    parity = merge_adapter(str(tiny_dir), work / "adapter", work / "merged", "float32", probes, 1e-4)
    assert parity["max_abs_logprob_diff"] <= 1e-4
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(work / "merged"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    changed = [n for n, p in merged.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("q_proj" in n for n in changed)


def test_merge_refuses_when_parity_fails(trained, tiny_dir):
    work, _ = trained
    with pytest.raises(MergeParityError, match="not published"):
        merge_adapter(str(tiny_dir), work / "adapter", work / "bad", "float32",
                      [RECORDS[0]["prompt"]], tolerance=-1.0)
    assert not (work / "bad").exists()
