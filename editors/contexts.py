"""The contexts an edit is trained on, shared by LU-LAFNs and the ROME family (ROME, MEMIT, AlphaEdit).

* Prefixes p_l^m (lu-lafns Eq. 8; ROME's and MEMIT's context templates): short
  texts sampled by the edited model itself from BOS (:func:`generate_prefixes`,
  seeded per language, special and added tokens excluded, cached per model),
  joined to a prompt as MEMIT's ``"{prefix}. {prompt}"`` (:func:`prefixed`).
* The KL prompt q_l (lu-lafns Eq. 9; ROME/MEMIT's ``"{subject} is a"``),
  written in each language (:data:`KL_TEMPLATES`, :func:`kl_prompt`).

The teacher-forced rows these contexts become are :mod:`editors.rows`.
"""
from __future__ import annotations

import logging
import weakref
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from analysis.errors import InputError

if TYPE_CHECKING:
    from analysis.model import Workbench

log = logging.getLogger(__name__)

#: q_l of lu-lafns Eq. 9 (and ROME/MEMIT's KL prompt), "{subject} is a" in each language ("{}" is the subject).
KL_TEMPLATES: dict[str, str] = {
    "en": "{} is a", "zh": "{}是一个", "de": "{} ist ein", "fr": "{} est un", "es": "{} es un",
    "ru": "{} — это", "ja": "{}は", "ar": "{} هو", "cs": "{} je", "nl": "{} is een", "it": "{} è un",
    "pt": "{} é um", "ko": "{}는", "th": "{} เป็น", "tr": "{} bir", "pl": "{} to", "uk": "{} — це",
    "vi": "{} là một",
}


@dataclass(frozen=True)
class PrefixSpec:
    """How many prefixes of how many tokens, and the sampling seed (what :func:`generate_prefixes` reads)."""

    n_prefixes: int
    prefix_length: int
    seed: int = 0


_PREFIX_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, list[str]]]" = weakref.WeakKeyDictionary()


def _language_seed(seed: int, language: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(language.encode())) % (2 ** 63)


def _last_logits(wb: Workbench, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] at each row's last non-padding token (LM head on those positions only)."""
    last = attention_mask.long().sum(1) - 1
    return wb.logits_at(wb.forward_inputs(input_ids, attention_mask), last).float()


def generate_prefixes(wb: Workbench, language: str, hp: Any) -> list[str]:
    """lu-lafns Eq. 8: M prefixes p_l^m of ``prefix_length`` tokens sampled by the model from BOS (cached; seeded).

    ``hp`` has ``n_prefixes`` (M), ``prefix_length`` and ``seed``: LU-LAFNs' hyper-parameters or a
    :class:`PrefixSpec` (ROME/MEMIT's ``[length, count]`` context templates).
    """
    if hp.n_prefixes == 0:
        return []
    key = (wb.spec, language, int(hp.seed), int(hp.n_prefixes), int(hp.prefix_length))
    cache = _PREFIX_CACHE.setdefault(wb.model, {})
    if key in cache:
        return list(cache[key])
    tok = wb.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise InputError(f"The tokenizer of {wb.name} has no BOS or EOS token to start the prefixes from.")
    gen = torch.Generator().manual_seed(_language_seed(hp.seed, language))
    special = {int(i) for i in getattr(tok, "all_special_ids", []) or []}
    # and every added token (Gemma's <start_of_image>, <unusedN>, ...): control tokens, not text
    special |= {int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {})}
    special = sorted(special)
    ids = torch.full((hp.n_prefixes, 1), int(start), dtype=torch.long, device=wb.device)
    with torch.no_grad():
        for _ in range(hp.prefix_length):
            logits = _last_logits(wb, ids, torch.ones_like(ids))
            vocab = logits.shape[-1]
            logits[:, [i for i in special if i < vocab]] = float("-inf")
            probs = torch.softmax(logits, -1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(wb.device)
            ids = torch.cat([ids, nxt], dim=1)
    prefixes = [" ".join(tok.decode(row[1:], skip_special_tokens=True).split()) for row in ids.cpu()]
    cache[key] = prefixes
    return list(prefixes)


def prefixed(prefix: str, prompt: str) -> str:
    """lu-lafns Eq. 8: ``p + x`` as MEMIT's context template ``"{prefix}. {prompt}"`` (bare prompt for no prefix)."""
    prefix = prefix.replace("{", " ").replace("}", " ").strip()
    return f"{prefix}. {prompt}" if prefix else prompt


def kl_prompt(language: str, subject: str) -> str:
    """lu-lafns Eq. 9: q_l, "{subject} is a" in ``language`` (English where no template is known, logged)."""
    template = KL_TEMPLATES.get(language)
    if template is None:
        log.info("No '{subject} is a' template for %r; using the English one for the KL prompt.", language)
        template = KL_TEMPLATES["en"]
    return template.format(subject)
