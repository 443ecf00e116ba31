"""Search: the composition of the one-round models (FFT) or adapters (LoRA) that learns the most within a forgetting
budget, found by a TPE search over the merge method, lambda, density / drop rate and per-model weights (study/search.py),
each trial scored on the tasks' eval splits and old knowledge's held-out slice; the chosen merge is then evaluated
on test as every model of the study."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import SearchConfig
from knowstack.errors import KnowstackError
from knowstack.study.graph import ModelRef, step_ref
from knowstack.study.methods.base import ComposeVariant, Method

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_search(builder: PlanBuilder, finetune: str, section: SearchConfig) -> None:
    """One search step over the one-round inputs (shared with the merges and MoE), then its chosen model's
    evaluation on test."""
    from knowstack.study.search import SearchSpace

    check_held_out_items(builder)
    inputs = [builder.one_round_input(task, finetune) for task in builder.tasks]
    models = [*builder.merge_with, *(ref for ref, _ in inputs)]
    try:
        SearchSpace(tuple(section.methods), len(models))
    except KnowstackError as error:
        raise KnowstackError(f"{str(error).removeprefix(f'field {error.field!r}: ')} (this search merges "
                             f"{len(models)} models)", field="methods.search.methods") from None
    params: dict[str, Any] = {
        "finetune": finetune,
        "base": builder.base.to_dict(),
        "models": models,
        "space": {"methods": list(section.methods), "lam_range": list(section.lam_range),
                  "density_range": list(section.density_range), "weight_range": list(section.weight_range)},
        "trials": section.trials,
        "max_old_loss": section.max_old_loss,
        "old_items": section.old_items,
        "seed": builder.seed if section.seed is None else section.seed,
        "first_trials": "each method once",  # a search step made before this drew all at random: another key
        **builder.eval_params(),
    }
    deps = builder.base_deps() + tuple(key for _, keys in inputs for key in keys)
    step = builder.add_step("search", f"search-{finetune}", params, deps)
    trained_on = "+".join(task["name"] for task in builder.tasks)
    builder.evaluate(ModelRef(step_ref(step)), f"search-{finetune}", "search", finetune, None, trained_on)


def check_held_out_items(builder: PlanBuilder) -> None:
    """The search scores old knowledge on the items after the first old_knowledge.limit ones: a limit must be set,
    and on the built-in world, whose old-knowledge tasks have a preset's number of items each, leave some, refused
    when the plan is made rather than by the search step after every training (another task's items are counted
    when the search reads them)."""
    config = builder.config
    limit = config.old_knowledge.limit
    if limit is None:
        raise KnowstackError("the search scores old knowledge on items the test scoring never reads: set "
                             "old_knowledge.limit (the test scoring reads the first `limit` items of each task, the "
                             "search the next `old_items`)", field="old_knowledge.limit")
    if config.old_knowledge.tasks != "builtin" or config.base.builtin is None:
        return
    from knowstack.builtin.world import PRESETS

    items = PRESETS[config.base.builtin].facts_per_family
    if limit >= items:
        raise KnowstackError(f"the built-in world '{config.base.builtin}' has {items} items per old-knowledge task, "
                             f"none after the first {limit} the test scoring reads, which the search scores on: lower "
                             "old_knowledge.limit", field="old_knowledge.limit")


def plan(builder: PlanBuilder, section: SearchConfig) -> None:
    for finetune in section.finetune:
        add_search(builder, finetune, section)


def _section(given: Any, kinds: list[str]) -> dict[str, Any]:
    """`compose --search`: the section from the compose options (--trials, --max-old-loss; the rest the config's
    defaults)."""
    return {"finetune": ["lora" if set(kinds) == {"adapter"} else "fft"], "trials": given.trials,
            "max_old_loss": given.max_old_loss, "seed": given.seed}


METHOD = Method("search", "search", "semi", plan,
                "the merge of the one-round models or adapters found by a search within a forgetting budget",
                (ComposeVariant("search", "search the merge method, lambda, density and per-model weights within "
                                          "--max-old-loss, scored on eval splits", kinds=("adapter", "model"),
                                knobs=("trials", "max_old_loss", "seed"), section=_section),))
