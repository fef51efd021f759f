"""Where the teacher retrieves: per-layer measurements that decide which layers keep full attention (MLA).

Two measures, both on the frozen teacher (`ling-surgery plan --measure` prints them; `plan.placement: measured`
keeps the layers they rank first):

- **retrieval**: on synthetic copy prompts (a random token sequence, then the same sequence again), the attention
  mass each head puts on the token it should copy — the token after the earlier occurrence of the current one
  (induction / retrieval heads: Olsson et al. 2022; Wu et al. 2024, "Retrieval Head"). A layer scores its best
  head: one head that copies is what a hybrid must keep exact, and only MLA layers can (a KDA layer's state is a
  fixed-size summary, not an addressable memory).
- **kl**: the teacher's next-token KL(teacher ‖ teacher with that one layer's attention replaced by its KDA init),
  on calibration text (the KL-guided layer selection of arXiv 2512.20569, with the init instead of a trained
  linear layer, so it is cheap enough for `plan`).

The prompts are random token ids from the tokenizer's ordinary vocabulary: never an evaluation's prompts or filler.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ling_surgery.surgery.errors import SurgeryError

def copy_prompts(vocab_size: int, count: int, period: int, seed: int = 0, avoid: tuple[int, ...] = ()) -> torch.Tensor:
    """`count` prompts of 2·period tokens: a random sequence of distinct tokens, then the same sequence again."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(avoid)] = False
    ids = allowed.nonzero().flatten()
    if len(ids) < period:
        raise SurgeryError(f"copy prompts of period {period} need {period} distinct ordinary tokens; the vocabulary "
                           f"has {len(ids)}")
    rows = [ids[torch.randperm(len(ids), generator=g)[:period]] for _ in range(count)]
    return torch.stack([torch.cat([r, r]) for r in rows])


def copy_sources(period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions of the second copy and, for each, the position of the token it should copy next."""
    queries = torch.arange(period, 2 * period - 1)
    return queries, queries - period + 1


def retrieval_scores(model, prompts: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """(layers, heads): mean attention weight of each head on the token to copy, over the second copy's queries.

    Attention weights come from the eager implementation (`output_attentions`), switched on for the call only.
    """
    period = prompts.shape[1] // 2
    queries, sources = copy_sources(period)
    previous = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    total = None
    try:
        with torch.no_grad():
            for batch in prompts.split(batch_size):
                out = model(input_ids=batch.to(model.device), output_attentions=True, use_cache=False)
                mass = torch.stack([a[:, :, queries, sources].float().sum(0).mean(-1) for a in out.attentions])
                total = mass if total is None else total + mass
    finally:
        if previous:
            model.set_attn_implementation(previous)
    return (total / len(prompts)).cpu()


def replacement_kl(teacher, replacements: dict[int, torch.nn.Module], windows: torch.Tensor, chunk_size: int = 32,
                   batch_size: int = 2) -> dict[int, float]:
    """Per layer i in `replacements`: mean KL(teacher ‖ teacher whose layer-i attention is `replacements[i]`), a KDA
    mixer run through `kda.kda_mixer_forward` on the attention's own input."""
    from ling_surgery.surgery.distill import kl_divergence
    from ling_surgery.surgery.kda import kda_mixer_forward

    layers = teacher.model.layers
    with torch.no_grad():
        reference = [teacher(input_ids=w.to(teacher.device)).logits for w in windows.split(batch_size)]
        out = {}
        for i, mixer in replacements.items():
            def swap(module, args, kwargs, output, mixer=mixer):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                return (kda_mixer_forward(mixer, hidden, chunk_size).to(output[0].dtype), *output[1:])

            handle = layers[i].self_attn.register_forward_hook(swap, with_kwargs=True)
            try:
                kls = [kl_divergence(ref, teacher(input_ids=w.to(teacher.device)).logits).item()
                       for ref, w in zip(reference, windows.split(batch_size))]
            finally:
                handle.remove()
            out[i] = sum(kls) / len(kls)
    return out


@dataclass(frozen=True)
class LayerMeasures:
    """Per teacher layer: the best head's retrieval score, all heads' scores, and the replacement KL (or None)."""

    retrieval: tuple[float, ...]
    heads: tuple[tuple[float, ...], ...]
    kl: tuple[float, ...] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.retrieval)

    def score(self, by: str) -> tuple[float, ...]:
        if by == "kl":
            if self.kl is None:
                raise SurgeryError("the KL measure was not computed; measure with kl=True")
            return self.kl
        return self.retrieval

    def ranked(self, by: str = "retrieval") -> list[int]:
        """Layers, most important to keep as full attention first."""
        score = self.score(by)
        return sorted(range(self.num_layers), key=lambda i: (-score[i], i))

    def choose(self, count: int, by: str = "retrieval") -> list[int]:
        if not 1 <= count <= self.num_layers:
            raise SurgeryError(f"plan.full_attention_count {count} must be between 1 and {self.num_layers} (layers)")
        return sorted(self.ranked(by)[:count])

    def coverage(self, layers, by: str = "retrieval") -> float:
        """The share of the measure (summed over layers) that a set of full-attention layers keeps."""
        score = self.score(by)
        total = sum(score) or 1.0
        return sum(score[i] for i in layers) / total

    def to_json(self) -> dict:
        return {"retrieval": list(self.retrieval), "heads": [list(h) for h in self.heads],
                "kl": None if self.kl is None else list(self.kl)}

    @classmethod
    def from_json(cls, data: dict) -> "LayerMeasures":
        kl = data.get("kl")
        return cls(tuple(data["retrieval"]), tuple(tuple(h) for h in data["heads"]), None if kl is None else tuple(kl))


def periodic_layouts(num_layers: int) -> list[tuple[int, tuple[int, ...]]]:
    """(group size, full-attention layers) of every periodic layout the serving engines' converters express."""
    return [(g, tuple(range(g - 1, num_layers, g))) for g in range(2, num_layers + 1) if num_layers % g == 0]


def measure_teacher(teacher, tokenizer, arch, source_config, target_config, windows: torch.Tensor | None,
                    period: int = 64, prompts: int = 8, seed: int = 0, chunk_size: int = 32) -> LayerMeasures:
    """Both measures on the teacher: retrieval on copy prompts, KL (when calibration `windows` are given) of each
    layer replaced by its KDA init (`init_maps.init_kda`, built from the teacher's own tensors)."""
    special = tuple(getattr(tokenizer, "all_special_ids", []) or ())
    vocab = min(source_config.vocab_size, len(tokenizer)) if tokenizer is not None else source_config.vocab_size
    scores = retrieval_scores(teacher, copy_prompts(vocab, prompts, period, seed, special))
    kl = None
    if windows is not None and len(windows):
        kl = replacement_kl(teacher, kda_inits(teacher, arch, source_config, target_config), windows, chunk_size)
        kl = tuple(kl[i] for i in range(len(scores)))
    return LayerMeasures(tuple(scores.max(-1).values.tolist()), tuple(tuple(h) for h in scores.tolist()), kl)


def kda_inits(teacher, arch, source_config, target_config) -> dict[int, torch.nn.Module]:
    """Every teacher layer's attention as the KDA mixer its init maps give (no calibration: plain inits)."""
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import BailingHybridDeltaAttention

    from ling_surgery.surgery.init_maps import Ledger, init_kda

    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    out = {}
    for i in range(source_config.num_hidden_layers):
        tensors = init_kda(Ledger(state), f"{arch.layers}.{i}.{arch.attention}", arch, None, source_config, target_config)
        mixer = BailingHybridDeltaAttention(target_config, i)
        mixer.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        out[i] = mixer.to(teacher.device, teacher.dtype).eval()
    return out


def measures_table(measures: LayerMeasures, chosen=()):
    from rich.table import Table

    table = Table(title="where the teacher retrieves (per layer)")
    table.add_column("layer", justify="right")
    table.add_column("retrieval (best head)", justify="right")
    table.add_column("head", justify="right")
    if measures.kl is not None:
        table.add_column("KL if KDA", justify="right")
    table.add_column("")
    for i in range(measures.num_layers):
        heads = measures.heads[i]
        row = [str(i), f"{measures.retrieval[i]:.3f}", str(max(range(len(heads)), key=heads.__getitem__))]
        if measures.kl is not None:
            row.append(f"{measures.kl[i]:.4f}")
        row.append("MLA" if i in chosen else "")
        table.add_row(*row)
    return table


def layouts_table(measures: LayerMeasures, measured: tuple[int, ...] | None = None, by: str = "retrieval"):
    """Periodic layouts (and the measured one) by the share of each measure their MLA layers keep, ranked by `by`
    within each count of MLA layers."""
    from rich.table import Table

    table = Table(title=f"layouts: the share of the teacher's {by} measure their MLA layers keep")
    for col in ("layout", "MLA layers", "retrieval kept", "KL kept" if measures.kl is not None else None, "engines"):
        if col:
            table.add_column(col, justify="left" if col in ("layout", "MLA layers", "engines") else "right")
    rows = [(f"periodic g={g}", layers, "transformers, vLLM, llama.cpp") for g, layers in periodic_layouts(measures.num_layers)]
    if measured is not None:
        rows.append(("measured", tuple(measured), "transformers, llama.cpp (ling-surgery GGUF); not vLLM"))
    rows.sort(key=lambda r: (len(r[1]), -measures.coverage(r[1], by)))
    for name, layers, engines in rows:
        cells = [name, ",".join(map(str, layers)), f"{measures.coverage(layers):.1%}"]
        if measures.kl is not None:
            cells.append(f"{measures.coverage(layers, 'kl'):.1%}")
        table.add_row(*cells, engines)
    return table



COPY_PERIOD, COPY_PROMPTS = 64, 8  # 8 prompts of 2 × 64 tokens: ~1k teacher tokens, seconds on a CPU


def measure_for(conversion, teacher, tokenizer, windows: torch.Tensor | None, chunk_size: int = 32,
                cache: Path | None = None, seed: int = 0) -> LayerMeasures:
    """The teacher's measures for a conversion, read from `cache` (a run folder's placement.json) when it holds the
    same measurement; the KL is computed only when `windows` are given."""
    key = {"source": conversion.source.name, "period": COPY_PERIOD, "prompts": COPY_PROMPTS, "seed": seed,
           "kl": windows is not None}
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return LayerMeasures.from_json(saved["measures"])
    measures = measure_teacher(teacher, tokenizer, conversion.arch, conversion.source_config, conversion.target_config,
                               windows, COPY_PERIOD, COPY_PROMPTS, seed, chunk_size)
    if cache is not None:
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps({"key": key, "measures": measures.to_json()}, indent=1))
        os.replace(tmp, cache)
    return measures


def resolve_measured(conversion, measures: LayerMeasures):
    """The conversion with `plan.placement: measured` resolved: the `full_attention_count` layers the recipe's
    `measure_by` ranks first stay MLA (`make_plan` marks the layout periodic if it happens to be)."""
    from ling_surgery.surgery.plan import make_plan
    from ling_surgery.surgery.targets import target_config

    plan = conversion.recipe.plan
    layers = measures.choose(plan.full_attention_count, plan.measure_by)
    layer_plan = replace(make_plan(measures.num_layers, None, layers, warn_non_periodic=False), measured=True)
    return replace(conversion, plan=layer_plan,
                   target_config=target_config(conversion.source_config, layer_plan, conversion.recipe))


def measure_plan(conversion, console=None, kl_windows: int = 2):
    """`ling-surgery plan --measure`: load the teacher, measure both measures (the KL on `kl_windows` calibration
    windows of the recipe's data), print them with the layouts ranked; returns (measures, resolved conversion)."""
    from ling_surgery.surgery import sources
    from ling_surgery.surgery.data import TokenStream, load_documents, split_heldout

    recipe = conversion.recipe
    teacher, tokenizer = sources.load_model(conversion.source, torch.float32, "cpu")
    seq_len = recipe.data.seq_len
    first = recipe.data.sources()[0]  # the mixture's first source: the KL needs a few windows of ordinary text
    docs, _ = split_heldout(load_documents(first.source, first.text_field, 16 * seq_len * kl_windows, first.subset),
                            recipe.data.heldout_fraction)
    windows = TokenStream.from_documents(docs, tokenizer, max_tokens=seq_len * (kl_windows + 1)).windows(seq_len)
    measures = measure_for(conversion, teacher, tokenizer, windows[:kl_windows], recipe.runtime.kda_chunk_size,
                           seed=recipe.seed)
    resolved = resolve_measured(conversion, measures) if conversion.plan.measured else conversion
    if console is not None:
        print_measures(console, measures, resolved)
        print_router_swap(console, conversion, teacher, windows[:kl_windows])
    return measures, resolved


def print_router_swap(console, conversion, teacher, windows: torch.Tensor) -> None:
    """MoE sources: how the MoE map does on these windows (`moe.measure_map`, the router fitted on the same windows)."""
    from ling_surgery.surgery.architectures import source_moe
    from ling_surgery.surgery.moe import measure_map, print_map
    from ling_surgery.surgery.taps import collect_stats

    moe = source_moe(conversion.source_config)
    if moe is None or not len(windows):
        return
    state = {k: v.detach() for k, v in teacher.state_dict().items()}
    stats = collect_stats(teacher, conversion.arch, [windows])
    print_map(console, measure_map(teacher, state, None, conversion.arch, moe, stats, windows), moe)


def print_measures(console, measures: LayerMeasures, conversion) -> None:
    """The per-layer table and the layouts table; a measured plan's layers are marked and ranked with the rest."""
    layers = conversion.plan.full_attention if conversion.plan.measured else None
    console.print(measures_table(measures, layers or ()))
    console.print(layouts_table(measures, layers, conversion.recipe.plan.measure_by))
