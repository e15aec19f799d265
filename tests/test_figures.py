"""analysis.figures: every figure on small synthetic tables, input checks, export to HTML and PNG."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from analysis import fact_figures, figures, run_figures
from analysis.errors import InputError, NeuroglotError
from analysis.figures import (
    LAFN,
    LAFN_COLOUR,
    beta_sweep,
    figure_to_png_bytes,
    language_colour,
    lape_distribution,
    neuron_drilldown,
    neurons_per_layer,
    overlap_by_layer,
    overlap_heatmap,
    save_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_LAYERS, N_NEURONS = 6, 100
LANGUAGES = ["en", "zh", "ar"]


def traces_by_name(fig: go.Figure) -> dict[str, go.BaseTraceType]:
    return {t.name: t for t in fig.data}


def _png_possible_or_skip() -> None:
    """PNG needs a Chrome for kaleido; skip only on a dev machine without one, never in CI."""
    if not Path("/usr/bin/chromium").exists() and not os.environ.get("CI") and not os.environ.get("BROWSER_PATH"):
        pytest.skip("no /usr/bin/chromium for kaleido's PNG export (CI unset)")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def per_layer() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(N_LAYERS):
        counts = {lang: int(rng.integers(20, 90)) for lang in LANGUAGES}
        for lang, c in counts.items():
            rows.append((layer, lang, c))
        rows.append((layer, LAFN, min(counts.values()) // 2 + (30 if layer == 3 else 0)))
        rows.append((layer, "specific:en", int(rng.integers(0, 10))))
    return pd.DataFrame(rows, columns=["layer", "set", "count"])


@pytest.fixture
def jaccard() -> pd.DataFrame:
    m = np.array([[1.0, 0.42, 0.31], [0.42, 1.0, 0.27], [0.31, 0.27, 1.0]])
    return pd.DataFrame(m, index=LANGUAGES, columns=LANGUAGES)


@pytest.fixture
def drill() -> tuple[pd.DataFrame, pd.DataFrame]:
    long = "The capital of France is Paris, a city on the Seine that has been the country's capital for ages."
    prompts = pd.DataFrame({
        "language": ["en", "zh", "en", "ar", "zh"],
        "text": [
            long, "法国的首都是巴黎。", "Paris is in France.", "عاصمة فرنسا هي باريس", "巴黎是法国的首都。",
        ],
        "activation": [3.5, 2.25, 4.0, 1.5, 2.75],
        "token": [" Paris", "巴黎", " France", "باريس", "\n"],
    })
    tokens = pd.DataFrame({
        "token": [" Paris", " Berlin", "巴黎", " the", " <b>"],
        "logit": [5.5, 4.25, 6.0, -2.0, -3.5],
        "direction": ["promoted", "promoted", "promoted", "suppressed", "suppressed"],
    })
    return prompts, tokens


# --------------------------------------------------------------------------- colours


def test_language_colours_are_fixed_and_lafn_is_distinct():
    assert language_colour("en") == language_colour("en") == language_colour("EN") == language_colour("en-US")
    assert language_colour("specific:zh") == language_colour("zh")
    assert language_colour(LAFN) == LAFN_COLOUR
    assert LAFN_COLOUR not in figures.LANGUAGE_COLOURS.values()
    # unknown codes still get a stable colour (crc32, not Python's salted hash)
    assert language_colour("xx_Qaaa") == language_colour("xx_Qaaa")
    assert len({language_colour(c) for c in ["en", "zh", "de", "fr", "es", "ja", "ru", "ar"]}) == 8


# --------------------------------------------------------------------------- Figure 1


def test_neurons_per_layer_traces_and_counts(per_layer):
    fig = neurons_per_layer(per_layer, N_NEURONS)
    by_name = traces_by_name(fig)
    assert set(by_name) == set(LANGUAGES) | {LAFN, "specific:en"}
    assert fig.layout.template.layout.paper_bgcolor is not None  # plotly_white applied
    assert "0-based" in fig.layout.xaxis.title.text
    for name, trace in by_name.items():
        expected = per_layer[per_layer["set"] == name].sort_values("layer")
        assert list(trace.x) == expected["layer"].tolist()
        assert list(trace.y) == expected["count"].tolist()
        np.testing.assert_allclose(trace.customdata, 100 * expected["count"].to_numpy() / N_NEURONS)
        assert "%" in trace.hovertemplate
    assert isinstance(by_name[LAFN], go.Bar) and by_name[LAFN].marker.color == LAFN_COLOUR
    assert by_name["en"].mode == "lines+markers" and by_name["en"].line.color == language_colour("en")
    assert by_name["specific:en"].line.dash == "dash"
    assert by_name["specific:en"].line.color == language_colour("en")
    assert fig.data[0].name == LAFN  # bars behind the lines
    peak = [a for a in fig.layout.annotations if "peak" in a.text]
    assert len(peak) == 1 and peak[0].x == 3


def test_neurons_per_layer_any_number_of_languages():
    langs = [f"l{i}" for i in range(12)]
    table = pd.DataFrame([(layer, lang, layer + i) for layer in range(3) for i, lang in enumerate(langs)],
                         columns=["layer", "set", "count"])
    fig = neurons_per_layer(table, 50, title="custom")
    assert [t.name for t in fig.data] == langs
    assert fig.layout.title.text == "custom"


@pytest.mark.parametrize("bad, match", [
    (pd.DataFrame(columns=["layer", "set", "count"]), "empty"),
    (pd.DataFrame({"layer": [0], "set": ["en"]}), "missing column"),
    (pd.DataFrame({"layer": [0, 0], "set": ["en", "en"], "count": [1, 2]}), "more than one row"),
    (pd.DataFrame({"layer": [0], "set": ["en"], "count": [500]}), "exceeds n_neurons"),
    (pd.DataFrame({"layer": [0.5], "set": ["en"], "count": [5]}), "whole numbers"),
    (pd.DataFrame({"layer": [0], "set": ["en"], "count": ["many"]}), "finite numbers"),
    ([1, 2, 3], "DataFrame"),
])
def test_neurons_per_layer_rejects_bad_input(bad, match):
    with pytest.raises(InputError, match=match):
        neurons_per_layer(bad, N_NEURONS)


def test_neurons_per_layer_rejects_bad_n_neurons(per_layer):
    for n in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="n_neurons"):
            neurons_per_layer(per_layer, n)


# --------------------------------------------------------------------------- overlaps


def test_overlap_heatmap_matrix(jaccard):
    fig = overlap_heatmap(jaccard)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    np.testing.assert_array_equal(np.asarray(hm.z), jaccard.to_numpy())
    assert list(hm.x) == list(hm.y) == LANGUAGES
    assert (hm.zmin, hm.zmax) == (0.0, 1.0)
    assert hm.texttemplate and "%{z" in hm.hovertemplate


def test_overlap_heatmap_reorders_columns_to_index(jaccard):
    shuffled = jaccard[["ar", "en", "zh"]]
    np.testing.assert_array_equal(np.asarray(overlap_heatmap(shuffled).data[0].z), jaccard.to_numpy())


@pytest.mark.parametrize("bad, match", [
    (pd.DataFrame(), "empty"),
    (pd.DataFrame([[1.0, 0.5]], index=["en"], columns=["en", "zh"]), "square"),
    (pd.DataFrame([[1.0, 1.5], [1.5, 1.0]], index=["en", "zh"], columns=["en", "zh"]), "between 0 and 1"),
    (np.eye(2), "DataFrame"),
])
def test_overlap_heatmap_rejects_bad_input(bad, match):
    with pytest.raises(InputError, match=match):
        overlap_heatmap(bad)


def test_overlap_by_layer_lines():
    table = pd.DataFrame({
        "layer": [0, 1, 2, 0, 1, 2],
        "pair": ["en–zh"] * 3 + ["en–ar"] * 3,
        "jaccard": [0.1, 0.5, 0.3, 0.2, 0.25, 0.4],
    })
    fig = overlap_by_layer(table)
    by_name = traces_by_name(fig)
    assert set(by_name) == {"en–zh", "en–ar"}
    assert list(by_name["en–zh"].y) == [0.1, 0.5, 0.3]
    assert list(by_name["en–ar"].x) == [0, 1, 2]
    assert by_name["en–zh"].line.color != by_name["en–ar"].line.color
    with pytest.raises(InputError, match="missing column"):
        overlap_by_layer(table.drop(columns="pair"))
    with pytest.raises(InputError, match="empty"):
        overlap_by_layer(table.iloc[:0])
    with pytest.raises(InputError, match="between 0 and 1"):
        overlap_by_layer(table.assign(jaccard=2.0))


# --------------------------------------------------------------------------- β sweep (Table 5)


def test_beta_sweep_heatmap():
    betas = [0.0, 0.1, 0.5, 0.9]
    layers = [11, 12, 13, 31]  # the layers Table 5 edits: a categorical axis keeps them side by side
    rows = [(b, layer, int(1000 * (1 - b)) + layer) for b in betas for layer in layers]
    table = pd.DataFrame(rows, columns=["beta", "layer", "count"]).sample(frac=1, random_state=1)
    fig = beta_sweep(table, 14336)
    (hm,) = fig.data
    expected = np.array([[int(1000 * (1 - b)) + layer for layer in layers] for b in betas], dtype=float)
    np.testing.assert_array_equal(np.asarray(hm.z, dtype=float), expected)
    assert list(hm.y) == ["0", "0.1", "0.5", "0.9"] and list(hm.x) == layers
    np.testing.assert_allclose(np.asarray(hm.customdata, dtype=float), 100 * expected / 14336)
    assert hm.text[0][0].startswith(f"{int(expected[0, 0]):,d}")
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.autorange == "reversed"


def test_beta_sweep_leaves_missing_cells_empty_and_validates():
    table = pd.DataFrame({"beta": [0.1, 0.1, 0.9], "layer": [0, 1, 0], "count": [10, 20, 3]})
    hm = beta_sweep(table, 100).data[0]
    z = np.asarray(hm.z, dtype=float)
    assert z[0].tolist() == [10, 20] and z[1, 0] == 3 and np.isnan(z[1, 1]) and hm.text[1][1] == ""
    with pytest.raises(InputError, match="missing column"):
        beta_sweep(table.drop(columns="beta"), 100)
    with pytest.raises(InputError, match="empty"):
        beta_sweep(table.iloc[:0], 100)
    with pytest.raises(InputError, match="more than one row"):
        beta_sweep(pd.concat([table, table]), 100)


# --------------------------------------------------------------------------- LAPE


def test_lape_distribution_boxes_and_specific_counts():
    rng = np.random.default_rng(1)
    lape = rng.uniform(0, np.log(3), size=(N_LAYERS, 200))
    lape[2, :50] = np.nan  # never-activated neurons
    mask = lape < 0.2
    fig = lape_distribution(lape, mask)
    by_name = traces_by_name(fig)
    box, bars = by_name["LAPE"], by_name["language-specific neurons"]
    assert list(box.x) == list(range(N_LAYERS))
    np.testing.assert_allclose(box.median, np.nanmedian(lape, axis=1))
    np.testing.assert_allclose(box.q1, np.nanpercentile(lape, 25, axis=1))
    assert all(lo <= q1 <= med <= q3 <= hi for lo, q1, med, q3, hi in
               zip(box.lowerfence, box.q1, box.median, box.q3, box.upperfence))
    assert list(bars.y) == mask.sum(axis=1).tolist()
    assert bars.yaxis == "y2"
    assert len(lape_distribution(lape).data) == 1


def test_lape_distribution_rejects_bad_input():
    with pytest.raises(InputError, match="2-D"):
        lape_distribution(np.zeros(5))
    with pytest.raises(InputError, match="2-D"):
        lape_distribution(np.zeros((0, 4)))
    with pytest.raises(InputError, match="finite"):
        lape_distribution(np.full((2, 3), np.nan))
    with pytest.raises(InputError, match="specific_mask"):
        lape_distribution(np.zeros((2, 3)), np.zeros((3, 2), dtype=bool))
    with pytest.raises(InputError, match="specific_mask"):
        lape_distribution(np.zeros((2, 3)), np.zeros((2, 3)))


# --------------------------------------------------------------------------- neuron drill-down


def test_neuron_drilldown_two_panels(drill):
    prompts, tokens = drill
    fig = neuron_drilldown(prompts, tokens, layer=7, neuron=4711)
    assert "7" in fig.layout.title.text and "4711" in fig.layout.title.text
    left = [t for t in fig.data if t.xaxis == "x"]
    right = [t for t in fig.data if t.xaxis == "x2"]
    assert left and right and len(left) + len(right) == len(fig.data)
    assert [t.name for t in left] == ["en", "zh", "ar"]
    assert {t.name for t in right} == {"promoted", "suppressed"}
    assert all(t.orientation == "h" for t in fig.data)

    by_name = traces_by_name(fig)
    assert list(by_name["en"].x) == [4.0, 3.5]  # strongest first within a language
    assert list(by_name["zh"].x) == [2.75, 2.25]
    assert by_name["en"].marker.color == language_colour("en")
    # labels cut to ~60 characters, the full text in the hover
    long_label = by_name["en"].y[1]
    assert long_label.startswith("[en] The capital of France") and long_label.endswith("…")
    assert len(long_label) <= len("[en] ") + 60
    assert "ages." in by_name["en"].customdata[1][0]
    assert by_name["zh"].y[1] == "[zh] 法国的首都是巴黎。"
    assert "\\n" in by_name["zh"].customdata[0][1]  # a newline token is shown escaped

    assert list(by_name["promoted"].x) == [6.0, 5.5, 4.25]
    assert list(by_name["suppressed"].x) == [-2.0, -3.5]
    assert list(by_name["promoted"].y) == ["“巴黎”", "“ Paris”", "“ Berlin”"]
    assert by_name["suppressed"].y[1] == "“ &lt;b&gt;”"  # HTML-like tokens show literally
    # first prompt / strongest promoted token on top (categorical axes start at the bottom)
    assert fig.layout.yaxis.categoryarray[-1] == by_name["en"].y[0]
    assert fig.layout.yaxis2.categoryarray[-1] == "“巴黎”"
    assert fig.layout.yaxis2.categoryarray[0] == "“ &lt;b&gt;”"


def test_neuron_drilldown_keeps_repeated_prompts_apart(drill):
    prompts, tokens = drill
    twice = pd.concat([prompts.iloc[[1]], prompts.iloc[[1]].assign(activation=1.0)])
    fig = neuron_drilldown(twice, tokens, 0, 0)
    assert len(set(traces_by_name(fig)["zh"].y)) == 2


def test_neuron_drilldown_rejects_bad_input(drill):
    prompts, tokens = drill
    with pytest.raises(InputError, match="top-prompts table is empty"):
        neuron_drilldown(prompts.iloc[:0], tokens, 0, 0)
    with pytest.raises(InputError, match="top-tokens table is missing"):
        neuron_drilldown(prompts, tokens.drop(columns="direction"), 0, 0)
    with pytest.raises(InputError, match="promoted"):
        neuron_drilldown(prompts, tokens.assign(direction="up"), 0, 0)
    with pytest.raises(InputError, match="neuron"):
        neuron_drilldown(prompts, tokens, 0, -1)


# --------------------------------------------------------------------------- export


def test_save_figure_html_and_png(tmp_path, per_layer):
    _png_possible_or_skip()
    fig = neurons_per_layer(per_layer, N_NEURONS)
    start = time.perf_counter()
    written = save_figure(fig, tmp_path / "sub" / "fig1_beta_0.1")
    elapsed = time.perf_counter() - start
    html_path, png_path = tmp_path / "sub" / "fig1_beta_0.1.html", tmp_path / "sub" / "fig1_beta_0.1.png"
    assert written == [html_path, png_path]  # the ".1" is not taken for a suffix
    html = html_path.read_text(encoding="utf-8")
    assert len(html) > 1_000_000 and '<script src="http' not in html  # plotly.js embedded: opens offline
    assert png_path.read_bytes().startswith(PNG_MAGIC)
    assert elapsed < 30


def test_figure_to_png_bytes(drill):
    _png_possible_or_skip()
    prompts, tokens = drill
    data = figure_to_png_bytes(neuron_drilldown(prompts, tokens, 1, 2))  # CJK/Arabic labels
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_save_figure_png_failure_keeps_html(tmp_path, monkeypatch, jaccard):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))

    def no_chrome(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(go.Figure, "to_image", no_chrome)
    with pytest.raises(NeuroglotError, match="HTML was written") as info:
        save_figure(overlap_heatmap(jaccard), tmp_path / "heat")
    assert "BROWSER_PATH" in str(info.value)
    assert (tmp_path / "heat.html").stat().st_size > 0
    assert not (tmp_path / "heat.png").exists()
    with pytest.raises(NeuroglotError, match="PNG export failed"):
        figure_to_png_bytes(overlap_heatmap(jaccard))


def test_save_figure_html_only_and_bad_format(tmp_path, jaccard):
    assert save_figure(overlap_heatmap(jaccard), tmp_path / "h", formats=("html",)) == [tmp_path / "h.html"]
    with pytest.raises(InputError, match="Unknown figure format"):
        save_figure(overlap_heatmap(jaccard), tmp_path / "x", formats=("gif",))
    assert not (tmp_path / "x.html").exists()


def test_browser_path_defaults_to_system_chromium(monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    figures._use_system_chromium()
    if Path("/usr/bin/chromium").exists():
        assert os.environ["BROWSER_PATH"] == "/usr/bin/chromium"
    else:
        assert "BROWSER_PATH" not in os.environ
    monkeypatch.setenv("BROWSER_PATH", "/opt/my-chrome")
    figures._use_system_chromium()
    assert os.environ["BROWSER_PATH"] == "/opt/my-chrome"


# ---------------------------------------------------------------- attribution and causal tracing


def test_knowledge_neurons_by_layer_panels_stack_independent_under_specific():
    per_layer = pd.DataFrame({"en": [3, 5, 0], "zh": [2, 6, 1], fact_figures.INDEPENDENT: [1, 4, 0],
                              "specific en": [2, 1, 0], "specific zh": [1, 2, 1]},
                             index=pd.Index([0, 1, 2], name="layer"))
    fig = fact_figures.knowledge_neurons_by_layer(per_layer, ["en", "zh"])
    assert [a.text for a in fig.layout.annotations][:2] == ["en", "zh"]
    assert fig.layout.barmode == "stack"
    names = [t.name for t in fig.data]
    assert names == ["language-independent (Eq. 3)", "en-specific (Eq. 4)",
                     "language-independent (Eq. 3)", "zh-specific (Eq. 4)"]
    assert list(fig.data[1].y) == [2, 1, 0] and list(fig.data[3].y) == [1, 2, 1]
    assert list(fig.data[0].y) == list(fig.data[2].y) == [1, 4, 0]
    assert [t.showlegend for t in fig.data][::2] == [True, False]       # one legend entry for the shared set
    assert fig.data[1].marker.color == language_colour("en") and fig.data[0].marker.color == LAFN_COLOUR
    with pytest.raises(InputError, match="no column for de"):
        fact_figures.knowledge_neurons_by_layer(per_layer, ["en", "de"])
    with pytest.raises(InputError, match="empty"):
        fact_figures.knowledge_neurons_by_layer(pd.DataFrame(), ["en"])


def test_attribution_strength_lines_are_layer_maxima():
    scores = {"en": np.array([[0.1, 0.5], [0.3, -0.2]]), "zh": np.array([[0.0, 0.0], [0.9, 0.1]])}
    fig = fact_figures.attribution_strength(scores, [4, 7])
    by = traces_by_name(fig)
    assert list(by["en"].y) == [0.5, 0.3] and list(by["en"].customdata) == [1, 0]
    assert list(by["zh"].x) == [4, 7]
    with pytest.raises(InputError, match="2 layers"):
        fact_figures.attribution_strength({"en": np.zeros((3, 2))}, [0, 1])


def test_causal_trace_heatmaps_three_panels_with_subject_marked():
    tokens = ["<bos>", "The", " Eiffel", " Tower", " is", " in"]
    scores = {k: np.random.default_rng(i).random((6, 4)) for i, k in enumerate(fact_figures.TRACE_KINDS)}
    fig = fact_figures.causal_trace_heatmaps(tokens, (2, 4), scores, 0.8, 0.05, " Paris")
    assert len(fig.data) == 3
    assert [t.colorscale[0][1] != t.colorscale[-1][1] for t in fig.data] == [True] * 3
    labels = list(fig.data[0].y)
    assert [lab.endswith("*") for lab in labels] == [False, False, True, True, False, False]
    assert "“ Eiffel” *" in labels
    np.testing.assert_array_equal(np.asarray(fig.data[1].z), scores["mlp"])
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["single restored hidden state", "restored MLP (window)", "restored attention (window)"]
    assert "0.800" in fig.layout.title.text and "0.050" in fig.layout.title.text
    only = fact_figures.causal_trace_heatmaps(tokens, (2, 4), {"mlp": scores["mlp"]}, 0.8, 0.05, "x")
    assert len(only.data) == 1
    with pytest.raises(InputError, match="subject range"):
        fact_figures.causal_trace_heatmaps(tokens, (4, 9), scores, 0.8, 0.05, "x")
    with pytest.raises(InputError, match="6 token rows"):
        fact_figures.causal_trace_heatmaps(tokens, (2, 4), {"hidden": np.zeros((5, 4))}, 0.8, 0.05, "x")
    with pytest.raises(InputError):
        fact_figures.causal_trace_heatmaps(tokens, (2, 4), {}, 0.8, 0.05, "x")


def test_average_effect_heatmaps_grid_languages_by_kinds():
    rows = ["First subject token", "Last subject token", "Last token"]
    frame = lambda v: pd.DataFrame(np.full((3, 5), v), index=rows, columns=range(5))  # noqa: E731
    effects = {"en": {"hidden": frame(0.1), "mlp": frame(0.2)}, "zh": {"hidden": frame(0.3), "mlp": frame(0.4)}}
    fig = fact_figures.average_effect_heatmaps(effects)
    assert len(fig.data) == 4
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["en · single restored hidden state", "en · restored MLP (window)",
                      "zh · single restored hidden state", "zh · restored MLP (window)"]
    # one colour scale per kind, shared by the languages
    by_kind = {}
    for t in fig.data:
        by_kind.setdefault(t.hovertemplate.rsplit("<extra>", 1)[1], []).append(round(t.zmax, 9))
    assert by_kind == {"hidden</extra>": [0.3, 0.3], "mlp</extra>": [0.4, 0.4]}
    assert list(fig.data[0].y) == rows
    with pytest.raises(InputError):
        fact_figures.average_effect_heatmaps({})


# --------------------------------------------------------------------------- grouped bars (regression)
# compare_summary, edit_overlap_by_layer, method_scores_bars and language_scores_bars share one bar helper;
# these pin the traces they drew before it (order, names, x, y, colours, hover, legend), missing values included.


def _plain(values) -> list | None:
    """Trace data as plain Python (numpy scalars and NaN as int/float/None) for comparison."""
    if values is None:
        return None

    def one(v):
        if isinstance(v, (list, tuple, np.ndarray)):
            return [one(e) for e in v]
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v

    return [one(v) for v in np.asarray(values, dtype=object).tolist()]


def bar_traces(fig: go.Figure) -> list[tuple]:
    """(name, x, y, colour, legend shown, x axis, customdata) of every trace, in order."""
    assert all(t.type == "bar" for t in fig.data)
    return [(t.name, _plain(t.x), _plain(t.y), t.marker.color, t.showlegend, t.xaxis, _plain(t.customdata))
            for t in fig.data]


@pytest.fixture
def compare_rows() -> pd.DataFrame:
    return pd.DataFrame([
        ("unedited", "en", "reliability", 10.0, 4), ("unedited", "zh", "reliability", 5.0, 4),
        ("memla", "zh", "reliability", 80.0, 4), ("memla", "en", "reliability", 90.0, 3),
        ("a<b", "en", "reliability", 99.4, 4),
        ("unedited", "en", "locality", 100.0, 2), ("memla", "en", "locality", 95.5, 2),
        ("memla", "de", "locality", 70.0, 2), ("a<b", "fr", "generality", 42.0, 1),
    ], columns=["method", "language", "kind", "success", "n"])


def test_compare_summary_bars_per_editor_in_panels_per_kind(compare_rows):
    fig = fact_figures.compare_summary(compare_rows)
    grey, blue, red = "#b0b0b0", "#1f77b4", "#d62728"
    assert bar_traces(fig) == [                   # kinds in COMPARE_KINDS order; an editor without rows draws nothing
        ("unedited", ["en", "zh"], [10.0, 5.0], grey, True, "x", [[4], [4]]),
        ("memla", ["zh", "en"], [80.0, 90.0], blue, True, "x", [[4], [3]]),
        ("a<b", ["en"], [99.4], red, True, "x", [[4]]),
        ("a<b", ["fr"], [42.0], red, False, "x2", [[1]]),
        ("unedited", ["en"], [100.0], grey, False, "x3", [[2]]),
        ("memla", ["en", "de"], [95.5, 70.0], blue, False, "x3", [[2], [2]]),
    ]
    assert [t.legendgroup for t in fig.data] == [t.name for t in fig.data]
    assert [list(t.text) for t in fig.data][2:4] == [["99"], ["42"]]
    assert fig.data[0].textposition == "outside" and fig.data[0].cliponaxis is False
    assert fig.data[2].hovertemplate == ("a&lt;b · reliability · %{x}: %{y:.1f} (mean of %{customdata[0]} "
                                         "probe(s))<extra></extra>")
    assert fig.data[3].hovertemplate.startswith("a&lt;b · generality · %{x}")
    assert [a.text for a in fig.layout.annotations] == ["reliability", "generality", "locality"]
    assert fig.layout.barmode == "group" and fig.layout.height == 420 and fig.layout.legend.title.text == "editor"
    assert tuple(fig.layout.yaxis.range) == (0, 112)

    without_n = fact_figures.compare_summary(compare_rows.drop(columns="n"), title="mine")
    assert [_plain(t.customdata) for t in without_n.data] == [[[1]] * len(t.x) for t in without_n.data]
    assert without_n.layout.title.text == "mine"
    single = fact_figures.compare_summary(compare_rows[compare_rows["method"] == "memla"])
    assert bar_traces(single) == [("memla", ["zh", "en"], [80.0, 90.0], blue, True, "x", [[4], [3]]),
                                  ("memla", ["en", "de"], [95.5, 70.0], blue, False, "x2", [[2], [2]])]
    many = pd.concat([compare_rows] + [compare_rows[compare_rows["method"] == "memla"].assign(method=m)
                                       for m in ("mpn", "langedit")], ignore_index=True)
    crowded = fact_figures.compare_summary(many)        # five editors: no numbers above the bars (they overlap)
    assert len({t.name for t in crowded.data}) == 5 and all(t.text is None for t in crowded.data)
    with pytest.raises(InputError, match="The comparison summary: column 'success' must hold finite numbers"):
        fact_figures.compare_summary(compare_rows.assign(success=np.nan))
    with pytest.raises(InputError, match=r"The comparison summary is missing column\(s\) \['kind'\]"):
        fact_figures.compare_summary(compare_rows.drop(columns="kind"))


def test_edit_overlap_by_layer_stacks_sets_per_source():
    table = pd.DataFrame([
        (3, "agnostic", 0.5, 2, 10, 7, "atlas"), (3, "en", 0.2, 1, 10, 30, "atlas"),
        (3, "other", 0.3, 0, 10, np.nan, "atlas"), (5, "agnostic", 0.1, 1, 10, 7, "atlas"),
        (5, "other", 0.9, 0, 10, np.nan, "atlas"), (4, "en", 0.6, 3, 10, 12, "ig"),
        (4, "added neurons", 0.4, 0, 10, 2, "ig"),
    ], columns=["layer", "set", "weight share", "overlap", "top", "set size", "source"])
    fig = fact_figures.edit_overlap_by_layer(table)
    assert bar_traces(fig) == [                   # a set without a value in the set size column shows -1
        ("agnostic", [3, 5], [50.0, 10.0], LAFN_COLOUR, True, "x", [[2, 10, 7], [1, 10, 7]]),
        ("en-specific", [3], [20.0], language_colour("en"), True, "x", [[1, 10, 30]]),
        ("other", [3, 5], [30.0, 90.0], "#c7c7c7", True, "x", [[0, 10, -1], [0, 10, -1]]),
        ("en-specific", [4], [60.0], language_colour("en"), False, "x2", [[3, 10, 12]]),
        ("added neurons", [4], [40.0], "#7f7f7f", False, "x2", [[0, 10, 2]]),
    ]
    assert [t.legendgroup for t in fig.data] == [t.name for t in fig.data]
    assert fig.data[1].hovertemplate == (
        "layer %{x} · en-specific: %{y:.1f} % of the edit's weight<br>%{customdata[0]} of the layer's "
        "%{customdata[1]} top neurons are in this set (set size %{customdata[2]})<extra></extra>")
    assert [a.text for a in fig.layout.annotations] == ["atlas sets (lu-lafns Eq. 4-6)",
                                                         "IG knowledge neurons (memla Eq. 3-4)"]
    assert tuple(fig.layout.xaxis.range) == (2.4, 5.6) and tuple(fig.layout.xaxis2.range) == (3.4, 4.6)
    assert fig.layout.barmode == "stack" and fig.layout.legend.title.text == "neurons"

    atlas = table[table["source"] == "atlas"].drop(columns=["source", "set size"])
    only = fact_figures.edit_overlap_by_layer(atlas)       # no source column: one panel; no set size: -1
    assert [(t.name, t.xaxis, _plain(t.customdata)[0]) for t in only.data] == [
        ("agnostic", "x", [2, 10, -1]), ("en-specific", "x", [1, 10, -1]), ("other", "x", [0, 10, -1])]
    single = fact_figures.edit_overlap_by_layer(table[table["set"] == "en"])
    assert [(t.name, _plain(t.x), t.showlegend, t.xaxis) for t in single.data] == [
        ("en-specific", [3], True, "x"), ("en-specific", [4], False, "x2")]
    with pytest.raises(InputError, match=r"The overlap table is missing column\(s\) \['top'\]"):
        fact_figures.edit_overlap_by_layer(table.drop(columns="top"))


def test_method_scores_bars_align_methods_to_kinds():
    scores = pd.DataFrame([
        ("memla", "reliability", 90.0), ("memla", "generality", np.nan), ("rome", "reliability", 99.0),
        ("rome", "locality", 50.0), ("memla", "locality", 40.0), (3, "portability", 12.5),
    ], columns=["method", "kind", "value"])
    fig = run_figures.method_scores_bars(scores, "Scores", "EM")
    kinds = ["reliability", "generality", "locality", "portability"]
    assert bar_traces(fig) == [                   # NaN and missing (method, kind) draw no bar
        ("memla", kinds, [90.0, None, 40.0, None], None, None, None, None),
        ("rome", kinds, [99.0, None, 50.0, None], None, None, None, None),
        ("3", kinds, [None, None, None, 12.5], None, None, None, None),
    ]
    assert [t.hovertemplate for t in fig.data][0] == "memla<br>%{x}: %{y:.1f}%<extra></extra>"
    assert fig.data[0].legendgroup is None
    assert fig.layout.barmode == "group" and tuple(fig.layout.yaxis.range) == (0, 102)
    assert fig.layout.yaxis.title.text == "EM (%)" and fig.layout.legend.title.text == "method"
    single = run_figures.method_scores_bars(scores[scores["method"] == "rome"], "Scores", "F1")
    assert bar_traces(single) == [("rome", ["reliability", "locality"], [99.0, 50.0], None, None, None, None)]
    with pytest.raises(InputError, match="The method scores need the columns method, kind and value; missing kind"):
        run_figures.method_scores_bars(scores.drop(columns="kind"), "Scores", "EM")
    with pytest.raises(InputError, match="The method scores are empty"):
        run_figures.method_scores_bars(scores.iloc[:0], "Scores", "EM")


def test_language_scores_bars_align_languages_to_methods():
    scores = pd.DataFrame([
        ("memla", "en", 90.0), ("memla", "zh", 30.0), ("rome", "en", 99.0), ("rome", "zh", np.nan),
        ("rome", "xx_Yyyy", 5.0), ("ft", "en", 1.0),
    ], columns=["method", "language", "value"])
    fig = run_figures.language_scores_bars(scores, "Languages", "EM")
    methods = ["memla", "rome", "ft"]
    assert bar_traces(fig) == [
        ("en", methods, [90.0, 99.0, 1.0], language_colour("en"), None, None, None),
        ("zh", methods, [30.0, None, None], language_colour("zh"), None, None, None),
        ("xx_Yyyy", methods, [None, 5.0, None], language_colour("xx_Yyyy"), None, None, None),
    ]
    assert fig.data[1].hovertemplate == "%{x} · asked in zh<br>EM %{y:.1f}%<extra></extra>"
    assert fig.layout.legend.title.text == "test language" and tuple(fig.layout.yaxis.range) == (0, 102)
    single = run_figures.language_scores_bars(scores[scores["language"] == "en"], "Languages", "EM")
    assert bar_traces(single) == [("en", methods, [90.0, 99.0, 1.0], language_colour("en"), None, None, None)]
    with pytest.raises(InputError, match="The language scores need the columns method, language and value"):
        run_figures.language_scores_bars(scores.drop(columns="method"), "Languages", "EM")
