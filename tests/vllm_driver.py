"""Run vLLM jobs in one process and print their greedy tokens as JSON (driven by test_vllm_plugin.py).

Usage: python vllm_driver.py JOBS_JSON. Each job: {"env": {...}, "model": DIR, "engine": {LLM kwargs},
"max_tokens": int, "rounds": [[prompt token ids, ...], ...]}; the prompts of a round are one
``LLM.generate`` call (one continuous batch). Prints one line ``RESULT <json>``: per job, per
round, per prompt {"tokens": [...], "cached": number of prompt tokens served by the prefix cache}.
"""

import gc
import json
import os
import sys


def run(job):
    from vllm import LLM, SamplingParams

    os.environ.update(job.get("env", {}))
    for name in job.get("unset", []):
        os.environ.pop(name, None)
    engine = dict(
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        max_num_seqs=8,
        seed=0,
        kv_cache_memory_bytes=64 << 20,
        block_size=32,
    )
    engine.update(job.get("engine", {}))
    llm = LLM(model=job["model"], **engine)
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    result = []
    for prompts in job["rounds"]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0} for o in outs])
    del llm
    gc.collect()
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    return result


def main():
    jobs = json.loads(sys.argv[1])
    print("RESULT " + json.dumps([run(job) for job in jobs]), flush=True)


if __name__ == "__main__":
    main()
