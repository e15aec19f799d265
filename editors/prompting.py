"""In-context edits: the text put before a prompt, and the multilingual retrieval that picks it.

An in-context edit (:mod:`editors.in_context`: IKE, and the retrieval-augmented
ReMaKE-style variant) changes no weight. Its :class:`~editors.edit.PromptContext`
says what the model is told before each question while the edit is applied;
:func:`rewrite_prompts` writes the prompts the model then really reads, and
:mod:`editors.answers` (greedy decoding and teacher-forced scores, hence every
metric and the Edit lab) answers those.

The prompt format is IKE's (Zheng et al. 2023, "Can We Edit Factual Knowledge by
In-Context Learning?"): demonstrations, each a ``New Fact:`` line and a
``Prompt:`` line with its answer, then the new fact(s) and the query::

    New Fact: The mother tongue of Jean Marais is Italian
    Prompt: As a native speaker, Jean Marais speaks Italian

    New Fact: When was the inception of IAAF Combined Events Challenge? 2006
    Prompt: IAAF Combined Events Challenge是什么时候成立的？

Retrieval (ReMaKE, Wang et al. 2023, "Retrieval-augmented Multilingual Knowledge
Editing") keeps the new facts in an edit memory and gives a query only the
fact most similar to it, and only when the similarity reaches a threshold; a
query that retrieves nothing is asked as it is (no demonstrations either).
ReMaKE retrieves with a multilingual sentence encoder; none can be downloaded
here, so the model embeds the texts itself (deviation, said in the README):

* :func:`sentence_embeddings` is PromptEOL (Jiang et al. 2023, "Scaling Sentence
  Embeddings with Large Language Models"): the text is put in the template
  ``This sentence : "{text}" means in one word:"`` and the embedding is the
  residual stream at the last token after one decoder layer (by default the
  second-to-last), centred on the mean embedding of the bundled demo corpus's
  prompts in eight languages (:func:`reference_center`) and L2-normalised.
* Similarity is the cosine of two such embeddings. On the embedded model and
  MzsRE dev records 100-149 (en facts, zh questions) this ranks the right fact
  first among 50 for 86 % of 300 en and zh questions; ``bench/retrieval_threshold.py``
  measures the separation and chose the preset threshold.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from analysis.arch import first_tensor
from analysis.errors import InputError
from analysis.hooks import Hooks
from analysis.tokens import join_answer, pad_sequences

if TYPE_CHECKING:
    from analysis.model import Workbench
    from editors.edit import PromptContext

#: PromptEOL's template (Jiang et al. 2023): the last token's state summarises the text.
EOL_TEMPLATE = 'This sentence : "{}" means in one word:"'
FACT_LINE = "New Fact: {}\n"
QUERY_LINE = "Prompt: {}"
#: How many prompts of the demo corpus the centring vector is the mean of (per call, fixed sample).
CENTER_TEXTS = 64

_CENTERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, torch.Tensor]]" = weakref.WeakKeyDictionary()


def default_layer(wb: Workbench) -> int:
    """The layer whose output embeds a text: the second-to-last (0-based), or 0 for a one-layer model."""
    return max(int(wb.n_layers) - 2, 0)


class _Enough(Exception):
    """Raised by the hook once the embedding layer has run: later layers are not needed."""


@torch.no_grad()
def sentence_embeddings(wb: Workbench, texts: Sequence[str], layer: int, batch_size: int = 16) -> torch.Tensor:
    """PromptEOL embeddings [len(texts), d_model] (float32, CPU): the residual stream after ``layer`` at the
    template's last token. Not centred, not normalised (see :func:`embed`)."""
    layer = wb.check_layer(layer)
    tok = wb.tokenizer
    base, _ = wb.base_model()
    out: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        chunk = [EOL_TEMPLATE.format(t) for t in texts[start:start + batch_size]]
        seqs = [list(tok(t, add_special_tokens=True)["input_ids"]) for t in chunk]
        ids, mask = pad_sequences(seqs, tok.pad_token_id, side="right", device=wb.device)
        last = mask.long().sum(1) - 1
        seen: dict[str, torch.Tensor] = {}

        def read(module: Any, args: Any, output: Any) -> None:
            seen["h"] = first_tensor(output)
            raise _Enough

        with Hooks() as hooks:
            hooks.forward(wb.arch.layer_module(wb.model, layer), read)
            try:
                base(**wb.forward_inputs(ids, mask))
            except _Enough:
                pass
        hidden = seen["h"]
        out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, int(wb.d_model))


def reference_center(wb: Workbench, layer: int) -> torch.Tensor:
    """The mean PromptEOL embedding of :data:`CENTER_TEXTS` prompts of the bundled demo corpus (8 languages,
    a fixed sample), cached per model and layer: subtracting it removes the direction every text shares."""
    cache = _CENTERS.setdefault(wb.model, {})
    if layer not in cache:
        from data.loaders import load_demo

        rows = load_demo().rows.drop_duplicates("fact_id").sample(CENTER_TEXTS, random_state=0)
        cache[layer] = sentence_embeddings(wb, list(rows["prompt"]), layer).mean(0)
    return cache[layer].clone()


def embed(wb: Workbench, texts: Sequence[str], layer: int, center: torch.Tensor) -> torch.Tensor:
    """Centred, L2-normalised PromptEOL embeddings: their dot products are cosine similarities."""
    vectors = sentence_embeddings(wb, texts, layer) - center.float()[None, :]
    return torch.nn.functional.normalize(vectors, dim=-1)


def fact_text(prompt: str, answer: str) -> str:
    """A new fact as a statement: the question followed by its answer (:func:`analysis.tokens.join_answer`)."""
    return join_answer(prompt.strip(), answer.strip())


def demonstration_text(fact: str, prompt: str, answer: str) -> str:
    """One IKE demonstration: a new fact and a prompt answered under it, then a blank line."""
    return FACT_LINE.format(fact) + QUERY_LINE.format(join_answer(prompt, answer)) + "\n\n"


@dataclass
class Rewritten:
    """What an in-context edit made of one prompt: the text the model reads and why."""

    prompt: str
    text: str                       # what the model reads (== prompt when nothing was added)
    facts: list[str]                # the new facts put before it
    retrieved: str | None = None    # the fact retrieval picked (None: nothing reached the threshold)
    similarity: float | None = None  # its cosine similarity (retrieval only: the best one, picked or not)


def rewrite_prompts(wb: Workbench, contexts: Sequence[PromptContext], prompts: Sequence[str]) -> list[Rewritten]:
    """The prompts as the model reads them under the in-context edits ``contexts`` (applied in order).

    Facts of contexts that do not retrieve are put before every prompt; contexts that retrieve pool their
    memories (the edit memory of every applied edit) and give each prompt the one fact most similar to it,
    if its similarity reaches that context's threshold. Demonstrations are those of the first context
    that contributes a fact. A prompt that gets no fact is read as it is.
    """
    prompts = list(prompts)
    fixed = [fact for c in contexts if not c.retrieve for fact in c.fact_texts()]
    best: list[tuple[float, str | None, float]] = [(float("-inf"), None, 0.0)] * len(prompts)
    retrievers = [c for c in contexts if c.retrieve and c.facts]
    embedded: dict[tuple[int, int], torch.Tensor] = {}
    for c in retrievers:
        key = (c.layer, id(c.center))
        if key not in embedded:
            embedded[key] = embed(wb, prompts, c.layer, c.center)
        sims = embedded[key] @ c.keys.float().T                    # [prompts, facts]
        values, where = sims.max(1)
        texts = c.fact_texts()
        for i, (value, j) in enumerate(zip(values.tolist(), where.tolist())):
            if value > best[i][0]:
                best[i] = (value, texts[j], c.threshold)
    demos_of = next((c.demonstrations for c in contexts if c.facts), [])
    out = []
    for prompt, (similarity, fact, threshold) in zip(prompts, best):
        picked = fact if fact is not None and similarity >= threshold else None
        facts = fixed + ([picked] if picked else [])
        if facts:
            text = "".join(demos_of) + "".join(FACT_LINE.format(f) for f in facts) + QUERY_LINE.format(prompt)
        else:
            text = prompt
        out.append(Rewritten(prompt, text, facts, picked,
                             None if fact is None else float(similarity)))
    return out


def check_threshold(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"A retrieval threshold is a cosine similarity in [-1, 1], got {value!r}.") from None
    if not -1.0 <= value <= 1.0:
        raise InputError(f"A retrieval threshold is a cosine similarity in [-1, 1], got {value!r}.")
    return value
