"""Merge a LoRA adapter into a full-precision copy of the stage's input model, with a parity check.

The base is loaded in its 16- or 32-bit dtype, never 4-bit: merging into quantized weights
re-quantizes and loses the update. The merged model is saved to a temporary folder, loaded back
from disk, and must reproduce the adapter model's next-token log-probabilities on probe prompts
within the profile's tolerance before it is moved into place.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from core.backend import DTYPES, next_token_logprobs
from core.errors import RunFailure

TOP_K = 50


class MergeParityError(RunFailure):
    """The merged weights do not reproduce the adapter model."""


def _load_full_precision(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[dtype]}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model


def compare_logprobs(reference: torch.Tensor, candidate: torch.Tensor, top_k: int = TOP_K) -> dict:
    """Max |difference| of log-probs over each probe's reference top-k tokens, and mean KL."""
    top = reference.topk(min(top_k, reference.shape[-1]), dim=-1).indices
    diff = (reference.gather(-1, top) - candidate.gather(-1, top)).abs().max().item()
    kl = (reference.exp() * (reference - candidate)).sum(-1).mean().item()
    return {"max_abs_logprob_diff": diff, "mean_kl": kl}


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path, dtype: str,
                  probes: list[str], tolerance: float) -> dict:
    """Merge, save, reload, and check parity; publish `out_dir` only when parity holds."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapted = PeftModel.from_pretrained(_load_full_precision(base_path, dtype), str(adapter_dir))
    adapted.eval()
    reference = next_token_logprobs(adapted, tokenizer, probes)
    merged = adapted.merge_and_unload()
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), max_shard_size="5GB")
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(tmp))
    del merged, adapted
    reloaded = _load_full_precision(str(tmp), dtype)
    parity = compare_logprobs(reference, next_token_logprobs(reloaded, tokenizer, probes))
    parity.update({"tolerance": tolerance, "probes": len(probes), "dtype": dtype})
    del reloaded
    if parity["max_abs_logprob_diff"] > tolerance:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeParityError(
            f"merged model differs from the adapter model by {parity['max_abs_logprob_diff']:.3g} "
            f"in next-token log-probability (tolerance {tolerance}); the merged weights were not "
            f"published. Check that the base at {base_path} is the model the adapter was "
            f"trained on."
        )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return parity
