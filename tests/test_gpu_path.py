"""What can be checked of the GPU (Unsloth) path on a machine without CUDA."""
import tomllib
from pathlib import Path

import pytest
import torch

from core import backend as backends
from registry.models import profile_by_name

ROOT = Path(__file__).resolve().parent.parent


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


@NO_CUDA
def test_unsloth_profile_falls_back_to_transformers_without_cuda():
    assert backends.backend_class(profile_by_name("qwen2.5-32b")) is backends.HFBackend
    assert backends.backend_class(profile_by_name("gemma-3-270m")) is backends.HFBackend


@NO_CUDA
def test_unsloth_is_never_imported_without_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        backends.import_unsloth()
    import sys

    assert "unsloth" not in sys.modules


def test_unsloth_backend_shares_the_interface():
    for method in ("load", "generate", "next_token_logprobs", "option_logprobs", "trainable_model"):
        assert callable(getattr(backends.UnslothBackend, method))
    assert backends.UnslothBackend.trainable_model is not backends.HFBackend.trainable_model


def test_gpu_extra_pins_match_the_checked_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    gpu = set(project["project"]["optional-dependencies"]["gpu"])
    assert {"unsloth==2026.10.7", "unsloth_zoo==2026.10.7", "trl==1.15.0",
            "transformers==5.17.0", "peft==0.21.2", "bitsandbytes==0.50.2"} <= gpu
    cpu = set(project["project"]["dependencies"])
    assert "trl==1.16.0" in cpu  # TRL 1.15's DPO crashes on CPU


def test_4bit_config_is_nf4_with_the_profile_compute_dtype():
    config = backends._bnb_4bit_config(profile_by_name("qwen2.5-32b"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
