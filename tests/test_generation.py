"""Batched generation: decoded stop strings, per-sequence seeds, and the on-disk cache."""
import json

import torch

from core.backend import SamplingSettings
from core.generation import GenerationCache, GenRequest, generate_all
from core.sampler import sample_batch, stop_offset
from core.guards import TemplateGuard
from core.prompting import house_prompt


def test_stop_acts_on_decoded_text_not_a_last_subtoken():
    # "Instruction:" ends in ':' - a bare colon must not stop generation.
    stops = ("\nInstruction:",)
    assert stop_offset("Ratio 3:1 works: yes", stops) == -1
    assert stop_offset("Answer here.\nInstruction: next", stops) == len("Answer here.")
    assert stop_offset("###\nmore", ("\n###",)) == 0  # at the very start, after the prompt's newline
    assert stop_offset("a\n", ("\n",)) == 1


def test_sequence_output_does_not_depend_on_its_batch(tiny_backend):
    settings = SamplingSettings(0.8, 0.95, 16, ("\n###",))
    prompts = [house_prompt("Describe a quiet river at dawn."), house_prompt("List three fruits."),
               house_prompt("Explain how a kite flies in the wind, in a few sentences.")]
    together = tiny_backend.generate(prompts, settings, [11, 12, 13])
    alone = [tiny_backend.generate([p], settings, [s])[0] for p, s in zip(prompts, [11, 12, 13])]
    assert [c.text for c in together] == [c.text for c in alone]
    other_seed = tiny_backend.generate(prompts[:1], settings, [99])[0]
    assert together[0].tokens <= 16 and other_seed.tokens <= 16


def test_cache_skips_finished_items_and_survives_a_torn_line(tiny_backend, tmp_path):
    guard = TemplateGuard(tiny_backend.tokenizer)
    settings = SamplingSettings(0.7, 0.95, 8, ("\n###",))
    requests = [GenRequest(f"i{i}", house_prompt(f"Write a line about the number {i}."), i)
                for i in range(5)]
    path = tmp_path / "cache.jsonl"
    cache = GenerationCache(path)
    first = generate_all(tiny_backend, requests, settings, cache, guard, 2, "t")
    cache.close()
    assert len(path.read_text().splitlines()) == 5
    with open(path, "a") as handle:
        handle.write('{"key": "torn')  # a crash mid-append
    calls = []
    original = tiny_backend.generate
    tiny_backend.generate = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        cache = GenerationCache(path)
        second = generate_all(tiny_backend, requests, settings, cache, guard, 2, "t")
        cache.close()
    finally:
        del tiny_backend.generate
    assert calls == []  # everything came from the cache
    assert second == first
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["key"] for line in lines)


PROMPTS_OF_MANY_LENGTHS = [
    "Hi.", "List three fruits and say which one is sweetest.", "Name a colour.",
    "Explain how a kite flies in the wind, in a few sentences, for a child of seven.", "Why?",
]


def grouped_and_whole(model, tokenizer, settings):
    seeds = list(range(len(PROMPTS_OF_MANY_LENGTHS)))
    grouped = sample_batch(model, tokenizer, PROMPTS_OF_MANY_LENGTHS, settings, seeds,
                           prefill_rows=2)
    whole = sample_batch(model, tokenizer, PROMPTS_OF_MANY_LENGTHS, settings, seeds,
                         prefill_rows=None)
    return grouped, whole


def test_prompt_pass_in_groups_decodes_as_one_forward(tiny_backend):
    for settings in (SamplingSettings(0.0, 1.0, 12, ()), SamplingSettings(0.9, 0.95, 12, ())):
        grouped, whole = grouped_and_whole(tiny_backend.model, tiny_backend.tokenizer, settings)
        assert grouped == whole
        assert len({c.text for c in grouped}) > 1


def test_prompt_pass_in_groups_keeps_sliding_window_layers_exact(tiny_backend):
    """A model with a sliding window shorter than the longest prompts: the spliced cache of a
    window layer holds the window, the full layer the whole prompt, as one forward makes them."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = tiny_backend.tokenizer
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id)
    model = Gemma3ForCausalLM(config).eval()
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS_OF_MANY_LENGTHS]
    assert min(lengths) < 6 < max(lengths)
    grouped, whole = grouped_and_whole(model, tokenizer, SamplingSettings(0.0, 1.0, 10, ()))
    assert grouped == whole
