"""Importance of a teacher's layers, MLP channels, attention groups and hidden channels on calibration data.

One pass over calibration batches records, with forward hooks:

- ``block_influence[i]``: 1 − mean over tokens of cos(h_in, h_out) of decoder layer ``i`` (ShortGPT's
  block influence: a layer that barely turns the hidden state is the cheapest to drop);
- ``mlp[i][j]``: mean |a_j| over tokens of the activation entering layer ``i``'s ``down_proj``;
- ``heads[i][h]``: mean over tokens of the L2 norm of query head ``h``'s slice of the input to
  ``o_proj`` (its attention output); `group_scores` sums a GQA group's query heads;
- ``hidden[j]``: mean |y_j| over tokens of every RMSNorm output feeding a layer or the head, summed
  over those norms (Minitron's embedding-channel importance).

Works for Llama-style (gated ``gate_proj``/``up_proj``) and Apertus (``up_proj`` only) decoders as
transformers implements them. What this module does not do: remove anything (`famex.prune.slicing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famex.errors import FamexError


@dataclass
class Importance:
    block_influence: torch.Tensor  # [layers]
    mlp: torch.Tensor  # [layers, intermediate]
    heads: torch.Tensor  # [layers, q heads]
    hidden: torch.Tensor  # [hidden]
    tokens: int

    def group_scores(self, kv_heads: int) -> torch.Tensor:
        """[layers, kv groups]: the sum of each GQA group's query-head scores."""
        layers, heads = self.heads.shape
        return self.heads.view(layers, kv_heads, heads // kv_heads).sum(-1)

    def as_dict(self) -> dict[str, list]:
        return {"block_influence": self.block_influence.tolist(), "mlp": self.mlp.tolist(), "heads": self.heads.tolist(),
                "hidden": self.hidden.tolist(), "tokens": self.tokens}


def decoder_layers(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise FamexError(f"{type(model).__name__} has no model.layers: famex prune handles decoder-only causal LMs "
                         "laid out as transformers' Llama / Apertus / Qwen / Mistral are")
    return list(layers)


def layer_norms(layer) -> list[torch.nn.Module]:
    """The RMSNorms of a decoder layer whose outputs feed its attention and its MLP."""
    names = [("input_layernorm", "post_attention_layernorm"), ("attention_layernorm", "feedforward_layernorm")]
    for pair in names:
        if all(hasattr(layer, n) for n in pair):
            return [getattr(layer, n) for n in pair]
    raise FamexError(f"{type(layer).__name__} has neither input_layernorm/post_attention_layernorm nor "
                     "attention_layernorm/feedforward_layernorm: a pre-norm decoder layer is needed")


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def measure_importance(model, batches: list[dict[str, torch.Tensor]]) -> Importance:
    """Run ``model`` over ``batches`` (``input_ids``, ``position_ids``, ``attention_mask``) and score its parts."""
    layers = decoder_layers(model)
    text = model.config.get_text_config()
    heads, head_dim = text.num_attention_heads, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    n_layers = len(layers)
    bi = torch.zeros(n_layers, dtype=torch.float64)
    mlp = torch.zeros(n_layers, layers[0].mlp.down_proj.in_features, dtype=torch.float64)
    head_scores = torch.zeros(n_layers, heads, dtype=torch.float64)
    hidden = torch.zeros(text.hidden_size, dtype=torch.float64)
    hooks = []

    def on_layer(i):
        def hook(module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).double()
            h_out = _first_tensor(output).double()
            bi[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()
        return hook

    def on_down(i):
        def hook(module, args):
            mlp[i] += args[0].double().abs().flatten(0, -2).sum(0)
        return hook

    def on_o(i):
        def hook(module, args):
            x = args[0].double()
            head_scores[i] += x.view(*x.shape[:-1], heads, head_dim).norm(dim=-1).flatten(0, -2).sum(0)
        return hook

    def on_norm(module, args, output):
        hidden.add_(output.double().abs().flatten(0, -2).sum(0))

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
        for norm in layer_norms(layer):
            hooks.append(norm.register_forward_hook(on_norm))
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                        attention_mask=batch.get("attention_mask"), use_cache=False)
            tokens += batch["input_ids"].numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise FamexError("no calibration tokens: famex prune ranks parts by their activations on calibration data")
    return Importance((bi / tokens).float(), (mlp / tokens).float(), (head_scores / tokens).float(),
                      (hidden / tokens).float(), tokens)


def keep_layers(importance: Importance | None, n_layers: int, keep: int, method: str) -> list[int]:
    """Indices of the decoder layers to keep, in order.

    ``every``: evenly spaced from the first to the last layer (every k-th when ``n_layers − 1`` is a
    multiple of ``keep − 1``); ``influence``: the ``keep`` layers of highest block influence.
    """
    if not 1 <= keep <= n_layers:
        raise FamexError(f"--layers {keep}: keep between 1 and the teacher's {n_layers} layers")
    if keep == n_layers:
        return list(range(n_layers))
    if method == "every":
        if keep == 1:
            return [0]
        return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})
    if method == "influence":
        assert importance is not None
        order = torch.argsort(importance.block_influence, descending=True, stable=True)
        return sorted(order[:keep].tolist())
    raise FamexError(f"--depth {method!r}: choose 'influence' (block influence on calibration data) or 'every' (evenly spaced)")


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring indices of the last dimension, in their original order."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :keep]
    return order.sort(dim=-1).values
