"""DPO with TRL on LoRA, resumable from its own checkpoints.

Records are plain strings (prompt / chosen / rejected); TRL never applies a chat template to
string data and appends EOS to chosen and rejected. Every record passes the template guard
before training starts. With a `peft_config` the reference model is the base with the adapter
disabled, so no second copy of the model is held.
"""
from __future__ import annotations

import dataclasses
import errno
import importlib.util
import math
import netrc
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from core.errors import RunFailure, UsageError
from core.guards import TemplateGuard
from core.io import read_json, write_json, write_jsonl
from core.models import PROJECT_ROOT
from core.progress import Progress

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DPOSettings:
    learning_rate: float
    beta: float
    epochs: int
    batch_size: int
    grad_accum: int
    max_length: int
    save_steps: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    seed: int
    sft_weight: float = 0.0  # weight of the NLL term on chosen responses (RPO); 0: plain DPO

    def lora(self) -> dict:
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "target_modules": list(LORA_TARGETS)}


TRACKERS = ("wandb", "trackio")  # besides TensorBoard, which every run writes
TRACKING_PROJECT = "bootstrap-curriculum"


def check_trackers(names: tuple[str, ...]) -> None:
    """Refuse (UsageError, every problem at once) trackers that cannot log: a package not
    installed, or W&B online without credentials (before any model is loaded)."""
    problems = []
    for name in names:
        if name not in TRACKERS:
            problems.append(f"--report-to {name}: choose from {', '.join(TRACKERS)} "
                            f"(TensorBoard is always written)")
        elif importlib.util.find_spec(name) is None:
            problems.append(f"--report-to {name}: the {name} package is not installed; "
                            f"pip install -e '.[tracking]'")
    if "wandb" in names and not wandb_can_log():
        problems.append("--report-to wandb: no W&B credentials (WANDB_API_KEY or `wandb "
                        "login`); or set WANDB_MODE=offline to log locally and `wandb sync` "
                        "later")
    if problems:
        raise UsageError("; ".join(problems))


def wandb_can_log() -> bool:
    """Offline or disabled W&B needs nothing; online needs an API key or a `wandb login`."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def finish_trackers(report_to: tuple[str, ...]) -> None:
    """Close the W&B run this training opened: the trainer's callback leaves it open (its Trackio
    callback closes its own), and the next stage of `run` would log into this stage's run."""
    if "wandb" in report_to:
        import wandb

        wandb.finish()


def loss_terms(sft_weight: float) -> dict:
    """DPOConfig's loss: sigmoid DPO, plus the NLL on chosen responses when `sft_weight` > 0
    (RPO; TRL 1.16 removed `rpo_alpha`, this is its replacement)."""
    if sft_weight <= 0:
        return {"loss_type": ["sigmoid"]}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete `checkpoint-N` folder (trainer_state.json is written last)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[1])))


def device_fields() -> dict:
    """TrainingArguments' device fields: the CPU without CUDA, bfloat16 where the GPU has it."""
    on_cpu = not torch.cuda.is_available()
    return {"use_cpu": on_cpu, "bf16": not on_cpu and torch.cuda.is_bf16_supported()}


def dpo_config(settings: DPOSettings, output_dir: Path, report_to: tuple[str, ...] = (),
               run_name: str | None = None, **overrides):
    """TRL's DPOConfig for the project's DPO settings (`overrides` replace any field)."""
    from trl import DPOConfig

    fields = dict(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        beta=settings.beta,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=list(report_to) or "none",
        run_name=run_name,
        project=TRACKING_PROJECT,
        **device_fields(),
        gradient_checkpointing=torch.cuda.is_available(),
        lr_scheduler_type="linear",
        warmup_steps=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        per_device_eval_batch_size=1,  # TRL averages per-batch means: batch 1 makes them exact
        logging_nan_inf_filter=False,  # a NaN loss must reach stop_on_nonfinite_loss, not be masked
        **loss_terms(settings.sft_weight),
    )
    return DPOConfig(**{**fields, **overrides})


def train_dpo(backend, records: list[dict], settings: DPOSettings, work_dir: Path,
              adapter_dir: Path, guard: TemplateGuard,
              dev_records: list[dict] | None = None, report_to: tuple[str, ...] = (),
              run_name: str | None = None) -> dict:
    """Train a LoRA with DPO; save the adapter to `adapter_dir`; return the per-step metrics,
    and with `dev_records` the trained model's DPO metrics on them (`dev`, see `dev_metrics`).
    TensorBoard logs go to work_dir/tensorboard; `report_to` adds W&B or Trackio under
    `run_name`, in the project TRACKING_PROJECT (for W&B: unless WANDB_PROJECT is set)."""
    guard.check_records(records, "pairs.jsonl")
    guard.check_records(dev_records or [], "dev pairs")
    from accelerate import PartialState
    from datasets import Dataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    from trl import DPOTrainer

    args = dpo_config(settings, work_dir / "checkpoints", report_to=report_to,
                      run_name=run_name)
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_PROJECT", TRACKING_PROJECT)
    model, peft_config = backend.trainable_model(settings.lora(), settings.seed)
    def as_dataset(rows: list[dict]) -> Dataset:
        return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    dataset = as_dataset(records)
    main_process = PartialState().is_main_process  # under `accelerate launch`, rank 0 writes
    writer = SummaryWriter(log_dir=str(work_dir / "tensorboard")) if main_process else None
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=backend.tokenizer,
        peft_config=peft_config,
        callbacks=[TensorBoardCallback(tb_writer=writer), step_progress(),
                   stop_on_nonfinite_loss(work_dir / "checkpoints")],
    )
    try:
        trainer.train(resume_from_checkpoint=last_checkpoint(work_dir / "checkpoints"))
    except Exception as error:  # safetensors and torch report a full disk in their own types
        if any(sign in str(error) for sign in DISK_FULL_SIGNS):
            raise OSError(errno.ENOSPC, "No space left on device", str(work_dir)) from error
        raise
    finish_trackers(report_to)
    # save_model gathers FSDP / ZeRO-3 shards and writes on rank 0 only: the adapter and the
    # tokenizer, plus the trainer's pickled arguments, which an adapter does not need
    trainer.save_model(str(adapter_dir))
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = summarize(steps, trainer.state.log_history, settings.beta)
    summary["processes"] = trainer.accelerator.num_processes
    if dev_records:
        summary["dev"] = dev_metrics(trainer.evaluate(as_dataset(dev_records)), len(dev_records),
                                     settings.beta)
    if main_process:
        writer.close()
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)
        write_jsonl(work_dir / "dpo_log.jsonl", steps)
        write_json(work_dir / "dpo_metrics.json", summary)
    return summary


def check_accelerate_config(profile) -> None:
    """Refuse (UsageError) a profile.accelerate_config that cannot launch: a missing or
    unreadable file, or the Unsloth backend (its open-source trainer is single-GPU)."""
    if not profile.accelerate_config:
        return
    path = Path(profile.accelerate_config)
    where = f"profile.accelerate_config={profile.accelerate_config}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file; pass an accelerate config such as "
                         f"configs/accelerate/ddp.yaml (or make one with `accelerate config`)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UsageError(f"{where}: not valid YAML ({error})") from error
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise UsageError(f"{where}: not an accelerate config (it has no distributed_type)")
    if profile.backend == "unsloth":
        raise UsageError(f"{where}: multi-process training runs on the transformers + PEFT "
                         f"backend; add --set profile.backend=hf")


def train_dpo_launched(accelerate_config: str, model_path: str, profile, pairs: Path,
                       settings: DPOSettings, work_dir: Path, adapter_dir: Path,
                       report_to: tuple[str, ...] = (), run_name: str | None = None) -> dict:
    """`train_dpo` in the processes `accelerate_config` asks for (core/train_worker.py), with
    its output in the terminal; returns rank 0's metrics. A failed launch is a RunFailure."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job = work_dir / "launch_job.json"
    write_json(job, {"model_path": model_path, "profile": dataclasses.asdict(profile),
                     "settings": dataclasses.asdict(settings), "pairs": str(pairs.resolve()),
                     "work_dir": str(work_dir.resolve()),
                     "adapter_dir": str(adapter_dir.resolve()),
                     "report_to": list(report_to), "run_name": run_name})
    (work_dir / "dpo_metrics.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(Path(accelerate_config).resolve()), "--module", "core.train_worker", str(job)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    finished = subprocess.run(command, cwd=PROJECT_ROOT, env=env)
    if finished.returncode != 0 or not (work_dir / "dpo_metrics.json").is_file():
        raise RunFailure(f"training under `accelerate launch --config_file {accelerate_config}` "
                         f"failed (exit code {finished.returncode}; its output is above); "
                         f"rerun the same command to resume from the last checkpoint")
    return read_json(work_dir / "dpo_metrics.json")


def dev_metrics(evaluated: dict, n: int, beta: float) -> dict:
    """The trained policy on pairs it did not train on, against the reference (the adapter
    off): how many it ranks right (implicit reward of chosen above rejected), the mean reward
    margin, and the chosen and rejected responses' log-probability change in nats."""
    return {"pairs": n, "ranked_right": round(evaluated["eval_rewards/accuracies"] * n),
            "margin": evaluated["eval_rewards/margins"],
            "chosen_logratio": evaluated["eval_rewards/chosen"] / beta,
            "rejected_logratio": evaluated["eval_rewards/rejected"] / beta,
            "loss": evaluated["eval_loss"]}


DISK_FULL_SIGNS = ("No space left on device", "unexpected pos")  # safetensors; torch.save
WATCHED = ("loss", "grad_norm", "logps/chosen", "logps/rejected")


class TrainingDiverged(RunFailure):
    """The training loss became NaN or infinite."""


def stop_on_nonfinite_loss(checkpoints: Path):
    """A trainer callback that stops training the moment a logged loss, gradient norm or
    log-probability is NaN or infinite, naming the step and the last checkpoint. (The trainer
    is told not to mask non-finite losses: `logging_nan_inf_filter=False`.)"""
    from transformers import TrainerCallback

    class StopOnNonfiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items()
                   if k in WATCHED and isinstance(v, float) and not math.isfinite(v)}
            if bad:
                good = last_checkpoint(checkpoints)
                what = ", ".join(f"{k} {v}" for k, v in bad.items())
                raise TrainingDiverged(
                    f"training diverged at step {state.global_step} ({what}); the last "
                    f"good checkpoint is {good or 'none (no checkpoint was saved yet)'}. Lower "
                    f"the learning rate (--set profile.learning_rate=...) and rerun with "
                    f"--accept-changed-settings: training then starts over")

    return StopOnNonfiniteLoss()


def step_progress():
    """A trainer callback reporting optimizer steps through core.progress (a step of a 270M
    model on two CPU cores takes about a minute: longer than the log interval)."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(state.max_steps, "train", done=state.global_step,
                                     unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.progress.close()

    return StepProgress()


def summarize(steps: list[dict], history: list[dict], beta: float) -> dict:
    """Per-step loss / reward accuracy / margin, plus first and last values."""
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
            "logps/chosen", "logps/rejected")
    per_step = [{"step": e.get("step"), **{k: e[k] for k in keys if k in e}} for e in steps]
    final = next((e for e in reversed(history) if "train_loss" in e), {})
    return {
        "steps": len(per_step),
        "first": per_step[0] if per_step else None,
        "last": per_step[-1] if per_step else None,
        "train_loss": final.get("train_loss"),
        "health": training_health(per_step, beta),
        "per_step": per_step,
    }


FLAT_MARGIN = 0.01  # |reward margin| below this at every step: the DPO loss sat at ln 2 = 0.693
EXPLODED_MARGIN = 20.0  # a reward margin beyond this: the policy has run far from the reference
FALLING_CHOSEN = -1.0  # nats: the chosen responses' log-probability, policy minus reference


def training_health(per_step: list[dict], beta: float) -> dict:
    """Warnings a user should see about a DPO run: nothing learned (every reward margin ~0, so
    the DPO loss stayed at ln 2), exploding margins, and chosen responses becoming less likely
    than under the reference model (the failure the NLL term guards against). The last
    comparison uses TRL's `rewards/chosen` = beta * (log p_policy - log p_reference) on the same
    batch; raw `logps/*` of different steps belong to different batches and are not compared."""
    margins = [s["rewards/margins"] for s in per_step if "rewards/margins" in s]
    chosen = [s["rewards/chosen"] / beta for s in per_step if "rewards/chosen" in s]
    rejected = [s["rewards/rejected"] / beta for s in per_step if "rewards/rejected" in s]
    warnings = []
    if margins and all(abs(m) < FLAT_MARGIN for m in margins):
        warnings.append(f"nothing learned: the reward margin stayed within +-{FLAT_MARGIN} at all "
                        f"{len(margins)} steps (DPO loss at 0.693); raise the learning rate, "
                        f"the epochs or the number of pairs")
    if any(abs(m) > EXPLODED_MARGIN for m in margins):
        worst = max(margins, key=abs)
        warnings.append(f"margins exploded: a reward margin reached {worst:.1f} (> "
                        f"{EXPLODED_MARGIN}); lower the learning rate or raise beta")
    if chosen and chosen[-1] <= FALLING_CHOSEN:
        warnings.append(f"chosen responses became less likely: at the last step their "
                        f"log-probability was {-chosen[-1]:.2f} nats below the reference "
                        f"model's; add the NLL term (profile.sft_weight) or lower the learning "
                        f"rate")
    return {"warnings": warnings,
            "chosen_logratio_last": chosen[-1] if chosen else None,
            "rejected_logratio_last": rejected[-1] if rejected else None}
