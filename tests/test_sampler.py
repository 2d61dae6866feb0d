"""The token picker: nucleus sampling among the top candidates, one generator per row."""
from collections import Counter

import torch

from core.sampler import NUCLEUS_CANDIDATES, SamplingSettings, pick_tokens

VOCAB = 4000


def peaked_logits() -> torch.Tensor:
    """Token 1500 has 0.5 of the mass, 7 has 0.3, 900 has 0.15; the other tokens share 0.05."""
    probs = torch.full((VOCAB,), 0.05 / (VOCAB - 3))
    probs[1500], probs[7], probs[900] = 0.5, 0.3, 0.15
    return probs.log()


def draws(logits: torch.Tensor, settings: SamplingSettings, seeds: range) -> list[int]:
    rows = logits.expand(len(seeds), -1)
    return pick_tokens(rows, settings, [torch.Generator().manual_seed(s) for s in seeds])


def test_nucleus_keeps_the_smallest_prefix_and_renormalises():
    settings = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=1, stop=())
    counts = Counter(draws(peaked_logits(), settings, range(3000)))
    assert set(counts) == {1500, 7, 900}  # 0.5 + 0.3 + 0.15 is the first prefix reaching 0.9
    for token, mass in ((1500, 0.5), (7, 0.3), (900, 0.15)):
        assert abs(counts[token] / 3000 - mass / 0.95) < 0.03


def test_a_nucleus_wider_than_the_candidates_samples_the_whole_sorted_vocabulary():
    logits = -torch.arange(VOCAB, dtype=torch.float32) * 1e-4  # almost flat, decreasing
    settings = SamplingSettings(temperature=1.0, top_p=0.99, max_new_tokens=1, stop=())
    picked = draws(logits, settings, range(300))
    assert max(picked) > NUCLEUS_CANDIDATES  # beyond the batched top-k
    assert min(picked) >= 0 and max(picked) < VOCAB


def test_top_p_one_keeps_every_token():
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=1, stop=())
    picked = draws(peaked_logits(), settings, range(2000))
    assert set(picked) - {1500, 7, 900}  # the 5% tail is reachable


def test_a_rows_token_depends_on_its_seed_not_on_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    settings = SamplingSettings(temperature=0.8, top_p=0.95, max_new_tokens=1, stop=())
    seeds = [5, 6, 7, 8, 9, 10]
    together = pick_tokens(logits, settings, [torch.Generator().manual_seed(s) for s in seeds])
    alone = [pick_tokens(logits[i : i + 1], settings, [torch.Generator().manual_seed(s)])[0]
             for i, s in enumerate(seeds)]
    assert together == alone
    again = pick_tokens(logits, settings, [torch.Generator().manual_seed(s) for s in seeds])
    assert again == together


def test_temperature_zero_is_greedy():
    logits = peaked_logits().expand(3, -1)
    settings = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=1, stop=())
    assert pick_tokens(logits, settings, []) == [1500, 1500, 1500]
