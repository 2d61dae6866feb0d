"""Model backends behind one small interface: load, batched generate, next-token log-probabilities, and a
trainable LoRA model for DPO. Merging lives in core/merge.py (it never touches 4-bit weights).

- `HFBackend`: transformers + PEFT on CPU or GPU (optionally bitsandbytes 4-bit on CUDA).
- `UnslothBackend`: Unsloth on a CUDA GPU; `unsloth` is imported only when CUDA is available,
  and before `trl`, as Unsloth requires.
"""
from __future__ import annotations

import torch

from core.profile import ModelProfile
from core.sampler import PREFILL_ROWS, SAMPLER_VERSION, Completion, SamplingSettings, sample_batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFBackend:
    """transformers + PEFT."""

    name = "hf"
    prefill_rows: int | None = PREFILL_ROWS  # prompts per group of the prompt pass

    def __init__(self, model, tokenizer, source: str, profile: ModelProfile):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.cache_id = f"{source}#sampler-v{SAMPLER_VERSION}"  # names its draws in cache keys
        self.profile = profile
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    @classmethod
    def load(cls, path: str, profile: ModelProfile,
             device_map: str | dict | None = "auto") -> "HFBackend":
        """`device_map` applies on CUDA only: "auto" spreads one process's model over every GPU;
        one process of a multi-process training run passes its own (core/train_worker.py)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict = {"dtype": DTYPES[profile.dtype]}
        if torch.cuda.is_available():
            kwargs["device_map"] = device_map
            if profile.load_in_4bit:
                kwargs["quantization_config"] = _bnb_4bit_config(profile)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, path, profile)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], settings: SamplingSettings, seeds: list[int],
                 on_finish=None) -> list[Completion]:
        """Sample one completion per prompt in one batch (see core.sampler.sample_batch);
        `on_finish(i, completion)` fires as each sequence ends."""
        self.tokenizer.padding_side = "left"
        return sample_batch(self.model, self.tokenizer, prompts, settings, seeds, on_finish,
                            self.prefill_rows)

    def next_token_logprobs(self, prompts: list[str]) -> torch.Tensor:
        """Log-probabilities of the next token after each prompt, shape [n, vocab] (float32)."""
        return next_token_logprobs(self.model, self.tokenizer, prompts)

    def option_logprobs(self, prompts: list[str], token_ids: tuple[int, ...]) -> torch.Tensor:
        """[n, len(token_ids)]: the next-token log-probability of each token after each prompt
        (the A/B judge's comparison)."""
        return self.next_token_logprobs(prompts)[:, list(token_ids)]

    def trainable_model(self, lora: dict, seed: int):
        """(model, peft_config) for TRL's DPOTrainer: TRL wraps the model with the adapter."""
        from peft import LoraConfig

        torch.manual_seed(seed)  # LoRA A matrices are initialised from the global RNG
        return self.model, LoraConfig(task_type="CAUSAL_LM", **lora)


class UnslothBackend(HFBackend):
    """Unsloth (CUDA only): fast 4-bit loading, generation and LoRA training."""

    name = "unsloth"
    # Unsloth's patched inference forward keeps its own cache, which `core.sampler.prefill`
    # cannot splice: its prompts run in one forward.
    prefill_rows = None

    @classmethod
    def load(cls, path: str, profile: ModelProfile) -> "UnslothBackend":
        FastLanguageModel = import_unsloth().FastLanguageModel
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=profile.max_length + profile.max_new_tokens,
            dtype=DTYPES[profile.dtype], load_in_4bit=profile.load_in_4bit,
        )
        FastLanguageModel.for_inference(model)
        return cls(model, tokenizer, path, profile)

    def generate(self, prompts: list[str], settings: SamplingSettings, seeds: list[int],
                 on_finish=None) -> list[Completion]:
        # Unsloth's trainers set padding right; batched generation needs left.
        self.tokenizer.padding_side = "left"
        return super().generate(prompts, settings, seeds, on_finish)

    def trainable_model(self, lora: dict, seed: int):
        """Unsloth's patched trainers ignore `peft_config`: the adapter is attached here."""
        FastLanguageModel = import_unsloth().FastLanguageModel
        model = FastLanguageModel.get_peft_model(
            self.model, r=lora["r"], lora_alpha=lora["lora_alpha"],
            lora_dropout=lora["lora_dropout"], target_modules=lora["target_modules"],
            use_gradient_checkpointing="unsloth", random_state=seed,
        )
        FastLanguageModel.for_training(model)
        return model, None


def import_unsloth():
    """Import unsloth, which raises without a GPU; callers reach this only on CUDA machines."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the Unsloth backend needs a CUDA GPU; on this machine use a CPU profile "
            "(--model gemma-3-270m) or install the GPU extra on a GPU host (docs/runpod.md)"
        )
    import unsloth  # noqa: F401  (must precede trl)

    return unsloth


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Next-token log-probabilities after each left-padded prompt, [n, vocab], float32 on CPU."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1, :]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _bnb_4bit_config(profile: ModelProfile):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[profile.dtype],
    )


def backend_class(profile: ModelProfile) -> type[HFBackend]:
    """Unsloth where the profile asks for it and CUDA exists; transformers otherwise."""
    if profile.backend == "unsloth" and torch.cuda.is_available():
        return UnslothBackend
    return HFBackend


def load_backend(path: str, profile: ModelProfile) -> HFBackend:
    torch.manual_seed(0)
    if profile.engine == "vllm":
        from core.vllm_engine import VLLMBackend

        return VLLMBackend.load(path, profile, backend_class(profile))
    return backend_class(profile).load(path, profile)
