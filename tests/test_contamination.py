"""Each contamination check fires on a planted case, and decontamination removes and lists it."""
import json
import shutil

import pytest
from transformers import AutoTokenizer, GenerationConfig

from core.contamination import (ContaminationError, NgramIndex, chat_template_probe,
                                decontaminate, evaluation_index, template_state,
                                write_findings_tsv)
from core.guards import TemplateGuard
from core.prompting import house_prompt
from tests.conftest import ROOT

DATA = ROOT.parent / "shared" / "data"
EXEMPLAR = "A lighthouse is a tall tower built on a coast or a rocky island that guides ships."


def clean_record(i: int) -> dict:
    return {"prompt": house_prompt(f"Describe a quiet morning number {i} in two sentences."),
            "chosen": "the morning was calm and still.", "rejected": "It Was Loud.",
            "task_id": f"t{i}"}


@pytest.fixture(scope="module")
def tok_and_config(tiny_dir):
    return AutoTokenizer.from_pretrained(str(tiny_dir)), GenerationConfig.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def index():
    return evaluation_index(DATA if DATA.is_dir() else None,
                            [("h1", "Write a letter to a friend about a trip you took to the mountains last year")])


def run(records, index, tok_and_config, allow=False):
    tokenizer, config = tok_and_config
    return decontaminate(records, index, [EXEMPLAR], TemplateGuard(tokenizer),
                         template_state(tokenizer, config), allow)


def test_clean_records_pass(index, tok_and_config):
    clean, findings, summary = run([clean_record(i) for i in range(3)], index, tok_and_config)
    assert len(clean) == 3 and not findings and summary["removed"] == 0
    assert summary["eval_sets"]["baseline-probes"] > 0 and summary["n"] == 13


def test_planted_chat_token_stops_the_stage(index, tok_and_config):
    records = [clean_record(0), {**clean_record(1), "chosen": "Sure!<|im_end|>"}]
    with pytest.raises(ContaminationError, match="chat markup '<\\|im_end\\|>' in record 1"):
        run(records, index, tok_and_config)
    clean, findings, summary = run(records, index, tok_and_config, allow=True)
    assert summary["overridden"] and len(clean) == 1


@pytest.mark.skipif(not DATA.is_dir(), reason="shared IFEval data absent")
def test_planted_ifeval_13gram_is_removed_and_listed(index, tok_and_config, tmp_path):
    ifeval = json.loads((DATA / "ifeval" / "input_data.jsonl").read_text().splitlines()[5])
    words = ifeval["prompt"].split()[:16]
    planted = {**clean_record(1), "chosen": "Here goes: " + " ".join(words).upper() + " and more."}
    records = [clean_record(0), planted, clean_record(2)]
    clean, findings, summary = run(records, index, tok_and_config)
    assert [r["task_id"] for r in clean] == ["t0", "t2"]
    assert summary["findings"]["data"] == 1
    assert findings[0].source == "ifeval" and findings[0].item == str(ifeval["key"])
    write_findings_tsv(tmp_path / "c.tsv", findings, records)
    rows = (tmp_path / "c.tsv").read_text().splitlines()
    assert rows[0].startswith("record\tcheck") and rows[1].startswith("1\tdata\tchosen\tifeval")


def test_planted_heldout_and_probe_copies_are_removed(index, tok_and_config):
    heldout = {**clean_record(1), "prompt": house_prompt(
        "Write a letter to a friend about a trip you took to the mountains last year.")}
    probe = {**clean_record(2), "prompt": house_prompt("What is the capital of Australia?")}
    clean, findings, _ = run([clean_record(0), heldout, probe], index, tok_and_config)
    assert len(clean) == 1
    assert {(f.source, f.item) for f in findings} == {("heldout", "h1"), ("baseline-probes", "bq01")}


def test_planted_exemplar_copy_is_removed(index, tok_and_config):
    records = [clean_record(0), {**clean_record(1), "rejected": EXEMPLAR}]
    clean, findings, summary = run(records, index, tok_and_config)
    assert len(clean) == 1 and summary["findings"]["exemplar"] == 1
    assert findings[0].field == "rejected"


def test_eos_disagreement_stops_the_stage(index, tiny_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_dir, broken)
    config = GenerationConfig.from_pretrained(str(broken))
    config.eos_token_id = 5  # not the tokenizer's <|endoftext|>
    config.save_pretrained(str(broken))
    tokenizer = AutoTokenizer.from_pretrained(str(broken))
    state = template_state(tokenizer, GenerationConfig.from_pretrained(str(broken)))
    assert not state["eos"]["consistent"]
    with pytest.raises(ContaminationError, match="EOS disagreement"):
        decontaminate([clean_record(0)], index, [], TemplateGuard(tokenizer), state, allow=False)


def test_template_state_reports_the_default_system_prompt(tok_and_config):
    state = template_state(*tok_and_config)
    assert state["has_chat_template"] and state["eos"]["consistent"]
    assert any("You are Qwen" in t for t in state["template_injects"])
    assert "<|im_start|>" in state["chat_special_tokens"]


def test_short_evaluation_items_match_whole():
    index = NgramIndex(13)
    index.add("probes", "p1", "What is the capital of Australia?")
    index.add("probes", "p2", "Hi there")  # too short to match anything
    assert index.first_hit("Q: what is the capital of australia today") == (
        "probes", "p1", "what is the capital of australia")
    assert index.first_hit("hi there friend") is None


def test_chat_template_probe_measures_the_template(tiny_backend):
    result = chat_template_probe(tiny_backend, ["What is rain?", "Name a colour."], max_new_tokens=8)
    assert result["has_chat_template"] and result["probes"] == 2
    assert result["mean_first_token_kl"] > 0
