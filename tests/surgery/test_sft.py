"""Decoupled SFT (`kind: sft`, `ling-surgery align`): a few TRL steps on a tiny upgraded model, with and without
LoRA; the export loads in a clean process with both modes selectable both ways; labels are exactly the answers;
an interrupted stage resumes from TRL's checkpoint to the same weights."""

import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import bpe_tokenizer, gguf_ready_student, kill_after_checkpoint

from ling_surgery.surgery import sft as sft_module
from ling_surgery.surgery.chat_template import THINK_OPEN, THINK_PREFILL, add_thinking_modes, answer_text
from ling_surgery.surgery.config import ALIGN_STAGES, SFTStage, load_recipe
from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.export import save_model
from ling_surgery.surgery.run import run
from ling_surgery.surgery.sft_data import chitchat_conversations, conversations, reasoning_gym_conversations

QA = [("2+2?", "4", "two and two"), ("3+4?", "7", "three and four"), ("5+1?", "6", "five and one"),
      ("1+1?", "2", "one and one"), ("6+2?", "8", "six and two"), ("4+5?", "9", "four and five")]


def write_conversations(path):
    rows = []
    for question, answer, reasoning in QA:
        for mode in ("fast", "think"):
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer_text(mode, answer, reasoning)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    """A tiny upgraded (bailing_hybrid) model with a ChatML tokenizer, saved as a model folder, and SFT data."""
    root = tmp_path_factory.mktemp("sft")
    tok = bpe_tokenizer()
    save_model(gguf_ready_student(tok), tok, root / "model", {})  # as `convert` writes it (Ling's tensor names)
    return root / "model", write_conversations(root / "chat.jsonl")


def align_recipe(model, data_file, output, **stage):
    sets = [f"stages.sft.data=[{{source: {data_file}, examples: 12}}]", "stages.sft.max_length=96",
            "stages.sft.batch_size=2", "stages.sft.epochs=1", "stages.sft.lr=5e-3", "stages.sft.warmup_steps=0", "eval.tokens=0",
            "data.seq_len=32", "runtime.save_every=2"]
    sets += [f"stages.sft.{k}={v}" for k, v in stage.items()]
    return load_recipe(None, sets, base={"stages": ALIGN_STAGES}, skip_kinds=("rl",),  # `align --no-rl`
                       model=str(model), output=str(output))


CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
q = [{"role": "user", "content": "2+2?"}]
render = lambda m, **kw: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, **kw)
out = {"model_type": model.config.model_type, "lora_left": any("lora" in n for n, _ in model.named_parameters()),
       "think_same": render(q, enable_thinking=True) == render([{"role": "system", "content": "detailed thinking on"}] + q),
       "fast_same": render(q, enable_thinking=False) == render([{"role": "system", "content": "detailed thinking off"}] + q),
       "fast_default": render(q) == render(q, enable_thinking=False),
       "modes_differ": render(q, enable_thinking=True) != render(q),
       "sampling": [model.generation_config.do_sample, model.generation_config.temperature,
                    model.generation_config.top_p, model.generation_config.top_k]}
ids = tok(render(q, enable_thinking=True), return_tensors="pt").input_ids
out["generated"] = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] - ids.shape[1]
print(json.dumps(out))
"""


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_align_trains_and_exports_a_model_with_both_modes(upgraded, tmp_path, lora):
    model_dir, data = upgraded
    extra = {"lora": "{r: 4, alpha: 8}"} if lora else {}
    report = run(align_recipe(model_dir, data, tmp_path / "out", **extra), fresh=True)
    stage = report["stages"]["sft"]
    assert stage["steps"] == 6 and stage["conversations"] == 12 and stage["lora"] == lora
    assert stage["loss_last"] < stage["loss_first"]  # 6 steps at lr 5e-3 on 12 conversations: the loss must fall
    # No conversion: the report compares the model with itself before alignment, not with a "teacher".
    assert report["meta"]["roles"] == ["before", "aligned"]
    assert "| metric | before | aligned | ratio |" in (tmp_path / "out" / "report.md").read_text()
    from safetensors.torch import load_file

    old, new = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert set(old) == set(new)  # LoRA merged away: the same stock tensors
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert any(".mlp." in k for k in changed) and any(".attention." in k for k in changed)
    # The MLA latents (layers 1 and 3) stay: AdamW steps would throw them out of their norm's linear regime.
    assert not any("kv_a_proj_with_mqa" in k or "kv_b_proj" in k for k in changed) and "model.layers.0.attention.q_proj.weight" in changed
    result = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "out" / "model")], capture_output=True,
                            text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"model_type": "bailing_hybrid", "lora_left": False, "think_same": True, "fast_same": True,
                   "fast_default": True, "modes_differ": True, "generated": 4,
                   "sampling": [True, 0.6, 0.95, 20]}  # shipped for thinking (config.SamplingSettings)


def _align_worker(rank: int, world: int, port: int, model_dir, data, out):
    from test_distributed import as_process

    as_process(rank, world, port)
    run(align_recipe(model_dir, data, out), fresh=True)


def test_two_processes_end_in_the_weights_of_one(upgraded, tmp_path):
    """SFT through TRL on two CPU processes (as `accelerate launch` starts them): each trains batch_size / 2
    conversations of every batch, and the stage ends in the weights of one process; the main process writes."""
    from safetensors.torch import load_file
    from test_distributed import _free_port

    model_dir, data = upgraded
    one = run(align_recipe(model_dir, data, tmp_path / "one"), fresh=True)
    mp.spawn(_align_worker, args=(2, _free_port(), model_dir, data, tmp_path / "two"), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "model" / "report.json").read_text())
    assert two["stages"]["sft"]["steps"] == one["stages"]["sft"]["steps"] == 6
    torch.testing.assert_close(torch.tensor(two["stages"]["sft"]["losses"]), torch.tensor(one["stages"]["sft"]["losses"]),
                               atol=0, rtol=1e-4)  # the logged loss is the global batch's
    before = load_file(model_dir / "model.safetensors")
    expected = load_file(tmp_path / "one" / "model" / "model.safetensors")
    actual = load_file(tmp_path / "two" / "model" / "model.safetensors")
    # One process trains on the fast KDA path, two through DDP's wrapper on the stock forward: float noise that AdamW
    # turns into up to ~lr-sized steps on parameters whose gradients are near zero. Measured: max |Δ| 9e-4 against
    # updates of up to 1.8e-2.
    moved = max((expected[k] - before[k]).abs().max().item() for k in expected)
    apart = max((actual[k] - expected[k]).abs().max().item() for k in expected)
    assert apart < 0.1 * moved, (apart, moved)


def test_labels_are_exactly_the_answers(upgraded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = upgraded
    tok = add_thinking_modes(AutoTokenizer.from_pretrained(model_dir))
    stage = SFTStage(data=[{"source": str(data), "examples": 12}], max_length=256)
    rows = conversations(stage.data[0], seed=0)
    ctx = RunContext(teacher=None, arch=None, train=None, seq_len=32, device=torch.device("cpu"))
    trainer = sft_module.make_trainer(AutoModelForCausalLM.from_pretrained(model_dir), tok, stage, ctx, rows,
                                      tmp_path / "trainer")
    for row, example in zip(rows, trainer.train_dataset):
        answer = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        labelled = [label for label in example["labels"] if label != -100]  # what the loss is taken on
        # The think block's opening (think) or the empty block (fast) is the generation prompt's, not learned.
        written = answer[len(THINK_PREFILL):] if answer.startswith(THINK_PREFILL) else answer
        assert tok.decode(labelled) == written + "<|im_end|>\n"
        assert (THINK_OPEN in answer) == ("detailed thinking on" in row["messages"][0]["content"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_interrupted_sft_resumes_to_the_same_weights(upgraded, tmp_path, monkeypatch, lora):
    from safetensors.torch import load_file

    model_dir, data = upgraded
    extra = {"lora": "{r: 4, alpha: 8}"} if lora else {}
    recipe = lambda name: align_recipe(model_dir, data, tmp_path / name, **extra)
    run(recipe("whole"), fresh=True)
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(recipe("broken"), fresh=True)
    monkeypatch.undo()
    with pytest.raises(SurgeryError, match="interrupted at step 4/6; pass --resume"):
        run(recipe("broken"))
    report = run(recipe("broken"), resume=True)
    assert report["stages"]["sft"]["resumed_from"].endswith("checkpoint-4")
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "broken" / "model" / "model.safetensors")
    diffs = {k: (whole[k] - resumed[k]).abs().max().item() for k in whole}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    assert not list((tmp_path / "broken" / "stages").glob(".*"))  # training state and TRL checkpoints cleared


def test_reasoning_gym_pairs_each_problem_in_both_modes():
    rows = reasoning_gym_conversations(["gsm_symbolic"], 6, ["fast", "think"], seed=0)
    by_question = {}
    for row in rows:
        system, user, assistant = row["messages"]
        by_question.setdefault(user["content"], {})[system["content"]] = assistant["content"]
    assert len(by_question) == 3
    for answers in by_question.values():
        fast, think = answers["detailed thinking off"], answers["detailed thinking on"]
        assert THINK_OPEN not in fast and think.startswith(THINK_OPEN) and think.endswith("\n\n" + fast)
        assert len(think) > 3 * len(fast)


def test_chitchat_is_fast_chat_that_ends_on_the_assistant():
    rows = chitchat_conversations(5, seed=0)
    assert len(rows) == 5
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and row["messages"][0]["content"] == "detailed thinking off"
        assert roles[1:] == ["user", "assistant"] * (len(roles[1:]) // 2) and roles[-1] == "assistant"


def test_bad_sft_data_gets_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversation": []}) + "\n")
    stage = SFTStage(data=[{"source": str(bad), "examples": 1}])
    with pytest.raises(SurgeryError, match=r"has no 'messages' field \(found: conversation\)"):
        conversations(stage.data[0], seed=0)
    stage = SFTStage(data=[{"source": "reasoning-gym", "examples": 2, "tasks": ["basic_arithmetic"]}])
    with pytest.raises(SurgeryError, match="no worked solution for think mode"):
        conversations(stage.data[0], seed=0)
    stage = SFTStage(data=[{"source": "reasoning-gym", "examples": 2, "tasks": ["no_such_task"]}])
    with pytest.raises(SurgeryError, match="reasoning-gym task 'no_such_task'"):
        conversations(stage.data[0], seed=0)


def test_batches_hold_conversations_of_similar_length_in_a_seeded_order(upgraded):
    _, data = upgraded
    stage = SFTStage(data=[{"source": str(data), "examples": 12}], batch_size=4)
    rows = sft_module.build_dataset(stage, seed=0)
    assert sorted(map(str, rows)) == sorted(map(str, conversations(stage.data[0], seed=0)))  # all of them, once
    size = lambda row: sum(len(m["content"]) for m in row["messages"])
    batches = [[size(r) for r in rows[i : i + 4]] for i in range(0, 12, 4)]
    for a in batches:  # the length ranges of different batches do not interleave
        for b in batches:
            assert a is b or max(a) <= min(b) or max(b) <= min(a)
    assert sft_module.build_dataset(stage, seed=0) == rows and sft_module.build_dataset(stage, seed=1) != rows


def test_the_fast_kda_loss_matches_transformers_reference_forward(upgraded, tmp_path):
    """The SFT loss through ling-surgery's chunked KDA equals the loss of the model's own forward (the reference
    fallback transformers runs without flash-linear-attention), value and gradients, on a right-padded batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    model_dir, data = upgraded
    tok = add_thinking_modes(AutoTokenizer.from_pretrained(model_dir))
    stage = SFTStage(data=[{"source": str(data), "examples": 12}], batch_size=4, max_length=256)
    rows = sft_module.build_dataset(stage, seed=0)
    ctx = RunContext(teacher=None, arch=None, train=None, seq_len=32, device=torch.device("cpu"), chunk_size=8)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    trainer = sft_module.make_trainer(model, tok, stage, ctx, rows, tmp_path / "trainer")
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # padded: the case that must stay exact
    count = (batch["labels"] != -100).sum()
    losses, grads = [], []
    for compute in (sft_module.KDASFTTrainer.compute_loss, SFTTrainer.compute_loss):
        model.zero_grad()
        loss = compute(trainer, model, dict(batch), num_items_in_batch=count)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), losses
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # fp32 sums in another order: compare each gradient as a whole
        error = (grads[0][name] - grads[1][name]).norm() / grads[1][name].norm().clamp_min(1e-12)
        assert error < 1e-4, (name, error.item())


def test_the_fast_kda_loss_trains_under_bf16_autocast(upgraded, tmp_path):
    """CUDA runs train SFT under bf16 autocast (TRL's bf16=True): the same loss path under CPU bf16 autocast gives a
    finite loss near the fp32 one and gradients for every trainable weight (ops without bf16 kernels stay fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = upgraded
    tok = add_thinking_modes(AutoTokenizer.from_pretrained(model_dir))
    stage = SFTStage(data=[{"source": str(data), "examples": 12}], batch_size=4, max_length=256)
    ctx = RunContext(teacher=None, arch=None, train=None, seq_len=32, device=torch.device("cpu"), chunk_size=8)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    sft_module.trainable_groups(model, ["kda_mixers", "mlp", "norms"])
    trainer = sft_module.make_trainer(model, tok, stage, ctx, sft_module.build_dataset(stage, seed=0), tmp_path / "t")
    batch = dict(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        fp32 = trainer.compute_loss(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - fp32.item()) < 0.05 * fp32.item()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


class AnsweringWriter:
    """Solves the problems whose question has an even length right and the others wrong (`traces: teacher`)."""

    name = "answering writer"

    def __init__(self, task, seed, solve_none=False):
        from ling_surgery.surgery.sft_data import problems

        # Every round draws from seed + problems tried so far; a seed's problems are a prefix-stable sequence.
        self.gold = {p["question"]: p["answer"] for s in range(seed, seed + 41) for p in problems(task, 20, s)}
        self.solve_none, self.asked = solve_none, 0

    def right(self, question):
        return len(question) % 2 == 0 and not self.solve_none

    def solve(self, questions):
        self.asked += len(questions)
        return [f"First I add, then I multiply.\nThe answer is {self.gold[q] if self.right(q) else self.gold[q] + '1'}."
                for q in questions]


def test_teacher_traces_keep_only_solutions_with_the_right_answer():
    from ling_surgery.surgery.sft_data import solved_problems

    writer = AnsweringWriter("gsm_symbolic", seed=7)
    solved = solved_problems("gsm_symbolic", 5, 7, writer)
    assert len(solved) == 5 and writer.asked > 5  # some wrong: more rounds
    assert all(writer.right(p["question"]) for p in solved)
    assert all(p["reasoning"] == f"First I add, then I multiply.\nThe answer is {p['answer']}." for p in solved)
    with pytest.raises(SurgeryError, match=r"solved 0 of 20 gsm_symbolic problems, fewer than the 5 needed"):
        solved_problems("gsm_symbolic", 5, 7, AnsweringWriter("gsm_symbolic", seed=7, solve_none=True))


def test_teacher_traces_run_through_the_stage_and_are_refused_where_they_cannot_apply(upgraded, tmp_path):
    model_dir, data = upgraded
    with pytest.raises(Exception, match="traces: teacher writes think-mode solutions to reasoning-gym problems"):
        align_recipe(model_dir, data, tmp_path / "x", data="[{source: chitchat, examples: 2, modes: [fast], traces: teacher}]")
    # A tiny random model solves nothing: the stage asks it (in its own template) and says so in one line.
    recipe = align_recipe(model_dir, data, tmp_path / "out",
                          data="[{source: reasoning-gym, examples: 2, traces: teacher, trace_max_tokens: 16}]")
    with pytest.raises(SurgeryError, match=r"the source model solved 0 of 4 gsm_symbolic problems"):
        run(recipe, fresh=True)


def test_training_problems_are_never_evaluation_problems():
    # Seeds alone let small templates recur: at this seed, 5 of 2,000 training problems were evaluation problems.
    from ling_surgery.surgery.sft_data import evaluation_questions

    rows = reasoning_gym_conversations(["gsm_symbolic"], 2000, ["fast"], seed=12345)
    questions = {row["messages"][1]["content"] for row in rows}
    assert len(rows) == 2000 and not questions & evaluation_questions("gsm_symbolic")


def test_chain_sum_think_mode_writes_the_running_total_and_checks_it():
    from ling_surgery.surgery.sft_data import EASY_ARITHMETIC, chain_sum_solution, evaluation_questions

    entry = {"question": "8 + 0 - 9 =", "answer": "-1", "metadata": {"expression": "8 + 0 - 9"}}
    assert chain_sum_solution(entry) == "8 + 0 = 8\n8 - 9 = -1"
    with pytest.raises(SurgeryError, match="gives -1, not 7"):
        chain_sum_solution(dict(entry, answer="7"))
    stage = SFTStage(data=[{"source": "reasoning-gym", "tasks": ["chain_sum"], "config": EASY_ARITHMETIC,
                            "examples": 40}])
    rows = conversations(stage.data[0], seed=0)
    held_out = evaluation_questions("chain_sum", tuple(sorted(EASY_ARITHMETIC.items())))
    assert len(rows) == 40 and not {row["messages"][1]["content"] for row in rows} & held_out
    for row in rows:
        question, answer = row["messages"][1]["content"], row["messages"][2]["content"]
        expression = question.rsplit(":", 1)[1].strip(" =")
        assert len(expression.split()) in (3, 5)  # the config holds: two or three one-digit terms
        if answer.startswith(THINK_OPEN):
            steps, final = answer.split("</think>")
            for step in steps.removeprefix(THINK_OPEN).strip().splitlines():  # each line "a ± b = c", true
                left, right = step.split(" = ")
                assert eval(left) == int(right)
            assert int(right) == int(final) == eval(expression)


def test_task_settings_belong_to_reasoning_gym_sources():
    with pytest.raises(ValueError, match="config holds reasoning-gym task settings"):
        SFTStage(data=[{"source": "chitchat", "examples": 2, "modes": ["fast"], "config": {"min_terms": 2}}])
