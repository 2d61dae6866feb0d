"""`export`: a finished stage as a model directory that reloads, a data set that `datasets` loads,
Hub cards that state the stage's facts, pushing through a stand-in of huggingface_hub, and
the refusals. Most tests export the tiny model's stage-1 run (`stage1_reference`)."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from app import export
from app.export import ExportError, PushError, export_stage, read_stage
from core.errors import UsageError
from core.run import RunDirError

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = "hf_SENTINEL_token_never_written_0123456789"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "export", *args],
                          capture_output=True, text=True, timeout=300)


def pairs_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "stage_1" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def card(path: Path) -> tuple[dict, str]:
    """(front matter, body) of a card."""
    _, meta, body = path.read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(meta), body


def load_pairs(data_file: Path):
    from datasets import load_dataset

    kind = "parquet" if data_file.suffix == ".parquet" else "json"
    return load_dataset(kind, data_files=str(data_file), split="train")


@pytest.fixture(scope="module")
def exported(stage1_reference, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One export through the CLI, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("export") / "out"
    result = cli("--run-dir", str(stage1_reference), "--stage", "1", "--to", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# the export ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_exported_model_reloads_with_the_merged_weights(exported, stage1_reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, result = exported
    assert f"model: {out / 'model'}" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    merged = AutoModelForCausalLM.from_pretrained(str(stage1_reference / "stage_1" / "merged"))
    mine, theirs = model.state_dict(), merged.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert list((out / "model").glob("*.safetensors")) and not list((out / "model").glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    assert tokenizer.chat_template is None  # the merged model's tokenizer had ChatML
    assert not (out / "model" / "chat_template.jinja").exists()
    config = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert config.get("chat_template") is None
    generation = GenerationConfig.from_pretrained(str(out / "model"))
    assert generation.eos_token_id == tokenizer.eos_token_id is not None


@pytest.mark.slow
def test_exported_pairs_load_with_datasets(exported, stage1_reference):
    out, result = exported
    pairs = pairs_of(stage1_reference)
    data = load_pairs(out / "dataset" / "data" / "train.jsonl")
    assert f"{len(pairs)} pairs" in result.stdout and len(data) == len(pairs)
    for column in ("prompt", "chosen", "rejected", "task_id"):
        assert data[column] == [p[column] for p in pairs]
    assert [json.loads(c) for c in data["constraints"]] == [p["constraints"] for p in pairs]


@pytest.mark.slow
def test_model_card_states_the_stage_facts(exported, stage1_reference):
    from huggingface_hub import ModelCard

    out, _ = exported
    meta, body = card(out / "model" / "README.md")
    assert ModelCard((out / "model" / "README.md").read_text()).data.to_dict() == meta
    assert meta["license"] == "other" and "base_model" not in meta  # tiny-qwen2 is not on the Hub
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"dpo", "trl", "peft", "lora", "bootstrap-curriculum", "stage-1"} <= set(meta["tags"])
    metrics = json.loads((stage1_reference / "stage_1" / "metrics.json").read_text())
    config = yaml.safe_load((stage1_reference / "config.yaml").read_text())
    headline = metrics["assessment"]["before"]["summary"]["prompt_level"]
    low, high = headline["ci95"]
    assert "explicit-instructions" in body
    assert f"{len(pairs_of(stage1_reference))} preference pairs" in body
    assert f"[{low:.1%}, {high:.1%}] ({headline['k']}/{headline['n']})" in body
    assert "Paired exact McNemar" in body and "funnel:" in body
    assert "**Contamination verdict: clean:" in body
    assert f"constitution.yaml version {config['constitution']['version']}, sha256 " \
           f"`{config['constitution']['sha256']}`" in body
    assert "no chat template" in body and "Instruction: " in body and "Response:" in body
    assert f"| learning_rate | {config['settings']['profile']['learning_rate']} |" in body
    assert "the run's model" in body  # what stage 1 learned from
    assert "| AILuminate v1.0 demo prompt set (`ailuminate`) | decontamination index" in body
    assert "cc-by-4.0" in body and "Content warning" not in body


@pytest.mark.slow
def test_dataset_card_points_the_viewer_at_the_data(exported, stage1_reference):
    from huggingface_hub import DatasetCard

    out, _ = exported
    meta, body = card(out / "dataset" / "README.md")
    assert DatasetCard((out / "dataset" / "README.md").read_text()).data.to_dict() == meta
    files = meta["configs"][0]["data_files"]
    assert files == [{"split": "train", "path": "data/train.jsonl"}]
    assert (out / "dataset" / files[0]["path"]).is_file()
    assert meta["license"] == "other" and meta["size_categories"] == ["n<1K"]
    assert {"dpo", "preference", "stage-1"} <= set(meta["tags"])
    assert "not-for-all-audiences" not in meta["tags"]
    assert f"{len(pairs_of(stage1_reference))} pairs." in body
    assert "**Contamination verdict: clean:" in body and "constitution.yaml version 1" in body
    assert "| `constraints` | provenance the stage records (JSON text) |" in body


@pytest.mark.slow
def test_parquet_export_and_a_base_model_on_the_hub(stage1_reference, tmp_path):
    """A run of gemma-3-270m (its config says so; the weights are the tiny model's) names the
    Hub base model and its licence; Parquet loads with `datasets`."""
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_reference, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"].update(reference="gemma-3-270m", profile="gemma-3-270m",
                           source="builtin:gemma-3-270m")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    written = export_stage(run_dir, 1, tmp_path / "out", "parquet")
    assert written["data_file"] == tmp_path / "out" / "dataset" / "data" / "train.parquet"
    data = load_pairs(written["data_file"])
    pairs = pairs_of(run_dir)
    assert data["chosen"] == [p["chosen"] for p in pairs]
    assert data["rejected"] == [p["rejected"] for p in pairs]
    meta, body = card(written["model_card"])
    assert meta["base_model"] == "google/gemma-3-270m" and meta["license"] == "gemma"
    assert "Gemma Terms of Use" in body
    assert card(written["dataset_card"])[0]["configs"][0]["data_files"][0]["path"] == \
        "data/train.parquet"


@pytest.mark.slow
def test_red_team_pairs_get_a_content_warning_and_their_licences(stage1_reference, tmp_path):
    """The rule: a dataset card warns when any pair's prompt is a red-team request (`kind`
    redteam, as stage 6 writes, or a source from AILuminate / HH-RLHF)."""
    facts = read_stage(stage1_reference, 1)
    first, second, *rest = facts.pairs
    pairs = [{**first, "kind": "redteam", "source": "ailuminate"},
             {**second, "kind": "redteam", "source": "model"}, *rest]
    facts = dataclasses.replace(facts, pairs=pairs)
    text = export.dataset_card(facts, Path("data/train.jsonl"), [], {})
    meta, body = yaml.safe_load(text.split("---\n")[1]), text.split("---\n", 2)[2]
    assert "**Content warning:** 2 of the" in body
    assert {"red-teaming", "not-for-all-audiences"} <= set(meta["tags"])
    assert meta["license"] == ["other", "cc-by-4.0"]
    assert ("| AILuminate v1.0 demo prompt set (`ailuminate`) | text in the training pairs; "
            "decontamination index") in body


# pushing ------------------------------------------------------------------------------------

class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls and the files each upload saw."""

    def __init__(self, token: str, fail: Exception | None = None):
        self.token, self.fail, self.calls = token, fail, []

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs) -> None:
        if self.fail:
            raise self.fail
        files = sorted(p.relative_to(kwargs["folder_path"]).as_posix()
                       for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))


@pytest.mark.slow
def test_push_uploads_the_model_and_the_pairs_and_writes_no_token(stage1_reference, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    apis = []

    def recording_api(token: str) -> RecordingApi:
        apis.append(RecordingApi(token))
        return apis[-1]

    monkeypatch.setattr(export, "hub_api", recording_api)
    out = tmp_path / "out"
    written = export_stage(stage1_reference, 1, out, push_to_hub="someone/tiny-stage1",
                           dataset_repo="someone/tiny-stage1-pairs", private=True)
    assert [api.token for api in apis] == [SENTINEL]  # the token comes from HF_TOKEN
    calls = apis[0].calls
    assert [(c[0], c[1], c[2].get("repo_type")) for c in calls] == [
        ("create_repo", "someone/tiny-stage1", "model"),
        ("upload_folder", "someone/tiny-stage1", "model"),
        ("create_repo", "someone/tiny-stage1-pairs", "dataset"),
        ("upload_folder", "someone/tiny-stage1-pairs", "dataset")]
    assert all(c[2]["private"] and c[2]["exist_ok"] for c in calls if c[0] == "create_repo")
    model_upload, data_upload = calls[1][2], calls[3][2]
    assert model_upload["folder_path"] == str(out / "model")
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= set(model_upload["files"])
    assert data_upload["folder_path"] == str(out / "dataset")
    assert data_upload["files"] == ["README.md", "data/train.jsonl"]
    assert written["pushed"] == ["https://huggingface.co/someone/tiny-stage1",
                                 "https://huggingface.co/datasets/someone/tiny-stage1-pairs"]
    assert card(out / "model" / "README.md")[0]["datasets"] == ["someone/tiny-stage1-pairs"]
    assert "load_dataset('someone/tiny-stage1-pairs'" in card(out / "dataset" / "README.md")[1]
    for path in out.rglob("*"):
        assert not path.is_file() or SENTINEL.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_failed_push_keeps_the_export_and_says_so(stage1_reference, tmp_path, monkeypatch):
    from huggingface_hub.errors import HTTPError

    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    api = RecordingApi(SENTINEL, fail=HTTPError("connection refused"))
    with pytest.raises(PushError, match="the export is complete in") as error:
        export_stage(stage1_reference, 1, tmp_path / "out", push_to_hub="someone/x", api=api)
    assert error.value.exit_code == 1 and (tmp_path / "out" / "model" / "README.md").is_file()


# refusals -----------------------------------------------------------------------------------

def test_push_without_a_token_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ExportError, match="HF_TOKEN") as error:
        export_stage(tmp_path, 1, tmp_path / "out", push_to_hub="someone/x")
    assert error.value.exit_code == 2 and not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="Hub repo id"):
        export_stage(tmp_path, 1, tmp_path / "out", push_to_hub="not a repo id")


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="has no config.yaml"):
        export_stage(tmp_path, 1, tmp_path / "out")


def test_a_skipped_stage_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {source: builtin:tiny-qwen2}\n")
    (tmp_path / "stage_2").mkdir()
    (tmp_path / "stage_2" / "SKIPPED").write_text(json.dumps({"reason": "no pair kept"}))
    result = cli("--run-dir", str(tmp_path), "--stage", "2", "--to", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "stage 2 of" in result.stderr and "was skipped (no pair kept)" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unfinished_damaged_stages_and_a_full_out_are_refused(stage1_reference, tmp_path):
    result = cli("--run-dir", str(stage1_reference), "--stage", "2", "--to", str(tmp_path / "o"))
    assert result.returncode == 2 and "error: stage 2 is not done in" in result.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    result = cli("--run-dir", str(stage1_reference), "--stage", "1", "--to", str(full))
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_reference, run_dir)
    with open(run_dir / "stage_1" / "pairs.jsonl", "a", encoding="utf-8") as handle:
        handle.write("\n")
    with pytest.raises(UsageError, match="marked done, but its .* pairs.jsonl"):
        export_stage(run_dir, 1, tmp_path / "o")
    export_stage(stage1_reference, 1, full, overwrite=True)
    assert sorted(p.name for p in full.iterdir()) == ["dataset", "model"]


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_behind(stage1_reference, tmp_path, monkeypatch):
    def broken(pairs, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_pairs", broken)
    with pytest.raises(OSError):
        export_stage(stage1_reference, 1, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# the data file ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_mixed_and_nested_metadata_load_with_one_type_per_column(tmp_path, suffix):
    pairs = [{"prompt": "p1", "chosen": "c1", "rejected": "r1", "checks": [{"kind": "x"}],
              "margin": 1, "label": "A", "mixed": "text", "flag": True},
             {"prompt": "p2", "chosen": "c2", "rejected": "r2", "checks": [{"n": 3, "k": [1]}],
              "margin": 0.25, "mixed": 7, "flag": False, "extra": None}]
    path = tmp_path / "data" / f"train.{suffix}"
    encoded = export.write_pairs(pairs, path)
    assert encoded == ["checks", "mixed"]
    data = load_pairs(path)
    assert data["prompt"] == ["p1", "p2"] and data["margin"] == [1.0, 0.25]
    assert data["label"] == ["A", None] and data["flag"] == [True, False]
    assert [json.loads(v) for v in data["checks"]] == [p["checks"] for p in pairs]
    assert [json.loads(v) for v in data["mixed"]] == ["text", 7]
