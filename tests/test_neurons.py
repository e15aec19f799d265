"""analysis.neurons: Eq. 4 counts against a hand computation, Eq. 5–6 sets, LAPE, run folders,
drill-down and bad input (papers/lu-lafns.md §3.2).

The hand computation uses nothing of analysis.neurons or analysis.tokens: raw
PyTorch forward hooks on each layer's neuron module, one text at a time (no
padding), real tokens = every token that is not one of the tokenizer's special
tokens, subject tokens = tokens whose character span overlaps the [X] slot.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import neurons
from analysis.errors import CorpusError, InputError, NeuroglotError
from analysis.model import Workbench
from analysis.neurons import (
    LAFN,
    NeuronCounts,
    atlas_counts,
    count_activations,
    factual_neurons,
    lape,
    language_agnostic_neurons,
    language_specific_neurons,
    neuron_set_table,
    neuron_top_tokens,
    top_activating_texts,
)
from analysis.tokens import encode
from data.corpus import REQUIRED_COLUMNS, Corpus
from tests.tiny import TINY_FAMILIES, make_corpus, tiny_model_and_tokenizer

POSITIONS = ("all", "last", "subject")
LANGS = ["en", "de", "zh"]

CORPUS = make_corpus()


@lru_cache(maxsize=None)
def tiny_wb(family: str) -> Workbench:
    model, tokenizer = tiny_model_and_tokenizer(family)
    return Workbench.from_loaded(model, tokenizer, spec=f"tiny-{family}")


def statements_and_spans(corpus: Corpus, language: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Full statements and the character span of the subject in each ([X] is the first slot)."""
    rows = corpus.rows[corpus.rows["language"] == language]
    texts, spans = [], []
    for template, subject, obj in zip(rows["template"], rows["subject"], rows["object"]):
        texts.append(template.replace("[X]", subject).replace("[Y]", obj))
        start = template.index("[X]")
        spans.append((start, start + len(subject)))
    return texts, spans


class NeuronHooks:
    """Raw PyTorch forward hooks on the neuron module of every layer of the full model."""

    def __init__(self, wb: Workbench):
        self.wb, self.acts, self.handles = wb, {}, []

    def __enter__(self):
        for i in range(self.wb.n_layers):
            module = self.wb.arch.site(self.wb.model, i, "neuron")
            self.handles.append(module.register_forward_hook(
                lambda mod, args, out, i=i: self.acts.__setitem__(i, out.detach().float())))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def run(self, text: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One text alone: per-layer activations [T, F], its token ids and character offsets."""
        tok = self.wb.tokenizer
        enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            self.wb.model(input_ids=enc["input_ids"])
        return [self.acts[i][0] for i in range(self.wb.n_layers)], enc["input_ids"][0], enc["offset_mapping"][0]


def real_tokens(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    return ~torch.isin(ids, torch.tensor(sorted(tokenizer.all_special_ids)))


def hand_counts(wb: Workbench, texts: list[str], spans: list[tuple[int, int]]) -> dict[str, tuple[np.ndarray, int]]:
    """{positions: (counts [L, F], tokens counted)} for the texts of one language."""
    out = {p: (np.zeros((wb.n_layers, wb.n_neurons), dtype=np.int64), 0) for p in POSITIONS}
    with NeuronHooks(wb) as hooks:
        for text, (s, e) in zip(texts, spans):
            acts, ids, offsets = hooks.run(text)
            real = real_tokens(wb.tokenizer, ids)
            last = torch.zeros_like(real)
            last[int(real.nonzero().max())] = True
            subject = real & (offsets[:, 0] < e) & (offsets[:, 1] > s)
            assert subject.any(), (text, s, e)
            for p, m in (("all", real), ("last", last), ("subject", subject)):
                counts, n = out[p]
                for i, act in enumerate(acts):
                    counts[i] += (act[m] > 0).sum(dim=0).numpy()
                out[p] = (counts, n + int(m.sum()))
    return out


@lru_cache(maxsize=None)
def hand(family: str) -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    """{language: hand_counts} for CORPUS on the tiny model of ``family``."""
    wb = tiny_wb(family)
    return {lang: hand_counts(wb, *statements_and_spans(CORPUS, lang)) for lang in LANGS}


def assert_equals_hand(result: NeuronCounts, family: str, positions: str, what: str = "") -> None:
    assert result.languages == LANGS
    assert result.positions == positions
    for li, lang in enumerate(LANGS):
        counts, n = hand(family)[lang][positions]
        assert result.tokens[li] == n, f"{family} {what} {positions} {lang}: tokens {result.tokens[li]} != {n}"
        assert result.texts[li] == 15
        assert np.array_equal(result.counts[li], counts), (
            f"{family} {what} {positions} {lang}: {int(np.abs(result.counts[li] - counts).sum())} counts differ")


@pytest.fixture
def padding(request):
    """Set the padding side of a tiny workbench's tokenizer for one test, then restore it."""
    changed = []

    def set_side(wb, side):
        changed.append((wb.tokenizer, wb.tokenizer.padding_side))
        wb.tokenizer.padding_side = side

    yield set_side
    for tok, side in reversed(changed):
        tok.padding_side = side


# ---------------------------------------------------------------- 1–2: counts == hand computation


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_counts_equal_hand_computation(family, side, padding):
    wb = tiny_wb(family)
    padding(wb, side)
    for positions in POSITIONS:
        result = count_activations(wb, CORPUS, LANGS, positions=positions, batch_size=4)
        assert_equals_hand(result, family, positions, f"padding={side}")


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "bloom", "gpt_neox", "xglm"])
def test_batch_size_does_not_change_counts(family, padding):
    wb = tiny_wb(family)
    padding(wb, "left")
    for positions in ("all", "subject"):
        one = count_activations(wb, CORPUS, LANGS, positions=positions, batch_size=1)
        eight = count_activations(wb, CORPUS, LANGS, positions=positions, batch_size=8)
        assert_equals_hand(one, family, positions, "batch_size=1")
        assert_equals_hand(eight, family, positions, "batch_size=8")


def test_tokens_are_the_real_tokens():
    wb = tiny_wb("llama")
    result = count_activations(wb, CORPUS, LANGS, batch_size=4)
    for li, lang in enumerate(LANGS):
        texts, _ = statements_and_spans(CORPUS, lang)
        n = sum(int(real_tokens(wb.tokenizer, torch.tensor(wb.tokenizer(t)["input_ids"])).sum()) for t in texts)
        assert result.tokens[li] == n
    last = count_activations(wb, CORPUS, LANGS, positions="last", batch_size=4)
    assert last.tokens.tolist() == [15, 15, 15]  # one position per text
    assert (result.counts <= result.tokens[:, None, None]).all()


def test_subject_found_in_prompt_part_not_in_object():
    tok = tiny_wb("llama").tokenizer
    text = "The official language of Japan is Japanese."
    prompt = "The official language of Japan is"
    batch = encode(tok, [text], ["Japan"], [len(prompt)])
    ids = batch.input_ids[0][batch.subject[0]]
    assert tok.decode(ids).strip() == "Japan"
    # without the limit the last occurrence is used (a prompt may contain the subject twice)
    assert encode(tok, [text], ["Japan"]).subject[0].nonzero().min() > batch.subject[0].nonzero().max()


# ---------------------------------------------------------------- 3: β


@pytest.fixture(scope="module")
def tiny_counts() -> NeuronCounts:
    return count_activations(tiny_wb("llama"), CORPUS, LANGS, batch_size=8)


def test_beta_zero_keeps_every_fired_neuron_and_one_keeps_none(tiny_counts):
    rng = np.random.default_rng(0)
    random = NeuronCounts(LANGS, rng.integers(0, 4, size=(3, 5, 40)), [100, 90, 80], [10, 10, 10])
    random.counts[1, 2] = 0  # a layer where nothing fired
    for counts in (tiny_counts, random):
        zero = factual_neurons(counts, 0)
        one = factual_neurons(counts, 1.0)
        for li, lang in enumerate(counts.languages):
            assert np.array_equal(zero[lang], counts.counts[li] > 0)
            assert not one[lang].any()
        assert zero["de"].dtype == bool and zero["de"].shape == (counts.n_layers, counts.n_neurons)


@pytest.mark.parametrize("beta", [-0.1, 1.5, "x", None, float("nan")])
def test_beta_outside_unit_interval_is_an_input_error(tiny_counts, beta):
    with pytest.raises(InputError, match="β"):
        factual_neurons(tiny_counts, beta)
    with pytest.raises(InputError):
        neuron_set_table(tiny_counts, beta)


def test_factual_neurons_follow_eq5_ratio():
    counts = NeuronCounts(["en", "zh"], [[[10, 5, 9, 0]], [[2, 4, 1, 3]]], [20, 20], [2, 2])
    f = factual_neurons(counts, 0.5)  # n / max > 0.5
    assert f["en"].tolist() == [[True, False, True, False]]
    assert f["zh"].tolist() == [[False, True, False, True]]


# ---------------------------------------------------------------- 4: set laws and LAPE


@pytest.mark.parametrize("seed", range(5))
def test_set_laws_on_random_counts(seed):
    rng = np.random.default_rng(seed)
    n_lang = 3
    counts = NeuronCounts(["en", "de", "zh"], rng.integers(0, 30, size=(n_lang, 4, 64)),
                          rng.integers(30, 60, size=n_lang), [5] * n_lang)
    for beta in (0.0, 0.2, 0.5, 0.8):
        factual = factual_neurons(counts, beta)
        lafn = language_agnostic_neurons(factual)
        specific = language_specific_neurons(factual)
        for lang in counts.languages:
            assert not (lafn & ~factual[lang]).any()            # LAFN ⊆ D_l
            assert not (specific[lang] & ~factual[lang]).any()  # specific ⊆ D_l
            assert not (specific[lang] & lafn).any()            # specific ∩ LAFN = ∅
        langs = counts.languages
        for i, a in enumerate(langs):
            for b in langs[i + 1:]:
                assert not (specific[a] & specific[b]).any()
        assert np.array_equal(language_agnostic_neurons(factual, ["en", "zh"]), factual["en"] & factual["zh"])
        table = neuron_set_table(counts, beta)
        per_set = table.groupby("set")["count"].sum()
        assert per_set[LAFN] == lafn.sum()
        assert per_set["specific:de"] == specific["de"].sum()
        assert per_set["en"] == factual["en"].sum()
        with pytest.raises(InputError):
            language_agnostic_neurons(factual, ["en"])


def test_lape_bounds_and_extremes():
    rng = np.random.default_rng(1)
    tokens = np.array([10, 20, 40])
    counts = rng.integers(0, 10, size=(3, 2, 50))
    counts[:, 0, 0] = [0, 7, 0]    # fires in one language only
    counts[:, 0, 1] = [1, 2, 4]    # equal probabilities (0.1) in all three
    counts[:, 0, 2] = [0, 0, 0]    # never fires
    entropy = lape(NeuronCounts(["en", "de", "zh"], counts, tokens, [1, 1, 1]))
    assert entropy.shape == (2, 50)
    assert (entropy >= -1e-12).all() and (entropy <= math.log(3) + 1e-12).all()
    assert entropy[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert entropy[0, 1] == pytest.approx(math.log(3))
    assert entropy[0, 2] == pytest.approx(math.log(3))
    with pytest.raises(InputError):
        lape(NeuronCounts(["en"], counts[:1], tokens[:1], [1]))


# ---------------------------------------------------------------- 5: run folders


def test_save_load_round_trip(tmp_path, tiny_counts):
    tiny_counts.meta.update(model="tiny", note={"nested": [1, 2]})
    tiny_counts.save(tmp_path / "run")
    back = NeuronCounts.load(tmp_path / "run")
    assert back.languages == tiny_counts.languages and back.positions == tiny_counts.positions
    for name in ("counts", "tokens", "texts"):
        assert np.array_equal(getattr(back, name), getattr(tiny_counts, name))
        assert getattr(back, name).dtype == np.int64
    assert back.meta == tiny_counts.meta
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["tokens"]["en"] == int(tiny_counts.tokens[0])


def test_atlas_counts_reuses_recomputes_and_repairs(tmp_path, monkeypatch):
    wb = tiny_wb("gpt2")
    folder = tmp_path / "run"
    first, where, reused = atlas_counts(wb, CORPUS, ["en", "zh"], folder=folder, batch_size=4)
    assert not reused and where == folder and (folder / "manifest.json").is_file()

    with monkeypatch.context() as m:
        def boom(*args, **kwargs):
            raise AssertionError("count_activations must not run for a saved request")
        m.setattr(neurons, "count_activations", boom)
        again, _, reused = atlas_counts(wb, CORPUS, ["en", "zh"], folder=folder, batch_size=4)
        assert reused
        assert np.array_equal(again.counts, first.counts) and np.array_equal(again.tokens, first.tokens)
        assert again.meta["key"] == first.meta["key"]

    other, _, reused = atlas_counts(wb, CORPUS, ["en", "zh"], positions="last", folder=folder,
                                   overwrite=True)  # another request: replaced only on purpose
    assert not reused and other.positions == "last" and other.tokens.tolist() == [15, 15]
    assert NeuronCounts.load(folder).positions == "last"  # the folder now holds the new request

    atlas_counts(wb, CORPUS, ["en", "zh"], folder=folder, overwrite=True)  # back to positions="all"
    npz = folder / "counts.npz"
    for damage in (lambda: npz.write_bytes(npz.read_bytes()[:40]),                     # truncated zip
                   lambda: npz.write_bytes(b"not numpy at all"),
                   lambda: npz.unlink(),
                   lambda: (folder / "manifest.json").write_text("{ broken"),
                   lambda: (folder / "manifest.json").write_text("[1, 2]")):
        damage()
        repaired, _, reused = atlas_counts(wb, CORPUS, ["en", "zh"], folder=folder)
        assert not reused
        assert np.array_equal(repaired.counts, first.counts)
        assert atlas_counts(wb, CORPUS, ["en", "zh"], folder=folder)[2]  # readable again


def test_loading_a_damaged_or_missing_folder_is_a_clear_error(tmp_path, tiny_counts):
    with pytest.raises(NeuroglotError, match="not a neuron run folder"):
        NeuronCounts.load(tmp_path / "nothing")
    tiny_counts.save(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    del manifest["languages"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NeuroglotError, match="damaged"):
        NeuronCounts.load(tmp_path / "run")
    tiny_counts.save(tmp_path / "run")
    (tmp_path / "run" / "counts.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(NeuroglotError, match="damaged"):
        NeuronCounts.load(tmp_path / "run")


def test_request_key_depends_on_objects_and_positions():
    wb = tiny_wb("llama")
    key = neurons.request_key(wb, CORPUS, ["en", "zh"], "all", "statement")
    rows = CORPUS.rows.copy()
    rows.loc[rows["language"] == "en", "object"] = "Atlantis"
    assert neurons.request_key(wb, Corpus(rows), ["en", "zh"], "all", "statement") != key
    assert neurons.request_key(wb, CORPUS, ["en", "zh"], "last", "statement") != key
    assert neurons.request_key(wb, CORPUS, ["en", "zh"], "all", "statement") == key


# ---------------------------------------------------------------- 6: bad input


def test_one_language_where_two_are_needed(tiny_counts):
    one = tiny_counts.select(["en"])
    with pytest.raises(InputError, match="at least 2"):
        neuron_set_table(one, 0.5)
    with pytest.raises(InputError, match="at least 2"):
        language_agnostic_neurons(factual_neurons(one, 0.5))
    with pytest.raises(InputError, match="at least 2"):
        language_specific_neurons(factual_neurons(one, 0.5))
    with pytest.raises(InputError, match="fr"):
        tiny_counts.of("fr")


def test_bad_count_requests_are_input_errors(tmp_path):
    wb = tiny_wb("llama")
    with pytest.raises(InputError, match="fr"):
        count_activations(wb, CORPUS, ["en", "fr"])
    with pytest.raises(InputError, match="middle"):
        count_activations(wb, CORPUS, ["en"], positions="middle")
    with pytest.raises(InputError, match="language"):
        count_activations(wb, CORPUS, [])
    with pytest.raises(InputError, match="batch_size"):
        count_activations(wb, CORPUS, ["en"], batch_size=0)
    with pytest.raises(InputError, match="title"):
        count_activations(wb, CORPUS, ["en"], text="title")
    with pytest.raises(InputError, match="middle"):
        atlas_counts(wb, CORPUS, ["en"], positions="middle", folder=tmp_path / "run")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(CorpusError, match="empty") as info:
        Corpus(pd.DataFrame(columns=list(REQUIRED_COLUMNS)), name="nothing")
    assert isinstance(info.value, NeuroglotError)


@pytest.mark.parametrize("text", ["statement", "prompt"])
def test_subject_missing_from_prompt_is_an_input_error(text):
    rows = CORPUS.rows.copy()
    bad = rows.index[rows["language"] == "en"][3]
    rows.loc[bad, "template"] = "The capital city is [Y]."  # no [X]: the subject is nowhere
    rows.loc[bad, "prompt"] = "The capital city is"
    corpus = Corpus(rows)
    with pytest.raises(InputError, match=repr(rows.loc[bad, "subject"])):
        count_activations(tiny_wb("llama"), corpus, ["en"], positions="subject", text=text)
    count_activations(tiny_wb("llama"), corpus, ["en"], positions="all", text=text)  # fine without subjects


# ---------------------------------------------------------------- 7: drill-down


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_neuron_top_tokens_reads_value_vector_through_unembedding(family):
    wb = tiny_wb(family)
    layer, neuron, k = 1, 7, 6
    table = neuron_top_tokens(wb, layer, neuron, k=k)
    promoted = table[table["direction"] == "promoted"]
    suppressed = table[table["direction"] == "suppressed"]
    assert len(promoted) == k and len(suppressed) == k
    assert promoted["logit"].min() >= suppressed["logit"].max()

    down = wb.arch.site(wb.model, layer, "down_proj").weight
    value = down[:, neuron] if wb.arch.down_orientation == "out_in" else down[neuron, :]
    logits = wb.model.get_output_embeddings().weight.detach() @ value.detach()
    top, bottom = torch.topk(logits, k), torch.topk(logits, k, largest=False)
    np.testing.assert_allclose(promoted["logit"].to_numpy(), top.values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(suppressed["logit"].to_numpy(), bottom.values.numpy(), rtol=1e-5, atol=1e-6)
    assert promoted["token"].tolist() == [wb.tokenizer.decode([int(t)]) for t in top.indices]


@pytest.mark.parametrize("family, side", [("llama", "right"), ("gpt2", "left"), ("gemma3_text", "left")])
def test_top_activating_texts_match_hooks(family, side, padding):
    wb = tiny_wb(family)
    padding(wb, side)
    layer, neuron, k = 2, 11, 4
    table = top_activating_texts(wb, CORPUS, layer, neuron, ["en", "zh"], k=k, batch_size=4)
    assert list(table.columns) == ["language", "text", "activation", "token"]
    assert set(table["language"]) == {"en", "zh"}
    peaks = {}
    with NeuronHooks(wb) as hooks:
        for text in set(table["text"]):
            acts, ids, _ = hooks.run(text)
            act = acts[layer][:, neuron][real_tokens(wb.tokenizer, ids)]
            peaks[text] = float(act.max())
    for lang, group in table.groupby("language"):
        assert len(group) <= k
        assert group["activation"].is_monotonic_decreasing
        for text, activation in zip(group["text"], group["activation"]):
            assert activation == pytest.approx(peaks[text], rel=1e-5, abs=1e-6)
    # the k texts shown are the k highest over all of the language's texts
    with NeuronHooks(wb) as hooks:
        en_texts, _ = statements_and_spans(CORPUS, "en")
        all_peaks = []
        for text in dict.fromkeys(en_texts):
            acts, ids, _ = hooks.run(text)
            all_peaks.append(float(acts[layer][:, neuron][real_tokens(wb.tokenizer, ids)].max()))
    shown = table[table["language"] == "en"]["activation"].to_numpy()
    np.testing.assert_allclose(shown, sorted(all_peaks, reverse=True)[:k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer, neuron", [(-1, 0), (3, 0), (0, -1), (0, 80), (99, 99)])
def test_drill_down_out_of_range_is_an_input_error(layer, neuron):
    wb = tiny_wb("llama")
    with pytest.raises(InputError, match="out of range"):
        neuron_top_tokens(wb, layer, neuron)
    with pytest.raises(InputError, match="out of range"):
        top_activating_texts(wb, CORPUS, layer, neuron, ["en"])


# ---------------------------------------------------------------- 8: the embedded model


@pytest.fixture(scope="module")
def embedded():
    from analysis.model import load_model

    return load_model("embedded")


@pytest.mark.slow
def test_embedded_counts_match_hooks_and_lafns_exist(embedded):
    from data import load_corpus

    wb = embedded
    corpus = load_corpus("demo", languages=["en", "zh"], max_facts=2)
    counts = count_activations(wb, corpus, ["en", "zh"])
    assert counts.counts.shape == (2, wb.n_layers, wb.n_neurons)
    assert counts.texts.tolist() == [int((corpus.rows["language"] == lang).sum()) for lang in ("en", "zh")]
    for li, lang in enumerate(("en", "zh")):
        texts, _ = statements_and_spans(corpus, lang)
        n = sum(int(real_tokens(wb.tokenizer, torch.tensor(wb.tokenizer(t)["input_ids"])).sum()) for t in texts)
        assert counts.tokens[li] == n
    assert (counts.counts <= counts.tokens[:, None, None]).all()
    lafn = language_agnostic_neurons(factual_neurons(counts, 0.1))
    assert (lafn.sum(axis=1) > 0).all(), lafn.sum(axis=1)

    # one text per language, counted by count_activations and by raw hooks
    first = corpus.rows.groupby("language", sort=False).head(1)
    one = Corpus(first.reset_index(drop=True), name="one")
    by_hooks = {lang: hand_counts(wb, *statements_and_spans(one, lang)) for lang in ("en", "zh")}
    for positions in POSITIONS:
        result = count_activations(wb, one, ["en", "zh"], positions=positions)
        for li, lang in enumerate(("en", "zh")):
            counts_hand, n = by_hooks[lang][positions]
            assert result.tokens[li] == n
            assert np.array_equal(result.counts[li], counts_hand), (positions, lang)
