"""Fine-grained RL (`kind: rl`): the sentence-level ratio against a hand-computed LPO loss and against TRL's sequence
level; token/sequence levels reproduce TRL's own loss through the fast KDA path; the rewards; a few RL steps on a tiny
upgraded model with and without LoRA at each level; an interrupted stage resumes to the same weights."""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from helpers import bpe_tokenizer, gguf_ready_student, kill_after_checkpoint
from trl import GRPOTrainer

from ling_surgery.surgery import rl as rl_module
from ling_surgery.surgery.chat_template import add_thinking_modes
from ling_surgery.surgery.config import ALIGN_STAGES, RLStage, load_recipe
from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.errors import RecipeError, SurgeryError
from ling_surgery.surgery.export import save_model
from ling_surgery.surgery.lpo import segment_mean, sentence_ends, sentence_ids
from ling_surgery.surgery.rewards import correctness, format, length, length_by_accuracy
from ling_surgery.surgery.run import run


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    """A tiny upgraded (bailing_hybrid) model whose ChatML tokenizer has ling-surgery's thinking modes."""
    root = tmp_path_factory.mktemp("rl")
    tok = add_thinking_modes(bpe_tokenizer())
    save_model(gguf_ready_student(tok), tok, root / "model", {})  # as `convert` writes it (Ling's tensor names)
    return root / "model"


def rl_recipe(model, output, **stage):
    sets = ["stages=[{kind: rl}]", "stages.rl.data=[{tasks: [basic_arithmetic], problems: 4}]",
            "stages.rl.num_generations=2", "stages.rl.prompts_per_rollout=4", "stages.rl.updates_per_rollout=2",
            "stages.rl.max_completion_length=10", "stages.rl.lr=1e-3",
            "stages.rl.rewards=[{name: correctness}, {name: length, weight: 0.5}, {name: length_by_accuracy, "
            "weight: 0.5}, {name: format}, {name: 'helpers:vowel_share'}]", "eval.tokens=0", "data.seq_len=32", "runtime.save_every=2"]
    sets += [f"stages.rl.{k}={v}" for k, v in stage.items()]
    return load_recipe(None, sets, model=str(model), output=str(output))


def make_trainer(model_dir, tmp_path, **stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stage = RLStage(data=[{"tasks": ["basic_arithmetic"], "problems": 2}], num_generations=2, prompts_per_rollout=2,
                    updates_per_rollout=1, max_completion_length=8, **stage)
    ctx = RunContext(teacher=None, arch=None, train=None, seq_len=32, device=torch.device("cpu"), chunk_size=4)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    trainer = rl_module.make_trainer(model, tok, stage, ctx, rl_module.prompt_rows(stage, tok, 0), tmp_path / "t")
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before computing a loss
    return trainer, model


# --- sentence boundaries and the sentence-level ratio ---------------------------------------------------------------

def test_sentences_end_at_end_punctuation_and_newlines_not_at_decimal_points():
    texts = ["It", " costs", " 3", ".", "14", ".", " Then", "\n", "\n", "more", "!", "\n", " Ok", "?"]
    assert sentence_ends(texts) == [False, False, False, False, False, True, False, False, True, False, False, True,
                                    False, True]
    tok = bpe_tokenizer()
    text = "It costs 3.14 apples. The fox jumps!\nThe dog"
    ids = torch.tensor([tok(text)["input_ids"] + [0, 0]])
    mask = torch.tensor([[1] * (ids.shape[1] - 2) + [0, 0]])
    segments = sentence_ids(tok, ids, mask, {})[0].tolist()
    pieces = {}
    for token, segment in zip(ids[0, :-2].tolist(), segments):
        pieces.setdefault(segment, []).append(token)
    assert [tok.decode(p) for p in pieces.values()] == ["It costs 3.14 apples.", " The fox jumps!\n", "The dog"]


def test_segment_mean_averages_each_sentence_over_its_unmasked_tokens():
    values = torch.tensor([[1.0, 3.0, 5.0, 7.0, 100.0], [2.0, 4.0, 6.0, -50.0, 80.0]], requires_grad=True)
    segments = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    out = segment_mean(values, segments, mask)
    assert torch.allclose(out, torch.tensor([[2.0, 2.0, 6.0, 6.0, 6.0], [4.0, 4.0, 4.0, 4.0, 4.0]]))
    out[0, 2].backward()  # differentiable: the sentence's mean passes 1/2 to each of its two real tokens
    assert values.grad[0].tolist() == [0.0, 0.0, 0.5, 0.5, 0.0] and values.grad[1].abs().sum() == 0


def lpo_by_hand(logps, old, segments, mask, advantages, epsilon):
    """LPO (Ling 2.0 §4.2) written out: per sentence r = exp(mean(logp − old)), its clipped surrogate weighted by the
    sentence's length, summed and divided by the number of completion tokens (dapo's normaliser)."""
    total, tokens = 0.0, 0
    for row in range(len(logps)):
        sentences = {}
        for t, (lp, o, s, m) in enumerate(zip(logps[row], old[row], segments[row], mask[row])):
            if m:
                sentences.setdefault(s, []).append(lp - o)
                tokens += 1
        for deltas in sentences.values():
            ratio = math.exp(sum(deltas) / len(deltas))
            a = advantages[row]
            total += len(deltas) * min(ratio * a, min(max(ratio, 1 - epsilon), 1 + epsilon) * a)
    return -total / tokens


def fixed_logps(values):
    def fake(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        return values, torch.zeros_like(values), None
    return fake


def test_the_sentence_level_loss_is_lpo_by_hand_with_clipping_and_padding_masked(upgraded, tmp_path, monkeypatch):
    trainer, model = make_trainer(upgraded, tmp_path, importance_sampling_level="sentence", epsilon=0.03)
    trainer.fast_path = False
    logps = torch.tensor([[-1.0, -1.2, -0.5, -2.0, -9.0], [-0.3, -0.4, -0.2, -0.1, -0.7]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.3, -0.4, -2.0, 5.0], [-0.3, -0.45, -0.2, 3.0, 1.0]])
    segments = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])  # padding holds values that would change every ratio
    advantages = torch.tensor([1.0, -1.0])
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", fixed_logps(logps))
    inputs = {"prompt_ids": torch.ones(2, 3, dtype=torch.long), "prompt_mask": torch.ones(2, 3, dtype=torch.long),
              "completion_ids": torch.ones(2, 5, dtype=torch.long), "completion_mask": mask, "advantages": advantages,
              "old_per_token_logps": old, "segment_ids": segments, "num_items_in_batch": mask.sum()}
    loss = trainer._compute_loss(model, inputs)
    expected = lpo_by_hand(logps.tolist(), old.tolist(), segments.tolist(), mask.tolist(), advantages.tolist(), 0.03)
    assert abs(loss.item() - expected) < 1e-6, (loss.item(), expected)
    # The first sentence of row 0 has ratio e^0.1 > 1.03 with a positive advantage: clipped, so it passes no gradient.
    loss.backward()
    assert logps.grad[0, :2].abs().sum() == 0 and logps.grad[0, 2:4].abs().sum() > 0
    assert logps.grad[:, 4].abs().sum() == 0 and logps.grad[1, 3:].abs().sum() == 0  # padding takes no part
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0


def test_one_sentence_per_completion_is_trls_sequence_level(upgraded, tmp_path, monkeypatch):
    sentence, model = make_trainer(upgraded, tmp_path, importance_sampling_level="sentence", epsilon=0.05)
    sequence, _ = make_trainer(upgraded, tmp_path, importance_sampling_level="sequence", epsilon=0.05,
                               epsilon_high=0.05)
    torch.manual_seed(0)
    logps = (-torch.rand(3, 6)).requires_grad_()
    old = logps.detach() + 0.08 * torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    inputs = {"prompt_ids": torch.ones(3, 2, dtype=torch.long), "prompt_mask": torch.ones(3, 2, dtype=torch.long),
              "completion_ids": torch.ones(3, 6, dtype=torch.long), "completion_mask": mask,
              "advantages": torch.tensor([0.7, -1.2, 0.4]), "old_per_token_logps": old,
              "segment_ids": torch.zeros(3, 6, dtype=torch.long), "num_items_in_batch": mask.sum()}
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", fixed_logps(logps))
    for trainer in (sentence, sequence):
        trainer.fast_path = False
    losses = [trainer._compute_loss(model, dict(inputs)) for trainer in (sentence, sequence)]
    grads = [torch.autograd.grad(loss, logps)[0] for loss in losses]
    assert abs(losses[0].item() - losses[1].item()) < 1e-7 and torch.allclose(grads[0], grads[1], atol=1e-7)
    assert sequence.importance_sampling_level == "sequence" and sentence.importance_sampling_level == "token"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_token_and_sequence_levels_reproduce_trls_loss_through_the_fast_kda_path(upgraded, tmp_path, level):
    """A real rollout of the tiny upgraded model: LPOTrainer's loss (cached sampler, shared-prompt fast KDA scoring) is
    TRL's own loss (transformers' forward with its reference kernels, left-padded prompts), value and gradients."""
    trainer, model = make_trainer(upgraded, tmp_path, importance_sampling_level=level,
                                  rewards=[{"name": "helpers:vowel_share"}])
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(batch)
    # A completion that ended early (the tiny random model rarely samples its EOS): right padding after it.
    inputs["completion_mask"][0, 5:] = 0
    inputs["completion_ids"][0, 5:] = trainer.processing_class.pad_token_id
    assert (inputs["prompt_mask"] == 0).any()  # prompts of different lengths: left-padded
    inputs["old_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
        model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])[0].detach()
    inputs["old_per_token_logps"] += 0.05 * torch.randn_like(inputs["old_per_token_logps"])  # off-policy: ratios ≠ 1
    results = []
    for fast in (True, False):
        trainer.fast_path = fast
        model.zero_grad()
        loss = trainer._compute_loss(model, dict(inputs))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast_loss, fast_grads), (trl_loss, trl_grads) = results
    assert torch.allclose(fast_loss, trl_loss, rtol=1e-4, atol=1e-6), (fast_loss, trl_loss)
    assert fast_grads.keys() == trl_grads.keys() and fast_grads
    for name in trl_grads:
        error = (fast_grads[name] - trl_grads[name]).norm() / trl_grads[name].norm().clamp_min(1e-12)
        assert error < 1e-3, (name, error.item())


def test_the_cached_sampler_decodes_greedily_as_generate_does(upgraded):
    from transformers import AutoModelForCausalLM

    from ling_surgery.surgery.rollout import sample_group

    model = AutoModelForCausalLM.from_pretrained(upgraded, dtype=torch.float32).eval()
    prompt = [5, 17, 33, 2, 90, 41, 7]
    ours = sample_group(model, prompt, 2, 12, [-1], do_sample=False, chunk_size=4)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert ours == [theirs, theirs]


def test_the_fast_scoring_trains_under_bf16_autocast(upgraded):
    """CUDA runs score under bf16 autocast: the fast path's log-probabilities stay near fp32 with finite gradients."""
    from transformers import AutoModelForCausalLM

    from ling_surgery.surgery.rollout import completion_logps

    model = AutoModelForCausalLM.from_pretrained(upgraded, dtype=torch.float32).train()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 0], [11, 12, 13, 14, 15, 16, 17, 18]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0], [1] * 8])
    fp32, _ = completion_logps(model, ids, mask, 4, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = completion_logps(model, ids, mask, 4, chunk_size=4)
    (bf16 * mask[:, -4:]).sum().backward()
    assert (bf16 - fp32).abs().max() < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- rewards --------------------------------------------------------------------------------------------------------

def test_rewards_score_answers_pay_short_right_answers_and_penalise_broken_modes():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    gold = entry["answer"]
    fast, think = "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"
    prompts = [fast] * 3 + [think] * 3
    completions = [gold, f"{gold}1", f"<think>x</think>{gold}", f"a\n</think>\n\n{gold}", f"a b c d\n</think>\n\n{gold}",
                   f"long and never closed {gold}"]
    ids = [[1], [1, 2], [1] * 5, [1] * 3, [1] * 7, [1] * 11]
    columns = {"task": ["basic_arithmetic"] * 6, "entry": [json.dumps(entry)] * 6}
    scores = correctness(prompts, completions, **columns)
    assert scores[0] == 1.0 and scores[1] < 1.0 and scores[3] == 1.0  # the task's partial credit stays below 1
    # Groups of equal prompts: fast lengths 1, 2, 5 → p = 0.5, 0.25, −0.5 (the second wrong: min(p, 0) = 0); think
    # 3, 7, 11 → 0.5, 0, −0.5. Two of three right in each group: `length_by_accuracy` pays 2/3 of that.
    evo_cot = [0.5, 0.0, -0.5, 0.5, 0.0, -0.5]
    assert length(prompts, completions, ids, **columns) == pytest.approx(evo_cot, abs=1e-8)
    assert length_by_accuracy(prompts, completions, ids, **columns) == pytest.approx([2 / 3 * r for r in evo_cot], abs=1e-8)
    assert format(prompts, completions, ["fast"] * 3 + ["think"] * 3) == [0, 0, -0.5, 0, 0, -0.5]


def test_the_length_reward_by_accuracy_scales_with_how_many_of_the_group_are_right():
    """Evo-CoT's α, larger on easy prompts and smaller on hard: a group nobody solves pays no length (unscaled, its
    shortest wrong answer would gain over the long ones — a reward for giving up early), a group all right pays it all."""
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    gold, prompt = entry["answer"], "<|im_start|>assistant\n"
    ids = [[1], [1] * 5, [1] * 7, [1] * 9]  # p = 0.5, 0, −0.25, −0.5
    columns = {"task": ["basic_arithmetic"] * 4, "entry": [json.dumps(entry)] * 4}
    wrong = [f"{gold}1", f"{gold}2", f"{gold}3", f"{gold}4"]
    assert length([prompt] * 4, wrong, ids, **columns) == pytest.approx([0, 0, -0.25, -0.5], abs=1e-8)
    assert length_by_accuracy([prompt] * 4, wrong, ids, **columns) == [0.0] * 4
    right = [gold] * 4
    assert length_by_accuracy([prompt] * 4, right, ids, **columns) == length([prompt] * 4, right, ids, **columns)
    one_right = [gold, *wrong[1:]]  # the short answer right: a quarter of the constant reward
    assert length_by_accuracy([prompt] * 4, one_right, ids, **columns) == pytest.approx([0.125, 0, -0.0625, -0.125], abs=1e-8)


def test_rollouts_sample_through_vllm_where_it_can_run_and_the_plan_says_why():
    from ling_surgery.surgery.rl import rollout_sampler

    use, why = rollout_sampler("auto", "llama", cuda=True, vllm_installed=True)
    assert use and "colocate" in why
    assert rollout_sampler("vllm", "qwen3", cuda=True, vllm_installed=True)[0]
    for choice, cuda, installed, reason in [("auto", False, True, "vLLM needs CUDA"),
                                            ("auto", True, False, "vllm is not installed"),
                                            ("generate", True, True, "as asked")]:
        use, why = rollout_sampler(choice, "llama", cuda=cuda, vllm_installed=installed)
        assert not use and why.startswith("transformers generate") and reason in why
    # An upgraded hybrid never goes to vLLM (its loader needs Ling's weight names); on CPU it samples on the fast path.
    assert not rollout_sampler("auto", "bailing_hybrid", cuda=True, vllm_installed=True)[0]
    assert "fast KDA path" in rollout_sampler("auto", "bailing_hybrid", cuda=False, vllm_installed=False)[1]
    for model_type, cuda, installed, message in [("bailing_hybrid", True, True, "vLLM cannot sample an upgraded"),
                                                  ("llama", False, True, "needs a CUDA device"),
                                                  ("llama", True, False, "needs the vllm package")]:
        with pytest.raises(SurgeryError, match=message):
            rollout_sampler("vllm", model_type, cuda=cuda, vllm_installed=installed)


# --- the stage --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["token", "sequence", "sentence"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rl_trains_a_tiny_upgraded_model_in_both_modes(upgraded, tmp_path, level, lora):
    from safetensors.torch import load_file

    extra = {"lora": "{r: 4, alpha: 8}"} if lora else {}
    report = run(rl_recipe(upgraded, tmp_path / "out", importance_sampling_level=level, **extra), fresh=True)
    stage = report["stages"]["rl"]
    assert stage["steps"] == 4 and stage["rollouts"] == 2 and stage["prompts"] == 8 and stage["lora"] == lora
    assert stage["importance_sampling_level"] == level
    modes = {key.split("/")[0] for row in stage["history"] for key in row if "/reward" in key}
    assert modes == {"fast", "think"}  # both modes sampled
    assert any(row.get("drift", 0) > 0 for row in stage["history"])  # the second update of a rollout is off-policy
    old, new = load_file(upgraded / "model.safetensors"), load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert set(old) == set(new) and any(not torch.equal(old[k], new[k]) for k in old)
    assert (tmp_path / "out" / "rl_curves.png").is_file()
    assert "| RL stage | mode |" in (tmp_path / "out" / "report.md").read_text()


def _rl_worker(rank: int, world: int, port: int, model_dir, out):
    from test_distributed import as_process

    as_process(rank, world, port)
    run(rl_recipe(model_dir, out), fresh=True)


def test_rl_trains_over_two_processes(upgraded, tmp_path):
    """GRPO through TRL on two CPU processes (as `accelerate launch` starts them): each samples and trains half of
    every update's completions (rewards and group advantages over all of them), the updates and rollouts are one
    process's, and the main process writes the model and report."""
    from safetensors.torch import load_file
    from test_distributed import _free_port

    mp.spawn(_rl_worker, args=(2, _free_port(), upgraded, tmp_path / "out"), nprocs=2, join=True)
    stage = json.loads((tmp_path / "out" / "model" / "report.json").read_text())["stages"]["rl"]
    assert stage["steps"] == 4 and stage["rollouts"] == 2 and stage["prompts"] == 8
    modes = {key.split("/")[0] for row in stage["history"] for key in row if "/reward" in key}
    assert modes == {"fast", "think"}
    old, new = load_file(upgraded / "model.safetensors"), load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_an_interrupted_rl_stage_resumes_to_the_same_weights(upgraded, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    run(rl_recipe(upgraded, tmp_path / "whole"), fresh=True)
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(rl_recipe(upgraded, tmp_path / "broken"), fresh=True)
    monkeypatch.undo()
    with pytest.raises(SurgeryError, match="interrupted at step 2/4; pass --resume"):
        run(rl_recipe(upgraded, tmp_path / "broken"))
    report = run(rl_recipe(upgraded, tmp_path / "broken"), resume=True)
    assert report["stages"]["rl"]["resumed_from"].endswith("checkpoint-2")
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "broken" / "model" / "model.safetensors")
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


@pytest.mark.parametrize("sets, message", [
    (["stages.rl.rewards=[{name: corectness}]"], "'corectness' is not a reward"),
    (["stages.rl.rewards=[{name: 'no_such_module:f'}]"], "cannot import 'no_such_module'"),
    (["stages.rl.rewards=[{name: 'helpers:no_such_function'}]"], "has no function 'no_such_function'"),
    (["stages.rl.loss_type=cispo"], "loss_type cispo cannot take the sentence-level ratio"),
    (["stages.rl.beta=0.04"], "cannot be combined with importance_sampling_level sentence"),
    (["stages.rl.loss_type=luspo", "stages.rl.importance_sampling_level=token"], "luspo needs importance_sampling_level sequence"),
    (["stages.rl.prompts_per_rollout=3"], "must be a multiple of updates_per_rollout"),
    (["stages.rl.importance_sampling_level=word"], "importance_sampling_level"),
])
def test_bad_rl_settings_are_one_line_errors(sets, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["stages=[{kind: rl}]", *sets])
    assert any(message in problem for problem in err.value.problems), err.value.problems


def test_problems_come_in_both_modes_with_their_settings_and_never_from_the_evaluation(upgraded):
    from transformers import AutoTokenizer

    from ling_surgery.evals.tasks import load_task
    from ling_surgery.surgery.sft_data import EASY_ARITHMETIC

    tok = AutoTokenizer.from_pretrained(upgraded)
    stage = RLStage(data=[{"tasks": ["chain_sum"], "config": EASY_ARITHMETIC, "problems": 30}])
    rows = rl_module.prompt_rows(stage, tok, seed=0)
    assert len(rows) == 60 and {r["mode"] for r in rows} == {"fast", "think"}
    questions = {json.loads(r["entry"])["question"] for r in rows}
    assert len(questions) == 30
    for question in questions:  # two or three one-digit terms
        terms = question.split(":")[1].strip(" =").replace("-", "+").split("+")
        assert 2 <= len(terms) <= 3 and all(len(t.strip()) == 1 for t in terms), question
    evaluated = {doc["question"] for doc in load_task("arithmetic_chat", 1000).docs}
    assert not any(q in evaluated for q in questions)
    with pytest.raises(SurgeryError, match="with config"):
        rl_module.prompt_rows(RLStage(data=[{"tasks": ["chain_sum"], "config": {"max_termz": 2}, "problems": 2}]), tok, 0)


def test_the_cpu_align_recipe_is_align_with_its_defaults():
    # README: `align --config smollm2-135m-align-cpu` is what `align` does with defaults; keep the two in step.
    shipped = load_recipe("smollm2-135m-align-cpu")
    defaults = load_recipe(None, base={"stages": ALIGN_STAGES})
    for stage, default in zip(shipped.stages, defaults.stages, strict=True):
        assert stage.model_dump() == default.model_dump(), stage.name
