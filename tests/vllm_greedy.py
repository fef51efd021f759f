"""Run by the Python that has vLLM (not imported by the tests): greedy continuations of a prompt, with the top-2
log-probabilities of every step, as one JSON line on stdout.

    python tests/vllm_greedy.py MODEL_DIR '[prompt token ids]' N
"""

import json
import sys

if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    from vllm import LLM, SamplingParams

    model, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, dtype="float32", max_model_len=256, enforce_eager=True, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
    steps = [{str(t): lp.logprob for t, lp in step.items()} for step in out.logprobs]
    print("GREEDY " + json.dumps({"tokens": list(out.token_ids), "top2": steps}))
