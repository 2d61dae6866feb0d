"""Model resolution and the built-in tiny model."""
import pytest

from registry.models import ModelResolutionError, resolve_model


def test_default_depends_on_cuda():
    assert resolve_model(None, has_cuda=False).profile.name == "gemma-3-270m"
    gpu = resolve_model(None, has_cuda=True)
    assert gpu.profile.name == "qwen2.5-32b" and "CUDA is available" in gpu.reason
    assert gpu.profile.backend == "unsloth" and gpu.profile.load_in_4bit
    assert (gpu.profile.lora_r, gpu.profile.lora_alpha, gpu.profile.learning_rate,
            gpu.profile.beta) == (32, 64, 5e-6, 0.1)


def test_hf_id_and_local_path(tmp_path):
    hub = resolve_model("Qwen/Qwen2.5-7B", has_cuda=True)
    assert hub.source == "Qwen/Qwen2.5-7B" and hub.profile.backend == "unsloth"
    (tmp_path / "config.json").write_text("{}")
    local = resolve_model(str(tmp_path), has_cuda=False)
    assert local.source == str(tmp_path.resolve()) and local.profile.dtype == "float32"


def test_bad_references():
    with pytest.raises(ModelResolutionError, match="not a profile"):
        resolve_model("gemma-3-27m", has_cuda=False)
    with pytest.raises(ModelResolutionError, match="needs a CUDA GPU"):
        resolve_model("qwen2.5-32b", has_cuda=False)


def test_tiny_model_is_qwen2_with_qwen_special_tokens(tiny_dir, tiny_backend):
    tok = tiny_backend.tokenizer
    assert tiny_backend.model.config.model_type == "qwen2"
    assert tok.eos_token == "<|endoftext|>"
    assert "<|im_start|>" in tok.all_special_tokens and "<|im_end|>" in tok.all_special_tokens
    assert "You are Qwen" in tok.chat_template
    assert (tiny_dir / "config.json").is_file() and (tiny_dir / "tokenizer.json").is_file()
