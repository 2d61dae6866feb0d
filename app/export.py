"""`export`: one finished stage as a standard model directory and a preference data set, each
with a Hugging Face Hub card, optionally pushed to the Hub.

    OUT/model/     the merged model's safetensors shards, index and config.json (copied byte for
                   byte), the tokenizer re-saved without a chat template, generation_config.json
                   whose eos_token_id is the tokenizer's EOS, README.md (the model card)
    OUT/dataset/   data/train.jsonl or data/train.parquet (pairs.jsonl; nested or mixed-type
                   metadata as JSON text, so Arrow reads every column with one type), README.md
                   (the dataset card; its `configs:` points the Hub viewer at the data file)

The export is built in a hidden folder next to OUT and renamed into place at the end: a failure
leaves no half-written export. Pushing needs HF_TOKEN in the environment; the token is passed to
huggingface_hub and written nowhere.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.pipeline import SKIPPED, check_intact, select_stage
from core.config import field_help
from core.errors import RunFailure, UsageError
from core.io import read_json, read_jsonl
from core.profile import ModelProfile
from core.prompting import RESPONSE_STOPS, house_prompt
from core.records import TASKS_FILE, read_tasks
from core.report import (assessment_section, baseline_section, contamination_section,
                         data_section)
from core.run import require_config
from registry.models import HF_ID

FORMATS = ("jsonl", "parquet")
PROJECT = "bootstrap-curriculum"


class ExportError(UsageError):
    """The export cannot be made as asked (stage not done, OUT not empty, no token, ...)."""


class PushError(RunFailure):
    """The export was written but pushing it to the Hub failed."""


@dataclass(frozen=True)
class BaseModel:
    """What the Hub card says about a run's base model."""

    hub_id: str | None  # None: not on the Hub (a local or built-in test model)
    license: str  # a Hub licence id; "other" when not known
    notice: str | None = None  # a notice the licence asks redistributions to carry


# Profile sources with known Hub facts; any other Hub id gets licence "other".
BASE_MODELS = {
    "builtin:gemma-3-270m": BaseModel(
        "google/gemma-3-270m", "gemma",
        "Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms"),
    "Qwen/Qwen2.5-32B": BaseModel("Qwen/Qwen2.5-32B", "apache-2.0"),
}


@dataclass(frozen=True)
class DataSet:
    """An external data set a stage may read (see ../shared/data/README.md)."""

    title: str
    license: str  # Hub licence id
    credit: str  # who made it, the paper, where it lives
    hub_id: str | None = None


EXTERNAL_SETS = {
    "ifeval": DataSet("IFEval", "apache-2.0", "Zhou et al. 2023, \"Instruction-Following "
                      "Evaluation for Large Language Models\"; github.com/google-research/"
                      "google-research (instruction_following_eval)", "google/IFEval"),
    "ailuminate": DataSet("AILuminate v1.0 demo prompt set", "cc-by-4.0",
                          "MLCommons, AILuminate v1.0 demo prompts (en_US), "
                          "github.com/mlcommons/ailuminate; used unmodified"),
    "hh-rlhf-harmless-test": DataSet(
        "HH-RLHF harmless-base, test split", "mit",
        "Anthropic; Bai et al. 2022, \"Training a Helpful and Harmless Assistant with RLHF\"; "
        "github.com/anthropics/hh-rlhf", "Anthropic/hh-rlhf"),
    "self-instruct": DataSet("Self-Instruct seed tasks", "apache-2.0",
                             "Wang et al. 2023, \"Self-Instruct\"; github.com/yizhongw/"
                             "self-instruct"),
    "truthfulqa": DataSet("TruthfulQA", "apache-2.0", "Lin et al. 2022, \"TruthfulQA\"; "
                          "github.com/sylinrl/TruthfulQA"),
    "mt-bench": DataSet("MT-Bench questions", "apache-2.0", "Zheng et al. 2023, \"Judging "
                        "LLM-as-a-Judge with MT-Bench and Chatbot Arena\"; github.com/lm-sys/"
                        "FastChat"),
}
RED_TEAM_SETS = ("ailuminate", "hh-rlhf-harmless-test")
IN_PAIRS, HELD_OUT, DECONTAMINATION = ("text in the training pairs", "held-out assessment",
                                       "decontamination index (no text exported)")
TRAINING_FIELDS = ("backend", "load_in_4bit", "dtype", "lora_r", "lora_alpha", "lora_dropout",
                   "learning_rate", "beta", "epochs", "sft_weight", "train_batch_size",
                   "grad_accum", "max_length")
MODEL_FILES = ("config.json", "model.safetensors.index.json")
COLUMNS = {"prompt": "the zero-shot house prompt the model was trained on (no exemplars)",
           "chosen": "the preferred response", "rejected": "the dispreferred response",
           "stage": "curriculum stage number",
           "task_id": "the task both responses answer (several pairs may share one)",
           "input_model_sha256": "sha256 of the weights that wrote both responses",
           "source": "where the task or the pair's rule came from",
           "kind": "the stage's kind of task (stage 6: redteam, helpful)"}


@dataclass(frozen=True)
class StageFacts:
    """What the cards say about the exported stage, read once from the run directory."""

    run_dir: Path
    number: int
    name: str
    summary: str
    config: dict
    metrics: dict
    pairs: list[dict]
    merge: dict

    @property
    def dir(self) -> Path:
        return self.run_dir / f"stage_{self.number}"


def export_stage(run_dir: Path, number: int, out: Path, data_format: str = "jsonl",
                 push_to_hub: str | None = None, dataset_repo: str | None = None,
                 private: bool = False, overwrite: bool = False, api=None) -> dict:
    """Write OUT/model and OUT/dataset for stage `number` of `run_dir`; push both when
    `push_to_hub` names a repo (the dataset goes to `dataset_repo`, default the same id as a
    dataset repo). `api` stands in for `huggingface_hub.HfApi` (tests). Returns what was
    written (and pushed)."""
    if data_format not in FORMATS:
        raise ExportError(f"--format {data_format!r}: use one of {', '.join(FORMATS)}")
    repos = hub_repos(push_to_hub, dataset_repo)
    if repos:
        api = api or hub_api(hub_token())
    stage = read_stage(run_dir, number)
    check_out(out, overwrite)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export of this pid
    try:
        written = build_export(stage, tmp, data_format, repos)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    written = {key: out / value.relative_to(tmp) if isinstance(value, Path) else value
               for key, value in written.items()}
    written["out"] = out
    if repos:
        written["pushed"] = push(api, out, repos, private)
    return written


def read_stage(run_dir: Path, number: int) -> StageFacts:
    """The stage's facts; refuses a run directory without config.yaml, a skipped, unfinished
    or damaged stage."""
    config = require_config(run_dir)
    spec = select_stage(number)
    stage_dir = run_dir / f"stage_{number}"
    if (stage_dir / SKIPPED).is_file():
        reason = read_json(stage_dir / SKIPPED)["reason"]
        raise ExportError(f"stage {number} of {run_dir} was skipped ({reason}): it trained no "
                          f"model, so there is nothing to export")
    if not (stage_dir / "DONE").is_file():
        raise ExportError(f"stage {number} is not done in {run_dir}; finish it with `python "
                          f"cli.py stage run {number} --run-dir {run_dir}` before exporting")
    check_intact(number, run_dir)
    return StageFacts(run_dir, number, spec.name, spec.summary, config,
                      read_json(stage_dir / "metrics.json"),
                      read_jsonl(stage_dir / "pairs.jsonl"), read_json(stage_dir / "merge.json"))


def check_out(out: Path, overwrite: bool) -> None:
    """OUT must be a new or empty directory (or `overwrite`); its parent is created."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--to {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--to {out} exists and is not empty; pass an empty or new directory, "
                          f"or --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def hub_repos(model_repo: str | None, dataset_repo: str | None) -> dict[str, str]:
    """{"model": id, "dataset": id} when pushing (checked for form), else {}."""
    if model_repo is None:
        if dataset_repo is not None:
            raise ExportError("--dataset-repo needs --push-to-hub")
        return {}
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repos = {"model": model_repo, "dataset": dataset_repo or model_repo}
    for repo in repos.values():
        try:
            validate_repo_id(repo)
        except HFValidationError as error:
            raise ExportError(f"Hub repo id {repo!r}: {error}") from None
    return repos


def hub_api(token: str):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def hub_token() -> str:
    """HF_TOKEN from the environment; pushing never reads a token from anywhere else."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ExportError("--push-to-hub needs a Hub token in the HF_TOKEN environment variable "
                          "(a write token from huggingface.co/settings/tokens); nothing was "
                          "written")
    return token


def build_export(stage: StageFacts, root: Path, data_format: str, repos: dict[str, str]) -> dict:
    """Model, data set and both cards under `root`; returns the paths written."""
    model_dir, dataset_dir = root / "model", root / "dataset"
    tokenizer = write_model(stage.dir / "merged", model_dir)
    data_file = dataset_dir / "data" / f"train.{data_format}"
    encoded = write_pairs(stage.pairs, data_file)
    (model_dir / "README.md").write_text(model_card(stage, tokenizer, repos), encoding="utf-8")
    (dataset_dir / "README.md").write_text(
        dataset_card(stage, data_file.relative_to(dataset_dir), encoded, repos), encoding="utf-8")
    return {"model": model_dir, "dataset": dataset_dir, "data_file": data_file,
            "pairs": len(stage.pairs), "json_columns": encoded,
            "model_card": model_dir / "README.md", "dataset_card": dataset_dir / "README.md"}


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished export into place; a replaced OUT is removed only afterwards."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))
        os.replace(out, old / "out")
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# the model ------------------------------------------------------------------------------------

def write_model(merged: Path, out: Path):
    """Safetensors shards and config copied; tokenizer re-saved with no chat template;
    generation_config.json with the tokenizer's EOS. Returns the tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig

    shards = sorted(merged.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{merged} holds no .safetensors weights; rerun the stage's merge step")
    out.mkdir(parents=True)
    for path in [*shards, *(merged / name for name in MODEL_FILES)]:
        if path.is_file():
            shutil.copyfile(path, out / path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(out))
    generation = GenerationConfig.from_pretrained(str(merged))
    generation.eos_token_id = tokenizer.eos_token_id
    generation.save_pretrained(str(out))
    return tokenizer


# the data set ---------------------------------------------------------------------------------

def json_columns(pairs: list[dict]) -> list[str]:
    """Columns whose values are not all one scalar type (nested, or mixed): these are written
    as JSON text so Arrow gives every column one type."""
    columns = dict.fromkeys(key for pair in pairs for key in pair)
    scalar = ({str}, {bool}, {int}, {float}, {int, float})
    return [c for c in columns
            if {type(p[c]) for p in pairs if p.get(c) is not None} not in [*scalar, set()]]


def table_rows(pairs: list[dict], encoded: list[str]) -> list[dict]:
    """Every pair with every column (None where absent); `encoded` columns as JSON text, and
    numbers in int/float columns as floats."""
    columns = list(dict.fromkeys(key for pair in pairs for key in pair))
    floats = {c for c in columns if {type(p[c]) for p in pairs if p.get(c) is not None}
              == {int, float}}

    def cell(column: str, value):
        if value is None:
            return None
        if column in encoded:
            return json.dumps(value, ensure_ascii=False)
        return float(value) if column in floats else value

    return [{c: cell(c, pair.get(c)) for c in columns} for pair in pairs]


def write_pairs(pairs: list[dict], path: Path) -> list[str]:
    """data/train.jsonl or .parquet; returns the JSON-encoded columns."""
    encoded = json_columns(pairs)
    rows = table_rows(pairs, encoded)
    path.parent.mkdir(parents=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    return encoded


# facts both cards state -----------------------------------------------------------------------

def base_model(stage: StageFacts) -> BaseModel:
    source = stage.config["model"]["source"]
    known = BASE_MODELS.get(source)
    if known:
        return known
    return BaseModel(source if HF_ID.match(source) else None, "other")


def is_red_team(pair: dict) -> bool:
    return pair.get("kind") == "redteam" or pair.get("source") in RED_TEAM_SETS


def external_sets(stage: StageFacts) -> dict[str, list[str]]:
    """{set name: roles} for every external data set the stage used: text in its pairs, its
    held-out assessment (tasks.jsonl's held-out sources; stage 4's HH-RLHF held-out pairs), the
    decontamination index."""
    heldout = {task.source for task in read_tasks(stage.dir / TASKS_FILE, "heldout")}
    if stage.metrics["data"].get("hh_heldout"):
        heldout.add("hh-rlhf-harmless-test")
    roles = {IN_PAIRS: {pair.get("source") for pair in stage.pairs}, HELD_OUT: heldout,
             DECONTAMINATION: set(stage.metrics["contamination"]["eval_sets"])}
    return {name: [role for role, names in roles.items() if name in names]
            for name in EXTERNAL_SETS if any(name in names for names in roles.values())}


def sets_section(used: dict[str, list[str]]) -> list[str]:
    if not used:
        return ["## External data sets and licences", "",
                "None: this run used no external data set (it ran with --no-eval-sets).", ""]
    lines = ["## External data sets and licences", "",
             "| data set | used for | licence | attribution |", "|---|---|---|---|"]
    for name, roles in used.items():
        s = EXTERNAL_SETS[name]
        lines.append(f"| {s.title} (`{name}`) | {'; '.join(roles)} | {s.license} | {s.credit} |")
    return lines + ["", "Each set is used under its licence; the pairs hold text of a set only "
                        "where the table says \"text in the training pairs\".", ""]


def contamination_verdict(summary: dict) -> str:
    """One line: clean, incomplete (no external evaluation sets) or overridden."""
    if summary["template_problems"]:
        return ("overridden: template checks failed and training went on with "
                "--allow-contamination: " + "; ".join(summary["template_problems"]))
    external = [name for name in summary["eval_sets"] if name in EXTERNAL_SETS]
    if not external:
        return ("incomplete: the run had no external evaluation sets (--no-eval-sets); the pairs "
                "were checked against the held-out split, the baseline probes and the exemplars "
                "only")
    return (f"clean: {summary['removed']} of {summary['records']} candidate pairs removed before "
            f"training; the {summary['kept']} trained pairs share no {summary['n']}-gram with "
            f"{', '.join(external)}, the held-out split or the baseline probes, copy no exemplar "
            f"and carry no chat markup")


def contamination_lines(stage: StageFacts) -> list[str]:
    summary = stage.metrics["contamination"]
    body = contamination_section(summary)
    exported = (["- the exported tokenizer has no chat template (removed at export)"]
                if summary["template"]["has_chat_template"] else [])
    return [body[0], "", f"**Contamination verdict: {contamination_verdict(summary)}.**", "",
            *body[2:-1], *exported,
            "- contamination.tsv stays in the run directory (not exported)", ""]


def constitution_lines(stage: StageFacts) -> list[str]:
    c = stage.config["constitution"]
    return ["## Constitution", "", f"constitution.yaml version {c['version']}, sha256 "
            f"`{c['sha256']}` (the run refuses to resume with a changed constitution).", ""]


def input_model_line(stage: StageFacts) -> str:
    recorded = stage.metrics["input_model"]
    sha = recorded["weights_sha256"]
    return (f"{recorded['origin']}: `{recorded['path']}`"
            + (f" (weights sha256 `{sha}`)" if sha else " (a Hub id: no local weights hash)"))


def front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def tags(stage: StageFacts, *extra: str) -> list[str]:
    return ["bootstrap-curriculum", f"stage-{stage.number}", stage.name, *extra]


# the model card -------------------------------------------------------------------------------

def model_card(stage: StageFacts, tokenizer, repos: dict[str, str]) -> str:
    base = base_model(stage)
    used = external_sets(stage)
    datasets = [repos["dataset"]] if repos else []
    datasets += [EXTERNAL_SETS[n].hub_id for n, roles in used.items()
                 if IN_PAIRS in roles and EXTERNAL_SETS[n].hub_id]
    meta = {**({"base_model": base.hub_id} if base.hub_id else {}), "license": base.license,
            "library_name": "transformers", "pipeline_tag": "text-generation",
            **({"datasets": datasets} if datasets else {}),
            "tags": tags(stage, "dpo", "trl", "peft", "lora", "base-model-curriculum")}
    lines = [f"# {repos.get('model', f'Stage {stage.number}: {stage.name}')}", "",
             f"The merged model after stage {stage.number} ({stage.name}) of a "
             f"{PROJECT} run: a base model taught, with preference pairs it wrote itself, "
             f"to {stage.summary}.", ""]
    if red := sum(map(is_red_team, stage.pairs)):
        lines += [f"> **Content note:** {red} of this stage's {len(stage.pairs)} training "
                  f"prompts are red-team requests (harmful by design); see the dataset card's "
                  f"content warning. This card quotes none of them.", ""]
    lines += model_lines(stage, base) + prompt_lines(stage, tokenizer, repos)
    lines += data_lines(stage, repos) + training_lines(stage)
    lines += assessment_section(stage.metrics["assessment"])
    lines += baseline_section(stage.metrics["baseline"]) + contamination_lines(stage)
    lines += constitution_lines(stage) + reproducibility_lines(stage) + sets_section(used)
    lines += ["## Licence", "", f"The weights follow the base model's licence: `{base.license}`."
              + (f" {base.notice}." if base.notice else "")
              + (" The exporter does not know this base model's licence: check it before "
                 "publishing." if base.license == "other" else ""), ""]
    return front_matter(meta) + "\n".join(lines)


def model_lines(stage: StageFacts, base: BaseModel) -> list[str]:
    model = stage.config["model"]
    hub = f"[`{base.hub_id}`](https://huggingface.co/{base.hub_id})" if base.hub_id else \
        f"`{model['source']}` (not on the Hub)"
    return ["## Model", "", "| | |", "|---|---|",
            f"| base model | {hub}; run profile `{model['profile']}` |",
            f"| this stage learned from | {input_model_line(stage)} |",
            f"| merged weights sha256 | `{stage.merge['weights_sha256']}` |",
            f"| dtype | {stage.merge['parity']['dtype']} |", ""]


def prompt_lines(stage: StageFacts, tokenizer, repos: dict[str, str]) -> list[str]:
    """How to prompt it: completion style, the house format, a prompt of this stage, EOS."""
    example = next((p["prompt"] for p in stage.pairs if not is_red_team(p)),
                   house_prompt("Name three primary colours."))
    where = repos.get("model", "path/to/model")
    stops = ", ".join(f"`{json.dumps(s)}`" for s in RESPONSE_STOPS)
    return [
        "## How to prompt it", "",
        "This is a base-model curriculum: the model has **no chat template** and is prompted in "
        "plain completion style, in the house format every stage trains and assesses on "
        f"(`{json.dumps(house_prompt('{instruction}'))[1:-1]}`), zero-shot. A training prompt "
        "of this stage:", "", "```", example.rstrip("\n"), "```", "",
        f"Generation ends at the tokenizer's EOS `{tokenizer.eos_token}` (id "
        f"{tokenizer.eos_token_id}, also generation_config.json's `eos_token_id`); the data "
        f"was generated with the stop strings {stops} as well.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
        f"model = AutoModelForCausalLM.from_pretrained({where!r})",
        f"prompt = {json.dumps(house_prompt('Name three primary colours.'))}",
        "ids = tokenizer(prompt, return_tensors=\"pt\")",
        "out = model.generate(**ids, max_new_tokens=128, do_sample=False)",
        "print(tokenizer.decode(out[0][ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```", ""]


def data_lines(stage: StageFacts, repos: dict[str, str]) -> list[str]:
    where = (f"[`{repos['dataset']}`](https://huggingface.co/datasets/{repos['dataset']})"
             if repos else "`../dataset/` of this export")
    body = data_section(stage.metrics)
    return [body[0], "", f"{len(stage.pairs)} preference pairs ({where}), written by the model "
            f"this stage learned from and trained on with DPO.", "", *body[2:], ""]


def training_lines(stage: StageFacts) -> list[str]:
    profile = stage.config["settings"]["profile"]
    helps = field_help(ModelProfile)
    dpo, parity = stage.metrics["dpo"], stage.metrics["merge"]
    lines = ["## Training", "", "DPO (TRL) on a LoRA (PEFT), merged into a full-precision copy "
             "of the input model. Settings (the run's `profile` section):", "",
             "| setting | value | meaning |", "|---|---|---|"]
    lines += [f"| {key} | {profile[key]} | {helps[key]} |" for key in TRAINING_FIELDS]
    return lines + [
        "", f"- {dpo['steps']} optimizer steps, train loss {dpo['train_loss']:.4g}",
        *[f"- **training warning**: {w}" for w in dpo["health"]["warnings"]],
        f"- merge parity: max |Δ log p| = {parity['max_abs_logprob_diff']:.3g} over "
        f"{parity['probes']} probes (tolerance {parity['tolerance']})", ""]


def reproducibility_lines(stage: StageFacts) -> list[str]:
    c = stage.config
    run = c["run"]
    versions = ", ".join(f"{name} {version}" for name, version in c["versions"].items())
    return ["## Reproducibility", "",
            f"- run settings: seed {run['seed']}, limit {run['limit']}, held-out "
            f"{run['heldout']}, baseline probes per capability {run['baseline_limit'] or 'all'}",
            f"- {PROJECT} git commit: `{c['git_commit'] or 'unknown (not a git checkout)'}`",
            f"- packages: {versions}", ""]


# the dataset card -----------------------------------------------------------------------------

def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def dataset_license(stage: StageFacts, used: dict[str, list[str]]) -> str | list[str]:
    """The base model's licence (it wrote the responses) and the licences of the sets whose
    text is in the pairs."""
    licences = [base_model(stage).license] + [EXTERNAL_SETS[n].license for n, roles in used.items()
                                              if IN_PAIRS in roles]
    unique = list(dict.fromkeys(licences))
    return unique[0] if len(unique) == 1 else unique


def dataset_card(stage: StageFacts, data_file: Path, encoded: list[str],
                 repos: dict[str, str]) -> str:
    used = external_sets(stage)
    red = sum(map(is_red_team, stage.pairs))
    meta = {"license": dataset_license(stage, used), "language": ["en"],
            "task_categories": ["text-generation"],
            "tags": tags(stage, "dpo", "preference", "synthetic",
                         *(["red-teaming", "not-for-all-audiences"] if red else [])),
            "size_categories": [size_category(len(stage.pairs))],
            "pretty_name": f"{PROJECT} stage {stage.number} ({stage.name}) preference pairs",
            "configs": [{"config_name": "default",
                         "data_files": [{"split": "train", "path": data_file.as_posix()}]}]}
    lines = [f"# {meta['pretty_name']}", ""]
    if red:
        lines += red_team_warning(red, len(stage.pairs))
    model = (f"[`{repos['model']}`](https://huggingface.co/{repos['model']})" if repos
             else "`../model/` of this export")
    lines += [f"The preference pairs stage {stage.number} ({stage.name}) of a {PROJECT} run "
              f"trained on with DPO; the stage teaches a base model to {stage.summary}. Both "
              f"responses of every pair were written by the model the stage learned from, "
              f"{input_model_line(stage)}, from few-shot completion prompts; `prompt` is the "
              f"zero-shot house prompt (no exemplars) the pair was trained on. The trained "
              f"model: {model}.", ""]
    lines += dataset_use_lines(data_file, repos) + column_lines(stage.pairs, encoded)
    body = data_section(stage.metrics)
    lines += ["## Sizes and funnel", "", f"{len(stage.pairs)} pairs.", "", *body[2:], ""]
    lines += contamination_lines(stage) + constitution_lines(stage) + sets_section(used)
    lines += ["## Licence", "", f"`license` lists the licence of the model that wrote the "
              f"responses ({base_model(stage).license}) and of every external set whose text is "
              f"in the pairs.", ""]
    return front_matter(meta) + "\n".join(lines)


def red_team_warning(red: int, total: int) -> list[str]:
    return [f"> **Content warning:** {red} of the {total} prompts are red-team requests "
            f"(`kind` redteam, or `source` AILuminate / HH-RLHF): they ask for harmful, "
            f"dangerous or offensive content by design, and the rejected responses may comply. "
            f"They are here to train refusing or safely redirecting; do not use them as "
            f"instructions to follow.", ""]


def dataset_use_lines(data_file: Path, repos: dict[str, str]) -> list[str]:
    kind = "parquet" if data_file.suffix == ".parquet" else "json"
    load = (f"load_dataset({repos['dataset']!r}, split=\"train\")" if repos else
            f"load_dataset({kind!r}, data_files={data_file.as_posix()!r}, split=\"train\")")
    return ["## Use", "", "```python", "from datasets import load_dataset", "",
            f"pairs = {load}", "```", "",
            "The columns `prompt`, `chosen` and `rejected` are what TRL's DPOTrainer reads.", ""]


def column_lines(pairs: list[dict], encoded: list[str]) -> list[str]:
    columns = dict.fromkeys(key for pair in pairs for key in pair)
    lines = ["## Columns", "", "| column | meaning |", "|---|---|"]
    for column in columns:
        meaning = COLUMNS.get(column, "provenance the stage records")
        lines.append(f"| `{column}` | {meaning}{' (JSON text)' if column in encoded else ''} |")
    return lines + [""]


# pushing ----------------------------------------------------------------------------------------

def push(api, out: Path, repos: dict[str, str], private: bool) -> list[str]:
    """Create (if needed) and upload the model repo and the dataset repo; returns their URLs."""
    from huggingface_hub.errors import HTTPError

    urls = []
    for repo_type, folder in (("model", out / "model"), ("dataset", out / "dataset")):
        repo = repos[repo_type]
        try:
            api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type=repo_type,
                              commit_message=f"{PROJECT} export: {folder.name}")
        except HTTPError as error:
            raise PushError(f"pushing {folder} to the Hub {repo_type} repo {repo} failed "
                            f"({error}); the export is complete in {out}: rerun with a new "
                            f"empty --to (or --overwrite) to push again") from None
        urls.append(f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}")
    return urls
