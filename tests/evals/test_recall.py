"""Long-context recall: prompts have the requested length and needle depth, a model that copies its context finds
every pass key, a random model finds none, lengths beyond a model are skipped, and the report draws the heat maps."""

import pytest
import torch
from helpers import char_tokenizer, tiny_model
from rich.console import Console

from ling_surgery.evals.evaluate import recall_task
from ling_surgery.evals.recall import NIAH_INTRO, PASSKEY_INTRO, HaystackBuilder, grid_docs
from ling_surgery.evals.scoring import LoadedModel
from ling_surgery.evals.tasks import load_task

PROSE = ["The river runs north. It floods in spring.", "A lantern hangs by the door. Moths circle it at night.",
         "Bread rises when warm. The baker knows the hour.", "Snow covered the pass. The road closed for a week."] * 5


class CopyingLM(torch.nn.Module):
    """An induction oracle: after the longest suffix (up to 16 tokens) that occurred before, predict what followed its
    latest occurrence. It retrieves from its context perfectly and knows nothing else."""

    def __init__(self, vocab: int, longest: int = 16):
        super().__init__()
        self.vocab, self.longest = vocab, longest
        self.config = type("Config", (), {"model_type": "copy", "max_position_embeddings": 4096})()
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = 10 * torch.eye(vocab)

        parent = self

        class Body(torch.nn.Module):
            def forward(self, input_ids, use_cache=False):
                return type("Out", (), {"last_hidden_state": parent.predicted_one_hot(input_ids)})()

        self.model = Body()

    def predicted_one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for row in ids:
            t = len(row)
            eq = row[:, None] == row[None, :]  # eq[i, j]: token i equals token j
            run = torch.zeros(t, t, dtype=torch.long)  # length of the matching suffixes ending at (i, j)
            match = torch.ones(t, t, dtype=torch.bool)
            for k in range(self.longest):
                shifted = torch.zeros(t, t, dtype=torch.bool)
                shifted[k:, k:] = eq[: t - k, : t - k]
                match &= shifted
                run += match.long()
            run = run.tril(-1)  # only strictly earlier occurrences
            score = run * t + torch.arange(t)  # longest match first, then the latest
            best = score.argmax(-1)
            found = run.gather(1, best[:, None])[:, 0] > 0
            nxt = torch.where(found, row[(best + 1).clamp(max=t - 1)], torch.zeros_like(row))
            out.append(torch.nn.functional.one_hot(nxt, self.vocab).float())
        return torch.stack(out)

    def generate(self, ids, max_new_tokens=8, **_):
        for _ in range(max_new_tokens):
            nxt = self.lm_head(self.predicted_one_hot(ids)[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def _builder(tok):
    return HaystackBuilder(lambda text: tok(text, add_special_tokens=False)["input_ids"], lambda i: tok.decode([i]), PROSE)


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_items_have_the_requested_length_and_needle_depth(task):
    tok = char_tokenizer()
    builder = _builder(tok)
    docs = grid_docs(task, (800, 1600), (0.0, 0.5, 1.0), 1, seed=3)
    assert docs == grid_docs(task, (800, 1600), (0.0, 0.5, 1.0), 1, seed=3)  # seeded: every model sees the same
    for doc in docs:
        item = builder.item(doc)
        assert len(item.prompt) + len(item.answer) == doc["length"]
        text = tok.decode(item.prompt)
        if task == "passkey":
            intro, needle, question = PASSKEY_INTRO, f" The pass key is {item.gold}.", text.rindex(" What is")
            needles = len(f" The pass key is {item.gold}. Remember it. {item.gold} is the pass key.")
        else:
            intro, question = NIAH_INTRO, text.rindex("\nWhat is")
            key = text[question:].split("number for ")[1].split(" ")[0]
            needle = f" One of the special magic numbers for {key} is: {item.gold}."
            needles = len(needle) * text.count("One of the special magic numbers")
        at = text.index(needle) - len(intro)  # characters are tokens here: the needle's offset in the haystack
        haystack = question - len(intro) - needles
        assert abs(at / haystack - doc["depth"]) < 0.1 or doc["variant"] == "multikey", (doc, at, haystack)
        if doc["variant"] == "multikey":
            assert text.count("One of the special magic numbers") == 4
        elif task == "niah":
            assert text.count("One of the special magic numbers") == 1
            assert sum(p in text for p in PROSE[:4]) >= 1  # the haystack is the given prose, from a sentence start


@pytest.mark.parametrize("variant, shared_at_most", [("passkey", 0.6), ("single", 0.6), ("multikey", 0.4)])
def test_the_cells_of_a_sample_share_their_prefixes(variant, shared_at_most):
    """What makes the grid cheap: a sample's items run as a prefix tree of about half their tokens (a third for
    multikey, one haystack per length asked once per depth); the keys of one depth are the same at every length."""
    from ling_surgery.evals.scoring import prefix_tree

    tok = char_tokenizer()
    builder = _builder(tok)
    docs = [d for d in grid_docs("passkey" if variant == "passkey" else "niah", (800, 1600, 3200), (0.0, 0.5, 1.0), 2,
                                 seed=1) if d["variant"] == variant]
    items = [builder.item(d) for d in docs]
    sequences = [i.prompt + i.answer for i in items]
    assert prefix_tree(sequences).size() < shared_at_most * sum(map(len, sequences))
    for depth in (0.0, 0.5, 1.0):
        golds = {(d["seed"], i.gold) for d, i in zip(docs, items) if d["depth"] == depth}
        assert len(golds) == 2  # one key per (sample, depth), whatever the length
    if variant == "multikey":  # one haystack per length: the items differ only in the question (and its key)
        import os

        same_length = [tok.decode(i.prompt) for i in items if i.length == 1600][:3]
        question = len(same_length[0]) - same_length[0].rindex("\nWhat is")
        assert len(os.path.commonprefix(same_length)) > len(same_length[0]) - question - 60


def test_a_copying_model_finds_every_pass_key_and_a_random_one_none():
    tok = char_tokenizer()
    task = load_task("passkey", 2, seed=0, lengths=(400, 800, 1600), depths=(0.0, 0.25, 0.5, 0.75, 1.0))
    copier = LoadedModel("copy", CopyingLM(len(tok)), tok, torch.device("cpu"))
    result = recall_task(copier, task, Console(quiet=True))
    assert result["n"] == 30 and result["acc"] == 1.0
    grid = result["variants"]["passkey"]["grid"]
    assert set(grid) == {"400", "800", "1600"} and all(v == 1.0 for row in grid.values() for v in row.values())
    assert result["samples"] and all(s["correct"] and s["predicted"] == s["gold"] for s in result["samples"])

    random_tiny = tiny_model("llama", max_position_embeddings=1024)
    lm = LoadedModel("random", random_tiny, tok, torch.device("cpu"))
    result = recall_task(lm, task, Console(quiet=True))
    assert result["acc"] <= 0.1  # chance for an exact 5-digit key is 1e-5
    assert result["skipped_lengths"] == [1600] and result["n"] == 20  # beyond its 1024 positions


def test_report_draws_recall_heat_maps_side_by_side(tmp_path):
    from ling_surgery.evals.eval_report import eval_markdown, write_eval_report

    tok = char_tokenizer()
    task = load_task("passkey", 1, seed=0, lengths=(400, 800), depths=(0.0, 1.0))
    copier = recall_task(LoadedModel("copy", CopyingLM(len(tok)), tok, torch.device("cpu")), task, Console(quiet=True))
    weak = recall_task(LoadedModel("random", tiny_model("llama", max_position_embeddings=1024), tok, torch.device("cpu")),
                       task, Console(quiet=True))
    report = {"kind": "ling-surgery-eval", "models": {"teacher": {"ref": "copy"}, "student": {"ref": "random"}},
              "tasks": {"passkey": {"teacher": copier, "student": weak, "ratio": weak["value"] / copier["value"]}},
              "inference": {}, "settings": {"limit": 1, "seed": 0, "device": "cpu"}, "seconds": 1.0}
    write_eval_report(tmp_path, report)
    assert (tmp_path / "recall.png").stat().st_size > 10_000
    markdown = eval_markdown(report)
    assert "|   passkey @ 400 tokens |  | 1.00 | 0.00 |  |" in markdown
    assert "passkey / teacher ✓: gold" in markdown  # what each model actually generated


def test_recall_data_and_grid_errors():
    from ling_surgery.surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="passkey' is synthetic"):
        load_task("passkey", 1, data="x.txt")
    with pytest.raises(SurgeryError, match="pass a .txt or .md file"):
        load_task("niah", 1, data="x.jsonl")
    tok = char_tokenizer()
    with pytest.raises(SurgeryError, match="leave too little haystack; use lengths of at least"):
        _builder(tok).item(grid_docs("niah", (400,), (0.5,), 1, seed=0)[-1])


def test_eval_runs_the_recall_grid_and_writes_the_heat_maps(tmp_path):
    from helpers import save_tiny_source

    from ling_surgery.evals.suite import run_eval
    from ling_surgery.surgery.errors import SurgeryError

    model = save_tiny_source(tmp_path / "tiny", "llama", max_position_embeddings=2048)
    prose = tmp_path / "prose.txt"
    prose.write_text("\n\n".join(PROSE))
    report = run_eval({"model": str(model)}, ["passkey", "niah"], limit=1, output=tmp_path / "report", contexts=(),
                      data={"niah": str(prose)}, console=Console(quiet=True), recall_lengths=(900, 4096),
                      recall_depths=(0.0, 1.0))
    passkey, niah = report["tasks"]["passkey"]["model"], report["tasks"]["niah"]["model"]
    assert passkey["n"] == 2 and passkey["skipped_lengths"] == [4096]
    assert niah["n"] == 4 and set(niah["variants"]) == {"single", "multikey"}
    assert "prose.txt" in niah["origin"]
    assert (tmp_path / "report" / "recall.png").is_file()
    with pytest.raises(SurgeryError, match="beyond the 2048 positions"):
        run_eval({"model": str(model)}, ["passkey"], limit=1, contexts=(), console=Console(quiet=True),
                 recall_lengths=(4096,))
