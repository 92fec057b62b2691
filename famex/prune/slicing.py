"""Cut a decoder-only model down to chosen layers, MLP channels, attention groups and hidden channels.

`pruned_model(model, plan)` returns a new model of the same architecture (a fresh config with the
smaller sizes, built by transformers and filled with slices of the original weights), so what it
saves loads in plain transformers. With a plan that keeps everything the new model computes exactly
the original's logits.

Slicing rules, by parameter name: ``q_proj`` rows follow the kept query heads, ``k_proj``/``v_proj``
rows the kept KV groups, ``o_proj`` columns the query heads; ``gate_proj``/``up_proj`` rows and
``down_proj`` columns the kept MLP channels; every tensor with a hidden-size dimension (embeddings,
the head, RMSNorm weights, projection inputs, ``o_proj``/``down_proj`` outputs) the kept hidden
channels. Per-head norms (QK-norm) and activation parameters (xIELU) are copied as they are.

What this module does not do: decide what to keep (`famex.prune.importance`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from famex.errors import FamexError


@dataclass
class PrunePlan:
    layers: list[int]  # kept decoder layers, in order
    mlp: list[torch.Tensor]  # per kept layer: kept MLP channels
    groups: list[torch.Tensor]  # per kept layer: kept KV groups
    hidden: torch.Tensor  # kept hidden channels


def full_plan(config) -> PrunePlan:
    text = config.get_text_config()
    n = text.num_hidden_layers
    return PrunePlan(list(range(n)), [torch.arange(text.intermediate_size)] * n,
                     [torch.arange(text.num_key_value_heads)] * n, torch.arange(text.hidden_size))


def pruned_config(config, plan: PrunePlan):
    """The original config with the plan's sizes (head_dim written out: it no longer follows hidden/heads)."""
    text = config.get_text_config()
    if text is not config:
        raise FamexError(f"{config.model_type}: famex prune handles text-only causal LMs")
    sizes = {len(m) for m in plan.mlp}
    groups = {len(g) for g in plan.groups}
    if len(sizes) != 1 or len(groups) != 1:
        raise FamexError("every kept layer must keep the same number of MLP channels and KV groups (one config for all layers)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rep = config.num_attention_heads // config.num_key_value_heads
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(plan.layers)
    new.intermediate_size = sizes.pop()
    new.num_key_value_heads = groups.pop()
    new.num_attention_heads = new.num_key_value_heads * rep
    new.hidden_size = len(plan.hidden)
    new.head_dim = head_dim
    if getattr(config, "layer_types", None):
        new.layer_types = [config.layer_types[i] for i in plan.layers]
    return new


def _rows_of_heads(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads: group g spans heads g·per_group … (g+1)·per_group − 1."""
    heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def slice_state(state: dict[str, torch.Tensor], config, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The original state dict cut to the plan (layer keys renumbered)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rep = config.num_attention_heads // config.num_key_value_heads
    d = config.hidden_size
    hid = plan.hidden
    new_index = {old: new for new, old in enumerate(plan.layers)}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        parts = name.split(".")
        layer = None
        if "layers" in parts:
            at = parts.index("layers")
            old = int(parts[at + 1])
            if old not in new_index:
                continue
            layer = new_index[old]
            parts[at + 1] = str(layer)
        key = ".".join(parts)
        leaf = parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]
        rows = cols = None
        if layer is not None:
            mlp, groups = plan.mlp[layer], plan.groups[layer]
            if leaf == "q_proj":
                rows, cols = _rows_of_heads(groups, rep, head_dim), hid
            elif leaf in ("k_proj", "v_proj"):
                rows, cols = _rows_of_heads(groups, 1, head_dim), hid
            elif leaf == "o_proj":
                rows, cols = hid, _rows_of_heads(groups, rep, head_dim)
            elif leaf in ("gate_proj", "up_proj"):
                rows, cols = mlp, hid
            elif leaf == "down_proj":
                rows, cols = hid, mlp
            elif t.dim() == 1 and t.shape[0] == d and "norm" in leaf:
                rows = hid
        elif leaf in ("embed_tokens", "lm_head") and t.dim() == 2:
            cols = hid
        elif t.dim() == 1 and t.shape[0] == d and "norm" in leaf:
            rows = hid
        if rows is not None:
            t = t.index_select(0, rows)
        if cols is not None and t.dim() == 2:
            t = t.index_select(1, cols)
        out[key] = t.contiguous().clone()
    return out


def pruned_model(model, plan: PrunePlan):
    """A new model of ``model``'s class holding only what ``plan`` keeps."""
    from transformers import AutoModelForCausalLM

    config = pruned_config(model.config, plan)
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng():  # the random init is overwritten; it must not move the caller's RNG
        new = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=model.config._attn_implementation)
    state = slice_state(model.state_dict(), model.config, plan)
    try:
        missing, unexpected = new.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that the slicing rules did not cut
        raise FamexError(f"famex prune does not know how to cut a parameter of {type(model).__name__}: {e}") from None
    # Tied heads and non-persistent buffers are not in a state dict; anything else must be.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FamexError(f"famex prune does not know how to cut {type(model).__name__}: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    new.eval()
    return new
