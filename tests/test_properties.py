"""Property-based tests (Hypothesis): no input crashes the loaders, readers and text helpers
with anything but their documented error."""
import gzip
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import SettingsError, apply_overrides
from core.constitution import Constitution, ConstitutionError, load_constitution
from core.contamination import DataSetError, load_eval_texts
from core.io import DamagedFileError, read_jsonl
from core.profile import ModelProfile
from core.sampler import stop_offset
from core.text import looping_reason
from registry.models import profile_by_name

FAST = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
YAMLISH = st.text(alphabet=st.sampled_from(list("abcv: -\n\t'\"[]{}0129_#&*!|>")), max_size=200)


@FAST
@given(text=YAMLISH)
def test_constitution_loader_returns_a_constitution_or_its_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("c") / "constitution.yaml"
    path.write_text(text)
    try:
        assert isinstance(load_constitution(path), Constitution)
    except ConstitutionError as error:
        assert str(error)


@FAST
@given(items=st.lists(st.text(alphabet=st.sampled_from(list("profile.stage1rn_=ax01.-e ")),
                              max_size=40), max_size=4))
def test_set_overrides_give_settings_or_one_settings_error(items):
    sections = {"profile": profile_by_name("tiny-qwen2")}
    try:
        result = apply_overrides(sections, items, locked=frozenset({"profile.name"}))
        assert isinstance(result["profile"], ModelProfile)
    except SettingsError as error:
        assert str(error)


@FAST
@given(lines=st.lists(st.one_of(st.text(max_size=30),
                                st.dictionaries(st.text(max_size=5), st.integers()).map(json.dumps)),
                      max_size=6),
       torn=st.text(max_size=10))
def test_jsonl_reader_gives_objects_or_names_the_damaged_line(tmp_path_factory, lines, torn):
    path = tmp_path_factory.mktemp("j") / "records.jsonl"
    path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines) + torn.replace("\n", ""))
    try:
        records = read_jsonl(path)
        assert all(isinstance(r, dict) for r in records) and len(records) <= len(lines)
    except DamagedFileError as error:
        assert f"{path}:" in str(error)


@FAST
@given(ifeval=st.text(max_size=120), csv_text=st.text(max_size=120))
def test_evaluation_set_loader_gives_sets_or_names_the_problem(tmp_path_factory, ifeval, csv_text):
    data = tmp_path_factory.mktemp("d")
    for rel, content in (("ifeval/input_data.jsonl", ifeval),
                         ("ailuminate/airr_official_1.0_demo_en_us_prompt_set_release.csv",
                          csv_text)):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(content)
    harmless = data / "hh-rlhf-harmless" / "harmless-base-test.jsonl.gz"
    harmless.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(harmless, "wt") as handle:
        handle.write(json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello."}) + "\n")
    try:
        sets = load_eval_texts(data)
        assert sets["hh-rlhf-harmless-test"] == [("0", "Hi?")]
    except DataSetError as error:
        assert "input_data.jsonl" in str(error) or ".csv" in str(error)


@FAST
@given(text=st.text(max_size=60), stops=st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_stop_offset_is_the_earliest_stop(text, stops):
    offset = stop_offset(text, tuple(stops))
    found = [text.find(s) for s in stops if s in text]
    at_start = [0 for s in stops if s.startswith("\n") and len(s) > 1 and text.startswith(s[1:])]
    assert offset == min(found + at_start, default=-1)
    if offset > 0:
        assert any(text[offset:].startswith(s) for s in stops)


@FAST
@given(sentence=st.lists(st.sampled_from(["rain", "falls", "on", "the", "hills"]), min_size=3,
                         max_size=6).map(" ".join), times=st.integers(2, 4))
def test_a_sentence_said_twice_always_loops(sentence, times):
    text = " ".join([sentence.capitalize() + "."] * times)
    assert looping_reason(text) == "repeats a sentence"


@FAST
@given(reserved=st.integers(0, 300), others=st.integers(0, 300), heldout=st.integers(0, 300))
def test_a_held_out_top_up_spares_training(reserved, others, heldout):
    from core.split import split_smallest_ids, top_up

    count = top_up(reserved, others, heldout)
    assert 0 <= count <= others
    if reserved:  # never beyond --heldout, never more than a quarter of the training material
        assert reserved + count <= max(heldout, reserved) and count <= others // 4
    else:  # nothing reserved: --heldout, or a quarter (at least one) when < 2 would train
        assert count == (heldout if others - heldout >= 2 else min(others, max(1, others // 4)))
        tasks = [{"id": f"{i:04d}"} for i in range(others)]
        assert count == sum(t["split"] == "heldout" for t in split_smallest_ids(tasks, heldout))
