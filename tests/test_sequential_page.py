"""The Sequential editing page (app/views/sequential.py) under Streamlit's AppTest, on a tiny random llama checkpoint.

A stream (LangEdit and MEMIT, en then de, 2 steps of 2 MzsRE dev records) is started from the form and runs in
the background; the page shows its progress, then the curves, the interference matrix and the null-space
ranks; the metric and the matrix's view can be switched; the state can be downloaded; the run folder is
opened again by a second session; rolling back drops the later steps; bad input is an error box that keeps
the page (and the run) usable."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.tiny import MZSRE_DEV, app_page

TINY = dict(v_lr=1.0, v_num_grad_steps=4, clamp_norm_factor=0.0, v_weight_decay=0.0,
            context_template_length_params=[[4, 1]], mom2_n_tokens=1000, layers=[0, 1])
HPARAMS = {"langedit": dict(TINY, nullspace_threshold=0.05, nullspace_relative=True),
           "memit": dict(TINY, mom2_update_weight=1.0)}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NEUROGLOT_CACHE", str(tmp_path_factory.getbasetemp() / "seq-page-cache"))


def new_page(spec: str):
    return app_page("sequential", spec).run()


def errors(at) -> list[str]:
    return [e.value for e in at.error] + [str(e.value) for e in at.exception]


def fill(at, out: str, hparams=HPARAMS, batch: int = 2, records: str = "100-149") -> None:
    at.multiselect(key="seq-methods").set_value(list(hparams))
    at.multiselect(key="seq-langs").set_value(["en", "de"])
    at.number_input(key="seq-batch").set_value(batch)
    at.number_input(key="seq-steps").set_value(2)
    at.number_input(key="seq-flores").set_value(3)
    at.text_input(key="seq-data").set_value(str(MZSRE_DEV))
    at.text_input(key="seq-records").set_value(records)
    at.text_input(key="seq-out").set_value(out)
    at.text_area(key="seq-hparams").set_value(json.dumps(hparams))


def wait_until_done(at, timeout: float = 240) -> None:
    started = time.time()
    while True:
        at.run()
        if not any("running ·" in str(getattr(p, "text", "")) for p in at.get("progress")):
            return
        assert time.time() - started < timeout, "the stream did not finish"
        time.sleep(0.5)


def test_run_watch_switch_download_reopen_and_roll_back(tiny_spec, tmp_path):
    if not MZSRE_DEV.is_dir():
        pytest.skip("MzsRE dev data not found")
    out = str(tmp_path / "stream")
    at = new_page(tiny_spec)
    assert not errors(at)
    # bad input first: an error box, nothing started
    fill(at, out, records="9-3")
    at.button[0].click().run()
    assert any("record range" in e.lower() for e in errors(at)), errors(at)
    fill(at, out, hparams={"langedit": dict(TINY, nullspace_threshold=-1.0)})
    at.button[0].click().run()
    assert errors(at) and not Path(out).exists()
    # the real run
    fill(at, out)
    at.button[0].click().run()
    assert not errors(at), errors(at)
    wait_until_done(at)
    assert not errors(at), errors(at)
    charts = at.get("plotly_chart")
    assert len(charts) == 3                                             # curves, interference, null space
    curves = json.loads(charts[0].proto.spec)
    assert {t["name"] for t in curves["data"]} >= {"en", "de", "all languages"}
    assert max(max(t["x"]) for t in curves["data"]) == 4                # 2 steps × 2 edits
    # switch the metric and the matrix's view: still three charts, the titles follow
    at.radio(key="seq-metric").set_value("specificity").run()
    assert "Specificity" in json.dumps(json.loads(at.get("plotly_chart")[0].proto.spec)["layout"])
    at.selectbox(key="seq-im-method").set_value("memit").run()
    at.radio(key="seq-im-rel").set_value("own step").run()
    heat = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert heat["layout"]["title"]["text"].startswith("memit") and heat["data"][0]["y"] == ["step 1 · en", "step 2 · de"]
    assert heat["data"][0]["z"][1] == [0.0, 0.0]                       # the last batch: no change since its own step
    assert not errors(at)
    # the state download is a zip of the saved state
    dl = [b for b in at.get("download_button") if b.key == "seq-dl"]
    assert dl and "langedit" in str(dl[0].proto.label)
    # a second session opens the same folder and sees the same run
    other = new_page(tiny_spec)
    other.radio(key="seq-mode").set_value("Open a run folder").run()
    other.text_input(key="seq-typed").set_value(out).run()
    other.button(key="seq-open").click().run()
    assert not errors(other) and len(other.get("plotly_chart")) == 3
    assert any("langedit 2/2" in m.value for m in other.markdown)
    # running the same stream again in the same folder recomputes nothing (resume of a finished run)
    steps_file = Path(out) / "langedit" / "steps.jsonl"
    before = steps_file.read_text()
    fill(at, out)
    at.button[0].click().run()
    wait_until_done(at)
    assert steps_file.read_text() == before and not errors(at)
    # roll back to step 1: the later steps go, the page says so and still draws
    at.selectbox(key="seq-rollback-step-2").set_value(1).run()
    at.button(key="seq-rollback").click().run()
    assert not errors(at), errors(at)
    assert len(steps_file.read_text().splitlines()) == 1
    assert any("langedit 1/2" in m.value for m in at.markdown)
    # a folder that holds something else is refused with a message
    other.text_input(key="seq-typed").set_value(str(tmp_path)).run()
    other.button(key="seq-open").click().run()
    assert any("no sequential run" in e for e in errors(other))
