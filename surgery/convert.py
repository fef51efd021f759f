"""`convert`: the one-shot form of `run` (a recipe whose output folder must be new), and the conversion plan.

`ling-surgery convert MODEL --output DIR` is `ling-surgery run` of the default recipe (or `--config FILE`) with
`source.model` and `export.output` set from the flags: one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ling_surgery.surgery import sources
from ling_surgery.surgery.architectures import ArchSpec, check_source_config
from ling_surgery.surgery.config import Recipe
from ling_surgery.surgery.defaults import Derived
from ling_surgery.surgery.plan import MLA, NON_PERIODIC, LayerPlan, student_costs, teacher_costs
from ling_surgery.surgery.targets import TargetSpec, check_shapes, get_target, target_config


@dataclass
class ConversionPlan:
    source: sources.Source
    source_config: object
    arch: ArchSpec
    plan: LayerPlan
    target: TargetSpec
    target_config: object
    recipe: Recipe  # with every unset plan value derived from the source: what runs, and what fingerprints hash
    derived: list[Derived]  # the values the recipe left unset, and where each came from

    def table(self, memory=None) -> Table:
        """The layer plan, costs, layout, derived values and the training stages' memory plan (`memory`: the run's,
        else the recipe's own `runtime` settings)."""
        from ling_surgery.evals.report import cost_rows
        from ling_surgery.surgery.memory_plan import MemoryPlan

        table = Table(title=f"plan: {self.source.name} → {self.target.model_type} ({self.target.name})")
        table.add_column("layers")
        table.add_column("mixer")
        table.add_column("init")
        runs: list[list] = []
        for i, kind in enumerate(self.plan.layer_types):
            if runs and runs[-1][2] == kind and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i, kind])
        t = self.target_config
        for a, b, kind in runs:
            label = f"{a}" if a == b else f"{a}–{b}"
            gate = "gated " if self.target.gated_mla else ""
            if kind == MLA and self.arch.mla_attention:
                table.add_row(label, f"{gate}MLA", f"the source's MLA copied exactly (r={t.kv_lora_rank}, RoPE "
                              f"{t.qk_rope_head_dim} dims)")
            elif kind == MLA:
                table.add_row(label, f"{gate}MLA", f"joint K/V SVD → r={t.kv_lora_rank}, RoPE {t.qk_rope_head_dim}/{t.qk_rope_head_dim + t.qk_nope_head_dim} dims")
            elif self.arch.mla_attention:
                table.add_row(label, "KDA", "q/k/v from the MLA's NoPE queries, keys and values")
            else:
                table.add_row(label, "KDA", "q/k/v/o from attention, GQA repeated")
        costs = Table(title="costs (computed from configs)")
        for col in ("", "teacher", "upgraded", "ratio"):
            costs.add_column(col, justify="left" if not col else "right")
        for row in cost_rows(teacher_costs(self.source_config), student_costs(self.target_config)):
            costs.add_row(*row)
        grid = Table.grid(padding=1)
        grid.add_row(table)
        grid.add_row(costs)
        if not self.target.linear_attention:
            layout = "every layer MLA"
        elif self.plan.provisional:
            layout = (f"measured by {self.recipe.plan.measure_by}: the {len(self.plan.full_attention)} layers ranked "
                      "first, chosen when the teacher loads (`ling-surgery plan --measure` shows them now); rows above "
                      "are provisional")
        elif self.plan.measured:
            periodic = f"periodic, layer_group_size={self.plan.group_size}" if self.plan.group_size else NON_PERIODIC
            layout = f"measured ({self.recipe.plan.measure_by}): {periodic}"
        elif self.plan.group_size:
            layout = f"periodic, layer_group_size={self.plan.group_size}"
        else:
            layout = f"not periodic: {NON_PERIODIC}"
        grid.add_row(f"layout: {layout}")
        if self.derived:
            derived = Table(title="derived from the source (unset in the recipe; set them to override)")
            for col in ("key", "value", "why"):
                derived.add_column(col, justify="right" if col == "value" else "left")
            for item in self.derived:
                derived.add_row(item.key, escape(str(item.value)), item.reason)
            grid.add_row(derived)
        memory = memory or MemoryPlan.of_run(self)
        if memory is not None and memory.stages:
            grid.add_row(memory.table())
        return grid


def plan_conversion(recipe: Recipe) -> ConversionPlan:
    """Resolve the source and build the layer plan and target config from the source config alone (no weights).

    Plan values the recipe leaves unset are derived from the source config here (`surgery/defaults.py`); the
    resolved recipe is `ConversionPlan.recipe`.
    """
    source = sources.resolve_source(recipe.source.model, recipe.source.revision)
    source_config = sources.load_config(source)
    arch = check_source_config(source_config)
    plan, resolved, derived = check_shapes(recipe, sources.SourceShape.from_config(source_config))
    return ConversionPlan(source, source_config, arch, plan, get_target(recipe.target),
                          target_config(source_config, plan, resolved), resolved, derived)


def convert(recipe: Recipe, console: Console | None = None, resume: bool = False) -> dict:
    """Run the recipe into a new output folder (or continue one with `resume`); returns the report."""
    from ling_surgery.surgery.run import run

    return run(recipe, console, resume=resume, fresh=not resume)
