"""FFN key statistics from text: the second moment of the keys, cached per model and layer.

ROME, MEMIT and AlphaEdit (and LangEdit, which builds on them) treat each FFN's
down-projection as a linear associative memory whose keys ``k`` are the
down-projection *input* (``act(gate(h)) * up(h)`` for gated FFNs; DESIGN.md
Decision 1, the ``"key"`` site of :mod:`analysis.arch`). They need the keys'
uncentred second moment over ordinary text,

    C = (1/N) Σ_t k_t k_tᵀ            [d_ff, d_ff]

(ROME's and MEMIT's ``mom2``, the "uncentered covariance" ``K_0 = (1/n_0) K_0ᵀ K_0``
of papers/langedit.md Algorithm 1, whose null space AlphaEdit and LangEdit
project onto). We also keep the mean ``μ = (1/N) Σ_t k_t`` so the centred
covariance ``C − μμᵀ`` is one call away (:meth:`KeyStats.covariance`).

The text (DESIGN.md Decision 7) is given: ``{language: [text, ...]}``, with a
label per language saying where it came from (FLORES-200 sentences of the edit
languages or the statements of a corpus, read by :mod:`data.flores`; this module
reads no files of text). Tokens counted: every
real token of each sentence (padding and the tokenizer's special tokens such as
BOS never count), each sentence cut at ``max_length`` tokens, until
``n_tokens`` tokens are seen. The budget is split fairly over the languages
(equal shares; a language with too little text gives all it has and the rest
goes to the others) and taken in text order, so the last sentence of a language
may count only its first tokens: N == n_tokens exactly whenever there is enough
text. Batches of the languages alternate (round robin).

How it is computed (:func:`key_statistics`): one nnsight trace per batch over
the decoder stack only (:meth:`Workbench.tracer`; the LM head never runs, and
the trace stops after the highest requested layer) reads the key site of every
requested layer, keeps the counted positions and adds ``Kᵀ K`` (float32
matmuls over blocks of rows; ``K`` = the batch's keys [n, d_ff]) to that
layer's running sum.

Precision and memory. The per-batch products are float32 (a sum of at most a
few thousand terms); they are added into an accumulator of ``precision``:
float64 by default (the accumulation adds no error of its own, whatever the
token count), or float32 (``precision="float32"``: half the memory; a few
hundred float32 additions for 100k tokens). On a GPU the per-batch matmuls
follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default; TF32 would
cost about three digits). The accumulators live on ``device`` (default: the
model's device, so on a GPU nothing crosses the bus until the end). Per
requested layer:

=======================  ==================  ======================================
what                     size                d_ff = 14336 (Llama-3.1-8B, Mistral-7B)
=======================  ==================  ======================================
accumulator              d_ff² × 8 B (f64)   1.64 GB (0.82 GB with float32)
a batch's product        ≤ 16M values        ≤ 64 MB float32 (+128 MB float64 copy),
                                             transient: Kᵀ K is added in row blocks
finishing (C / N → f32)  d_ff² × 4 B         0.82 GB beside the accumulator, briefly
result (CPU, float32)    d_ff² × 4 B         0.82 GB; also the file size on disk
=======================  ==================  ======================================

so MEMIT's five layers of an 8B model hold 8.2 GB of float64 accumulators on
the GPU (4.1 GB in float32) and return 4.1 GB on the CPU (Qwen2-7B, d_ff =
18944: 2.9 GB float64 per layer; bloomz-7b1 and GPT-J, 16384: 2.1 GB). The
embedded model (d_ff = 2048) needs 32 MB per layer.

Disk cache (:func:`cached_key_statistics`): ``cache_root()/stats/<key>/layer_<l>.safetensors``
where ``<key>`` hashes the model (spec, name, parameter count, dtype and a
fingerprint of its weights), the languages, the source and a digest of its
texts, ``n_tokens``, ``max_length`` and :data:`STATS_VERSION`. The folder is a run
folder of :mod:`analysis.runs` (kind "stats", its record in ``key.json``) that grows a
layer at a time (:func:`analysis.runs.add_to_run`). Layers already on disk are read
back; only missing or damaged layers are computed (in one pass).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from analysis import runs
from analysis.arch import resolve
from analysis.errors import InputError, NeuroglotError
from analysis.tokens import Batch

if TYPE_CHECKING:
    from analysis.model import Workbench

#: Bumped when what key_statistics computes changes, so older cache entries are not reused.
STATS_VERSION = 1
#: The source label of FLORES-200 sentences (read by :mod:`data.flores`); it comes first in a combined label.
FLORES = "flores"
PRECISIONS: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
_META_KEY = "neuroglot_key_stats"
_TOKENIZE_CHUNK = 256
#: Values per block of rows of a batch's product Kᵀ K (16M float32 = 64 MB).
BLOCK_ELEMENTS = 1 << 24

Progress = Callable[[int, int], None]  # (tokens done, tokens planned)


# ------------------------------------------------------------------------- text


def source_label(sources: Mapping[str, str]) -> str:
    """One label for the sources of all languages ("flores", "corpus:demo", "flores+corpus:demo")."""
    return "+".join(sorted(set(sources.values()), key=lambda label: (label != FLORES, label)))


def texts_digest(texts: Mapping[str, Sequence[str]]) -> str:
    """SHA-1 of the texts per language (order included)."""
    payload = json.dumps({lang: list(t) for lang, t in texts.items()}, ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------- checks


def check_positive(value: Any, name: str) -> int:
    """``value`` as an int ≥ 1, or an InputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name} must be a whole number of at least 1; got {value!r}.")
    return int(value)


def check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}: use {' or '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


# ---------------------------------------------------------------- statistics


@dataclass
class KeyStats:
    """Second moment and mean of one layer's FFN keys over ``tokens`` real tokens of text."""

    layer: int
    second_moment: torch.Tensor   # C = (1/N) Σ k kᵀ, float32 [d_ff, d_ff] on the CPU
    mean: torch.Tensor            # μ = (1/N) Σ k, float32 [d_ff] on the CPU
    tokens: int                   # N
    languages: list[str]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer, self.tokens = int(self.layer), int(self.tokens)
        self.second_moment = self.second_moment.detach().to("cpu", torch.float32).contiguous()
        self.mean = self.mean.detach().to("cpu", torch.float32).contiguous()
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.second_moment.shape != (d, d):
            raise ValueError(f"second_moment must be [d_ff, d_ff] and mean [d_ff]; got "
                             f"{tuple(self.second_moment.shape)} and {tuple(self.mean.shape)}")
        self.languages = list(self.languages)

    @property
    def d_ff(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self) -> torch.Tensor:
        """The centred covariance ``C − μμᵀ`` (float32 [d_ff, d_ff])."""
        return self.second_moment - torch.outer(self.mean, self.mean)

    def checksum(self) -> str:
        """CRC-32 of the tensors' bytes, stored beside them to detect damaged files."""
        crc = zlib.crc32(self.second_moment.numpy())
        return f"{zlib.crc32(self.mean.numpy(), crc):08x}"

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON metadata in its header), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"layer": self.layer, "tokens": self.tokens, "languages": self.languages, "source": self.source,
                "meta": self.meta, "crc32": self.checksum(), "stats_version": STATS_VERSION}
        runs.atomic_save(path, lambda tmp: save_file({"second_moment": self.second_moment, "mean": self.mean}, tmp,
                                                     metadata={_META_KEY: json.dumps(info, ensure_ascii=False)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "KeyStats":
        """Read a file written by :meth:`save`; NeuroglotError if it is missing or damaged."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise NeuroglotError(f"No key statistics at {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()[_META_KEY])
                tensors = {name: f.get_tensor(name) for name in ("second_moment", "mean")}
            stats = cls(info["layer"], tensors["second_moment"], tensors["mean"], info["tokens"],
                        info["languages"], info["source"], dict(info["meta"]))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise NeuroglotError(f"{path} holds damaged key statistics: {exc}") from exc
        if stats.checksum() != info.get("crc32"):
            raise NeuroglotError(f"{path} holds damaged key statistics: the checksum does not match.")
        return stats


class KeySums:
    """Running sums Σ k kᵀ, Σ k and N of one layer's keys."""

    def __init__(self, d_ff: int, dtype: torch.dtype, device: torch.device):
        self.outer = torch.zeros(d_ff, d_ff, dtype=dtype, device=device)
        self.total = torch.zeros(d_ff, dtype=dtype, device=device)
        self.count = 0

    def add(self, keys: torch.Tensor) -> None:
        """Add the keys ``[n, d_ff]`` of one batch: ``Kᵀ K`` as float32 matmuls over blocks of rows.

        Blocks keep the float32 product (and its float64 copy for the addition)
        at about :data:`BLOCK_ELEMENTS` values instead of d_ff² (0.8 GB + 1.6 GB
        for d_ff = 14336).
        """
        k = keys.to(device=self.outer.device, dtype=torch.float32)
        d = k.shape[1]
        rows = max(1, BLOCK_ELEMENTS // max(d, 1))
        for start in range(0, d, rows):
            block = self.outer[start:start + rows]
            if block.dtype == torch.float32:
                block.addmm_(k[:, start:start + rows].T, k)
            else:
                block.add_(k[:, start:start + rows].T @ k)
        self.total.add_(k.sum(0))
        self.count += int(k.shape[0])

    def second_moment_and_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, μ)`` as float32 on the CPU; frees the accumulator."""
        n = max(self.count, 1)
        outer, self.outer = self.outer, None
        second = outer.div_(n).to(torch.float32).cpu()
        del outer
        return second, (self.total / n).to(torch.float32).cpu()


@dataclass
class PlannedText:
    """A text of the token budget: ``take`` of its ``length`` real tokens count (its first ones)."""

    language: str
    text: str
    length: int
    take: int


def real_token_counts(tokenizer, texts: Sequence[str], max_length: int, cap: int) -> list[int]:
    """Real tokens (no special tokens) of each text cut at ``max_length``, for the first texts
    until their sum reaches ``cap`` (the rest are not tokenised)."""
    counts: list[int] = []
    total = 0
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        enc = tokenizer(list(texts[start:start + _TOKENIZE_CHUNK]), truncation=True, max_length=max_length,
                        return_special_tokens_mask=True, return_attention_mask=False)
        for special in enc["special_tokens_mask"]:
            n = len(special) - int(sum(special))
            counts.append(n)
            total += n
            if total >= cap:
                return counts
    return counts


def fair_token_shares(available: Mapping[str, int], n_tokens: int) -> dict[str, int]:
    """Split ``n_tokens`` over languages as equally as text allows (water filling).

    A language with less than its share gives all it has; the others share the
    rest (earlier languages take the odd tokens). The shares sum to
    ``min(n_tokens, Σ available)``.
    """
    shares: dict[str, int] = {}
    pending = list(available)
    remaining = int(n_tokens)
    while pending:
        share, extra = divmod(remaining, len(pending))
        short = [lang for lang in pending if available[lang] <= share]
        if not short:
            for i, lang in enumerate(pending):
                shares[lang] = share + (1 if i < extra else 0)
            break
        for lang in short:
            shares[lang] = int(available[lang])
            remaining -= int(available[lang])
        pending = [lang for lang in pending if lang not in short]
    return {lang: shares[lang] for lang in available}


def token_plan(tokenizer, texts: Mapping[str, Sequence[str]], n_tokens: int,
               max_length: int) -> dict[str, list[PlannedText]]:
    """The texts (and tokens of the last one) each language contributes to the budget, in text order."""
    counts = {lang: real_token_counts(tokenizer, t, max_length, n_tokens) for lang, t in texts.items()}
    shares = fair_token_shares({lang: sum(c) for lang, c in counts.items()}, n_tokens)
    plan: dict[str, list[PlannedText]] = {}
    for lang, lengths in counts.items():
        left, chosen = shares[lang], []
        for text, length in zip(texts[lang], lengths):
            if left <= 0:
                break
            if length > 0:
                chosen.append(PlannedText(lang, text, length, min(length, left)))
                left -= chosen[-1].take
        plan[lang] = chosen
    return plan


def round_robin_batches(plan: Mapping[str, list[PlannedText]], batch_size: int) -> list[list[PlannedText]]:
    """Batches of one language each (texts sorted by length, less padding), alternating between languages."""
    per_language = []
    for chosen in plan.values():
        ordered = sorted(chosen, key=lambda t: t.length)
        per_language.append([ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)])
    return [b for group in itertools.zip_longest(*per_language) for b in group if b]


def encode_truncated(tokenizer, texts: Sequence[str], max_length: int) -> Batch:
    """One padded batch of ``texts`` cut at ``max_length`` tokens; ``real`` marks non-special tokens.

    Like :func:`analysis.tokens.encode` with truncation, except that a row with no
    real token keeps none (nothing of it is counted).
    """
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                    return_special_tokens_mask=True)
    attention = enc["attention_mask"]
    real = attention.bool() & ~enc["special_tokens_mask"].bool()
    idx = torch.arange(real.shape[1]).expand_as(real)
    last = torch.where(real, idx, torch.full_like(idx, -1)).max(dim=1).values.clamp(min=0)
    return Batch(enc["input_ids"], attention, real, last, None)


def counted_positions(batch: Batch, takes: Sequence[int]) -> torch.Tensor:
    """Bool [B, T]: the first ``takes[row]`` real tokens of each row."""
    rank = batch.real.long().cumsum(dim=1)
    limit = torch.as_tensor(list(takes), dtype=torch.long, device=rank.device)[:, None]
    return batch.real & (rank <= limit)


def accumulate_batch(wb: Workbench, batch: Batch, counted: torch.Tensor, sums: Mapping[int, KeySums]) -> None:
    """Add the keys at the ``counted`` positions of one batch to each layer's sums: one trace over
    the decoder stack, stopped after the highest layer in ``sums``."""
    _, layers_path = wb.base_model()
    down = wb.arch.down_proj
    flat = counted.reshape(-1).nonzero().squeeze(1)  # flat (row, token) indices of the counted positions
    with wb.lock, torch.no_grad():
        nn_model = wb.tracer()
        with nn_model.trace(**wb.forward_inputs(batch.input_ids, batch.attention_mask)) as tracer:
            for layer in sorted(sums):  # layer order, as the forward pass
                key = resolve(nn_model, f"{layers_path}.{layer}.{down}").inputs[0][0]  # [B, T, d_ff]
                sums[layer].add(key.flatten(0, 1).index_select(0, flat))
            tracer.stop()  # later layers are not needed


def checked_texts(texts: Mapping[str, Sequence[str]], sources: str | Mapping[str, str]
                  ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The non-empty texts per language and a source label per language (``sources``: one label for
    all, or ``{language: label}``); InputError for anything else."""
    if not isinstance(texts, Mapping):
        raise InputError("Key statistics take texts per language ({language: [text, ...]}), got "
                         f"{type(texts).__name__}; data.flores.statistics_texts reads them for languages.")
    texts = {str(lang): [str(t) for t in lang_texts if str(t).strip()] for lang, lang_texts in texts.items()}
    if not texts:
        raise InputError("No texts were given for the key statistics.")
    if isinstance(sources, str):
        return texts, {lang: sources for lang in texts}
    missing = [lang for lang in texts if lang not in sources]
    if missing:
        raise InputError(f"No source label for the texts of {', '.join(missing)}.")
    return texts, {lang: str(sources[lang]) for lang in texts}


def key_statistics(wb: Workbench, layers: int | Iterable[int], texts: Mapping[str, Sequence[str]],
                   n_tokens: int = 100_000, batch_size: int = 16, max_length: int = 128,
                   source: str | Mapping[str, str] = "texts", progress: Progress | None = None, *,
                   precision: str = "float64", device: str | torch.device | None = None) -> dict[int, KeyStats]:
    """Second moment and mean of the keys of every requested layer, in one pass over the text.

    ``texts``: ``{language: [text, ...]}`` (:func:`data.flores.statistics_texts`
    reads FLORES-200 or a corpus for languages); ``source`` labels where they
    came from (one label, or one per language). At most
    ``n_tokens`` real tokens are counted, split fairly over the languages;
    fewer only when the text runs out (``meta["requested_tokens"]`` keeps the
    request). ``precision`` is the accumulator's dtype ("float64" or
    "float32"), kept on ``device`` (default: the model's). ``progress(done,
    planned)`` is called with token counts after each batch.
    """
    layers = wb.check_layers(layers, what="the key statistics")
    n_tokens = check_positive(n_tokens, "n_tokens")
    batch_size = check_positive(batch_size, "batch_size")
    max_length = check_positive(max_length, "max_length")
    dtype = check_precision(precision)
    texts, sources = checked_texts(texts, source)
    started = time.perf_counter()
    plan = token_plan(wb.tokenizer, texts, n_tokens, max_length)
    planned = sum(t.take for chosen in plan.values() for t in chosen)
    if planned == 0:
        raise InputError(f"The texts of {', '.join(texts)} have no tokens to count.")
    target = torch.device(device) if device is not None else wb.device
    sums = {layer: KeySums(wb.arch.d_ff(wb.model, layer), dtype, target) for layer in layers}
    tokens = dict.fromkeys(texts, 0)
    done = 0
    for chunk in round_robin_batches(plan, batch_size):
        batch = encode_truncated(wb.tokenizer, [t.text for t in chunk], max_length).to(wb.device)
        counted = counted_positions(batch, [t.take for t in chunk])
        accumulate_batch(wb, batch, counted, sums)
        n = int(counted.sum())
        tokens[chunk[0].language] += n
        done += n
        if progress is not None:
            progress(done, planned)
    seconds = round(time.perf_counter() - started, 2)
    meta = {"model": wb.spec, "model_name": wb.name, "requested_tokens": n_tokens, "max_length": max_length,
            "batch_size": batch_size, "precision": precision, "sources": sources,
            "tokens_per_language": tokens, "texts_per_language": {lang: len(c) for lang, c in plan.items()},
            "texts_sha1": texts_digest(texts), "seconds": seconds, "stats_version": STATS_VERSION}
    out = {}
    for layer in layers:
        second, mean = sums.pop(layer).second_moment_and_mean()
        out[layer] = KeyStats(layer, second, mean, done, list(texts), source_label(sources), dict(meta))
    return out


# ---------------------------------------------------------------- disk cache


def model_fingerprint(wb: Workbench, elements: int = 64) -> str:
    """SHA-1 of the first ``elements`` values of every parameter: tells apart two models with the
    same name and size (random tiny models, a model with an edit applied). Not a full hash."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, param in wb.model.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().reshape(-1)[:elements].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def stats_request(wb: Workbench, texts: Mapping[str, Sequence[str]], source: str, n_tokens: int,
                  max_length: int) -> dict[str, Any]:
    """Everything that determines the statistics (the layer aside), as plain data; its
    :func:`analysis.runs.request_key` names the cache folder."""
    return {"model": wb.spec, "name": wb.name, "params": wb.n_params, "dtype": str(wb.dtype),
            "weights": model_fingerprint(wb), "languages": list(texts), "source": source,
            "texts": texts_digest(texts), "n_tokens": int(n_tokens), "max_length": int(max_length),
            "version": STATS_VERSION}


def stats_path(folder: Path, layer: int) -> Path:
    return folder / f"layer_{int(layer)}.safetensors"


def read_cached(folder: Path, layer: int, key: str, d_ff: int) -> KeyStats | None:
    """The layer's statistics from the cache folder, or None when absent, damaged or not of ``key``."""
    path = stats_path(folder, layer)
    if not path.is_file():
        return None
    try:
        stats = KeyStats.load(path)
    except NeuroglotError:
        return None
    if stats.meta.get("key") != key or stats.layer != layer or stats.d_ff != d_ff:
        return None
    return stats


def cached_key_statistics(wb: Workbench, layers: int | Iterable[int], texts: Mapping[str, Sequence[str]],
                          sources: str | Mapping[str, str] = "texts", n_tokens: int = 100_000, *,
                          batch_size: int = 16, max_length: int = 128, precision: str = "float64",
                          progress: Progress | None = None) -> tuple[dict[int, KeyStats], Path, bool]:
    """:func:`key_statistics` of ``texts``, read from the disk cache where computed before.

    ``texts`` and ``sources`` as :func:`data.flores.statistics_texts` returns them
    (``{language: [text, ...]}``; ``{language: "flores" | "corpus:<name>"}`` or one
    label for all). The languages' order does not matter. Layers found in
    ``cache_root()/stats/<key>/`` are read back; missing or damaged ones are
    computed together in one pass and written there. Returns ``(stats per
    layer, cache folder, True when every layer came from disk)``.
    """
    from analysis.model import cache_root

    layers = wb.check_layers(layers, what="the key statistics")
    n_tokens = check_positive(n_tokens, "n_tokens")
    max_length = check_positive(max_length, "max_length")
    check_positive(batch_size, "batch_size")
    check_precision(precision)
    texts, sources = checked_texts(texts, sources)
    texts = {lang: texts[lang] for lang in sorted(texts)}  # the statistics do not depend on the order
    label = source_label(sources)
    request = stats_request(wb, texts, label, n_tokens, max_length)
    key = runs.request_key(request)
    where = cache_root() / "stats" / key
    info = runs.claim(where, "stats", key, request)
    found: dict[int, KeyStats] = {}
    if info.state in ("run", "damaged"):  # a damaged record: the layers carry their key and checksum
        for layer in layers:
            stats = read_cached(where, layer, key, wb.arch.d_ff(wb.model, layer))
            if stats is not None:
                found[layer] = stats
    missing = [layer for layer in layers if layer not in found]
    computed: dict[int, KeyStats] = {}
    if missing:
        computed = key_statistics(wb, missing, texts, n_tokens=n_tokens, batch_size=batch_size,
                                  max_length=max_length, source=label, progress=progress, precision=precision)
        for stats in computed.values():
            stats.meta.update(key=key, sources=sources, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                              versions=runs.versions())
        found.update(computed)
    if computed or info.state != "run":
        runs.add_to_run(where, "stats", key, request,
                        lambda folder: [stats.save(stats_path(folder, layer)) for layer, stats in computed.items()])
    return {layer: found[layer] for layer in layers}, where, not missing
