"""The scripted test backend: scripted answers where the script has one, the real model's
otherwise, in the caller's order, with a distinct cache identity."""
import torch

from core.judge import judge_many
from core.guards import TemplateGuard
from core.sampler import SamplingSettings
from core.scripted import Script, ScriptedBackend

SETTINGS = SamplingSettings(temperature=0.7, top_p=0.95, max_new_tokens=6, stop=("\n###",))


def test_generate_mixes_scripted_and_sampled_in_order(tiny_backend):
    backend = ScriptedBackend(tiny_backend, Script(
        complete=lambda p: " scripted answer" if p.endswith("two:") else None))
    finished = {}
    out = backend.generate(["one:", "two:", "three:"], SETTINGS, [1, 2, 3],
                           on_finish=lambda i, c: finished.setdefault(i, c.text))
    real = tiny_backend.generate(["one:", "three:"], SETTINGS, [1, 3])
    assert out[1].text == " scripted answer" and out[1].finish == "stop"
    assert [out[0].text, out[2].text] == [c.text for c in real]
    assert finished == {0: out[0].text, 1: out[1].text, 2: out[2].text}
    assert backend.scripted_completions == 1 and backend.source.startswith("scripted:")


def test_preferences_decide_the_judge_and_the_rest_is_real(tiny_backend):
    guard = TemplateGuard(tiny_backend.tokenizer)
    prefer_first_shown = Script(prefer=lambda p: " A" if p.endswith("Answer:") else None)
    backend = ScriptedBackend(tiny_backend, prefer_first_shown)
    verdicts = judge_many(backend, guard, [("", "Describe rain.", "x text", "y text")], 8, "test")
    # " A" in both orders favours whichever response is shown first: a position-biased tie
    assert verdicts[0].winner == "tie" and verdicts[0].margin_xy > 0 > verdicts[0].margin_yx
    prefer_x = Script(prefer=lambda p: " A" if p.split("Response A:")[-1].lstrip().startswith("x")
                      else " B")
    verdicts = judge_many(ScriptedBackend(tiny_backend, prefer_x), guard,
                          [("", "Describe rain.", "x text", "y text")], 8, "test")
    assert verdicts[0].winner == "x"
    plain = ScriptedBackend(tiny_backend, Script())
    assert torch.equal(plain.next_token_logprobs(["Hello"]),
                       tiny_backend.next_token_logprobs(["Hello"]))
