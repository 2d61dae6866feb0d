"""A stage's pairs are plain TRL data: `datasets` loads pairs.jsonl as it is, and TRL's own
DPOTrainer (no project code) trains on it."""
import math

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from core.io import read_jsonl


def test_plain_trl_trains_two_dpo_steps_on_a_stages_pairs(stage1_reference, tiny_dir, tmp_path):
    pairs_file = stage1_reference / "stage_1" / "pairs.jsonl"
    dataset = load_dataset("json", data_files=str(pairs_file), split="train")
    records = read_jsonl(pairs_file)
    assert dataset.num_rows == len(records) >= 2
    assert dataset["prompt"] == [r["prompt"] for r in records]
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=1,
                     learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
                     save_strategy="no", seed=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=dataset.select_columns(["prompt", "chosen", "rejected"]))
    trainer.train()

    assert trainer.state.global_step == 2
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # the weights moved
