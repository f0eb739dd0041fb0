"""Tensor-parallel plans: the user's patterns resolved to modules, and the built-in plans of common models.

A plan maps `fnmatch` patterns over module names to styles (see `_styles.py`). A pattern matches a module
whose full name, or any dotted suffix of it, fits: `"layers.*.mlp.up_proj"` finds `model.layers.0.mlp.up_proj`
in a `LlamaForCausalLM` as well as `layers.0.mlp.up_proj` in a bare `LlamaModel`. The first matching pattern
wins; a pattern that matches no module is an error (a typo would otherwise leave the model unsplit).

Built-in plans, recognised by module structure (class names do not matter):

* Llama-style blocks (Llama, Mistral, Qwen2, ...): `self_attn.{q,k,v}_proj` column-wise and `o_proj`
  row-wise (each rank computes its share of the heads), `mlp.{gate,up}_proj` column-wise and `down_proj`
  row-wise; the token embedding row-wise and the `lm_head` column-wise with its output gathered, when
  their sizes divide and they are not tied to each other.
* GPT-2-style blocks (transformers `Conv1D`): `mlp.c_fc` column-wise and `mlp.c_proj` row-wise; the fused
  q/k/v projection `attn.c_attn` column-wise with its output gathered, so every rank computes every
  head's attention, and `attn.c_proj` row-wise over that whole input. Splitting heads would need the
  fused projection's columns regrouped per rank, which no checkpoint format keeps.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ..errors import PrepareError
from ._styles import is_conv1d, make_style, split_dimension

Plan = list[tuple[str, nn.Module, Any]]


def matches(name: str, pattern: str) -> bool:
    """Whether a module name, or a dotted suffix of it, fits the pattern."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(1, len(parts)))


def resolve(model: nn.Module, tp_plan: dict[str, Any] | str | None, tp: int) -> Plan:
    """(name, module, torch style) for every module the plan splits, checked against the sizes."""
    if tp_plan is None or tp_plan == "auto":
        return builtin_plan(model, tp)
    assert isinstance(tp_plan, dict)
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, Any] = {}
    for pattern, style in tp_plan.items():
        hits = [(n, m) for n, m in named if matches(n, pattern)]
        if not hits:
            raise PrepareError(
                f"tp_plan pattern {pattern!r} matches no module of {type(model).__name__}; module names look "
                f"like: {_examples(named)}. Fix the pattern (fnmatch: '*' matches any characters)."
            )
        for name, _ in hits:
            chosen.setdefault(name, style)
    plan = [(n, m, _style(chosen[n], m)) for n, m in named if n in chosen and chosen[n] is not None]
    check_sizes(plan, tp)
    return plan


def _style(style: Any, module: nn.Module) -> Any:
    return make_style(style, module) if isinstance(style, str) else style


def _examples(named: list[tuple[str, nn.Module]]) -> str:
    leaves = [n for n, m in named if not list(m.children())]
    shown = leaves[:8]
    return ", ".join(shown) + (f", ... ({len(leaves)} in all)" if len(leaves) > len(shown) else "")


def check_sizes(plan: Plan, tp: int) -> None:
    """Every split dimension must divide by the tensor-parallel size."""
    for name, module, style in plan:
        split = split_dimension(style, module)
        if split is not None and split[1] % tp:
            label, size = split
            raise PrepareError(
                f"tp={tp} cannot split {name} ({type(module).__name__}, {label}={size}) evenly: {size} is not "
                f"a multiple of {tp}. Choose a tensor-parallel size that divides it, or leave the module "
                "replicated in tp_plan (map its pattern to None)."
            )


# -- built-in plans -------------------------------------------------------------------------------------

LLAMA_BLOCK = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}
GPT2_BLOCK = {
    "attn.c_attn": "colwise_gather_output",
    "attn.c_proj": "rowwise_from_replicate",
    "mlp.c_fc": "colwise",
    "mlp.c_proj": "rowwise",
}


def builtin_plan(model: nn.Module, tp: int) -> Plan:
    """The plan of the first family whose blocks the model has; a `PrepareError` naming the fix if none."""
    for family, block_plan, is_block, extras in (
        ("Llama", LLAMA_BLOCK, _is_llama_block, _llama_extras),
        ("GPT-2", GPT2_BLOCK, _is_gpt2_block, lambda model, tp: []),
    ):
        blocks = list(_blocks(model, is_block))
        if blocks:
            _check_heads(family, blocks, tp)
            plan: Plan = []
            for prefix, block in blocks:
                for suffix, style in block_plan.items():
                    module = block.get_submodule(suffix)
                    plan.append((f"{prefix}.{suffix}", module, make_style(style, module)))
            check_sizes(plan, tp)
            return plan + extras(model, tp)
    raise PrepareError(
        f"parallelism tp={tp}: {type(model).__name__} has no built-in tensor-parallel plan (there are plans "
        "for Llama-style blocks: self_attn.q_proj/k_proj/v_proj/o_proj with mlp.gate_proj/up_proj/down_proj, "
        "and GPT-2-style blocks: attn.c_attn/c_proj with mlp.c_fc/c_proj). Give one, e.g. "
        "ParallelismOptions(tp=2, tp_plan={'blocks.*.up': 'colwise', 'blocks.*.down': 'rowwise'}); "
        f"its modules include: {_examples([(n, m) for n, m in model.named_modules() if n])}."
    )


def _blocks(model: nn.Module, is_block: Callable[[nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name and is_block(module):
            yield name, module


def _has(block: nn.Module, path: str, kind: Callable[[nn.Module], bool]) -> bool:
    try:
        return kind(block.get_submodule(path))
    except AttributeError:
        return False


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _is_llama_block(module: nn.Module) -> bool:
    return all(_has(module, path, _is_linear) for path in LLAMA_BLOCK)


def _is_gpt2_block(module: nn.Module) -> bool:
    return all(_has(module, path, is_conv1d) for path in GPT2_BLOCK)


def _check_heads(family: str, blocks: list[tuple[str, nn.Module]], tp: int) -> None:
    """Llama-style attention splits by heads: the query and key/value head counts must divide by tp."""
    if family != "Llama":
        return
    name, block = blocks[0]
    attn = block.get_submodule("self_attn")
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim:
        return
    heads = _out_features(attn.get_submodule("q_proj")) // head_dim
    kv_heads = _out_features(attn.get_submodule("k_proj")) // head_dim
    for label, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count % tp:
            raise PrepareError(
                f"tp={tp} cannot split the {count} {label} of {name}.self_attn evenly; choose a "
                f"tensor-parallel size that divides both {heads} and {kv_heads}."
            )


def _out_features(linear: nn.Module) -> int:
    assert isinstance(linear, nn.Linear)
    return linear.out_features


def _llama_extras(model: nn.Module, tp: int) -> Plan:
    """Token embedding row-wise, lm_head column-wise (output gathered), when they divide and are not tied."""
    embed = next(((n, m) for n, m in model.named_modules() if n.endswith("embed_tokens")), None)
    head = next(((n, m) for n, m in model.named_modules() if n.split(".")[-1] == "lm_head"), None)
    tied = embed is not None and head is not None and embed[1].weight is getattr(head[1], "weight", None)
    plan: Plan = []
    if tied:
        return plan
    if embed is not None and isinstance(embed[1], nn.Embedding) and embed[1].num_embeddings % tp == 0:
        plan.append((embed[0], embed[1], make_style("rowwise", embed[1])))
    if head is not None and isinstance(head[1], nn.Linear) and head[1].out_features % tp == 0:
        plan.append((head[0], head[1], make_style("colwise_gather_output", head[1])))
    return plan
