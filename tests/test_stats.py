"""analysis.stats: FFN key second moments against a hand computation, the token budget, one pass
for all layers, the disk cache, FLORES-200 reading and bad input.

The hand computation uses nothing of analysis.stats, analysis.tokens or nnsight: raw PyTorch
forward pre-hooks on each layer's down-projection (its input is the key), one text at a time
(no padding), real tokens = the tokens that are not among the tokenizer's special ids (BOS),
float64 sums.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import stats
from analysis.errors import InputError, NeuroglotError
from analysis.model import Workbench
from analysis.stats import KeyStats, fair_token_shares, key_statistics
from data import flores
from data.corpus import Corpus
from data.flores import flores_sentences
from tests import tiny
from tests.tiny import tiny_model_and_tokenizer

FAMILIES = ("gpt2", "llama", "bloom", "gemma3_text", "xglm")
TEXTS = {lang: [s.strip() for s in tiny._FREE[lang].splitlines() if s.strip()] for lang in ("en", "de")}
SHARED_FLORES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flores200_devtest"


def cached_key_statistics(wb, layers, languages, folder, corpus=None, **kwargs):
    """analysis.stats.cached_key_statistics of the languages' texts as data.flores reads them (as the editors do)."""
    texts, sources = flores.statistics_texts(languages, folder=folder, corpus=corpus)
    return stats.cached_key_statistics(wb, layers, texts, sources, **kwargs)


@lru_cache(maxsize=None)
def tiny_wb(family: str = "llama", padding_side: str = "right", seed: int = 0) -> Workbench:
    model, tokenizer = tiny_model_and_tokenizer(family, seed=seed, padding_side=padding_side)
    return Workbench.from_loaded(model, tokenizer, spec=f"tiny-{family}")


def hand_stats(wb: Workbench, texts: dict[str, list[str]], layers, quotas=None, max_length: int = 128):
    """{layer: (C, μ)} and N by hooks on the full model, text by text, the first ``quotas[lang]``
    real tokens of each language (all when None), each text cut at ``max_length`` tokens."""
    special = torch.tensor(sorted(wb.tokenizer.all_special_ids))
    keys: dict[int, torch.Tensor] = {}
    handles = [wb.arch.site(wb.model, layer, "key").register_forward_pre_hook(
        lambda module, args, layer=layer: keys.__setitem__(layer, args[0][0].detach().double()))
        for layer in layers]
    d = {layer: wb.arch.d_ff(wb.model, layer) for layer in layers}
    outer = {layer: torch.zeros(d[layer], d[layer], dtype=torch.float64) for layer in layers}
    total = {layer: torch.zeros(d[layer], dtype=torch.float64) for layer in layers}
    n = 0
    try:
        for lang, lang_texts in texts.items():
            left = math.inf if quotas is None else quotas[lang]
            for text in lang_texts:
                if left <= 0:
                    break
                ids = torch.tensor(wb.tokenizer(text)["input_ids"][:max_length])
                real = (~torch.isin(ids, special)).nonzero().squeeze(1)
                real = real[:int(min(left, len(real)))]
                with torch.no_grad():
                    wb.model(input_ids=ids[None])
                for layer in layers:
                    k = keys[layer][real]
                    outer[layer] += k.T @ k
                    total[layer] += k.sum(0)
                n += len(real)
                left -= len(real)
    finally:
        for h in handles:
            h.remove()
    return {layer: (outer[layer] / n, total[layer] / n) for layer in layers}, n


def assert_matches(result: dict[int, KeyStats], expected, n: int) -> None:
    for layer, (second, mean) in expected.items():
        got = result[layer]
        assert got.tokens == n
        assert got.second_moment.dtype == torch.float32 and got.second_moment.device.type == "cpu"
        assert got.second_moment.shape == second.shape
        torch.testing.assert_close(got.second_moment.double(), second, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.mean.double(), mean, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------- against hooks


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_second_moment_matches_hooks(family, padding_side):
    wb = tiny_wb(family, padding_side)
    layers = list(range(wb.n_layers))
    result = key_statistics(wb, layers, TEXTS, n_tokens=10**6, batch_size=4)
    expected, n = hand_stats(wb, TEXTS, layers)
    assert_matches(result, expected, n)
    assert second_moment_is_psd(result[0].second_moment)
    assert result[0].meta["requested_tokens"] == 10**6  # the text ran out first


def second_moment_is_psd(c: torch.Tensor) -> bool:
    return bool(torch.allclose(c, c.T, atol=1e-5) and torch.linalg.eigvalsh(c.double()).min() > -1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_budget_is_exact_and_fair(family):
    wb = tiny_wb(family, "left")
    result = key_statistics(wb, [0, 2], TEXTS, n_tokens=101, batch_size=3)
    assert result[0].tokens == 101
    assert result[0].meta["tokens_per_language"] == {"en": 51, "de": 50}
    expected, n = hand_stats(wb, TEXTS, [0, 2], quotas={"en": 51, "de": 50})  # the last text is cut mid-way
    assert n == 101
    assert_matches(result, expected, 101)


def test_language_with_little_text_gives_all_it_has():
    wb = tiny_wb("llama")
    texts = {"en": TEXTS["en"][:1], "de": TEXTS["de"]}
    en_tokens = hand_stats(wb, {"en": texts["en"]}, [0])[1]
    result = key_statistics(wb, 1, texts, n_tokens=80, batch_size=4)[1]
    assert result.tokens == 80
    assert result.meta["tokens_per_language"] == {"en": en_tokens, "de": 80 - en_tokens}
    expected, _ = hand_stats(wb, texts, [1], quotas={"en": en_tokens, "de": 80 - en_tokens})
    assert_matches({1: result}, expected, 80)


def test_fair_token_shares():
    assert fair_token_shares({"a": 100, "b": 100, "c": 100}, 10) == {"a": 4, "b": 3, "c": 3}
    assert fair_token_shares({"a": 2, "b": 100, "c": 100}, 30) == {"a": 2, "b": 14, "c": 14}
    assert fair_token_shares({"a": 2, "b": 5}, 30) == {"a": 2, "b": 5}
    assert sum(fair_token_shares({"a": 7, "b": 9, "c": 50}, 40).values()) == 40


def test_max_length_cuts_every_text():
    wb = tiny_wb("gpt2", "left")
    result = key_statistics(wb, [1], TEXTS, n_tokens=10**6, max_length=5, batch_size=4)
    expected, n = hand_stats(wb, TEXTS, [1], max_length=5)
    assert n == 4 * sum(len(t) for t in TEXTS.values())  # BOS + 4 real tokens per text
    assert_matches(result, expected, n)


def test_float32_accumulation_and_row_blocks_agree(monkeypatch):
    wb = tiny_wb("llama")
    f64 = key_statistics(wb, [2], TEXTS, n_tokens=10**6, batch_size=2)[2]
    f32 = key_statistics(wb, [2], TEXTS, n_tokens=10**6, batch_size=2, precision="float32")[2]
    torch.testing.assert_close(f32.second_moment, f64.second_moment, rtol=1e-5, atol=1e-5)
    assert f32.meta["precision"] == "float32"
    monkeypatch.setattr(stats, "BLOCK_ELEMENTS", 7 * wb.n_neurons)  # blocks of 7 rows, the last one short
    for precision, whole in (("float64", f64), ("float32", f32)):
        blocked = key_statistics(wb, [2], TEXTS, n_tokens=10**6, batch_size=2, precision=precision)[2]
        torch.testing.assert_close(blocked.second_moment, whole.second_moment, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(blocked.mean, whole.mean, rtol=0, atol=0)


# ---------------------------------------------------------------- one pass


class ForwardCounter:
    """Counts forward calls of the embedding, the LM head and each decoder layer."""

    def __init__(self, wb: Workbench):
        self.wb, self.calls, self.handles = wb, {}, []

    def __enter__(self):
        modules = {"embed": self.wb.arch.embedding(self.wb.model), "lm_head": self.wb.arch.lm_head_module(self.wb.model)}
        modules.update({f"layer{i}": m for i, m in enumerate(self.wb.arch.layer_modules(self.wb.model))})
        for name, module in modules.items():
            self.calls[name] = 0
            self.handles.append(module.register_forward_hook(
                lambda *_, name=name: self.calls.__setitem__(name, self.calls[name] + 1)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_all_layers_in_one_pass_equal_per_layer():
    wb = tiny_wb("bloom", "left")
    with ForwardCounter(wb) as together:
        all_layers = key_statistics(wb, [2, 0, 1, 1], TEXTS, n_tokens=150, batch_size=2)
    assert sorted(all_layers) == [0, 1, 2]
    batches = together.calls["embed"]
    assert batches >= 4  # several batches per language
    assert together.calls["lm_head"] == 0  # the LM head never runs
    for layer in range(3):
        with ForwardCounter(wb) as alone:
            single = key_statistics(wb, layer, TEXTS, n_tokens=150, batch_size=2)[layer]
        assert alone.calls["embed"] == batches  # one forward per batch, whatever the number of layers
        assert alone.calls["lm_head"] == 0
        assert all(alone.calls[f"layer{i}"] == 0 for i in range(layer + 1, 3))  # stopped after the layer
        assert torch.equal(single.second_moment, all_layers[layer].second_moment)
        assert torch.equal(single.mean, all_layers[layer].mean)
        assert single.tokens == all_layers[layer].tokens == 150


def test_progress_reports_tokens():
    wb = tiny_wb("llama")
    seen = []
    key_statistics(wb, [0], TEXTS, n_tokens=60, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (60, 60) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))


# ----------------------------------------------------------------- save / load


def test_key_stats_save_load_round_trip(tmp_path):
    wb = tiny_wb("gpt2")
    original = key_statistics(wb, [1], TEXTS, n_tokens=70, source="tiny text")[1]
    path = original.save(tmp_path / "sub" / "layer_1.safetensors")
    back = KeyStats.load(path)
    assert torch.equal(back.second_moment, original.second_moment) and torch.equal(back.mean, original.mean)
    assert (back.layer, back.tokens, back.languages, back.source) == (1, 70, ["en", "de"], "tiny text")
    assert back.meta == json.loads(json.dumps(original.meta))
    torch.testing.assert_close(back.covariance(), back.second_moment - torch.outer(back.mean, back.mean))
    assert [p.name for p in path.parent.iterdir()] == ["layer_1.safetensors"]  # no temporary file left
    with pytest.raises(NeuroglotError, match="No key statistics"):
        KeyStats.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------- disk cache


@pytest.fixture
def flores_dir(tmp_path, monkeypatch):
    """A FLORES-like folder with the tiny texts, and an empty cache."""
    folder = tmp_path / "flores"
    folder.mkdir()
    (folder / "eng_Latn.devtest").write_text("\n".join(TEXTS["en"]) + "\n", encoding="utf-8")
    (folder / "deu_Latn.devtest").write_text("\n".join(TEXTS["de"]) + "\n", encoding="utf-8")
    monkeypatch.setenv("NEUROGLOT_CACHE", str(tmp_path / "cache"))
    return folder


class ComputeSpy:
    """Wraps stats.key_statistics, recording the layers each call computes."""

    def __init__(self, monkeypatch):
        self.calls, self.real = [], stats.key_statistics
        monkeypatch.setattr(stats, "key_statistics", self)

    def __call__(self, wb, layers, *args, **kwargs):
        self.calls.append(list(layers))
        return self.real(wb, layers, *args, **kwargs)


def test_cache_round_trip(flores_dir, monkeypatch):
    wb = tiny_wb("llama")
    first, folder, from_disk = cached_key_statistics(wb, [0, 2], ["de", "en"], n_tokens=90, folder=flores_dir)
    assert not from_disk and sorted(p.name for p in folder.iterdir()) == [
        "key.json", "layer_0.safetensors", "layer_2.safetensors"]
    assert folder.parent == Path(flores_dir.parent / "cache" / "stats")
    assert first[0].tokens == 90 and first[0].source == "flores" and first[0].languages == ["de", "en"]
    expected, _ = hand_stats(wb, {"de": TEXTS["de"], "en": TEXTS["en"]}, [0, 2], quotas={"de": 45, "en": 45})
    assert_matches(first, expected, 90)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(stats, "key_statistics", fail)
    again, folder2, from_disk = cached_key_statistics(wb, [2, 0], ["en", "de"], n_tokens=90, folder=flores_dir)
    assert from_disk and folder2 == folder and list(again) == [0, 2]
    for layer in (0, 2):
        assert torch.equal(again[layer].second_moment, first[layer].second_moment)


def test_cache_computes_only_missing_layers(flores_dir, monkeypatch):
    wb = tiny_wb("gpt2")
    spy = ComputeSpy(monkeypatch)
    cached_key_statistics(wb, [1], ["en", "de"], n_tokens=80, folder=flores_dir)
    both, _, from_disk = cached_key_statistics(wb, [0, 1, 2], ["en", "de"], n_tokens=80, folder=flores_dir)
    assert spy.calls == [[1], [0, 2]] and not from_disk
    assert cached_key_statistics(wb, [0, 1, 2], ["en", "de"], n_tokens=80, folder=flores_dir)[2]
    assert spy.calls == [[1], [0, 2]]
    alone = key_statistics(wb, [0, 1, 2], {"de": TEXTS["de"], "en": TEXTS["en"]}, n_tokens=80)
    for layer in range(3):
        assert torch.equal(both[layer].second_moment, alone[layer].second_moment)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_cache_recomputes_damaged_file(flores_dir, monkeypatch, damage):
    wb = tiny_wb("llama")
    first, folder, _ = cached_key_statistics(wb, [0, 1], ["en"], n_tokens=40, folder=flores_dir)
    path = folder / "layer_1.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF  # inside the tensors: only the checksum can tell
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    with pytest.raises(NeuroglotError, match="damaged"):
        KeyStats.load(path)
    spy = ComputeSpy(monkeypatch)
    again, _, from_disk = cached_key_statistics(wb, [0, 1], ["en"], n_tokens=40, folder=flores_dir)
    assert spy.calls == [[1]] and not from_disk
    assert torch.equal(again[1].second_moment, first[1].second_moment)
    assert torch.equal(KeyStats.load(path).second_moment, first[1].second_moment)  # rewritten


def test_cache_key_follows_request_and_model(flores_dir):
    wb = tiny_wb("llama")
    _, base, _ = cached_key_statistics(wb, [0], ["en"], n_tokens=40, folder=flores_dir)
    _, more, _ = cached_key_statistics(wb, [0], ["en"], n_tokens=41, folder=flores_dir)
    _, short, _ = cached_key_statistics(wb, [0], ["en"], n_tokens=40, max_length=8, folder=flores_dir)
    _, langs, _ = cached_key_statistics(wb, [0], ["en", "de"], n_tokens=40, folder=flores_dir)
    _, other, from_disk = cached_key_statistics(tiny_wb("llama", seed=1), [0], ["en"], n_tokens=40, folder=flores_dir)
    assert len({base, more, short, langs, other}) == 5 and not from_disk
    (flores_dir / "eng_Latn.devtest").write_text("Other text entirely.\n", encoding="utf-8")
    _, changed, from_disk = cached_key_statistics(wb, [0], ["en"], n_tokens=40, folder=flores_dir)
    assert changed != base and not from_disk


# ----------------------------------------------------------------- text sources


@pytest.mark.skipif(not SHARED_FLORES.is_dir(), reason="needs ../shared/data/flores200_devtest")
def test_flores_sentences_from_shared_files(monkeypatch):
    monkeypatch.delenv("NEUROGLOT_FLORES", raising=False)
    assert flores.default_flores_folder() == SHARED_FLORES
    got = flores_sentences(["en", "deu_Latn", "en"], max_sentences=3)
    assert list(got) == ["en", "de"] and all(len(v) == 3 for v in got.values())
    first = (SHARED_FLORES / "eng_Latn.devtest").read_text(encoding="utf-8").splitlines()[0]
    assert got["en"][0] == first.strip()
    assert len(flores_sentences("de")["de"]) == 1012
    with pytest.raises(InputError, match=r"'sv'.*en \(eng_Latn\)"):
        flores_sentences(["en", "sv"])
    with pytest.raises(InputError, match="unknown language code"):
        flores_sentences(["xx"])
    with pytest.raises(InputError, match="max_sentences"):
        flores_sentences(["en"], max_sentences=0)


def test_flores_folder_from_environment_and_missing(flores_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROGLOT_FLORES", str(flores_dir))
    assert flores_sentences(["en"])["en"] == TEXTS["en"]
    assert flores.flores_languages() == {"de": "deu_Latn", "en": "eng_Latn"}
    with pytest.raises(InputError, match=r"No FLORES-200 sentences for 'zh'.*de \(deu_Latn\), en \(eng_Latn\)"):
        flores_sentences(["zh"])
    monkeypatch.setenv("NEUROGLOT_FLORES", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="NEUROGLOT_FLORES"):
        flores_sentences(["en"])


def tiny_fact_corpus() -> Corpus:
    rows = [dict(fact_id=f"P36:{i}", relation="P36", language=lang, subject=c, object=k,
                 prompt=f"{c}的首都是" if lang == "zh" else f"The capital of {c} is",
                 template_id=f"P36.{lang}", template="[X]的首都是[Y]。" if lang == "zh" else "The capital of [X] is [Y].")
            for lang in ("en", "zh") for i, (c, k, _) in enumerate(tiny._COUNTRIES[lang])]
    return Corpus(pd.DataFrame(rows), name="facts")


def test_corpus_fallback_for_language_without_flores(flores_dir):
    corpus = tiny_fact_corpus()
    texts, sources = flores.statistics_texts(["en", "zh"], folder=flores_dir, corpus=corpus)
    assert sources == {"en": "flores", "zh": "corpus:facts"}
    assert texts["en"] == TEXTS["en"]
    assert sorted(texts["zh"]) == sorted(f"{c}的首都是{k}。" for c, k, _ in tiny._COUNTRIES["zh"])
    with pytest.raises(InputError, match="Give a corpus"):
        flores.statistics_texts(["en", "zh"], folder=flores_dir)
    texts, sources = flores.statistics_texts(["en"], source=corpus, folder=flores_dir)
    assert sources == {"en": "corpus:facts"} and len(texts["en"]) == len(tiny._COUNTRIES["en"])
    # no FLORES folder at all: every language from the corpus
    _, sources = flores.statistics_texts(["en", "zh"], folder=flores_dir / "absent", corpus=corpus)
    assert set(sources.values()) == {"corpus:facts"}
    wb = tiny_wb("llama")
    result, _, _ = cached_key_statistics(wb, [0], ["zh", "en"], n_tokens=60, folder=flores_dir, corpus=corpus)
    assert result[0].source == "flores+corpus:facts" and result[0].tokens == 60
    assert result[0].meta["sources"] == {"en": "flores", "zh": "corpus:facts"}


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[3]), "Layer 3 is out of range"),
    (dict(layers=[-1]), "out of range"),
    (dict(layers=[]), "at least one layer"),
    (dict(layers=[True]), "out of range"),
    (dict(n_tokens=0), "n_tokens"),
    (dict(n_tokens=2.5), "n_tokens"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_length=0), "max_length"),
    (dict(precision="float16"), "precision"),
    (dict(texts={}), "No texts"),
    (dict(texts={"en": ["", "  "]}), "no tokens"),
    (dict(texts=[]), "at least one language"),
    (dict(texts=["en"], source="wikipedia"), "Unknown source"),
])
def test_bad_input_is_an_input_error(kwargs, message):
    wb = tiny_wb("llama")
    args = dict(layers=[0], texts=TEXTS, n_tokens=10)
    args.update(kwargs)
    texts = args.pop("texts")
    layers = args.pop("layers")
    with pytest.raises(InputError, match=message):
        if isinstance(texts, list):  # languages: data.flores reads their texts
            texts, args["source"] = flores.statistics_texts(texts, args.pop("source", flores.FLORES))
        key_statistics(wb, layers, texts, **args)


def test_statistics_take_texts_not_languages():
    with pytest.raises(InputError, match=r"texts per language.*data\.flores\.statistics_texts"):
        key_statistics(tiny_wb("llama"), [0], ["en"])


def test_cached_bad_input_is_an_input_error(flores_dir):
    wb = tiny_wb("llama")
    with pytest.raises(InputError, match="out of range"):
        cached_key_statistics(wb, [7], ["en"], folder=flores_dir)
    with pytest.raises(InputError, match="n_tokens"):
        cached_key_statistics(wb, [0], ["en"], n_tokens=0, folder=flores_dir)
    with pytest.raises(InputError, match="'zh'"):
        cached_key_statistics(wb, [0], ["zh"], folder=flores_dir)
