"""A multilingual sequential editing run: streams from data, what is measured after every step, the run folder.

Stream (:func:`make_stream`, papers/langedit.md §4.1.1)
    MzsRE (or Bi-ZsRE: its en-zh file) records that have every stream language
    and can be edited in each (the subject occurs in the question: of MzsRE
    dev's 500 records, 145 can in all of en, de, nl, es, fr and zh), in a
    seeded shuffled order, optionally only from ``records`` (ranges such as
    ``"0-99,150-499"``, so that records used to choose presets stay out); step
    ``t`` takes the next ``batch`` records and edits them in one language:
    ``order="blocks"`` gives each language a contiguous block of steps in the
    order given (as the paper: all English batches, then German, ...);
    ``"interleaved"`` cycles through the languages. Every method of a run gets
    the same stream.

Measured after every step (§4.1.2, §4.3-4.4), on the model carrying the state
    For every batch so far and every stream language ``p`` (the records are
    parallel, so a batch edited in German can be asked in Chinese): Efficacy
    (the edit question → the new target), Generality (the paraphrase → the new
    target) and Specificity (the locality question → its answer), each the
    teacher-forced top-1 accuracy of the answer's tokens (Eq. 11-13 as MEMIT's
    and AlphaEdit's zsRE code score them), averaged over the batch. From these:
    the per-language curves (each edit asked in its own language, against the
    number of edits so far), the retention of the first batch, and the
    interference matrix (batch × probe language). General ability: the
    perplexity of the edited model on held-out FLORES-200 sentences of each
    language (the last ``flores_sentences`` lines of devtest; the key statistics
    read the first ones), against the unedited model (step 0). Deviation: the
    paper measures general ability with four XTREME tasks, which need data and
    fine-tuned heads this offline tool does not have.

Per-probe rows
    Beside the averages, every probe is kept as a row: batch, record (the data
    set's record id), language asked in, kind, prompt, expected answer, its
    top-1 accuracy (0-1) and ``predicted``: the arg-max token at each answer
    position decoded. That text is *not* a greedy answer: position ``k`` is the
    model's choice given the prompt and the expected answer's tokens before
    ``k`` (teacher forcing), so it reads "what the model predicts token by
    token". It comes from the logits the scores already compute, so keeping it
    costs no extra forward pass (a greedy answer would cost one decoding run per
    probe and step). Folders written before the rows existed have no
    ``"probes"`` key; everything that reads the averages reads them as before.

Run folder (resumable)
    ``sequential.json`` (the configuration, the model, the methods, the stream), ``baseline.json``
    (step 0: the unedited model's scores, perplexities and probe rows, written atomically) and per method
    ``<method>/state`` (:class:`editors.sequential.SequentialState`, saved
    atomically after every step) and ``<method>/steps.jsonl`` (one line per step
    with its scores and probe rows, appended and fsynced after the state is saved). A run started again with the
    same configuration continues where it stopped: a step whose state was saved
    but whose line is missing is measured again; a half-computed step is
    recomputed from the saved state, so the result is the one an uninterrupted
    run gives.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from analysis.errors import InputError
from analysis.tokens import pad_sequences
from data.flores import flores_sentences
from editors.answers import answer_scores
from editors.base import model_meta
from editors.requests import EditRequest
from editors.sequential import (
    SequentialState, available_sequential, check_state_for, get_sequential, new_state, sequential_step)

if TYPE_CHECKING:
    from analysis.model import Workbench

RUN_FORMAT = "neuroglot-sequential-run"
RUN_JSON = "sequential.json"
BASELINE_JSON = "baseline.json"
STEPS_FILE = "steps.jsonl"
ORDERS = ("blocks", "interleaved")
KINDS = ("efficacy", "generality", "specificity")

#: ``progress(method, step, fraction, message)``; step 0 is the unedited model's measurement.
RunProgress = Callable[[str, int, float, str], None]


# ================================================================== the stream


def parse_ranges(spec: str) -> list[tuple[int, int | None]]:
    """``"0-99,150-"`` → ``[(0, 99), (150, None)]``; empty: everything."""
    out: list[tuple[int, int | None]] = []
    for part in str(spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = (int(hi) if hi.strip() else None) if sep else a
        except ValueError:
            raise InputError(f"Record ranges are written as 0-99,150-499 (or 150- for 'to the end'); "
                             f"got {spec!r}.") from None
        if a < 0 or (b is not None and b < a):
            raise InputError(f"Bad record range {part!r}: the numbers must be 0 or more and ascending.")
        out.append((a, b))
    return out


@dataclass
class StreamConfig:
    """What defines a run's stream and its measurements (the run folder's identity)."""

    dataset: str
    languages: list[str]
    batch: int = 20
    steps: int = 6
    order: str = "blocks"
    seed: int = 0
    records: str = ""                   # ranges of record indices the stream may use ("" = all)
    flores_sentences: int = 50

    def validate(self) -> "StreamConfig":
        self.languages = [str(x).strip() for x in self.languages if str(x).strip()]
        if not self.languages:
            raise InputError("Give at least one language for the stream (--languages en,de,...).")
        if len(set(self.languages)) != len(self.languages):
            raise InputError(f"A language is given twice in {','.join(self.languages)}.")
        for name in ("batch", "steps", "flores_sentences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}.")
        if self.order not in ORDERS:
            raise InputError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"--seed must be a whole number of at least 0, got {self.seed!r}.")
        parse_ranges(self.records)
        return self

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d["dataset"] = str(Path(self.dataset).resolve()) if self.dataset else ""
        return d


@dataclass
class StreamStep:
    index: int                  # 1-based
    language: str
    records: list[int]          # record indices in the data set


def step_languages(languages: Sequence[str], steps: int, order: str) -> list[str]:
    """The language of each step: contiguous blocks in the given order, or cycling through them."""
    if order == "interleaved":
        return [languages[t % len(languages)] for t in range(steps)]
    return [languages[t * len(languages) // steps] for t in range(steps)]


def load_stream_records(config: StreamConfig) -> tuple[list[Any], list[int]]:
    """The data set's records (with every stream language) and the stream's shuffled pool of their indices."""
    from data.edit_records import load_mzsre

    try:
        records = load_mzsre(config.dataset, config.languages)
    except Exception as exc:  # noqa: BLE001 (CorpusError and OS errors: one message)
        raise InputError(str(exc)) from None
    usable = [i for i, r in enumerate(records) if all(lang in r.fields for lang in config.languages)
              and _editable(r, config.languages)]
    ranges = parse_ranges(config.records)
    if ranges:
        usable = [i for i in usable if any(a <= i and (b is None or i <= b) for a, b in ranges)]
    order = np.random.default_rng(config.seed).permutation(len(usable))
    return records, [usable[k] for k in order]


def _editable(record: Any, languages: Sequence[str]) -> bool:
    """Whether every language of the record is an edit request a key-value editor can take (its subject occurs
    in its prompt, a target is given): records that are not (MzsRE has some whose translated subject is not
    in the translated question) never enter a stream."""
    try:
        EditRequest.from_record(record, list(languages)).validate()
    except InputError:
        return False
    return True


def make_stream(config: StreamConfig, loaded: tuple[list[Any], list[int]] | None = None) -> list[StreamStep]:
    """The stream's steps; ``loaded``: what :func:`load_stream_records` returned, when the caller has it."""
    config.validate()
    _, pool = loaded if loaded is not None else load_stream_records(config)
    need = config.batch * config.steps
    if len(pool) < need:
        raise InputError(f"{config.dataset}: the stream needs {need} records ({config.steps} steps of "
                         f"{config.batch}) with all of {', '.join(config.languages)}"
                         f"{' in ' + config.records if config.records else ''}; there are {len(pool)}.")
    langs = step_languages(config.languages, config.steps, config.order)
    return [StreamStep(t + 1, langs[t], pool[t * config.batch:(t + 1) * config.batch]) for t in range(config.steps)]


def step_requests(records: Sequence[Any], step: StreamStep, language: str) -> list[EditRequest]:
    return [EditRequest.from_record(records[i], [language]) for i in step.records]


# ================================================================== measurements


def probe_scores(wb: Workbench, records: Sequence[Any], stream: Sequence[StreamStep], upto: int,
                 languages: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For every batch ``1..upto`` and probe language: the three top-1 accuracies (module docstring), and one
    row per probe (batch, record, language, kind, prompt, expected, top1 0-1, predicted: the teacher-forced
    arg-max tokens decoded), both from the same single teacher-forced forward pass per batch of prompts."""
    prompts, answers, where = [], [], []
    for step in stream[:upto]:
        for lang in languages:
            for i in step.records:
                fact = EditRequest.from_record(records[i], [lang]).facts[lang]
                record = str(getattr(records[i], "record_id", "") or i)
                items = [("efficacy", fact.prompt, fact.target_new)]
                items += [("generality", p, fact.target_new) for p in fact.paraphrases[:1]]
                items += [("specificity", q, a) for q, a in fact.locality[:1]]
                for kind, prompt, answer in items:
                    prompts.append(prompt)
                    answers.append(answer)
                    where.append((step.index, lang, kind, record))
    scores = answer_scores(wb, prompts, answers) if prompts else []
    sums: dict[tuple[int, str], dict[str, list[float]]] = {}
    probes: list[dict[str, Any]] = []
    for (batch, lang, kind, record), prompt, answer, score in zip(where, prompts, answers, scores):
        sums.setdefault((batch, lang), {k: [] for k in KINDS})[kind].append(score.top1_accuracy)
        probes.append({"batch": batch, "record": record, "language": lang, "kind": kind, "prompt": prompt,
                       "expected": answer, "top1": score.top1_accuracy,
                       "predicted": wb.tokenizer.decode(score.predicted, skip_special_tokens=True).strip()})
    out = []
    for (batch, lang), kinds in sums.items():
        row: dict[str, Any] = {"batch": batch, "probe": lang, "n": len(kinds["efficacy"])}
        for kind in KINDS:
            row[kind] = 100.0 * sum(kinds[kind]) / len(kinds[kind]) if kinds[kind] else None
        out.append(row)
    return out, probes


def held_out_sentences(languages: Sequence[str], n: int) -> dict[str, list[str]]:
    """The last ``n`` FLORES-200 devtest sentences of each language (the key statistics read the first ones)."""
    return {lang: sents[-n:] for lang, sents in zip(languages, flores_sentences(list(languages)).values())}


@torch.no_grad()
def perplexities(wb: Workbench, sentences: Mapping[str, Sequence[str]], batch_size: int = 4) -> dict[str, float]:
    """exp(mean token NLL) of each language's sentences (every token after the first, BOS included)."""
    tok = wb.tokenizer
    out: dict[str, float] = {}
    for lang, texts in sentences.items():
        total, count = 0.0, 0
        for start in range(0, len(texts), batch_size):
            seqs = [list(tok(t, add_special_tokens=True)["input_ids"])[:128] for t in texts[start:start + batch_size]]
            ids, mask = pad_sequences(seqs, tok.pad_token_id, device=wb.device)
            logits = wb.logits_at(wb.forward_inputs(ids, mask), slice(0, ids.shape[1] - 1)).float()
            logp = torch.log_softmax(logits, dim=-1)
            target = ids[:, 1:]
            nll = -logp.gather(2, target[..., None]).squeeze(-1)
            keep = mask[:, 1:].bool()
            total += float(nll[keep].sum())
            count += int(keep.sum())
        out[lang] = math.exp(total / max(count, 1))
    return out


# ================================================================== the run folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} cannot be read ({exc}).") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{time.time_ns()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_steps(folder: Path) -> list[dict[str, Any]]:
    path = folder / STEPS_FILE
    rows: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue                      # a line cut by an interruption: that step is measured again
    by_step = {int(r["step"]): r for r in rows if "step" in r}
    return [by_step[k] for k in sorted(by_step)]


def _append(path: Path, row: Mapping[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def is_run_folder(out: str | Path) -> bool:
    return (Path(out) / RUN_JSON).is_file()


def check_run_folder(out: str | Path, config: StreamConfig, model: Mapping[str, Any], overwrite: bool = False) -> str:
    """"new", "resume" or "replace"; InputError for a folder that holds something else or another run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; --out must be a folder.")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    if not is_run_folder(out):
        if overwrite:
            raise InputError(f"{out} holds files that are not a sequential run; it is not replaced. "
                             "Choose an empty or new folder.")
        raise InputError(f"{out} is not empty and holds no sequential run; choose an empty or new folder.")
    info = _read_json(out / RUN_JSON)
    same = info.get("config") == config.identity() and info.get("model", {}).get("spec") == model.get("spec")
    if same:
        return "resume"
    if overwrite:
        return "replace"
    raise InputError(f"{out} holds another sequential run (other data, languages, stream or model); "
                     "give another --out, or --overwrite to replace it.")


@dataclass
class RunResult:
    folder: Path
    methods: list[str]
    steps_done: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def over_preset(wb: Workbench, method: str, overrides: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The method's preset for ``wb`` with ``overrides`` (field values) over it; None (the preset) without."""
    if not overrides:
        return None
    cls = get_sequential(method).hparams_class
    try:
        base = cls.preset(wb).to_dict()
    except InputError:                  # no preset for this model: the overrides and the class defaults
        base = {}
    base.update(dict(overrides))
    return base


def run_sequential(wb: Workbench, config: StreamConfig, methods: Sequence[str], out: str | Path,
                   hparams: Mapping[str, Mapping[str, Any]] | None = None, overwrite: bool = False,
                   progress: RunProgress | None = None, stop_after: int | None = None) -> RunResult:
    """Run (or continue) the stream for every method in ``methods``; returns what the folder now holds.

    ``hparams``: per method, field values over the method's preset for the model. ``stop_after``: stop each method after that
    many steps in this call (to interrupt on purpose; a later call continues).
    """
    started = time.perf_counter()
    config.validate()
    names = [str(m).strip().lower() for m in methods if str(m).strip()]
    if not names:
        raise InputError("Give at least one method (--methods langedit,alphaedit,memit).")
    known = available_sequential()
    unknown = [m for m in names if m not in known]
    if unknown:
        raise InputError(f"Unknown sequential method(s) {', '.join(unknown)}; known: {', '.join(known)}.")
    method_objs = {m: get_sequential(m, over_preset(wb, m, (hparams or {}).get(m))) for m in names}
    for obj in method_objs.values():
        obj.hparams_for(wb)                                     # bad hyper-parameters: before any work
    model = model_meta(wb)
    mode = check_run_folder(out, config, model, overwrite)
    loaded = load_stream_records(config)
    stream = make_stream(config, loaded)
    records = loaded[0]
    sentences = held_out_sentences(config.languages, config.flores_sentences)
    out = Path(out)
    if mode == "replace":
        import shutil

        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    info = _read_json(out / RUN_JSON) if mode == "resume" else {}
    run_methods = list(dict.fromkeys(list(info.get("methods", [])) + names))
    _write_json(out / RUN_JSON, {
        "format": RUN_FORMAT, "config": config.identity(), "model": model, "methods": run_methods,
        "stream": [asdict(s) for s in stream], "created": info.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    report = progress or (lambda method, step, fraction, message: None)

    if not (out / BASELINE_JSON).is_file():
        report("unedited", 0, 0.0, "measuring the unedited model (every batch, every language) and its perplexity")
        with wb.lock:
            scores, probes = probe_scores(wb, records, stream, len(stream), config.languages)
            ppl = perplexities(wb, sentences)
        _write_json(out / BASELINE_JSON, {"scores": scores, "perplexity": ppl, "probes": probes})

    # every method's state first; then step after step, every method at that step (a run cut short leaves
    # every method at about the same step, so what is there compares like with like)
    states: dict[str, SequentialState] = {}
    measured: dict[str, set[int]] = {}
    for name in list(method_objs):
        folder = out / name
        folder.mkdir(exist_ok=True)
        state_dir = folder / "state"
        if (state_dir / "state.json").is_file():
            state = SequentialState.load(state_dir, device=wb.device)
            check_state_for(state, wb, name)
            method_objs[name] = get_sequential(name, state.hparams)   # a resumed stream keeps its hyper-parameters
        else:
            report(name, 0, 0.0, "key statistics K_0 of the edited layers")
            state = new_state(wb, method_objs[name], config.languages,
                              progress=lambda d, p, n=name: report(n, 0, d / max(p, 1),
                                                                   f"key statistics: {d:,}/{p:,} tokens"))
            state.save(state_dir)
        states[name] = state
        measured[name] = {int(r["step"]) for r in read_steps(folder)}
    computed_now = dict.fromkeys(method_objs, 0)
    for step in stream:
        t = step.index
        for name, method in method_objs.items():
            state, folder = states[name], out / name
            if t > len(state):
                if stop_after is not None and computed_now[name] >= stop_after:
                    continue
                if t > len(state) + 1:
                    continue                                       # an earlier step of this method is missing
                requests = step_requests(records, step, step.language)

                def step_progress(f: float, message: str, t: int = t, n: str = name) -> None:
                    report(n, t, 0.8 * f, message)

                record = sequential_step(wb, method, state, requests, progress=step_progress)
                state.append(record)
                state.save(folder / "state")
                computed_now[name] += 1
            if t <= len(state) and t not in measured[name]:
                report(name, t, 0.85, f"measuring {t * config.batch} edits in {len(config.languages)} languages")
                t0 = time.perf_counter()
                with state.edit(t).applied(wb):
                    scores, probes = probe_scores(wb, records, stream, t, config.languages)
                    report(name, t, 0.95, "FLORES-200 perplexity")
                    ppl = perplexities(wb, sentences)
                s = state.steps[t - 1]
                _append(folder / STEPS_FILE, {
                    "step": t, "language": step.language, "edits": sum(x.n for x in state.steps[:t]),
                    "records": step.records, "seconds": s.meta.get("seconds", {}),
                    "measure_seconds": round(time.perf_counter() - t0, 3),
                    "nullspace": {str(k): v for k, v in s.nullspace.items()}, "scores": scores, "perplexity": ppl,
                    "notes": s.meta.get("notes", []), "probes": probes})
                measured[name].add(t)
                report(name, t, 1.0, "step done")
    done = {name: len(state) for name, state in states.items()}
    return RunResult(out, names, done, time.perf_counter() - started)


# ================================================================== reading a run (the app, the CLI's tables)


@dataclass
class RunView:
    """A run folder read back: configuration, baseline and every method's measured steps."""

    folder: Path
    info: dict[str, Any]
    baseline: dict[str, Any] | None
    steps: dict[str, list[dict[str, Any]]]

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config", {})

    @property
    def languages(self) -> list[str]:
        return list(self.config.get("languages", []))

    @property
    def stream(self) -> list[dict[str, Any]]:
        return list(self.info.get("stream", []))


def read_run(out: str | Path) -> RunView:
    out = Path(out)
    if not is_run_folder(out):
        raise InputError(f"{out} holds no sequential run (no {RUN_JSON}).")
    info = _read_json(out / RUN_JSON)
    baseline = _read_json(out / BASELINE_JSON) if (out / BASELINE_JSON).is_file() else None
    steps = {m: read_steps(out / m) for m in info.get("methods", []) if (out / m).is_dir()}
    return RunView(out, info, baseline, steps)


def _batch_languages(view: RunView) -> dict[int, str]:
    return {int(s["index"]): s["language"] for s in view.stream}


def curve_rows(view: RunView) -> list[dict[str, Any]]:
    """Per method, step and edit language (and "all"): each metric over the edits so far, asked in their own
    language; the pre-edited value of the same edits beside it (step 0 is the unedited model)."""
    langs = _batch_languages(view)
    base = {(int(r["batch"]), r["probe"]): r for r in (view.baseline or {}).get("scores", [])}
    out = []
    for method, rows in view.steps.items():
        for row in rows:
            t = int(row["step"])
            own = [r for r in row["scores"] if langs.get(int(r["batch"])) == r["probe"]]
            groups: dict[str, list[dict[str, Any]]] = {"all": own}
            for r in own:
                groups.setdefault(r["probe"], []).append(r)
            for lang, rs in groups.items():
                n = sum(r["n"] for r in rs)
                entry = {"method": method, "step": t, "edits": int(row["edits"]), "language": lang}
                for kind in KINDS:
                    vals = [(r[kind], r["n"]) for r in rs if r[kind] is not None]
                    entry[kind] = sum(v * w for v, w in vals) / sum(w for _, w in vals) if vals else None
                    bvals = [(base[(int(r["batch"]), r["probe"])][kind], r["n"]) for r in rs
                             if (int(r["batch"]), r["probe"]) in base and base[(int(r["batch"]), r["probe"])][kind]
                             is not None]
                    entry[f"{kind}_unedited"] = (sum(v * w for v, w in bvals) / sum(w for _, w in bvals)
                                                 if bvals else None)
                entry["n"] = n
                out.append(entry)
    return out


def final_rows(view: RunView) -> list[dict[str, Any]]:
    """The last measured step of each method per language (and "mean" over languages), with the FLORES
    perplexity change against the unedited model, plus a "Pre-edited" row per language."""
    curves = curve_rows(view)
    ppl0 = (view.baseline or {}).get("perplexity", {})
    out: list[dict[str, Any]] = []
    pre: dict[tuple[str, int], dict[str, Any]] = {}   # the unedited model on the same edits, once each
    for method, rows in view.steps.items():
        if not rows:
            continue
        last = rows[-1]
        t = int(last["step"])
        for lang in view.languages + ["all"]:
            match = [c for c in curves if c["method"] == method and c["step"] == t and c["language"] == lang]
            if not match:
                continue
            c = match[0]
            ppl = last.get("perplexity", {})
            if lang == "all":
                change = [100 * (ppl[x] / ppl0[x] - 1) for x in ppl if x in ppl0]
                dppl = sum(change) / len(change) if change else None
            else:
                dppl = 100 * (ppl[lang] / ppl0[lang] - 1) if lang in ppl and lang in ppl0 else None
            out.append({"method": method, "step": t, "edits": c["edits"], "language": lang,
                        **{k: c[k] for k in KINDS}, "ppl_change_pct": dppl})
            pre.setdefault((lang, c["edits"]), {"method": "unedited", "step": 0, "edits": c["edits"], "language": lang,
                                                **{k: c[f"{k}_unedited"] for k in KINDS}, "ppl_change_pct": 0.0})
    return list(pre.values()) + out


def retention_rows(view: RunView) -> list[dict[str, Any]]:
    """The first batch's efficacy (in its own language) after every step, per method."""
    langs = _batch_languages(view)
    first = langs.get(1)
    out = []
    for method, rows in view.steps.items():
        for row in rows:
            for r in row["scores"]:
                if int(r["batch"]) == 1 and r["probe"] == first:
                    out.append({"method": method, "step": int(row["step"]), "edits": int(row["edits"]),
                                "language": first, **{k: r[k] for k in KINDS}})
    return out


def interference_matrix(view: RunView, method: str, kind: str = "efficacy", step: int | None = None,
                        relative_to: str = "value") -> tuple[list[str], list[str], list[list[float | None]]]:
    """Rows: the batches ("step t · language"); columns: probe languages; cells: ``kind`` at ``step`` (the
    last by default). ``relative_to``: "value" (as is), "unedited" (minus the unedited model's) or "own step"
    (minus the value right after that batch was edited: what later batches did to it)."""
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    rows = view.steps.get(method, [])
    if not rows:
        return [], view.languages, []
    by_step = {int(r["step"]): r for r in rows}
    t = max(by_step) if step is None else int(step)
    if t not in by_step:
        raise InputError(f"{method} has no measured step {t}.")
    langs = _batch_languages(view)
    cell = {(int(r["batch"]), r["probe"]): r[kind] for r in by_step[t]["scores"]}
    base = {(int(r["batch"]), r["probe"]): r[kind] for r in (view.baseline or {}).get("scores", [])}
    labels, matrix = [], []
    for b in sorted({int(r["batch"]) for r in by_step[t]["scores"]}):
        labels.append(f"step {b} · {langs.get(b, '?')}")
        line = []
        for p in view.languages:
            v = cell.get((b, p))
            if v is not None and relative_to == "unedited":
                v = v - base[(b, p)] if base.get((b, p)) is not None else None
            elif v is not None and relative_to == "own step":
                own = {(int(r["batch"]), r["probe"]): r[kind] for r in by_step.get(b, {}).get("scores", [])}
                v = v - own[(b, p)] if own.get((b, p)) is not None else None
            line.append(v)
        matrix.append(line)
    return labels, view.languages, matrix


def nullspace_rows(view: RunView) -> list[dict[str, Any]]:
    out = []
    for method, rows in view.steps.items():
        for row in rows:
            for layer, dim in (row.get("nullspace") or {}).items():
                out.append({"method": method, "step": int(row["step"]), "language": row["language"],
                            "layer": int(layer), "nullspace_dim": dim})
    return out


def seconds_rows(view: RunView) -> list[dict[str, Any]]:
    out = []
    for method, rows in view.steps.items():
        if rows:
            total = [r["seconds"].get("total", 0.0) for r in rows]
            targets = [r["seconds"].get("targets", 0.0) for r in rows]
            out.append({"method": method, "steps": len(rows), "s_per_batch": sum(total) / len(total),
                        "target_s_per_batch": sum(targets) / len(targets),
                        "measure_s_per_step": sum(r.get("measure_seconds", 0.0) for r in rows) / len(rows)})
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report(view: RunView) -> str:
    """The run's tables as Markdown: the final table per method and language, the first batch's retention,
    the null-space rank at the last step, and the seconds per batch."""
    cfg = view.config
    lines = [f"# Sequential editing: {', '.join(view.steps)} on {view.info.get('model', {}).get('name', '?')}",
             "",
             f"Stream: {cfg.get('steps')} steps of {cfg.get('batch')} edits ({cfg.get('order')}, seed {cfg.get('seed')}), "
             f"languages {', '.join(view.languages)}, records {cfg.get('records') or 'all'} of {cfg.get('dataset')}.",
             "Efficacy / Generality / Specificity: teacher-forced top-1 accuracy (%) of the answer tokens over all "
             "edits so far, each asked in its own language. ΔPPL: FLORES-200 perplexity change against the "
             "unedited model (%).", ""]
    final = final_rows(view)
    if final:
        lines += ["## After the last step", "", "| method | edits | language | Efficacy | Generality | Specificity "
                  "| ΔPPL % |", "|---|---|---|---|---|---|---|"]
        for r in final:
            lines.append(f"| {r['method']} | {r['edits']} | {'mean' if r['language'] == 'all' else r['language']} | "
                         f"{_fmt(r['efficacy'])} | {_fmt(r['generality'])} | {_fmt(r['specificity'])} | "
                         f"{_fmt(r['ppl_change_pct'])} |")
        lines.append("")
    retention = retention_rows(view)
    if retention:
        lines += ["## The first batch's efficacy after every step (negative interference)", "",
                  "| method | " + " | ".join(f"step {t}" for t in sorted({r['step'] for r in retention})) + " |",
                  "|---|" + "---|" * len({r['step'] for r in retention})]
        for method in view.steps:
            vals = {r["step"]: r["efficacy"] for r in retention if r["method"] == method}
            if vals:
                lines.append(f"| {method} | " + " | ".join(_fmt(vals.get(t)) for t in sorted(
                    {r['step'] for r in retention})) + " |")
        lines.append("")
    ns = nullspace_rows(view)
    if ns:
        lines += ["## Null-space rank kept per layer (at each method's last step)", "",
                  "| method | " + " | ".join(f"layer {x}" for x in sorted({r['layer'] for r in ns})) + " |",
                  "|---|" + "---|" * len({r['layer'] for r in ns})]
        for method in view.steps:
            mine = [r for r in ns if r["method"] == method]
            if mine:
                last = max(r["step"] for r in mine)
                dims = {r["layer"]: r["nullspace_dim"] for r in mine if r["step"] == last}
                lines.append(f"| {method} | " + " | ".join("–" if dims.get(x) is None else str(dims[x])
                                                          for x in sorted({r['layer'] for r in ns})) + " |")
        lines.append("")
    secs = seconds_rows(view)
    if secs:
        lines += ["## Seconds", "", "| method | steps | s per batch | of which target values | measuring, s per step |",
                  "|---|---|---|---|---|"]
        for r in secs:
            lines.append(f"| {r['method']} | {r['steps']} | {r['s_per_batch']:.1f} | {r['target_s_per_batch']:.1f} | "
                         f"{r['measure_s_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def rollback_run(out: str | Path, step: int) -> dict[str, int]:
    """Roll every method's saved state in the run folder back to ``step`` and drop its later measurements.

    A later ``run_sequential`` with the same configuration recomputes the dropped steps."""
    out = Path(out)
    if not is_run_folder(out):
        raise InputError(f"{out} holds no sequential run (no {RUN_JSON}).")
    info = _read_json(out / RUN_JSON)
    kept: dict[str, int] = {}
    for method in info.get("methods", []):
        state_dir = out / method / "state"
        if not (state_dir / "state.json").is_file():
            continue
        state = SequentialState.load(state_dir)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= len(state):
            raise InputError(f"--rollback must be a step from 0 to {len(state)} ({method} has {len(state)}); "
                             f"got {step!r}.")
        state.rollback(step)
        state.save(state_dir)
        rows = [r for r in read_steps(out / method) if int(r["step"]) <= step]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        tmp = out / method / f".{STEPS_FILE}.tmp-{time.time_ns()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / method / STEPS_FILE)
        kept[method] = step
    return kept


def sequential_figures(view: RunView) -> dict[str, Any]:
    """The run's figures by file stem: the curves of each metric, each method's interference matrix (efficacy,
    after the last step and as the change since each batch's own step) and the null-space ranks."""
    import pandas as pd

    from analysis import stream_figures as sf

    curves = pd.DataFrame(curve_rows(view))
    figs: dict[str, Any] = {}
    if curves.empty:
        return figs
    for metric in sf.METRIC_TITLES:
        figs[f"curves_{metric}"] = sf.curves_figure(curves, metric, list(view.steps))
    for method in view.steps:
        for rel, suffix, title in (("value", "", ""), ("own step", "_change", " − right after its own step")):
            labels, langs, matrix = interference_matrix(view, method, "efficacy", relative_to=rel)
            if labels:
                figs[f"interference_{method}{suffix}"] = sf.interference_figure(
                    labels, langs, matrix, f"{method}: Efficacy{title}", diverging=rel != "value")
    figs["nullspace"] = sf.nullspace_figure(pd.DataFrame(nullspace_rows(view)))
    return figs
