"""What a causal trace starts from (analysis.causal_trace): the prompt's tokens and its subject's,
the noise σ and its draws, the states each cell restores, the checked parameters.

Both the batched :func:`analysis.causal_trace.causal_trace` and the reference
:func:`analysis.reference.causal_trace_per_cell` start from :func:`prepare`, so they
see the same tokens and the same noise.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from analysis.arch import first_tensor
from analysis.errors import InputError
from analysis.tokens import answer_ids, encode

if TYPE_CHECKING:
    from analysis.causal_trace import TraceParams
    from analysis.model import Workbench

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")


# ---------------------------------------------------------------------- noise

_STD_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, float]]" = weakref.WeakKeyDictionary()


def embedding_noise_std(wb: Workbench, chunk: int = 16384) -> float:
    """Standard deviation of the token-embedding module's output over the whole vocabulary.

    The module output is what the noise is added to (for gemma it includes the
    sqrt(d_model) scale). Computed in chunks of ``chunk`` ids in float64 and
    cached per embedding module until its weight changes. ROME instead takes the
    std of the embeddings of its facts' subjects (see the module docstring).
    """
    module = wb.arch.embedding(wb.model)
    weight = module.weight
    stamp = (weight.data_ptr(), weight._version, tuple(weight.shape), str(weight.dtype))
    cached = _STD_CACHE.get(module)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    n_vocab = int(weight.shape[0])
    total = total_sq = 0.0
    count = 0
    with wb.lock, torch.no_grad():
        for start in range(0, n_vocab, chunk):
            ids = torch.arange(start, min(start + chunk, n_vocab), device=weight.device).unsqueeze(0)
            x = first_tensor(module(ids)).double()
            total += float(x.sum())
            total_sq += float((x * x).sum())
            count += x.numel()
    mean = total / count
    std = math.sqrt(max(total_sq - count * mean * mean, 0.0) / max(count - 1, 1))
    _STD_CACHE[module] = (stamp, std)
    return std


def noise_sigma(wb: Workbench, noise: float = 3.0, sigma: float | None = None) -> float:
    """σ of the subject noise: ``sigma`` when given, else ``noise ×`` :func:`embedding_noise_std`."""
    if sigma is not None:
        if not is_number(sigma) or not float(sigma) >= 0 or not math.isfinite(float(sigma)):
            raise InputError(f"sigma must be a finite number >= 0; got {sigma!r}.")
        return float(sigma)
    if not is_number(noise) or not float(noise) >= 0 or not math.isfinite(float(noise)):
        raise InputError(f"noise must be a finite number >= 0 (a multiple of the embedding std); got {noise!r}.")
    return float(noise) * embedding_noise_std(wb)


def subject_noise(samples: int, n_tokens: int, d_model: int, sigma: float, seed: int) -> torch.Tensor:
    """``samples`` noise tensors [n_tokens, d_model] ~ N(0, 1) × σ from one generator seeded with ``seed``.

    Returned stacked, [samples, n_tokens, d_model], float32 on the CPU.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randn((n_tokens, d_model), generator=gen) for _ in range(samples)]) * sigma


def is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


# --------------------------------------------------------------- preparation


@dataclass
class _Prepared:
    input_ids: torch.Tensor       # [1, T] on the model's device
    tokens: list[str]
    subject: tuple[int, int]      # [start, end)
    answer_id: int | None         # None: the model's own prediction
    sigma: float
    noise: torch.Tensor           # [samples, end - start, d_model], model dtype and device
    kinds: tuple[str, ...]
    meta: dict[str, Any]


def check_parameters(kinds: Sequence[str], samples: int, window: int, max_rows: int, seed: int,
                     noise: float | None = None) -> tuple[str, ...]:
    """Refuse bad tracing parameters (before a model is loaded, and before any fact is traced)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise InputError(f"Unknown kind(s) {', '.join(map(repr, unknown)) or '(none given)'}: "
                         f"choose from {', '.join(KINDS)}.")
    for name, value, least in (("samples", samples, 1), ("window", window, 1), ("max_rows", max_rows, 1)):
        if not is_number(value) or int(value) != value or int(value) < least:
            raise InputError(f"{name} must be a whole number >= {least}; got {value!r}.")
    if not is_number(seed) or int(seed) != seed:
        raise InputError(f"seed must be a whole number; got {seed!r}.")
    if noise is not None and (not is_number(noise) or not float(noise) >= 0 or not math.isfinite(float(noise))):
        raise InputError(f"noise must be a finite number >= 0 (a multiple of the embedding std); got {noise!r}.")
    return kinds


def prepare(wb: Workbench, prompt: str, subject: str, answer: str | None, params: TraceParams,
            language: str | None) -> _Prepared:
    """Validate the parameters, tokenise, locate the subject, draw the noise."""
    kinds, samples, noise, sigma = params.kinds, params.samples, params.noise, params.sigma
    window, seed, max_rows = params.window, params.seed, params.max_rows
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty.")
    if not isinstance(subject, str) or not subject.strip():
        raise InputError("The subject is empty.")
    kinds = check_parameters(kinds, samples, window, max_rows, seed)
    ids, (start, end) = locate_subject(wb.tokenizer, prompt, subject)
    tokens = [wb.tokenizer.decode([int(i)]) for i in ids[0]]
    answer_id = None
    if answer is not None:
        answer_id = int(answer_ids(wb.tokenizer, prompt, answer)[0])
    s = noise_sigma(wb, noise, sigma)
    drawn = subject_noise(int(samples), end - start, wb.d_model, s, int(seed))
    meta = {"prompt": prompt, "subject": subject, "language": language, "samples": int(samples),
            "noise": float(noise), "sigma": s, "sigma_given": sigma is not None, "window": int(window),
            "seed": int(seed), "model": wb.name, "model_spec": wb.spec}
    return _Prepared(ids.to(wb.device), tokens, (start, end), answer_id, s,
                     drawn.to(device=wb.device, dtype=wb.dtype), kinds, meta)


def locate_subject(tokenizer, prompt: str, subject: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Input ids [1, T] of ``prompt`` and the subject's token range ``[start, end)``.

    The subject's tokens are those whose characters overlap its last occurrence
    in the prompt (:func:`analysis.tokens.encode`: leading-space tokens and
    scripts without spaces alike); a range with gaps is taken from its first to
    its last token. A subject not in the prompt raises :class:`InputError`.
    """
    batch = encode(tokenizer, [prompt], subjects=[subject])
    where = batch.subject[0].nonzero().squeeze(1)
    return batch.input_ids, (int(where.min()), int(where.max()) + 1)


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window of layers around ``layer``: ``[max(0, l - w//2), min(L, l - (-w//2)))``."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The layers whose ``kind`` state cell (t, ``layer``) restores: the layer itself for
    "hidden", the window around it for "mlp" and "attn"."""
    return (layer,) if kind == "hidden" else tuple(window_layers(layer, window, n_layers))


def kind_module(wb: Workbench, kind: str, layer: int) -> torch.nn.Module:
    """The module whose output is the ``kind`` state of ``layer``."""
    if kind == "hidden":
        return wb.arch.layer_module(wb.model, layer)
    if kind == "mlp":
        return wb.arch.ffn_output_module(wb.model, layer)
    return wb.arch.site(wb.model, layer, "attn")
