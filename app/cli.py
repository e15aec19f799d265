"""The `neuroglot` command line: headless access to what the app does.

Every error a user can cause is printed as one line, exit code 2 (app/cli_errors.py); Ctrl-C prints one
line, exit code 130. Output paths are checked before any work and written atomically (app/cli_outputs.py):
a folder of another request or command is replaced only with --overwrite; nothing earlier is ever lost.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from analysis.attribution import AttributionParams
from analysis.causal_trace import TraceParams
from analysis.errors import InputError, NeuroglotError
from analysis.neurons import CountParams
from app import forms
from app.cli_errors import on_interrupt, user_errors
from app.cli_outputs import claim_out, save_figures, save_parquet, save_table
from app.forms import parse_layers, per_language, read_json, split_list

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Neuroglot: multilingual neurons and knowledge edits in LLMs.")

ModelOpt = typer.Option("embedded", "--model", "-m",
                        help="'embedded' (Gemma 3 270M), a Hugging Face id, a checkpoint folder or a .gguf file.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16.")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Allow the checkpoint's own Python code to run.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an --out folder that holds another request's or "
                                                       "another command's results (refused otherwise).")

# The fact of `edit` and `compare` (fact_request): one edit request, given one way.
RequestOpt = typer.Option(None, "--request", help="JSON file (or inline JSON) of one edit request: {facts: {LANG: "
                                                  "{prompt, subject, target_new, ...}}}.")
RecordOpt = typer.Option(None, "--record", help="A data-set record instead: its id (mzsre:5, mlake:...) or its "
                                                "number.")
DatasetOpt = typer.Option(Path("../shared/data/mzsre/dev"), "--dataset", help="MzsRE or MLaKE folder for --record.")
PromptOpt = typer.Option(None, "--prompt", help="Type the fact: LANG:QUESTION (repeat per language; more per "
                                                "language = paraphrases).")
SubjectOpt = typer.Option(None, "--subject", help="LANG:SUBJECT (in the prompt).")
TargetOpt = typer.Option(None, "--target", help="LANG:NEW ANSWER.")
OldOpt = typer.Option(None, "--old", help="LANG:OLD ANSWER (optional).")
ParaphraseOpt = typer.Option(None, "--paraphrase", help="LANG:PARAPHRASE (repeat).")
LocalityOpt = typer.Option(None, "--locality", help="LANG:QUESTION|ANSWER (repeat).")
PortabilityOpt = typer.Option(None, "--portability", help="LANG:QUESTION|ANSWER (repeat).")


def record_languages_opt(default: str) -> typer.models.OptionInfo:
    """--languages of --record; each command has its own default."""
    return typer.Option(default, "--languages", "-l", help="Languages of --record.")


@cli.command()
@user_errors
def info(model: str = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
         trust_remote_code: bool = TrustOpt) -> None:
    """Load a model and print its family, layers, neurons per layer, parameters, device and dtype."""
    from analysis.model import load_model

    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    s = wb.summary()
    rows = [
        ("model", s["name"]),
        ("family", s["family"]),
        ("layers", s["layers"]),
        ("neurons per layer", s["neurons_per_layer"]),
        ("neurons in all", s["neurons_total"]),
        ("hidden size", s["d_model"]),
        ("vocabulary", s["vocab_size"]),
        ("parameters", f"{s['parameters']:,} ({s['parameters'] / 1e6:.1f}M)"),
        ("device", s["device"]),
        ("dtype", s["dtype"]),
        ("load time", f"{s['load_seconds']:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@cli.command()
@user_errors
def corpus(corpus: str = typer.Option("demo", "--corpus", "-c",
                                      help="'demo', a ParaRel/mParaRel folder, an X-FACTR csv, or a JSONL/CSV file."),
           languages: Optional[str] = typer.Option(None, "--languages", "-l", help="Comma-separated, e.g. en,zh,de."),
           relations: Optional[str] = typer.Option(None, "--relations", "-r", help="Comma-separated, e.g. P36,P37."),
           aligned: bool = typer.Option(False, "--aligned", help="Count only facts present in every chosen language."),
           ) -> None:
    """Print the number of facts per relation x language of a corpus."""
    from data import load_corpus

    corp = load_corpus(corpus, languages=split_list(languages), relations=split_list(relations))
    langs = split_list(languages)
    if aligned:
        if not langs or len(langs) < 2:
            raise InputError("--aligned needs at least two --languages.")
        corp = corp.aligned(langs)
    table = corp.counts(margins=True)
    typer.echo(f"{corp.name}: {corp.summary()}")
    typer.echo(table.to_string())


@cli.command()
@user_errors
def neurons(model: str = ModelOpt,
            corpus: str = typer.Option("demo", "--corpus", "-c", help="Corpus spec (see `neuroglot corpus`)."),
            languages: str = typer.Option("en,zh", "--languages", "-l", help="Comma-separated, at least two."),
            beta: float = typer.Option(0.1, "--beta", "-b", help="lu-lafns Eq. 5 threshold β in [0, 1]."),
            out: Path = typer.Option(..., "--out", "-o", help="Run folder to write (reused if the request is the same)."),
            positions: str = typer.Option(CountParams.positions, "--positions",
                                          help="Tokens counted: all, subject or last."),
            text: str = typer.Option(CountParams.text, "--text",
                                     help="statement (full sentence, as the paper) or prompt."),
            relations: Optional[str] = typer.Option(None, "--relations", "-r", help="Comma-separated relation ids."),
            max_facts: Optional[int] = typer.Option(None, "--max-facts", help="Facts per relation (sampled, seed 0)."),
            aligned: bool = typer.Option(True, "--aligned/--all-facts", help="Keep only facts present in every language."),
            batch_size: int = typer.Option(CountParams.batch_size, "--batch-size"),
            png: bool = typer.Option(True, "--png/--no-png", help="Also write PNG figures (needs Chromium)."),
            overwrite: bool = OverwriteOpt,
            device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """Neuron atlas: count activations, find factual / language-agnostic / language-specific neurons, write figures."""
    from tqdm import tqdm

    from analysis import figures
    from analysis import neurons as nr
    from analysis.model import load_model
    from data import load_corpus

    langs = split_list(languages) or []
    if len(langs) < 2:
        raise InputError("--languages needs at least two languages, e.g. en,zh.")
    nr.check_beta(beta)
    if positions not in nr.POSITIONS:
        raise InputError(f"--positions must be one of {', '.join(nr.POSITIONS)}.")
    if text not in nr.TEXTS:
        raise InputError(f"--text must be statement or prompt; got {text!r}.")
    corp = load_corpus(corpus, languages=langs, relations=split_list(relations), max_facts=max_facts)
    if aligned:
        corp = corp.aligned(langs)
    claim_out(out, "neurons", nr.atlas_request(model, corp, langs, positions, text), overwrite)
    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with tqdm(total=1, unit="text", desc="tracing") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        counts, folder, reused = nr.atlas_counts(wb, corp, langs, positions=positions, text=text, folder=out,
                                                 batch_size=batch_size, progress=progress, overwrite=overwrite)
    on_interrupt(f"the counts in {folder} are complete; the tables and figures written so far are complete "
                 "files (run the command again for the rest).")
    typer.echo(f"{'read' if reused else 'wrote'} counts: {folder} ({counts.summary()})")
    table = nr.neuron_set_table(counts, beta)
    save_table(table, folder / f"neurons_per_layer_beta{beta:g}.csv", index=False)
    save_parquet(nr.neuron_list(counts, beta), folder / f"neurons_beta{beta:g}.parquet")
    factual = nr.factual_neurons(counts, beta)
    sweep = nr.beta_sweep(counts)
    save_table(sweep, folder / "beta_sweep.csv", index=False)
    figs = {
        f"neurons_per_layer_beta{beta:g}": figures.neurons_per_layer(table, counts.n_neurons),
        f"overlap_beta{beta:g}": figures.overlap_heatmap(nr.jaccard_overlap(factual)),
        f"overlap_by_layer_beta{beta:g}": figures.overlap_by_layer(nr.overlap_by_layer(factual)),
        "beta_sweep": figures.beta_sweep(sweep, counts.n_neurons),
        "lape": figures.lape_distribution(nr.lape(counts), np.logical_or.reduce(
            list(nr.lape_specific_neurons(counts).values()))),
    }
    save_figures(folder, figs, png)
    wide = table.pivot(index="layer", columns="set", values="count")
    typer.echo(wide.to_string())
    lafn = wide[nr.LAFN]
    top = lafn.sort_values(ascending=False).head(3)
    typer.echo(f"LAFNs (β={beta:g}) peak at layer(s) {', '.join(str(i) for i in top.index)} "
               f"({', '.join(f'{v:,}' for v in top.values)} of {counts.n_neurons:,} neurons)")
    typer.echo(f"figures: {', '.join(sorted(figs))} → {folder}")


@cli.command()
@user_errors
def attribute(model: str = ModelOpt,
              corpus: str = typer.Option("demo", "--corpus", "-c", help="Corpus spec (see `neuroglot corpus`)."),
              languages: str = typer.Option("en,zh", "--languages", "-l", help="Comma-separated."),
              max_facts: int = typer.Option(AttributionParams.max_facts, "--max-facts",
                                            help="Facts (round-robin over relations)."),
              facts: Optional[str] = typer.Option(None, "--facts", help="Comma-separated fact ids instead."),
              relations: Optional[str] = typer.Option(None, "--relations", "-r", help="Comma-separated relation ids."),
              prompts_per_fact: Optional[int] = typer.Option(None, "--prompts-per-fact",
                                                             help="Paraphrases per fact and language (default all)."),
              prompt: Optional[list[str]] = typer.Option(None, "--prompt",
                                                         help="Type a fact instead: LANG:PROMPT, repeat per "
                                                              "language/paraphrase."),
              target: Optional[list[str]] = typer.Option(None, "--target", help="LANG:ANSWER for each typed language."),
              out: Path = typer.Option(..., "--out", "-o", help="Run folder to write (reused if the request is the same)."),
              threshold: float = typer.Option(AttributionParams.threshold, "--threshold", "-t",
                                              help="Per prompt: ≥ t × the prompt's max."),
              share: float = typer.Option(AttributionParams.share, "--share", "-p",
                                          help="Per fact: in ≥ p of its prompts."),
              steps: int = typer.Option(AttributionParams.steps, "--steps", help="Integration steps m."),
              method: str = typer.Option(AttributionParams.method, "--method",
                                         help="riemann_right (Dai et al.) or gausslegendre, riemann_trapezoid, ..."),
              target_tokens: str = typer.Option(AttributionParams.target_tokens, "--target-tokens",
                                                help="first or mean."),
              layers: Optional[str] = typer.Option(None, "--layers", help="e.g. 0-5,9 (default all)."),
              max_rows: int = typer.Option(AttributionParams.max_rows, "--max-rows",
                                           help="Rows (layers × steps) per forward."),
              png: bool = typer.Option(True, "--png/--no-png", help="Also write PNG figures (needs Chromium)."),
              overwrite: bool = OverwriteOpt,
              device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """Knowledge neurons by integrated gradients (MEMLA Eq. 1-4) per language: independent vs specific."""
    from tqdm import tqdm

    from analysis import attribution as at
    from analysis import fact_figures
    from analysis.model import load_model
    from data import load_corpus

    at.check_fraction(threshold, "The attribution threshold t")  # before loading anything
    at.check_fraction(share, "The prompt share p")
    typed = per_language(prompt, "--prompt")
    if typed:
        answers = per_language(target, "--target")
        missing = sorted(set(typed) - set(answers))
        if missing:
            raise InputError(f"Give the answer for {', '.join(missing)} too (--target {missing[0]}:...).")
        table = forms.typed_prompt_table(forms.typed_facts(typed, answers=answers))
        langs = list(typed)
        source = "typed"
    else:
        if target:
            raise InputError("--target goes with --prompt (a typed fact).")
        langs = split_list(languages) or []
        if not langs:
            raise InputError("--languages needs at least one language.")
        corp = load_corpus(corpus, languages=langs, relations=split_list(relations))
        table = at.fact_prompts(corp, langs, max_facts=max_facts, prompts_per_fact=prompts_per_fact,
                                fact_ids=split_list(facts))
        source = corp.name
    at.check_method(method, steps, target_tokens)
    claim_out(out, "attribute", at.attribution_request(model, table, steps, method, target_tokens), overwrite)
    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    chosen = parse_layers(layers, wb.n_layers)
    with tqdm(total=len(table), unit="prompt", desc="integrated gradients") as bar:
        def progress(frac: float, message: str) -> None:
            bar.n = round(frac * len(table))
            bar.refresh()

        run, folder, reused = at.attribution_run(wb, table, layers=chosen, steps=steps, method=method,
                                                 target_tokens=target_tokens, max_rows=max_rows, folder=out,
                                                 progress=progress, extra_meta={"corpus": source},
                                                 overwrite=overwrite)
    on_interrupt(f"the attributions in {folder} are complete; the tables and figures written so far are complete "
                 "files (run the command again for the rest).")
    typer.echo(f"{'read' if reused else 'wrote'} attributions: {folder} ({run.summary()})")
    counts = run.set_counts(threshold, share)
    per_layer = run.per_layer(threshold, share)
    save_table(counts, folder / f"knowledge_neurons_t{threshold:g}_p{share:g}.csv", index=False)
    save_table(per_layer, folder / f"knowledge_neurons_per_layer_t{threshold:g}_p{share:g}.csv")
    tops = [run.top_neurons(f, threshold, share).assign(fact_id=f) for f in run.fact_ids]
    import pandas as pd

    save_table(pd.concat(tops, ignore_index=True), folder / f"top_neurons_t{threshold:g}_p{share:g}.csv", index=False)
    figs = {f"knowledge_neurons_by_layer_t{threshold:g}_p{share:g}":
            fact_figures.knowledge_neurons_by_layer(per_layer, run.languages),
            "attribution_strength": fact_figures.attribution_strength(run.mean_scores(), run.layers)}
    save_figures(folder, figs, png)
    shown = counts.drop(columns=["object"]).set_index("fact_id")
    typer.echo(shown.to_string())
    typer.echo(run.neuron_summary(threshold, share, counts))
    typer.echo(run.completeness_summary())
    typer.echo(f"figures: {', '.join(sorted(figs))} → {folder}")


@cli.command()
@user_errors
def trace(model: str = ModelOpt,
          prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="LANG:PROMPT of a typed fact (repeat per "
                                                                             "language)."),
          subject: Optional[list[str]] = typer.Option(None, "--subject", help="LANG:SUBJECT for each typed prompt."),
          answer: Optional[list[str]] = typer.Option(None, "--answer", help="LANG:ANSWER (default: the model's own "
                                                                             "prediction)."),
          corpus: str = typer.Option("demo", "--corpus", "-c", help="Corpus spec (see `neuroglot corpus`)."),
          languages: str = typer.Option("en,zh", "--languages", "-l", help="Comma-separated."),
          fact: Optional[str] = typer.Option(None, "--fact", help="One corpus fact id: heatmaps per language."),
          max_facts: int = typer.Option(TraceParams.max_facts, "--max-facts",
                                        help="Without --prompt/--fact: facts to average."),
          answer_from: str = typer.Option("object", "--answer-from", help="Corpus facts: object (the corpus answer) "
                                                                          "or model (its own prediction)."),
          kinds: str = typer.Option(",".join(TraceParams.kinds), "--kinds", help="Any of hidden, mlp, attn."),
          samples: int = typer.Option(TraceParams.samples, "--samples", help="Noise samples per cell."),
          noise: float = typer.Option(TraceParams.noise, "--noise",
                                      help="σ = noise × the std of the token embeddings."),
          window: int = typer.Option(TraceParams.window, "--window",
                                     help="Layers restored together for mlp and attn."),
          seed: int = typer.Option(TraceParams.seed, "--seed"),
          max_rows: int = typer.Option(TraceParams.max_rows, "--max-rows", help="Rows per forward."),
          out: Path = typer.Option(..., "--out", "-o", help="Run folder to write."),
          png: bool = typer.Option(True, "--png/--no-png", help="Also write PNG figures (needs Chromium)."),
          overwrite: bool = OverwriteOpt,
          device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """ROME-style causal tracing: heatmaps of one fact per language, or average effects over many facts."""
    from tqdm import tqdm

    from analysis import causal_trace as ct
    from analysis import fact_figures, figures
    from analysis.model import load_model
    from data import load_corpus

    chosen_kinds = split_list(kinds) or []
    bad = [k for k in chosen_kinds if k not in fact_figures.TRACE_KINDS]
    if bad or not chosen_kinds:
        raise InputError(f"--kinds takes hidden, mlp and attn; got {kinds!r}.")
    ct.check_parameters(chosen_kinds, samples, window, max_rows, seed, noise)
    if max_facts < 1:
        raise InputError(f"--max-facts must be at least 1; got {max_facts}.")
    typed = per_language(prompt, "--prompt")
    single: dict[str, tuple[str, str, Optional[str]]] = {}
    if typed:
        subjects, answers = per_language(subject, "--subject"), per_language(answer, "--answer")
        for lang, texts in typed.items():
            if lang not in subjects:
                raise InputError(f"Give the subject of the {lang} prompt too (--subject {lang}:...).")
            single[lang] = (texts[0], subjects[lang][0], (answers.get(lang) or [None])[0])
    elif subject or answer:
        raise InputError("--subject and --answer go with --prompt (a typed fact).")
    langs = split_list(languages) or []
    corp = None
    if not typed:
        if not langs:
            raise InputError("--languages needs at least one language.")
        if answer_from not in ct.ANSWERS:
            raise InputError("--answer-from must be object or model.")
        corp = load_corpus(corpus, languages=langs)
        if fact:
            single = {lang: (p, s, o if answer_from == "object" else None)
                      for lang, (p, s, o) in ct.fact_prompt(corp.rows, fact, langs).items()}
    fmt = ("html", "png") if png else ("html",)
    if single:
        from analysis import runs

        request = {"model": model.strip(), "dtype": dtype, "facts": {k: list(v) for k, v in single.items()},
                   "kinds": chosen_kinds, "samples": samples, "noise": noise, "window": window, "seed": seed}
        key = runs.request_key(request)
        claim_out(out, "trace", request, overwrite, key=key)
        wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        traces, figs = {}, {}
        for lang, (text, subj, ans) in single.items():
            with tqdm(total=100, desc=f"tracing {lang}", unit="%") as bar:
                def progress(frac: float, message: str) -> None:
                    bar.n = round(100 * frac)
                    bar.refresh()

                result = ct.causal_trace(wb, text, subj, ans, kinds=chosen_kinds, samples=samples, noise=noise,
                                         window=window, seed=seed, max_rows=max_rows, progress=progress,
                                         language=lang)
            traces[lang] = [result]
            figs[f"trace_{lang}"] = fact_figures.causal_trace_heatmaps(
                result.tokens, result.subject_range, result.scores, result.p_clean, result.p_corrupted,
                result.answer, title=f"[{lang}] {text} → {result.answer.strip()}")
            typer.echo(f"{lang}: {text!r} → {result.answer!r}: {result.summary()}")

        def write(tmp: Path) -> None:
            ct.save_traces(tmp, traces, {"request": dict(request, model=wb.spec, key=key)})
            for name, fig in figs.items():
                figures.save_figure(fig, tmp / name, formats=fmt)

        runs.write_run(out, "trace", key, request, write)
        typer.echo(f"wrote traces and figures trace_<language> → {out}")
        return
    claim_out(out, "trace", dict(model=model.strip(), corpus=corp.name, languages=langs, max_facts=max_facts, seed=seed,
                                 kinds=chosen_kinds, samples=samples, noise=float(noise), window=window), overwrite)
    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with tqdm(total=100, desc="tracing facts", unit="%") as bar:
        def progress(frac: float, message: str) -> None:
            bar.n = round(100 * frac)
            bar.refresh()

        traces, folder, reused = ct.trace_run(wb, corp, langs, max_facts=max_facts, kinds=chosen_kinds,
                                              samples=samples, noise=noise, window=window, seed=seed,
                                              answer=answer_from, folder=out, max_rows=max_rows, progress=progress,
                                              overwrite=overwrite)
    on_interrupt(f"the traces in {folder} are complete; the figures written so far are complete files.")
    effects = {lang: {k: ct.average_effects(traces[lang], k) for k in chosen_kinds} for lang in langs if traces[lang]}
    if not effects:
        raise InputError("No fact could be traced (no prompt contains its subject).")
    for lang, per_kind in effects.items():
        for k, frame in per_kind.items():
            save_table(frame, folder / f"average_effect_{lang}_{k}.csv")
    save_figures(folder, {"average_effects": fact_figures.average_effect_heatmaps(effects)}, png)
    typer.echo(f"{'read' if reused else 'wrote'} traces: {folder} ({traces.summary()})")
    for lang, per_kind in effects.items():
        for k, frame in per_kind.items():
            cat, layer = np.unravel_index(np.nanargmax(frame.to_numpy(dtype=float)), frame.shape)
            typer.echo(f"{lang} {k}: strongest average effect {frame.iat[cat, layer]:.4f} at "
                       f"{frame.index[cat]}, layer {frame.columns[layer]}")
    typer.echo(f"figure: average_effects → {folder}")


def fact_request(request, record, dataset, languages, prompt, subject, target, old, paraphrase, locality,
                 portability):
    """The fact of `edit` and `compare`, given one way: --request, --record (of --dataset) or typed options."""
    from editors.requests import EditRequest

    sources = sum(x is not None and x != [] for x in (request, record, prompt))
    if sources != 1:
        raise InputError("Give the fact one way: --request FILE, --record ID or --prompt/--subject/--target.")
    if request is not None:
        data = read_json(request, "--request")
        if not isinstance(data, dict):
            raise InputError("--request must hold one JSON object (an edit request).")
        req = EditRequest.from_dict(data)
    elif record is not None:
        from data.edit_records import load_edit_records

        langs = split_list(languages) or []
        records = load_edit_records(dataset)
        found = [r for r in records if r.record_id == record.strip()]
        if not found:
            index = forms.record_index(record)
            if index >= len(records):
                raise InputError(f"--record {record}: {dataset} has {len(records)} records (0 to "
                                 f"{len(records) - 1}).")
            found = [records[index]]
        req = EditRequest.from_record(found[0], langs)
    else:
        req = forms.edit_request_from_options(prompt, subject, target, old, paraphrase, locality, portability)
    return req


@cli.command()
@user_errors
def edit(model: str = ModelOpt,
         method: str = typer.Option("lu-lafns", "--method", help="Editor (see --list)."),
         request: Optional[str] = RequestOpt,
         record: Optional[str] = RecordOpt,
         dataset: Path = DatasetOpt,
         languages: str = record_languages_opt("en,zh"),
         prompt: Optional[list[str]] = PromptOpt,
         subject: Optional[list[str]] = SubjectOpt,
         target: Optional[list[str]] = TargetOpt,
         old: Optional[list[str]] = OldOpt,
         paraphrase: Optional[list[str]] = ParaphraseOpt,
         locality: Optional[list[str]] = LocalityOpt,
         portability: Optional[list[str]] = PortabilityOpt,
         hparams: Optional[str] = typer.Option(None, "--hparams", help="JSON object (or file) of hyper-parameter "
                                                                        "values over the preset."),
         preset: Optional[str] = typer.Option(None, "--preset", help="Use another model's preset by name."),
         save: Optional[Path] = typer.Option(None, "--save", help="Write the edit to this folder (safetensors + JSON)."),
         list_editors: bool = typer.Option(False, "--list", help="List the editors and exit."),
         device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """Edit one fact in several languages and print every probe's answer before and after, per language."""
    import pandas as pd

    from editors.base import available_editors
    from editors.evaluate import before_after

    if list_editors:
        typer.echo("\n".join(available_editors()))
        return
    if save is not None:
        from editors.edit import check_save_folder

        check_save_folder(save, "--save")  # before the edit is computed, not after
        on_interrupt(f"{save} is as it was before this command (nothing was saved).")
    req = fact_request(request, record, dataset, languages, prompt, subject, target, old, paraphrase, locality,
                       portability)
    from analysis.model import load_model

    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    from editors.base import get_editor

    req = req.validate(wb, get_editor(method).needs_subject)
    editor = forms.editor_with(wb, method, hparams, preset)
    typer.echo(f"editing {', '.join(req.languages)} with {editor.name} ...")
    started = time.perf_counter()
    result = editor.compute(wb, req)
    typer.echo(f"computed in {time.perf_counter() - started:.1f} s: {result}")
    table = before_after(wb, req, result)
    with pd.option_context("display.max_colwidth", 48, "display.width", 200):
        for lang, part in table.groupby("language", sort=False):
            typer.echo(f"\n[{lang}]")
            shown = part.drop(columns=["language"]).copy()
            for col in ("P(new) before", "P(new) after", "F1 after", "EM after"):
                shown[col] = shown[col].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.3f}")
            typer.echo(shown.to_string(index=False))
    if save is not None:
        folder = result.save(save)  # atomic: an interruption leaves the earlier edit in place
        typer.echo(f"\nsaved the edit: {folder}")


@cli.command()
@user_errors
def compare(model: str = ModelOpt,
            methods: str = typer.Option("lu-lafns,memla,langedit,mpn", "--methods",
                                        help="Editors, comma-separated (see `neuroglot edit --list`)."),
            request: Optional[str] = RequestOpt,
            record: Optional[str] = RecordOpt,
            dataset: Path = DatasetOpt,
            languages: str = record_languages_opt("en,zh,de"),
            prompt: Optional[list[str]] = PromptOpt,
            subject: Optional[list[str]] = SubjectOpt,
            target: Optional[list[str]] = TargetOpt,
            old: Optional[list[str]] = OldOpt,
            paraphrase: Optional[list[str]] = ParaphraseOpt,
            locality: Optional[list[str]] = LocalityOpt,
            portability: Optional[list[str]] = PortabilityOpt,
            hparams: Optional[str] = typer.Option(None, "--hparams", help="JSON object (or file) {editor: {field: "
                                                                           "value}} over each editor's preset."),
            test_languages: Optional[str] = typer.Option(None, "--test-languages",
                                                         help="Languages to probe (default: the fact's)."),
            transfer: bool = typer.Option(False, "--transfer", help="Also edit each language alone and all "
                                                                    "together: the transfer matrices."),
            out: Optional[Path] = typer.Option(None, "--out", help="Write the grid, summary, timings, transfer "
                                                                   "matrices, figures and every edit (zip) here."),
            png: bool = typer.Option(False, "--png", help="Also write the figures as PNG (needs Chromium)."),
            overwrite: bool = OverwriteOpt,
            device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """Every editor on one fact in several languages, side by side (the Compare page, headless).

    Edits are cached on disk per model, editor, hyper-parameters and request: a second run reads them back."""
    import pandas as pd
    from tqdm import tqdm

    from analysis import fact_figures, figures, runs
    from analysis.run_figures import transfer_heatmap
    from editors import compare as cmp

    names = split_list(methods) or []
    if not names:
        raise InputError("--methods needs at least one editor.")
    overrides = read_json(hparams, "--hparams") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputError("--hparams must be one JSON object {editor: {field: value}}.")
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise InputError(f"--hparams names editor(s) not in --methods: {', '.join(unknown)}.")
    req = fact_request(request, record, dataset, languages, prompt, subject, target, old, paraphrase, locality,
                       portability)
    tests = split_list(test_languages) if test_languages else None
    job = {"model": model.strip(), "dtype": dtype, "request": req.to_dict(), "methods": names,
           "hparams": overrides, "test_languages": tests, "transfer": transfer}
    key = runs.request_key(job)
    if out is not None:
        claim_out(out, "compare", job, overwrite, key=key)
    from analysis.model import load_model
    from editors.base import get_editor

    for name in names:
        get_editor(name)                   # an unknown editor is refused before the model loads
    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with tqdm(total=100, desc="comparing", unit="%") as bar:
        def progress(frac: float, message: str) -> None:
            bar.n = round(100 * frac)
            bar.set_postfix_str(message[:60])
            bar.refresh()

        result = cmp.compare(wb, req, {n: overrides.get(n) for n in names}, tests, progress=progress,
                             on_error="raise")
    timing = cmp.timing_table(result)
    typer.echo(timing.to_string(index=False))
    grid = cmp.probe_grid(result)
    shown = grid[["language", "probe"] + [c for c in grid.columns if c.endswith(" · answer")]]
    with pd.option_context("display.max_colwidth", 28, "display.width", 220):
        for lang, part in shown.groupby("language", sort=False):
            typer.echo(f"\n[{lang}]")
            typer.echo(part.drop(columns=["language"]).to_string(index=False))
    summary = cmp.summary_table(result)
    wide = summary.pivot_table(index=["method", "kind"], columns="language", values="success", sort=False)
    typer.echo("\nmean success (token F1 %) per editor, probe kind and language:")
    typer.echo(wide.round(1).to_string())
    figs = {"summary": fact_figures.compare_summary(summary)}
    matrices = {}
    if transfer:
        with tqdm(total=100, desc="transfer matrices", unit="%") as bar:
            def progress(frac: float, message: str) -> None:
                bar.n = round(100 * frac)
                bar.set_postfix_str(message[:60])
                bar.refresh()

            found = cmp.transfer_matrix_runs(wb, req, {n: overrides.get(n) for n in names}, progress=progress)
        for method, per_set in found.items():
            for label, run in per_set.items():
                if isinstance(run, str):
                    typer.echo(f"{method} editing {label}: {run}", err=True)
            matrices[method] = matrix = cmp.transfer_matrix(per_set, "top1")
            typer.echo(f"\n{method}: reliability top-1 % (edit languages × test languages)")
            typer.echo(matrix.round(1).to_string())
            figs[f"transfer_{method}"] = transfer_heatmap(matrix, f"{method}: edit language × test language",
                                                          "top-1 accuracy of the new target")
    if out is None:
        return
    edits = cmp.edits_zip(result.runs)

    def write(tmp: Path) -> None:
        grid.to_csv(tmp / "grid.csv", index=False)
        summary.to_csv(tmp / "summary.csv", index=False)
        timing.to_csv(tmp / "timing.csv", index=False)
        for method, matrix in matrices.items():
            matrix.to_csv(tmp / f"transfer_{method}.csv")
        (tmp / "edits.zip").write_bytes(edits)
        for name, fig in figs.items():
            figures.save_figure(fig, tmp / name, formats=("html", "png") if png else ("html",))

    runs.write_run(out, "compare", key, job, write)
    typer.echo(f"\nwrote grid.csv, summary.csv, timing.csv, {len(matrices)} transfer matrices, figures and "
               f"edits.zip → {out}")


@cli.command()
@user_errors
def overlap(model: str = ModelOpt,
            dataset: Path = typer.Option(Path("../shared/data/mzsre/dev"), "--dataset",
                                         help="MzsRE or MLaKE folder."),
            records: str = typer.Option("0-49", "--records", help="Record numbers, e.g. 0-49 or 0-9,20-29."),
            methods: str = typer.Option("lu-lafns,memla,langedit,mpn", "--methods", help="Editors, comma-separated."),
            hparams: Optional[str] = typer.Option(None, "--hparams", help="JSON object (or file) {editor: {field: "
                                                                           "value}} over each editor's preset."),
            edit_language: str = typer.Option("en", "--edit-language", help="The language each edit is made in."),
            test_languages: str = typer.Option("en,zh,de", "--test-languages",
                                               help="Languages of the fact's neurons and of the transfer."),
            beta: float = typer.Option(0.5, "--beta", help="lu-lafns Eq. 5 threshold of the fact's atlas neurons."),
            top_share: float = typer.Option(0.9, "--top-share", help="Per layer, the edit's top neurons carry this "
                                                                     "share of its weight."),
            out: Optional[Path] = typer.Option(None, "--out", help="Write points.csv, correlations.csv and the "
                                                                   "scatter figure here."),
            png: bool = typer.Option(False, "--png", help="Also write the figure as PNG (needs Chromium)."),
            overwrite: bool = OverwriteOpt,
            device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """Why edits transfer, over many records: each edit's share of weight on the fact's language-agnostic
    neurons against its cross-lingual transfer, one point per record and editor, with Spearman's ρ per editor.

    Edits come from (and go to) the Compare cache: an interrupted run goes on where it stopped."""
    import pandas as pd
    from tqdm import tqdm

    from analysis import fact_figures, figures, runs
    from data.edit_records import load_edit_records
    from editors import overlap as ov
    from editors.base import get_editor
    from editors.sequential_run import parse_ranges

    names = split_list(methods) or []
    if not names:
        raise InputError("--methods needs at least one editor.")
    for name in names:
        get_editor(name)
    overrides = read_json(hparams, "--hparams") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputError("--hparams must be one JSON object {editor: {field: value}}.")
    tests = split_list(test_languages) or []
    if edit_language not in tests:
        raise InputError(f"--edit-language {edit_language} must be one of --test-languages ({', '.join(tests)}).")
    if len(tests) < 2:
        raise InputError("--test-languages needs at least two languages (transfer is to the other ones).")
    ranges = parse_ranges(records)
    everything = load_edit_records(dataset)
    chosen = [r for i, r in enumerate(everything)
              if any(a <= i and (b is None or i <= b) for a, b in ranges) and all(lang in r.fields for lang in tests)]
    if not chosen:
        raise InputError(f"{dataset}: no record in {records} has all of {', '.join(tests)}.")
    job = {"model": model.strip(), "dtype": dtype, "dataset": str(dataset), "records": records, "methods": names,
           "hparams": overrides, "edit_language": edit_language, "test_languages": tests, "beta": beta,
           "top_share": top_share}
    key = runs.request_key(job)
    if out is not None:
        claim_out(out, "overlap", job, overwrite, key=key)
    from analysis.model import load_model

    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    typer.echo(f"{len(chosen)} records × {len(names)} editors, edit in {edit_language}, neurons and transfer over "
               f"{', '.join(tests)}")

    def results(points: pd.DataFrame):
        ok = points[~points["error"].astype(bool)] if "error" in points else points
        corr = ov.rank_correlations(ok)
        return corr, fact_figures.overlap_vs_transfer(ok, corr)

    def write_out(points: pd.DataFrame, corr: pd.DataFrame, fig, final: bool) -> None:
        def write(tmp: Path) -> None:
            points.to_csv(tmp / "points.csv", index=False)
            corr.to_csv(tmp / "correlations.csv", index=False)
            figures.save_figure(fig, tmp / "overlap_vs_transfer", formats=("html", "png") if png and final
                                else ("html",))

        runs.write_run(out, "overlap", key, job, write)

    parts: list[pd.DataFrame] = []
    chunk = 5        # the folder is rewritten every `chunk` records: an interrupted run keeps what it measured
    with tqdm(total=100, desc="overlap", unit="%") as bar:
        for start in range(0, len(chosen), chunk):
            def progress(frac: float, message: str, start: int = start) -> None:
                bar.n = round(100 * (start + frac * len(chosen[start:start + chunk])) / len(chosen))
                bar.set_postfix_str(message[:60])
                bar.refresh()

            parts.append(ov.overlap_transfer(wb, chosen[start:start + chunk], {n: overrides.get(n) for n in names},
                                             edit_language, tests, beta=beta, top_share=top_share,
                                             progress=progress))
            if out is not None and start + chunk < len(chosen):
                so_far = pd.concat(parts, ignore_index=True)
                write_out(so_far, *results(so_far), final=False)
    points = pd.concat(parts, ignore_index=True)
    failed = points[points["error"].astype(bool)] if "error" in points else points.iloc[:0]
    for _, row in failed.iterrows():
        typer.echo(f"{row['record']} · {row['method']}: {row['error']}", err=True)
    corr, fig = results(points)
    with pd.option_context("display.width", 200):
        typer.echo(corr.round(3).to_string(index=False))
    if out is None:
        return
    write_out(points, corr, fig, final=True)
    typer.echo(f"wrote points.csv, correlations.csv, overlap_vs_transfer → {out}")


@cli.command()
@user_errors
def evaluate(model: str = ModelOpt,
             methods: str = typer.Option("lu-lafns,memit,rome,lora-ft", "--methods", help="Comma-separated editors."),
             dataset: Path = typer.Option(Path("../shared/data/mzsre/dev"), "--dataset",
                                          help="MzsRE / Bi-ZsRE or MLaKE folder or file (told apart by their files; "
                                               "MLaKE: single-hop questions are the edits, multi-hop ones "
                                               "portability, subjects derived)."),
             edit_languages: str = typer.Option("en,zh", "--edit-languages", help="Edited together (Table 2)."),
             test_languages: str = typer.Option("en,zh", "--test-languages", help="Scored in each."),
             n: int = typer.Option(50, "--n", help="Records (the first n with every language)."),
             offset: int = typer.Option(0, "--offset", help="Skip this many records first."),
             monolingual: bool = typer.Option(True, "--monolingual/--no-monolingual",
                                              help="Also edit each language alone (Table 1, transfer matrix)."),
             hparams: Optional[str] = typer.Option(None, "--hparams", help='JSON (or file): {"lu-lafns": {"beta": '
                                                                          '0.2}, ...} over the presets.'),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (resumed if it holds this run)."),
             merge: Optional[list[Path]] = typer.Option(None, "--merge", help="Merge these run folders of one "
                                                                               "evaluation into --out and print its "
                                                                               "tables (nothing is computed)."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in an --out folder that holds "
                                                                       "another evaluation or another command's "
                                                                       "results (refused otherwise)."),
             table: str = typer.Option("all", "--table", help="Tables to print: all, memla (ES / PS / NS per "
                                                                 "test language and their cross-lingual averages, "
                                                                 "per edit language set), or mpn (mpn Table 1: "
                                                                 "Reliability, MLG, CLG, Locality, patches; the "
                                                                 "first edit language is the source)."),
             device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """The papers' comparison: edit n records with each method, score every test language, print the tables."""
    from tqdm import tqdm

    from analysis.model import load_model
    from editors.base import get_editor
    from editors.evaluate import (EvalConfig, check_run_folder, edit_sets_for, load_records, memla_report,
                                  merge_runs, mpn_report, parse_language_sets, report, run_evaluation)

    tables = {"all": report, "memla": memla_report, "mpn": mpn_report}
    if table not in tables:
        raise InputError(f"--table must be one of: {', '.join(tables)}; got {table!r}.")
    print_tables = tables[table]
    if merge:
        if out is None:
            raise InputError("--merge needs --out, the folder to merge into.")
        claim_out(out, "evaluate", None, overwrite)
        frame, config = merge_runs(merge, out, overwrite=overwrite)
        typer.echo(print_tables(frame, config))
        typer.echo(f"merged run folder: {out}")
        return

    names = list(dict.fromkeys(split_list(methods) or []))
    if not names:
        raise InputError("--methods names no editor; give at least one, e.g. lu-lafns,memit (see `neuroglot edit "
                         "--list`).")
    for name in names:
        get_editor(name)                                   # unknown names fail before the model loads
    edit_langs = list(parse_language_sets(edit_languages, "--edit-languages")[0])
    tests = list(parse_language_sets(test_languages, "--test-languages")[0])
    overrides = forms.method_hparams(hparams, names)
    sets = [list(s) for s in edit_sets_for(edit_langs, monolingual)]
    records = load_records(dataset, list(dict.fromkeys(edit_langs + tests)), n, offset,
                           on_skip=lambda message: typer.echo(f"warning: {message}", err=True))
    config = EvalConfig(dataset=str(Path(dataset).resolve()), methods=names, edit_sets=sets, test_languages=tests,
                        n=n, offset=offset, hparams=overrides, model=model.strip())
    if out is None:
        out = Path("runs") / f"evaluate-{'-'.join(names)}-{'+'.join(edit_langs)}-n{n}"
    state = check_run_folder(config, out, overwrite, what="--out")  # before the model loads
    on_interrupt(f"the rows finished so far are kept in {out} and its tables match them; run the same command "
                 f"again to resume{' (without --overwrite)' if state == 'replace' else ''}.")
    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    config.model = wb.spec
    total = len(records) * (1 + len(names) * len(sets))
    with tqdm(total=total, unit="step", desc="evaluate") as bar:
        def progress(frac: float, message: str) -> None:
            bar.n = round(frac * total)
            bar.set_postfix_str(message[:60])
            bar.refresh()

        frame = run_evaluation(wb, config, out, progress=progress, records=records, overwrite=overwrite)
    typer.echo(print_tables(frame, config))
    typer.echo(f"run folder: {out} (rows.jsonl, probes.csv, tables.md)")


@cli.command()
@user_errors
def sequential(model: str = ModelOpt,
               methods: str = typer.Option("langedit,alphaedit,memit", "--methods",
                                           help="Comma-separated sequential methods (langedit, alphaedit, memit)."),
               dataset: Path = typer.Option(Path("../shared/data/mzsre/dev"), "--dataset",
                                            help="MzsRE folder (six languages) or a Bi-ZsRE (en-zh) file."),
               languages: str = typer.Option("en,de,nl,es,fr,zh", "--languages", help="Stream languages, in order."),
               batch: int = typer.Option(20, "--batch", help="Edits per step (one language per step)."),
               steps: int = typer.Option(6, "--steps", help="Steps of the stream."),
               order: str = typer.Option("blocks", "--order", help="blocks (each language's steps together, as "
                                                                   "the paper) or interleaved."),
               seed: int = typer.Option(0, "--seed", help="Shuffles the records (the same stream for every method)."),
               records: str = typer.Option("", "--records", help="Record ranges the stream may use, e.g. "
                                                                 "0-99,150-499 (default: all)."),
               flores: int = typer.Option(50, "--flores-sentences", help="Held-out FLORES-200 sentences per "
                                                                         "language for the perplexity check."),
               hparams: Optional[str] = typer.Option(None, "--hparams", help='JSON (or file): {"langedit": '
                                                                            '{"nullspace_threshold": 0.01}, ...}.'),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (resumed if it holds this "
                                                                           "run)."),
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace another run in --out."),
               rollback: Optional[int] = typer.Option(None, "--rollback", help="Only roll every method's saved "
                                                                               "state in --out back to this step "
                                                                               "(its later measurements go too)."),
               png: bool = typer.Option(True, "--png/--no-png", help="Also write the figures as PNG (needs "
                                                                     "Chromium; HTML is always written)."),
               device: str = DeviceOpt, dtype: str = DtypeOpt, trust_remote_code: bool = TrustOpt) -> None:
    """Multilingual sequential editing (LangEdit, AlphaEdit, MEMIT): a stream of batches, measured after every step."""
    from tqdm import tqdm

    from analysis.model import load_model
    from editors.sequential_run import (StreamConfig, check_run_folder, make_stream, read_run, report,
                                        rollback_run, run_sequential, sequential_figures)

    if rollback is not None:
        if out is None:
            raise InputError("--rollback needs --out, the run folder.")
        rollback_run(out, rollback)
        typer.echo(report(read_run(out)))
        typer.echo(f"run folder: {out} rolled back to step {rollback}")
        return
    names = list(dict.fromkeys(split_list(methods) or []))
    config = StreamConfig(dataset=str(dataset), languages=split_list(languages) or [], batch=batch, steps=steps,
                          order=order, seed=seed, records=records, flores_sentences=flores).validate()
    overrides = forms.method_hparams(hparams, names)
    make_stream(config)                                       # a stream the data cannot fill fails before the model
    if out is None:
        out = Path("runs") / f"sequential-{'-'.join(names)}-{'+'.join(config.languages)}-b{batch}x{steps}"
    check_run_folder(out, config, {"spec": model.strip()}, overwrite)
    on_interrupt(f"every finished step is kept in {out}; run the same command again to continue.")
    wb = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    total = 1 + len(names) * steps
    with tqdm(total=total, unit="step", desc="sequential") as bar:
        order_of = {m: i for i, m in enumerate(names)}

        def progress(method: str, step: int, fraction: float, message: str) -> None:
            base = 0 if method == "unedited" else 1 + max(step - 1, 0) * len(names) + order_of.get(method, 0)
            bar.n = min(total, round(base + (fraction if step else 0)))
            bar.set_postfix_str(f"{method} step {step}: {message}"[:70])
            bar.refresh()

        run_sequential(wb, config, names, out, hparams=overrides, overwrite=overwrite, progress=progress)
    view = read_run(out)
    text = report(view)
    from analysis import runs as _runs

    _runs.write_text(Path(out) / "tables.md", text)
    typer.echo(text)
    figures_dir = Path(out) / "figures"
    figures_dir.mkdir(exist_ok=True)
    try:
        save_figures(figures_dir, sequential_figures(view), png)
    except NeuroglotError as exc:
        typer.echo(f"note: {exc}", err=True)
    typer.echo(f"run folder: {out} (sequential.json, baseline.json, <method>/steps.jsonl, <method>/state, tables.md, "
               "figures/)")


runs_cli = typer.Typer(no_args_is_help=True, help="Finished run folders (evaluate, sequential, overlap): list them, "
                                                     "print their tables and probes, write their figures (the Runs "
                                                     "page).")
cli.add_typer(runs_cli, name="runs")


@runs_cli.command("list")
@user_errors
def runs_list(roots: Optional[list[Path]] = typer.Argument(None, help="Folders to look in (default: ./runs and "
                                                                       "NEUROGLOT_RUNS).")) -> None:
    """List the evaluation, sequential and overlap run folders (two levels deep) with their kind."""
    from app import run_browser as rb

    found = rb.find_run_folders(roots or rb.run_roots())
    if not found:
        raise InputError(f"No run folder under {', '.join(str(r) for r in (roots or rb.run_roots()))}.")
    for folder, kind in found:
        typer.echo(f"{kind:<11} {folder}")


@runs_cli.command("show")
@user_errors
def runs_show(folder: Path = typer.Argument(..., help="An evaluate, sequential or overlap run folder."),
              table: str = typer.Option("all", "--table", help="Tables to print: all, memla, mpn (evaluate runs) "
                                                                "or none."),
              transfer: bool = typer.Option(False, "--transfer", help="Print each method's transfer matrix (edit "
                                                                      "languages × test languages) of --metric and "
                                                                      "--score."),
              metric: str = typer.Option("reliability", "--metric", help="Transfer matrices and figures: reliability, "
                                                                         "generality, locality or portability."),
              score: str = typer.Option("em", "--score", help="Transfer matrices and figures: em, f1 or top1."),
              probes: bool = typer.Option(False, "--probes", help="Print the probes (implied by any filter): the "
                                                                  "question, expected answer, answers before and "
                                                                  "after; sequential runs: each probe's "
                                                                  "teacher-forced prediction before and after a "
                                                                  "step (older folders: the averaged scores after "
                                                                  "every step)."),
              method: Optional[str] = typer.Option(None, "--method", help="Only these methods (comma-separated; "
                                                                           "overlap runs: these editors' points)."),
              edit_languages: Optional[str] = typer.Option(None, "--edit-languages",
                                                           help="Only these edit sets, e.g. en+zh,en."),
              language: Optional[str] = typer.Option(None, "--language", help="Only these test languages (sequential:"
                                                                              " asked in)."),
              kind: Optional[str] = typer.Option(None, "--kind", help="Only these probe kinds, e.g. "
                                                                      "reliability,locality."),
              failures: bool = typer.Option(False, "--failures", help="Only probes where the edited model is wrong "
                                                                      "(EM < 1; sequential: top-1 < 1) or a "
                                                                      "locality / specificity answer changed."),
              step: str = typer.Option("last", "--step", help="Sequential runs: the probes after this step (a "
                                                                "number), 'last' (each method's last measured "
                                                                "step) or 'all'."),
              limit: int = typer.Option(50, "--limit", help="Probe rows printed (the CSV gets all)."),
              csv: Optional[Path] = typer.Option(None, "--csv", help="Write the (filtered) probes here as CSV "
                                                                     "(overlap runs: the points shown)."),
              figures_dir: Optional[Path] = typer.Option(None, "--figures", help="Write the page's figures here "
                                                                                 "(HTML and PNG)."),
              png: bool = typer.Option(True, "--png/--no-png", help="Also write the figures as PNG (needs Chromium).")
              ) -> None:
    """Print a finished (or still running) run folder's tables, transfer matrices and probes; write its figures.

    An overlap run (`neuroglot overlap`) prints Spearman's ρ per editor and its points (--method filters them)."""
    import pandas as pd

    from analysis import runs as run_files
    from app import run_browser as rb

    if limit < 0:
        raise InputError(f"--limit must be 0 or more; got {limit}.")
    for path in (csv, figures_dir):
        if path is not None:
            run_files.check_writable(path, "--csv" if path is csv else "--figures")
    run_kind = rb.run_kind(folder)
    filters = dict(methods=split_list(method), edit_languages=split_list(edit_languages),
                   languages=split_list(language), kinds=split_list(kind))
    probes = probes or failures or any(filters.values()) or step != "last"
    if run_kind != rb.SEQUENTIAL and step != "last":
        raise InputError("--step is for sequential runs (the probes after that step).")
    figs: dict = {}
    if run_kind == rb.OVERLAP:
        from analysis import fact_figures

        unused = [name for name, given in (("--edit-languages", filters["edit_languages"]),
                                           ("--language", filters["languages"]), ("--kind", filters["kinds"]),
                                           ("--failures", failures), ("--transfer", transfer),
                                           ("--metric", metric != "reliability"), ("--score", score != "em")) if given]
        if unused:
            raise InputError(f"{', '.join(unused)}: not for overlap runs, whose points are filtered by --method.")
        if table not in ("all", "none"):
            raise InputError(f"--table must be all or none for an overlap run; got {table!r}.")
        view = rb.read_overlap(folder)
        unknown = [m for m in filters["methods"] or [] if m not in view.methods]
        if unknown:
            raise InputError(f"--method {', '.join(unknown)}: this run's editors are {', '.join(view.methods)}.")
        typer.echo(f"{folder} · overlap · {rb.overlap_header(view)}")
        for _, row in view.errors.iterrows():
            typer.echo(f"warning: {row['record']} · {row['method']}: {row['error']}", err=True)
        if table != "none":
            note = " (recomputed from points.csv: correlations.csv predates the p value)" if view.recomputed else ""
            corr = rb.correlation_table(view)
            with pd.option_context("display.width", 200):
                typer.echo(f"\n## Spearman's ρ of agnostic share and transfer, per editor{note}\n"
                           f"{corr.round(3).to_string(index=False)}\n")
        rows = rb.filter_points(view.points, filters["methods"])
        printed = rows.drop(columns=[c for c in ("cached", "seconds", "pooled") if c in rows])
        printed = printed.drop(columns=["error"] if not (printed["error"] != "").any() else [])
        for column in rb.SHARE_COLUMNS:            # 0-1 in points.csv (and in the CSV written): % here
            if column in printed:
                printed[column] = 100.0 * printed[column]
        printed = printed.rename(columns={c: f"{c} %" for c in rb.SHARE_COLUMNS})
        with pd.option_context("display.max_colwidth", 40, "display.width", 250):
            typer.echo(f"{len(rows):,} points" + (f" (the first {limit} shown)" if len(rows) > limit else "")
                       + "; shares: % of the edit's weight, transfer and reliability: top-1 gain (points)")
            if limit and len(rows):
                typer.echo(printed.head(limit).round(1).to_string(index=False))
        probes = False                             # printed above
        scored = rb.filter_points(view.scored, filters["methods"]).dropna(subset=["agnostic share", "transfer"])
        if figures_dir is not None and not scored.empty:
            figs = {"overlap_vs_transfer": fact_figures.overlap_vs_transfer(scored, view.correlations)}
    elif run_kind == rb.SEQUENTIAL:
        from editors.sequential_run import read_run, sequential_figures

        if filters["edit_languages"]:
            raise InputError("--edit-languages is for evaluation runs; a sequential run filters by --method, "
                             "--step, --language, --kind and --failures.")
        data = rb.read_sequential(folder)
        if table != "none":
            typer.echo(data["report"] or f"{folder} holds no measured step yet.")
        if not data["probes"].empty:
            rows = data["probes"]
            if step == "last":
                last = rows.groupby("method")["step"].transform("max")
                rows = rows[rows["step"] == last]
            elif step != "all":
                try:
                    wanted_step = int(step)
                except ValueError:
                    raise InputError(f"--step must be a step number, 'last' or 'all'; got {step!r}.") from None
                if wanted_step not in set(rows["step"]):
                    raise InputError(f"--step {wanted_step}: the measured steps are "
                                     f"{', '.join(str(x) for x in sorted(set(rows['step'])))}.")
                rows = rows[rows["step"] == wanted_step]
            rows = rb.filter_sequential_probes(rows, filters["methods"], None, filters["languages"], filters["kinds"],
                                               failures)
        elif filters["kinds"] or failures or step not in ("last", "all"):
            raise InputError(data["probes_note"] or f"{folder} holds no measured step yet, so no probe to filter.")
        else:
            rows = data["step_scores"]
            for column, wanted in (("method", filters["methods"]), ("asked_in", filters["languages"])):
                if wanted:
                    rows = rows[rows[column].isin(wanted)]
        if data["probes_note"] and (probes or csv is not None):
            typer.echo(f"note: {data['probes_note']}", err=True)
        if figures_dir is not None:
            figs = sequential_figures(read_run(folder))
    else:
        from analysis import run_figures
        from editors.evaluate import memla_report, mpn_report

        tables = {"all": None, "memla": memla_report, "mpn": mpn_report, "none": None}
        if table not in tables:
            raise InputError(f"--table must be one of: {', '.join(tables)}; got {table!r}.")
        if score not in rb.SCORE_TITLES:
            raise InputError(f"--score must be one of: {', '.join(rb.SCORE_TITLES)}; got {score!r}.")
        view = rb.read_evaluate(folder)
        if view.frame.empty:
            raise InputError(f"{folder} holds no finished record yet.")
        if metric not in rb.kinds_of(view.frame):
            raise InputError(f"--metric must be one of: {', '.join(rb.kinds_of(view.frame))}; got {metric!r}.")
        if not view.finished:
            typer.echo(f"note: {folder} has no tables.md: it is still being written (or was interrupted); these are "
                       "the records finished so far.", err=True)
        if table == "all":
            typer.echo(view.report)
        elif table != "none":
            typer.echo(tables[table](view.frame, rb.eval_config(view.config)))
        matrices = rb.transfer_matrices(view, metric, score)
        title = f"{metric.capitalize()} {rb.SCORE_TITLES[score]}"
        if transfer:
            for name, matrix in matrices.items():
                typer.echo(f"## Transfer matrix, {name}: {title} (%)\n{matrix.round(1).to_string(index=False)}\n")
        if figures_dir is not None:
            figs = {f"transfer_{name}_{metric}_{score}": run_figures.transfer_heatmap(matrix, f"{name}: {title}", title)
                    for name, matrix in matrices.items()}
            figs[f"methods_{score}"] = run_figures.method_scores_bars(
                rb.method_scores(view, score), f"Every metric, editing {view.main_edit_set}", rb.SCORE_TITLES[score])
            figs[f"languages_{metric}_{score}"] = run_figures.language_scores_bars(
                rb.language_scores(view, metric, score), f"{title} per test language, editing {view.main_edit_set}",
                title)
        rows = rb.filter_probes(rb.probe_table(view.frame), failures_only=failures, **filters)
    if probes:
        with pd.option_context("display.max_colwidth", 40, "display.width", 200):
            typer.echo(f"{len(rows):,} rows" + (f" (the first {limit} shown)" if len(rows) > limit else ""))
            if limit and len(rows):
                typer.echo(rows.head(limit).to_string(index=False))
    if csv is not None:
        save_table(rows, csv, index=False)
        typer.echo(f"wrote {csv} ({len(rows):,} rows)")
    if figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        save_figures(figures_dir, figs, png)
        typer.echo(f"wrote {len(figs)} figures to {figures_dir}")


cache_cli = typer.Typer(no_args_is_help=True, help="The disk cache (converted models, key statistics, cached runs, "
                                                      "the Compare page's edits): list its areas, clear them.")
cli.add_typer(cache_cli, name="cache")


def human_bytes(n: int) -> str:
    """1.2 GB (decimal units, as NEUROGLOT_COMPARE_CACHE_GB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def n_entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


@cache_cli.command("list")
@user_errors
def cache_list() -> None:
    """Each cache area: its size, entries, oldest and newest entry (last used), folder and what it holds."""
    from analysis import cache

    def when(stamp: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp is not None else "-"

    found = cache.usage()
    rows = [("area", "size", "entries", "oldest", "newest", "path", "description")]
    rows += [(u.area, human_bytes(u.bytes), str(u.entries), when(u.oldest), when(u.newest), str(u.path),
              u.description) for u in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.rjust(w) if i in (1, 2) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        typer.echo("  ".join(cells + [row[-1]]))
    typer.echo(f"\n{human_bytes(sum(u.bytes for u in found))} in all under {cache.cache_root()} (NEUROGLOT_CACHE "
               "moves it; NEUROGLOT_COMPARE_CACHE_GB caps compare's edits)")


@cache_cli.command("clear")
@user_errors
def cache_clear(area: str = typer.Argument(..., help="models, gguf, stats, runs or compare (comma-separated for "
                                                     "several), or all: every area but models and gguf, which are "
                                                     "cleared only when named (all,models)."),
                older_than: Optional[float] = typer.Option(None, "--older-than", help="Only the entries unused for "
                                                                                      "more than this many days."),
                yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking.")) -> None:
    """Delete cached entries (a reader never sees half of one); they are computed again when needed."""
    from analysis import cache

    names = cache.select_areas(area)
    plan = {name: cache.stale_entries(name, older_than) for name in names}
    count = sum(len(found) for found in plan.values())
    size = sum(cache.size_of(path) for found in plan.values() for path in found)
    what = ", ".join(names) + (f" unused for over {older_than:g} day{'s' * (older_than != 1)}"
                               if older_than is not None else "")
    if not count:
        typer.echo(f"nothing to delete in {what}.")
        return
    if not yes and not typer.confirm(f"Delete {n_entries(count)} ({human_bytes(size)}) of {what}?"):
        typer.echo("nothing was deleted.")
        raise typer.Exit(code=1)
    freed = 0
    for name in names:
        if plan[name]:
            done = cache.clear(name, older_than, listed=plan[name])
            freed += done.bytes
            typer.echo(f"{name}: deleted {n_entries(len(done.paths))}, freed {human_bytes(done.bytes)}")
    typer.echo(f"freed {human_bytes(freed)} in all")


@cli.command()
@user_errors
def app(model: str = ModelOpt, corpus: str = typer.Option("demo", "--corpus", "-c", help="Corpus shown first."),
        port: int = typer.Option(8501, "--port"),
        address: str = typer.Option("127.0.0.1", "--address", help="Bind address (keep 127.0.0.1 unless you mean it)."),
        ) -> None:
    """Start the Streamlit app (bound to 127.0.0.1, XSRF protection on)."""
    from analysis.model import check_spec
    from data import load_corpus

    if not 1 <= port <= 65535:
        raise InputError(f"--port must be between 1 and 65535; got {port}.")
    if not address.strip():
        raise InputError("--address is empty; use 127.0.0.1 (this machine only) or an interface address.")
    check_spec(model)       # a bad spec or corpus fails here, not in the browser
    load_corpus(corpus)
    if model == "embedded":
        from analysis.model import embedded_checkpoint

        embedded_checkpoint()  # first run: convert here, with a progress bar in the terminal
    main_py = Path(__file__).with_name("main.py")
    env = dict(os.environ, NEUROGLOT_MODEL=model, NEUROGLOT_CORPUS=corpus)
    cmd = [sys.executable, "-m", "streamlit", "run", str(main_py),
           "--server.address", address, "--server.port", str(port),
           "--server.enableXsrfProtection", "true", "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    typer.echo(f"Neuroglot: http://{address}:{port}  (model: {model}, corpus: {corpus})")
    if os.name == "posix":
        # Become the server instead of waiting on a child: a signal sent to `neuroglot app` (Ctrl-C, a service
        # manager, a test fixture's terminate()) then reaches Streamlit itself and leaves no orphan behind.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)
    raise typer.Exit(code=subprocess.call(cmd, env=env))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
