"""Reading an earlier stage's outputs: None when it has not written them, an error when it is
DONE and the file is missing, or the file is damaged."""
import pytest

from core.io import write_jsonl
from core.records import MissingEarlierOutputError, earlier_records


def test_a_stage_that_did_not_write_the_file_gives_none(tmp_path):
    assert earlier_records(tmp_path, 1, "instructions.jsonl", reader=3) is None
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "stage_1" / "SKIPPED").write_text("{}")
    assert earlier_records(tmp_path, 1, "pairs.jsonl", reader=3) is None


def test_a_skipped_stage_still_gives_what_it_wrote(tmp_path):
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "stage_1" / "SKIPPED").write_text("{}")
    write_jsonl(tmp_path / "stage_1" / "scores.jsonl", [{"id": "a"}])
    assert earlier_records(tmp_path, 1, "scores.jsonl", reader=5) == [{"id": "a"}]


def test_a_finished_stage_gives_its_records(tmp_path):
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "stage_1" / "DONE").write_text("done\n")
    write_jsonl(tmp_path / "stage_1" / "instructions.jsonl", [{"id": "a"}, {"id": "b"}])
    assert [r["id"] for r in earlier_records(tmp_path, 1, "instructions.jsonl", 3)] == ["a", "b"]


def test_a_done_stage_without_the_file_is_an_error(tmp_path):
    (tmp_path / "stage_2").mkdir()
    (tmp_path / "stage_2" / "DONE").write_text("done\n")
    with pytest.raises(MissingEarlierOutputError, match=r"stage 4 reads .*questions.jsonl.*missing"):
        earlier_records(tmp_path, 2, "questions.jsonl", reader=4)


def test_a_damaged_line_is_named(tmp_path):
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "stage_1" / "DONE").write_text("done\n")
    (tmp_path / "stage_1" / "scores.jsonl").write_text('{"id": 1}\n{"id": \n')
    with pytest.raises(MissingEarlierOutputError, match=r"scores.jsonl:2: not a JSON line"):
        earlier_records(tmp_path, 1, "scores.jsonl", reader=5)


def test_a_pair_record_carries_provenance_and_keeps_the_stage_fields():
    from core.records import Pair

    record = {"prompt": "Instruction: x\nResponse:", "chosen": "a", "rejected": "b",
              "task_id": "t1", "chosen_sample": 0, "constraints": []}
    pair = Pair.from_stage(record, stage=3, input_model_sha256="ab12")
    assert pair.extra == {"chosen_sample": 0, "constraints": []}
    assert list(pair.to_json()) == ["prompt", "chosen", "rejected", "stage", "task_id",
                                    "input_model_sha256", "chosen_sample", "constraints"]
    assert pair.to_json()["stage"] == 3 and pair.to_json()["input_model_sha256"] == "ab12"


@pytest.mark.parametrize("broken, phrase", [
    ({"chosen": None}, "without text in ['chosen']"),
    ({"task_id": 7}, "without text in ['task_id']"),
    ({"stage": 2}, "fills in itself"),
])
def test_a_malformed_stage_pair_is_a_clear_error(broken, phrase):
    from core.errors import RunFailure
    from core.records import Pair

    record = {"prompt": "p", "chosen": "a", "rejected": "b", "task_id": "t1", **broken}
    with pytest.raises(RunFailure, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        Pair.from_stage(record, 1, None)


def test_tasks_round_trip_and_split(tmp_path):
    from core.records import Task, read_tasks, write_tasks

    tasks = [Task("a", 1, "train", "Describe rain.", "instruction", "model", {"constraints": []}),
             Task("b", 1, "heldout", "Name a fruit.", "instruction", "pool")]
    write_tasks(tmp_path / "tasks.jsonl", tasks)
    assert read_tasks(tmp_path / "tasks.jsonl") == tasks
    assert [t.id for t in read_tasks(tmp_path / "tasks.jsonl", "heldout")] == ["b"]


def test_a_bad_task_record_or_split_is_named(tmp_path):
    from core.errors import RunFailure
    from core.records import Task, read_tasks

    with pytest.raises(RunFailure, match="split 'test'"):
        Task("a", 1, "test", "x", "k", "s")
    (tmp_path / "tasks.jsonl").write_text('{"id": "a", "stage": 1, "split": "train"}\n')
    with pytest.raises(MissingEarlierOutputError, match=r"line 1: not a task record \(text missing"):
        read_tasks(tmp_path / "tasks.jsonl")
    with pytest.raises(MissingEarlierOutputError, match="none.jsonl is missing"):
        read_tasks(tmp_path / "none.jsonl")


def test_earlier_tasks_of_a_stage_that_has_not_run(tmp_path):
    from core.records import Task, earlier_tasks, write_tasks

    assert earlier_tasks(tmp_path, 1, reader=3) is None
    (tmp_path / "stage_1").mkdir()
    write_tasks(tmp_path / "stage_1" / "tasks.jsonl",
                [Task("a", 1, "heldout", "Describe rain.", "instruction", "model")])
    assert [t.text for t in earlier_tasks(tmp_path, 1, reader=3)] == ["Describe rain."]
