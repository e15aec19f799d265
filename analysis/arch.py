"""Where each architecture family keeps its FFN neurons, keys, values, attention and embeddings.

Two FFN sites matter to Neuroglot (DESIGN.md, Decision 1; lu-lafns Eq. 2-3, papers/lu-lafns.md):

* **neuron** -- the output of the activation function applied to the FFN's first
  matrix, ``act_fn(h W1)``: one scalar per intermediate dimension per layer. For a
  gated FFN (``down(act(gate(h)) * up(h))``, lu-lafns Eq. 3) this is the *gate* branch
  ``act(gate(h))``, before the product with ``up(h)``. "Activated" means > 0. The
  neuron site is the activation-function module, so its forward *output* is read.
* **key** -- the input of the down-projection, the vector MEMIT, AlphaEdit and
  LangEdit treat as the key of the FFN's linear associative memory. For an ungated
  FFN (lu-lafns Eq. 2) key == neuron; for a gated FFN key == act(gate(h)) * up(h). The key
  site is the down-projection module, so its forward *input* is read.

Row ``j`` of :meth:`ArchAdapter.value_vectors` is the value vector of neuron ``j``:
what a unit of key ``j`` adds to the FFN output.

Every path is a dotted attribute path (integers index ``ModuleList``s). ``layers``,
``embed``, ``final_norm`` and ``lm_head`` start at the model root (a
``*ForCausalLM``); every other path starts at one decoder layer.
:meth:`ArchAdapter.site_path` joins them, so the same string finds the module
in the PyTorch model and the matching envoy in an nnsight wrapper
(:func:`resolve` works on both). :data:`SITE_READS` says whether a site's
quantity is the module's output or its input.

Family notes (transformers 5.x source; hooks run in ``eval()`` mode, where every
dropout is the identity). Whether a decoder layer or attention module returns a
tensor or a tuple differs between families and transformers versions: read
outputs through :func:`first_tensor`.

* llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text: gated FFN
  ``mlp.{gate_proj,up_proj,down_proj}`` with ``mlp.act_fn`` (a fresh activation
  module per layer, ``ACT2FN`` instantiates one per lookup). The decoder layer
  returns a tensor; attention returns ``(output, weights)``.
* gemma2, gemma3_text: the attention output and the FFN output each pass through a
  norm (``post_attention_layernorm`` / ``post_feedforward_layernorm``) before the
  residual add, so the "FFN output" (``mlp`` output) is not literally what is added
  to the residual stream. The adapter records those norms in ``post_attn_norm`` /
  ``post_ffn_norm``. The token embedding is scaled by sqrt(d_model) inside the
  embedding module (also in gemma). Where ``config.final_logit_softcapping`` is
  set (gemma2 by default) the logits are ``tanh(lm_head(h) / c) * c``, not the
  ``lm_head`` output itself.
* gemma3 (the multimodal ``Gemma3ForConditionalGeneration``): same layers under
  ``model.language_model``; :func:`adapter_for` probes a model for that prefix.
* gpt2: ``Conv1D`` weights are stored ``[in, out]``, so ``mlp.c_proj.weight`` is
  ``[d_ff, d_model]`` (``down_orientation == "in_out"``). Block returns a tensor.
* gptj: parallel residual, ``out = x + attn(ln_1 x) + mlp(ln_1 x)``; the block
  returns ``(hidden, attn_weights)``.
* gpt_neox: ``config.use_parallel_residual`` (True for Pythia) selects
  ``out = x + attn(ln1 x) + mlp(ln2 x)``, else the sequential form; the adapter's
  ``parallel_residual`` copies the config. Layer returns a tensor.
* bloom: ``BloomAttention`` and ``BloomMLP`` both add the residual *inside* the
  module (``dropout_add(..., residual)``), so neither module's output is the
  attention or FFN output. The adapter therefore points ``attn`` at
  ``self_attention.dense`` (the output projection, whose output is the attention
  output proper) and sets ``mlp = None`` so that :meth:`ffn_output_module` is
  ``mlp.dense_4h_to_h``. With ``pretraining_tp > 1`` *and* ``slow_but_exact``
  both projections are bypassed (sliced ``F.linear`` calls), so hooks on them
  would never fire: :func:`adapter_for` refuses such a config (the published
  BLOOM/BLOOMZ configs we know of set ``slow_but_exact = False``). The block returns
  ``(hidden, attn_weights)``. The token embedding is followed by
  ``word_embeddings_layernorm``, outside the ``embed`` site. With
  ``apply_residual_connection_post_layernorm`` (False in published checkpoints)
  the residual branch carries the normed hidden state, not the layer input.
* xglm: no MLP container: ``fc1``, ``activation_fn`` and ``fc2`` live in the
  decoder layer, so ``mlp = None`` and the FFN output is ``fc2``'s output.
  Sinusoidal positions are added after the (scaled) token embedding.

In all families the ``embed`` site is the token embedding only (positions, where
learned or sinusoidal, are added afterwards).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.errors import InputError, UnsupportedArchitectureError

__all__ = [
    "ArchAdapter",
    "SITE_NAMES",
    "SITE_READS",
    "SUPPORTED_FAMILIES",
    "FAMILY_ALIASES",
    "adapter_for",
    "embedding",
    "final_norm",
    "first_tensor",
    "lm_head",
    "resolve",
]

#: Per-layer site names accepted by :meth:`ArchAdapter.site`.
SITE_NAMES: tuple[str, ...] = (
    "layer", "neuron", "key", "down_proj", "first_proj", "up_proj", "mlp", "attn",
)

#: Which side of the module returned by :meth:`ArchAdapter.site` carries the quantity:
#: "output" (read ``module.output`` / a forward hook's output, via :func:`first_tensor`)
#: or "input" (the first positional input of the module).
SITE_READS: dict[str, str] = {
    "layer": "output",        # residual stream after the layer
    "neuron": "output",       # act_fn(h W1), [B, T, d_ff]
    "key": "input",           # down-projection input, [B, T, d_ff]
    "down_proj": "output",    # down-projection output, [B, T, d_model] (+ bias)
    "first_proj": "output",   # h W1 (pre-activation); its input is the FFN input
    "up_proj": "output",      # h W_up (gated FFNs only)
    "mlp": "output",          # FFN output before any post-FFN norm and residual add
    "attn": "output",         # attention output before any post-attention norm and residual add
}


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths of one architecture family (see the module docstring)."""

    family: str
    layers: str
    neuron: str
    first_proj: str
    up_proj: str | None
    down_proj: str
    down_orientation: str  # "out_in": weight is [d_model, d_ff]; "in_out": [d_ff, d_model]
    mlp: str | None  # None where no module outputs exactly the FFN output (xglm, bloom): use down_proj's output
    attn: str
    embed: str
    final_norm: str
    lm_head: str
    gated: bool
    # Residual-stream structure, for code that reassembles a layer's output:
    # out = x + post_attn_norm(attn) + post_ffn_norm(ffn) (each norm only where named).
    parallel_residual: bool = False
    post_attn_norm: str | None = None  # relative to a layer
    post_ffn_norm: str | None = None   # relative to a layer

    # ---- model-level modules -------------------------------------------------------
    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return resolve(model, self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layer_modules(model))

    def d_ff(self, model: nn.Module, layer: int = 0) -> int:
        """Number of FFN neurons in ``layer`` (read from the weights, not the config)."""
        return int(self.down_weight(model, layer).shape[1])

    def d_model(self, model: nn.Module) -> int:
        return int(self.down_weight(model, 0).shape[0])

    def embedding(self, model: nn.Module) -> nn.Module:
        """Token embedding module (output [B, T, d_model], before positions are added)."""
        return resolve(model, self.embed)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        """The norm applied to the last layer's output before the LM head."""
        return resolve(model, self.final_norm)

    def lm_head_module(self, model: nn.Module) -> nn.Module:
        """The LM head (unembedding), output [B, T, vocab]."""
        return resolve(model, self.lm_head)

    # ---- per-layer sites -----------------------------------------------------------
    def ffn_output_path(self) -> str:
        """Layer-relative path of the module whose output is the FFN output."""
        return self.mlp if self.mlp is not None else self.down_proj

    def site_relpath(self, name: str) -> str:
        """Layer-relative path of site ``name`` ("" for the layer itself)."""
        if name == "layer":
            return ""
        if name == "key":
            return self.down_proj
        if name == "mlp":
            return self.ffn_output_path()
        if name == "up_proj" and self.up_proj is None:
            raise InputError(
                f"{self.family} has an ungated FFN: there is no up_proj site "
                f"(sites: {', '.join(n for n in SITE_NAMES if n != 'up_proj')})."
            )
        if name in ("neuron", "down_proj", "first_proj", "up_proj", "attn"):
            return getattr(self, name)
        raise InputError(f"Unknown site {name!r}; choose one of: {', '.join(SITE_NAMES)}.")

    def site_path(self, layer: int, name: str, n_layers: int | None = None) -> str:
        """Path of site ``name`` in ``layer`` from the model root, e.g. ``model.layers.3.mlp.act_fn``.

        Negative ``layer`` counts from the end only when ``n_layers`` is given.
        """
        if n_layers is not None:
            layer = check_layer(layer, n_layers)
        elif layer < 0:
            raise InputError(f"Layer {layer} is negative; pass n_layers to count from the end.")
        rel = self.site_relpath(name)
        return f"{self.layers}.{layer}" + (f".{rel}" if rel else "")

    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        layers = self.layer_modules(model)
        return layers[check_layer(layer, len(layers))]

    def site(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        """The module of site ``name`` in ``layer``; read its side given by ``SITE_READS[name]``."""
        rel = self.site_relpath(name)
        block = self.layer_module(model, layer)
        return resolve(block, rel) if rel else block

    def ffn_output_module(self, model: nn.Module, layer: int) -> nn.Module:
        """Module whose output is the FFN output (``mlp``; ``down_proj`` for xglm and bloom)."""
        return resolve(self.layer_module(model, layer), self.ffn_output_path())

    # ---- weights -------------------------------------------------------------------
    def down_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Down-projection weight as ``[d_model, d_ff]`` -- a view of the parameter, never a copy."""
        weight = self.site(model, layer, "down_proj").weight
        return weight if self.down_orientation == "out_in" else weight.T

    def down_bias(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        """Down-projection bias ``[d_model]``, or None."""
        return getattr(self.site(model, layer, "down_proj"), "bias", None)

    def value_vectors(self, model: nn.Module, layer: int) -> torch.Tensor:
        """``[d_ff, d_model]`` view; row ``j`` is what one unit of key ``j`` adds to the FFN output."""
        return self.down_weight(model, layer).T


# ``final_norm`` and ``lm_head`` are path fields of the dataclass, so the module
# getters are methods with a ``_module`` suffix plus module-level functions
# ``embedding(model)``, ``final_norm(model)``, ``lm_head(model)`` below.


def _gated(family: str, **overrides: Any) -> ArchAdapter:
    fields: dict[str, Any] = dict(
        family=family,
        layers="model.layers",
        neuron="mlp.act_fn",
        first_proj="mlp.gate_proj",
        up_proj="mlp.up_proj",
        down_proj="mlp.down_proj",
        down_orientation="out_in",
        mlp="mlp",
        attn="self_attn",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        gated=True,
    )
    fields.update(overrides)
    return ArchAdapter(**fields)


_GEMMA_SANDWICH = dict(
    post_attn_norm="post_attention_layernorm", post_ffn_norm="post_feedforward_layernorm"
)

_ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _gated("llama"),
    "mistral": _gated("mistral"),
    "qwen2": _gated("qwen2"),
    "qwen3": _gated("qwen3"),
    "gemma": _gated("gemma"),
    "gemma2": _gated("gemma2", **_GEMMA_SANDWICH),
    "gemma3_text": _gated("gemma3_text", **_GEMMA_SANDWICH),
    "gpt2": ArchAdapter(
        family="gpt2", layers="transformer.h", neuron="mlp.act", first_proj="mlp.c_fc",
        up_proj=None, down_proj="mlp.c_proj", down_orientation="in_out", mlp="mlp",
        attn="attn", embed="transformer.wte", final_norm="transformer.ln_f",
        lm_head="lm_head", gated=False,
    ),
    "gptj": ArchAdapter(
        family="gptj", layers="transformer.h", neuron="mlp.act", first_proj="mlp.fc_in",
        up_proj=None, down_proj="mlp.fc_out", down_orientation="out_in", mlp="mlp",
        attn="attn", embed="transformer.wte", final_norm="transformer.ln_f",
        lm_head="lm_head", gated=False, parallel_residual=True,
    ),
    "gpt_neox": ArchAdapter(
        family="gpt_neox", layers="gpt_neox.layers", neuron="mlp.act",
        first_proj="mlp.dense_h_to_4h", up_proj=None, down_proj="mlp.dense_4h_to_h",
        down_orientation="out_in", mlp="mlp", attn="attention",
        embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head", gated=False, parallel_residual=True,
    ),
    "bloom": ArchAdapter(
        family="bloom", layers="transformer.h", neuron="mlp.gelu_impl",
        first_proj="mlp.dense_h_to_4h", up_proj=None, down_proj="mlp.dense_4h_to_h",
        down_orientation="out_in",
        mlp=None,  # BloomMLP's output already includes the residual
        attn="self_attention.dense",  # BloomAttention's output already includes the residual
        embed="transformer.word_embeddings", final_norm="transformer.ln_f",
        lm_head="lm_head", gated=False,
    ),
    "xglm": ArchAdapter(
        family="xglm", layers="model.layers", neuron="activation_fn", first_proj="fc1",
        up_proj=None, down_proj="fc2", down_orientation="out_in", mlp=None,
        attn="self_attn", embed="model.embed_tokens", final_norm="model.layer_norm",
        lm_head="lm_head", gated=False,
    ),
}

#: Families with an adapter, by Hugging Face ``config.model_type``.
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS)

#: Other ``model_type`` values accepted, and the family whose layers they use.
FAMILY_ALIASES: dict[str, str] = {"gemma3": "gemma3_text"}

# Gemma3ForConditionalGeneration (model_type "gemma3") keeps the text model here.
_GEMMA3_MULTIMODAL = dict(
    layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
)


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor in a module's output: ``output`` itself, or ``output[0]`` for tuples/lists."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    hidden = getattr(output, "last_hidden_state", None)  # ModelOutput dataclasses
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"No tensor in module output of type {type(output).__name__}.")


def resolve(root: Any, path: str) -> Any:
    """Follow a dotted path (``"model.layers.3.mlp"``) from ``root``.

    Integer segments index into ``ModuleList``/``Sequential`` (``root[3]``); other
    segments are attributes. Works on ``nn.Module`` trees and on nnsight envoys.
    An empty path returns ``root``. Raises ``AttributeError`` naming the missing segment.
    """
    obj = root
    if not path:
        return obj
    walked: list[str] = []
    for segment in path.split("."):
        try:
            if segment.lstrip("-").isdigit():
                try:
                    obj = obj[int(segment)]
                except TypeError:  # not indexable: fall back to the attribute "3"
                    obj = getattr(obj, segment)
            else:
                obj = getattr(obj, segment)
        except (AttributeError, IndexError, KeyError) as exc:
            where = ".".join(walked) or "<root>"
            raise AttributeError(
                f"{type(root).__name__} has no {segment!r} under {where!r} (path {path!r})."
            ) from exc
        walked.append(segment)
    return obj


def check_layer(layer: Any, n_layers: int, name: str = "the model", *, from_end: bool = True) -> int:
    """``layer`` as an index in ``0..n_layers-1``; InputError (naming ``name``'s layers) for anything else.

    ``from_end``: negative numbers count from the last layer (-1 is the last). The one
    layer check of the backend (:meth:`analysis.model.Workbench.check_layer` calls it).
    """
    integral = isinstance(layer, (int, np.integer)) and not isinstance(layer, (bool, np.bool_))
    low = -n_layers if from_end else 0
    if not integral or not low <= int(layer) < n_layers:
        shown = int(layer) if integral else repr(layer)
        raise InputError(f"Layer {shown} is out of range: {name} has {n_layers} layers "
                         f"(0-{n_layers - 1}{'; -1 is the last' if from_end else ''}).")
    return int(layer) % n_layers


def _config_of(model_or_config: Any) -> Any:
    if isinstance(model_or_config, nn.Module):
        return getattr(model_or_config, "config", None)
    return model_or_config


def _unsupported(model_type: Any) -> UnsupportedArchitectureError:
    aliases = ", ".join(f"{a} (as {f})" for a, f in FAMILY_ALIASES.items())
    return UnsupportedArchitectureError(
        f"Model type {model_type!r} is not supported: Neuroglot knows where the FFN neurons "
        f"of these families are: {', '.join(SUPPORTED_FAMILIES)}; also accepted: {aliases}."
    )


def adapter_for(model_or_config: Any) -> ArchAdapter:
    """The adapter for a model (``nn.Module`` with ``.config``) or a config (anything with ``model_type``).

    Given a model, the adapter is checked against it: every site of every layer must
    resolve and the neuron modules must be distinct per layer; otherwise
    ``UnsupportedArchitectureError``.
    """
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    family = FAMILY_ALIASES.get(model_type, model_type)
    if family not in _ADAPTERS:
        raise _unsupported(model_type)
    adapter = _ADAPTERS[family]
    model = model_or_config if isinstance(model_or_config, nn.Module) else None

    if model_type == "gemma3":
        multimodal = model is None or _has(model, _GEMMA3_MULTIMODAL["layers"])
        if multimodal:
            adapter = dataclasses.replace(adapter, **_GEMMA3_MULTIMODAL)
    if family == "gpt_neox":
        parallel = bool(getattr(config, "use_parallel_residual", True))
        # GPTNeoXForCausalLM calls its head ``embed_out`` in transformers 4.x, ``lm_head`` in 5.x.
        head = "embed_out" if model is not None and _has(model, "embed_out") else "lm_head"
        adapter = dataclasses.replace(adapter, parallel_residual=parallel, lm_head=head)
    if family == "bloom" and getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise UnsupportedArchitectureError(
            "This BLOOM config sets slow_but_exact=True with pretraining_tp > 1, which bypasses "
            "the projection modules Neuroglot hooks. Set config.slow_but_exact = False before "
            "loading (the results are the same up to rounding)."
        )
    if model is not None:
        _validate(adapter, model)
    return adapter


def _has(root: nn.Module, path: str) -> bool:
    try:
        resolve(root, path)
    except AttributeError:
        return False
    return True


def _validate(adapter: ArchAdapter, model: nn.Module) -> None:
    name = type(model).__name__
    try:
        layers = adapter.layer_modules(model)
        for path in (adapter.embed, adapter.final_norm, adapter.lm_head):
            resolve(model, path)
        seen: set[int] = set()
        for block in layers:
            for site in SITE_NAMES:
                if site == "layer" or (site == "up_proj" and not adapter.gated):
                    continue
                resolve(block, adapter.site_relpath(site))
            neuron = resolve(block, adapter.neuron)
            if id(neuron) in seen:
                raise UnsupportedArchitectureError(
                    f"{name} shares one activation module between layers, so its neurons "
                    "cannot be told apart by layer."
                )
            seen.add(id(neuron))
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"{name} (model type {adapter.family!r}) does not have the layout Neuroglot expects "
            f"for this family: {exc}"
        ) from exc


def embedding(model: nn.Module, adapter: ArchAdapter | None = None) -> nn.Module:
    """Token embedding module of ``model``."""
    return (adapter or adapter_for(model)).embedding(model)


def final_norm(model: nn.Module, adapter: ArchAdapter | None = None) -> nn.Module:
    """Final norm module of ``model``."""
    return (adapter or adapter_for(model)).final_norm_module(model)


def lm_head(model: nn.Module, adapter: ArchAdapter | None = None) -> nn.Module:
    """LM head module of ``model``."""
    return (adapter or adapter_for(model)).lm_head_module(model)
