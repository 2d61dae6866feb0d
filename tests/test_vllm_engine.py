"""The vLLM engine (core/vllm_engine.py) on a tiny model: seeds, stop strings, per-sequence
callbacks, determinism, and cache keys apart from the HF loop's. The engine tests need
.venv-vllm (`bash scripts/setup.sh --vllm`) and are skipped without it; the stop-string rules
are checked without vLLM too."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from core.backend import HFBackend, load_backend
from core.errors import UsageError
from core.generation import GenerationCache, GenRequest, generate_cached
from core.guards import TemplateGuard
from core.sampler import Completion, SamplingSettings
from core.vllm_engine import INSTALL, VLLM_VENV, check_engine, completion
from registry.models import profile_by_name

needs_vllm = pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").is_file(),
                                reason=f"vLLM's environment {VLLM_VENV} is missing ({INSTALL})")

PROMPTS = ["Instruction: Name a colour.\nResponse:", "Instruction: Say hello.\nResponse:",
           "Instruction: Count to three.\nResponse:", "Question: What is rain?\nAnswer:",
           "Instruction: Write one short sentence about the sea.\nResponse:", "Hello"]
SEEDS = [11, 12, 13, 14, 15, 16]
STOPS = ("e", "\nInstruction")
SETTINGS = SamplingSettings(temperature=0.9, top_p=0.95, max_new_tokens=24, stop=STOPS)
NO_STOPS = SamplingSettings(temperature=0.9, top_p=0.95, max_new_tokens=12, stop=())


def vllm_profile():
    return replace(profile_by_name("tiny-qwen2"), engine="vllm")


def head16_copy(tiny_dir, target: Path) -> Path:
    """The tiny model's tokenizer on a Qwen2 with 4 heads of 16 and random weights: a head size
    vLLM's CPU attention has no kernel for (it has 32 to 512)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(tiny_dir)
    config.num_attention_heads, config.num_key_value_heads = 4, 2  # 64 / 4 = 16 per head
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def vllm_backend(tiny_dir):
    with load_backend(str(tiny_dir), vllm_profile()) as backend:
        yield backend


def test_completion_applies_stops_and_eos_as_the_hf_loop(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("one two\nInstruction: three")["input_ids"]
    eos = {tok.eos_token_id}
    stopped = completion(tok, ids + [tok.eos_token_id], eos, ("\nInstruction",))
    assert stopped.text == "one two" and stopped.finish == "stop"
    # the first token count whose decoded prefix holds the stop, as core.sampler stops there
    assert "\nInstruction" in tok.decode(ids[:stopped.tokens])
    assert "\nInstruction" not in tok.decode(ids[:stopped.tokens - 1])
    assert completion(tok, ids + [tok.eos_token_id, 5], eos, ()) == Completion(
        tok.decode(ids), "eos", len(ids))
    assert completion(tok, ids, eos, ("zzz",)) == Completion(tok.decode(ids), "length", len(ids))
    # a stop beginning with a newline also matches at the very start (core.sampler.stop_offset)
    at_start = completion(tok, tok("Instruction: x")["input_ids"], eos, ("\nInstruction",))
    assert (at_start.text, at_start.finish) == ("", "stop")


def test_unknown_engine_is_a_usage_error():
    with pytest.raises(UsageError, match="choose one of hf, vllm"):
        check_engine(replace(vllm_profile(), engine="tgi"))


def test_a_head_size_without_cpu_kernels_is_refused_before_anything_runs(tiny_dir, tmp_path,
                                                                         monkeypatch):
    from click.testing import CliRunner

    import core.vllm_engine
    from cli import main

    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()  # as if installed
    monkeypatch.setattr(core.vllm_engine, "VLLM_VENV", tmp_path / "venv")
    model = head16_copy(tiny_dir, tmp_path / "head16")
    with pytest.raises(UsageError, match="heads of size 16.*use --engine hf"):
        load_backend(str(model), vllm_profile())
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["stage", "run", "1", "--model", str(model), "--limit",
                                       "8", "--engine", "vllm", "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "heads of size 16" in result.output
    assert not run_dir.exists()


def test_a_run_recorded_before_profile_engine_existed_resumes_on_hf():
    from core.config import changed_settings

    saved = {"profile": {"lora_r": 16}}  # a config.yaml written before the field was added
    defaults = {"profile": {"lora_r": 16, "engine": "hf"}}
    assert changed_settings(saved, {"profile": {"lora_r": 16, "engine": "hf"}}, defaults) == []
    assert changed_settings(saved, {"profile": {"lora_r": 16, "engine": "vllm"}}, defaults) == [
        "profile.engine: the run has 'hf', this command gives 'vllm'"]


def test_engine_vllm_without_its_venv_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import core.vllm_engine
    from cli import main

    monkeypatch.setattr(core.vllm_engine, "VLLM_VENV", tmp_path / "missing")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["stage", "run", "1", "--model", "tiny-qwen2", "--limit",
                                       "8", "--engine", "vllm", "--run-dir", str(run_dir)])
    assert result.exit_code == 2
    assert "install it with `bash scripts/setup.sh --vllm`" in result.output
    assert not run_dir.exists()


@needs_vllm
def test_generate_seeds_stops_and_callbacks(vllm_backend):
    finished: list[tuple[int, Completion]] = []
    out = vllm_backend.generate(PROMPTS, SETTINGS, SEEDS,
                                on_finish=lambda i, c: finished.append((i, c)))
    assert sorted(i for i, _ in finished) == list(range(len(PROMPTS)))  # once per prompt
    assert dict(finished) == dict(enumerate(out))
    for c in out:
        assert c.finish in ("stop", "eos", "length")
        assert not any(stop in c.text for stop in STOPS)
        assert 0 < c.tokens <= SETTINGS.max_new_tokens or c.finish == "eos"
        assert c.finish != "length" or c.tokens == SETTINGS.max_new_tokens
    assert any(c.finish == "stop" for c in out)
    plain = vllm_backend.generate(PROMPTS, NO_STOPS, SEEDS)
    assert all(c.text for c in plain if c.finish == "length")
    assert all(c.tokens == NO_STOPS.max_new_tokens for c in plain if c.finish == "length")
    print(f"worker start-up {vllm_backend.worker().startup_s:.0f} s")


@needs_vllm
def test_same_seed_same_text_whatever_the_batch(vllm_backend):
    first = vllm_backend.generate(PROMPTS, NO_STOPS, SEEDS)
    assert vllm_backend.generate(PROMPTS, NO_STOPS, SEEDS) == first
    alone = [vllm_backend.generate([p], NO_STOPS, [s])[0] for p, s in zip(PROMPTS[:3], SEEDS)]
    assert alone == first[:3]  # a sequence does not depend on its batch
    reordered = vllm_backend.generate(PROMPTS[::-1], NO_STOPS, SEEDS[::-1])
    assert reordered[::-1] == first
    other_seed = vllm_backend.generate(PROMPTS, NO_STOPS, [s + 100 for s in SEEDS])
    assert other_seed != first


@needs_vllm
def test_many_long_seeded_prompts_in_one_call(vllm_backend):
    """More prompt tokens than one engine step takes: vLLM's chunked prefill would split a
    prompt across steps and rewind its seeded generator, which the CPU build cannot do ('CPU
    Generator does not use offset', seen on stage 1's few-shot prompts)."""
    long_prompts = [" ".join(f"word{j}" for j in range(i, i + 150)) for i in range(24)]
    out = vllm_backend.generate(long_prompts, NO_STOPS, list(range(24)))
    assert len(out) == 24 and all(c.tokens > 0 for c in out)
    assert vllm_backend.generate(long_prompts[:2], NO_STOPS, [0, 1]) == out[:2]


@needs_vllm
def test_the_judge_s_option_log_probabilities_match_transformers(vllm_backend, tiny_dir):
    """vLLM's `logprob_token_ids` are the raw next-token log-probabilities: the same numbers the
    transformers backend gives (float32 on both), so the A/B judge reads the same margins."""
    import torch

    from core.judge import option_token_ids

    ids = option_token_ids(vllm_backend.tokenizer)
    hf = HFBackend.load(str(tiny_dir), profile_by_name("tiny-qwen2"))
    ours = vllm_backend.option_logprobs(PROMPTS, ids)
    theirs = hf.option_logprobs(PROMPTS, ids)
    assert ours.shape == (len(PROMPTS), 2)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    assert vllm_backend._hf is None  # the judge did not load a second copy of the model


@needs_vllm
def test_cache_is_hit_and_never_shared_with_the_hf_loop(vllm_backend, tiny_dir, tmp_path):
    requests = [GenRequest(f"r{i}", p, s) for i, (p, s) in enumerate(zip(PROMPTS, SEEDS))]
    cache = tmp_path / "cache.jsonl"
    guard = TemplateGuard(vllm_backend.tokenizer)
    first = generate_cached(vllm_backend, requests, SETTINGS, cache, guard, 4, "vllm")

    class NoGeneration:
        cache_id = vllm_backend.cache_id

        def generate(self, *args, **kwargs):
            raise AssertionError("a cached request was generated again")

    assert generate_cached(NoGeneration(), requests, SETTINGS, cache, guard, 4, "again") == first
    hf = HFBackend.load(str(tiny_dir), profile_by_name("tiny-qwen2"))
    generate_cached(hf, requests, SETTINGS, cache, guard, 4, "hf")
    entries = GenerationCache(cache).entries
    assert len(entries) == 2 * len(requests)  # the HF loop generated every request itself


@needs_vllm
def test_worker_death_is_a_run_failure_with_its_log(vllm_backend):
    """Last in this file: it ends the shared worker."""
    from core.errors import RunFailure

    too_long = "word " * 5000  # longer than the model's 2,048-token context: vLLM refuses it
    with pytest.raises(RunFailure, match=r"vLLM worker stopped \(exit code [1-9]\d*\): "
                                         r"\S*VLLMValidationError: .*maximum context length"):
        vllm_backend.generate([too_long], NO_STOPS, [0])


@needs_vllm
def test_stage_1_on_the_tiny_model_with_the_vllm_engine(tmp_path):
    """The whole stage with generation on vLLM: instructions and responses from the worker, the
    judge and DPO on transformers, then merge, assessment (generation on vLLM again) and report."""
    import json
    import subprocess

    from conftest import stage1_command

    run_dir = tmp_path / "run"
    out = subprocess.run(stage1_command(run_dir, "--engine", "vllm", "--heldout", "4",
                                        "--baseline-limit", "1"),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "stage_1" / "DONE").is_file()
    assert "engine: vllm" in (run_dir / "config.yaml").read_text()
    metrics = json.loads((run_dir / "stage_1" / "metrics.json").read_text())
    assert metrics["funnel"]["pairs_kept"] >= 1
    assert metrics["dpo"]["steps"] >= 1 and metrics["assessment"]
