"""The one prepared check for a lent GPU: a random-weight model shaped like Llama-3.1-8B, in bfloat16 on CUDA.

    .venv/bin/python bench/gpu.py                 # on a CUDA machine (about 4 minutes on one H100; limit 8)
    .venv/bin/python bench/gpu.py --tiny          # the same code path on a small model, on CPU, in under a minute
    .venv/bin/python bench/gpu.py --tiny --dtype bfloat16   # ... in the GPU run's dtype

No download: the model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` with Llama-3.1-8B's
sizes (hidden 4096, FFN 14336, 32 layers, 32 heads / 8 key-value heads, vocabulary 128,256,
RoPE θ 500,000 with the llama3 scaling) and seeded random weights; the tokenizer is the tiny
in-memory BPE of ``tests/tiny.py`` (its ids are valid rows of any embedding). It is wrapped in a
``Workbench`` as the tests wrap their tiny models, and then measures, one line each, what the
CPU benchmarks measure on the embedded model, with their own functions:

* ``atlas count overhead`` — ``bench/neurons.py``: count_batch against a forward with the LM
  head at the last token, over the same batches of the demo corpus (median of rounds);
* ``causal tracing speedup`` — ``bench/causal_trace.py``: the ROME-style per-cell loop against
  the batched ``causal_trace`` (same prompt, subject, noise and σ);
* ``IG speedup`` — ``bench/attribution.py``: captum layer by layer against ``neuron_attributions``;
* ``LU-LAFNs edit`` and ``MEMIT edit`` — one request (en + zh) with the Llama-3.1-8B presets:
  seconds and ``torch.cuda.max_memory_allocated`` (peak, and above the loaded model). MEMIT's
  first edit includes its key statistics (``--mom2-tokens`` tokens of the demo corpus's en+zh
  statements, written as a FLORES-style folder so that no data outside the repository is
  needed); its second edit reads them back from the cache;
* ``Compare page`` — LU-LAFNs and MPN on that request through ``editors.compare`` (first run against
  the rerun read back from the Compare cache), and the "Why did it transfer?" neuron tables (first
  computed, then read back).

Random weights make every probability tiny and every edit meaningless: these are figures of
time and memory only. In bfloat16 the batched and the reference paths round differently, so
the largest score difference is printed, not held to the float32 benchmarks' 1e-4.

On a machine without CUDA (and without ``--tiny`` / ``--device cpu``) it prints one line and
exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

#: Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B).
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   hidden_act="silu", tie_word_embeddings=False)
#: The same family scaled down for ``--tiny`` (head_dim and the 4:1 query/key-value grouping kept).
TINY_SHAPE = dict(LLAMA_31_8B, hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=128, vocab_size=4096, max_position_embeddings=16384)
ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)
PRESET = "meta-llama/Llama-3.1-8B"  # the editors' preset key


def llama_config(shape: dict, tokenizer):
    """A LlamaConfig of ``shape`` with Llama 3.1's RoPE settings and the tokenizer's special ids."""
    import transformers

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if "rope_parameters" in getattr(transformers.LlamaConfig, "__dataclass_fields__", {}) or hasattr(
            transformers.LlamaConfig(), "rope_parameters"):
        return transformers.LlamaConfig(**shape, **special, rope_parameters=dict(ROPE))
    rope = {k: v for k, v in ROPE.items() if k != "rope_theta"}  # transformers < 5: rope_theta + rope_scaling
    return transformers.LlamaConfig(**shape, **special, rope_theta=ROPE["rope_theta"], rope_scaling=rope)


def build_workbench(device: torch.device, dtype: torch.dtype, tiny: bool, seed: int = 0):
    """The random-weight Llama-3.1-8B-shaped model (or its ``--tiny`` cousin) in a Workbench."""
    import transformers

    from analysis.model import Workbench
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = llama_config(TINY_SHAPE if tiny else LLAMA_31_8B, tokenizer)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:  # weights are created (and initialised) where they will run
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to(device=device, dtype=dtype)
    name = ("tiny " if tiny else "") + "random-weight Llama-3.1-8B shape"
    return Workbench.from_loaded(model, tokenizer, spec="random-llama-3.1-8b", name=name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def scaled_layers(layers: list[int], n_layers: int) -> list[int]:
    """A preset's layers (for 32 layers) mapped onto ``n_layers`` (identity for the full shape)."""
    return sorted({min(n_layers - 1, layer * n_layers // 32) for layer in layers})


# ----------------------------------------------------------------------------------------- measures


def atlas_overhead(wb, facts: int, repeats: int, batch_size: int = 32) -> str:
    """bench/neurons.py's figure: time(count_batch) / time(forward with the LM head at the last token)."""
    import bench.neurons as bn
    from data import load_corpus

    languages = ["en", "zh"]
    corpus = load_corpus("demo", languages=languages, max_facts=facts)
    batches = bn.make_batches(wb, corpus, languages, batch_size)
    paths = {"a": bn.last_token_logits, "b": bn.count}
    for fn in paths.values():
        fn(wb, batches[-1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    orders = list(itertools.permutations(paths))
    for r in range(repeats):
        totals = dict.fromkeys(paths, 0.0)
        for i, batch in enumerate(batches):
            for name in orders[(r * len(batches) + i) % len(orders)]:
                totals[name] += bn.timed(paths[name], wb, batch)
        for name, total in totals.items():
            times[name].append(total)
    ta, tb = statistics.median(times["a"]), statistics.median(times["b"])
    n_tokens = sum(int(b.real.sum()) for b in batches)
    return (f"atlas count overhead: {tb / ta:.3f} (count_batch {tb:.2f} s vs forward + last-token head {ta:.2f} s; "
            f"{len(batches)} batches, {n_tokens} tokens, median of {repeats}; CPU benchmark target <= "
            f"{bn.TARGET:.2f})")


def tracing_speedup(wb, samples: int, window: int, max_rows: int) -> str:
    """bench/causal_trace.py's figure: time(per-cell reference) / time(batched causal_trace)."""
    import numpy as np

    import bench.causal_trace as bct

    sigma = bct.noise_sigma(wb, 3.0)
    common = dict(prompt=bct.PROMPT, subject=bct.SUBJECT, answer=None, kinds=bct.KINDS, samples=samples,
                  sigma=sigma, window=window, seed=0, max_rows=max_rows)
    bct.causal_trace(wb, **dict(common, kinds=("hidden",), samples=1))  # warm-up
    sync(wb.device)
    ref, t_ref = bct.timed(bct.causal_trace_per_cell, wb, **common)
    sync(wb.device)
    proj, t_proj = bct.timed(bct.causal_trace, wb, **common)
    sync(wb.device)
    diff = max(float(np.abs(ref.scores[k] - proj.scores[k]).max()) for k in bct.KINDS)
    cells = len(bct.KINDS) * len(proj.tokens) * wb.n_layers
    return (f"causal-tracing speedup: {t_ref / t_proj:.2f} (per-cell reference {t_ref:.1f} s vs batched "
            f"{t_proj:.1f} s; {cells} cells, {samples} samples, window {window}; max |score diff| {diff:.1e}; "
            f"CPU benchmark target >= {bct.TARGET:.1f})")


def ig_speedup(wb, steps: int, target: str = "Paris") -> str:
    """bench/attribution.py's figure: time(captum layer by layer) / time(neuron_attributions)."""
    import numpy as np

    import bench.attribution as ba
    import bench.causal_trace as bct

    prompt = bct.PROMPT

    def project():
        return ba.neuron_attributions(wb, prompt, target, steps=steps).scores

    def reference():
        return ba.neuron_attributions_reference(wb, prompt, target, steps=steps)

    ours, ref = project(), reference()  # warm-up and agreement
    diff = float(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).max())
    times = {}
    for name, fn in (("reference", reference), ("project", project)):
        sync(wb.device)
        started = time.perf_counter()
        fn()
        sync(wb.device)
        times[name] = time.perf_counter() - started
    return (f"IG speedup: {times['reference'] / times['project']:.2f} (captum layer by layer "
            f"{times['reference']:.1f} s vs project {times['project']:.1f} s; {wb.n_layers} layers x "
            f"{wb.n_neurons} neurons, {steps} steps; max |diff| {diff:.1e}; CPU benchmark target >= {ba.TARGET:.1f})")


def edit_request():
    from editors.requests import EditRequest, LanguageFact

    return EditRequest({"en": LanguageFact("The capital of France is", "France", "Berlin"),
                        "zh": LanguageFact("法国的首都是", "法国", "柏林")}, "gpu-check")


def timed_edit(wb, editor, request) -> tuple[float, float | None, float | None]:
    """Seconds of one ``editor.compute``; peak device memory during it and its excess over the model (bytes)."""
    cuda = wb.device.type == "cuda"
    if cuda:
        sync(wb.device)
        torch.cuda.reset_peak_memory_stats(wb.device)
        resident = torch.cuda.memory_allocated(wb.device)
    started = time.perf_counter()
    editor.compute(wb, request)
    sync(wb.device)
    seconds = time.perf_counter() - started
    if not cuda:
        return seconds, None, None
    peak = torch.cuda.max_memory_allocated(wb.device)
    return seconds, peak, peak - resident


def memory_text(peak: float | None, extra: float | None) -> str:
    if peak is None:
        from bench.common import peak_rss_mib

        return f"no GPU (process peak RSS {peak_rss_mib() / 1024:.2f} GiB)"
    return f"peak GPU memory {gib(peak)} ({gib(extra)} above the loaded model)"


def lu_lafns_edit(wb, tiny: bool) -> str:
    from editors.lu_lafns import LULAFNsEditor, LULAFNsHParams

    fields = dict(LULAFNsHParams.PRESETS[PRESET])
    fields["layers"] = scaled_layers(fields["layers"], wb.n_layers)
    if tiny:
        fields.update(steps=3, n_prefixes=2)
    hp = LULAFNsHParams(**fields)
    seconds, peak, extra = timed_edit(wb, LULAFNsEditor(hp), edit_request())
    return (f"LU-LAFNs edit: {seconds:.1f} s, {memory_text(peak, extra)} "
            f"(preset {PRESET}: layers {hp.layers}, beta {hp.beta}, {hp.steps} steps, en+zh)")


def memit_edit(wb, tiny: bool, mom2_tokens: int) -> str:
    from editors.memit import MEMITEditor, MEMITHParams

    fields = dict(MEMITHParams.PRESETS[PRESET])
    fields["layers"] = scaled_layers(fields["layers"], wb.n_layers)
    fields["mom2_n_tokens"] = mom2_tokens
    if tiny:
        fields.update(v_num_grad_steps=3, context_template_length_params=[[5, 2]])
    hp = MEMITHParams(**fields)
    editor, request = MEMITEditor(hp), edit_request()
    cold, cold_peak, cold_extra = timed_edit(wb, editor, request)
    warm, peak, extra = timed_edit(wb, editor, request)
    return (f"MEMIT edit: {warm:.1f} s, {memory_text(peak, extra)}; first edit with key statistics "
            f"({mom2_tokens:,} tokens) {cold:.1f} s, {memory_text(cold_peak, cold_extra)} "
            f"(preset {PRESET}: layers {hp.layers}, {hp.v_num_grad_steps} steps, en+zh)")


def compare_and_overlap(wb, tiny: bool) -> str:
    """The Compare page's work on this model: LU-LAFNs and MPN (the Llama-3.1-8B presets) on one en+zh fact,
    computed, then read back from the Compare cache (the baseline a rerun is measured against: the first
    run); and the "Why did it transfer?" section's neuron tables (the edit's, kept beside the cached edit,
    and the fact's atlas sets), first computed, then read back."""
    from editors.compare import compare
    from editors.lu_lafns import LULAFNsHParams
    from editors.mpn import MPNOnlyHParams
    from editors.overlap import cached_edit_neurons, fact_neuron_sets

    lu = dict(LULAFNsHParams.PRESETS[PRESET])
    lu["layers"] = scaled_layers(lu["layers"], wb.n_layers)
    mpn = dict(MPNOnlyHParams.PRESETS[PRESET])
    if tiny:
        lu.update(steps=3, n_prefixes=2)
        mpn.update(steps=5)
    methods = {"lu-lafns": lu, "mpn": mpn}
    request = edit_request()
    timings = []
    for _ in range(2):
        sync(wb.device)
        started = time.perf_counter()
        result = compare(wb, request, methods, on_error="raise")
        sync(wb.device)
        timings.append(time.perf_counter() - started)
    neurons = []
    for _ in range(2):
        started = time.perf_counter()
        for run in result.runs:
            cached_edit_neurons(wb, run.folder)
        fact_neuron_sets(wb, request, beta=0.5)
        sync(wb.device)
        neurons.append(time.perf_counter() - started)
    per_editor = ", ".join(f"{r.method} {r.seconds:.1f} s" for r in result.runs)
    return (f"Compare page: first run {timings[0]:.1f} s ({per_editor}), rerun {timings[1]:.2f} s "
            f"(read back: {timings[0] / max(timings[1], 1e-9):.0f}x faster); why-section neuron tables first "
            f"{neurons[0]:.2f} s, again {neurons[1]:.2f} s (lu-lafns + mpn presets {PRESET}, en+zh)")


@contextlib.contextmanager
def private_caches(facts: int):
    """Key statistics go to a fresh cache; their text is the demo corpus's en+zh statements, written as
    a FLORES-style folder (``<code>.devtest``) so that nothing outside the repository is read."""
    from data import load_corpus
    from data.flores import FLORES_CODES, FLORES_ENV, FLORES_SUFFIX

    saved = {k: os.environ.get(k) for k in ("NEUROGLOT_CACHE", FLORES_ENV)}
    with tempfile.TemporaryDirectory(prefix="neuroglot-gpu-") as tmp:
        flores = Path(tmp) / "flores"
        flores.mkdir()
        corpus = load_corpus("demo", languages=["en", "zh"], max_facts=facts)
        for lang in ("en", "zh"):
            lines = dict.fromkeys(str(s).strip() for s in corpus.statements(lang) if str(s).strip())
            (flores / f"{FLORES_CODES[lang]}{FLORES_SUFFIX}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.environ["NEUROGLOT_CACHE"] = str(Path(tmp) / "cache")
        os.environ[FLORES_ENV] = str(flores)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (the default) or cpu (the default with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="a small model of the same family, small sizes: proves the path end to end")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="bfloat16 (the default on CUDA) or float32 (the default on CPU)")
    parser.add_argument("--facts", type=int, default=None, help="facts per relation for the atlas (20; tiny 2)")
    parser.add_argument("--repeats", type=int, default=3, help="atlas rounds (median)")
    parser.add_argument("--samples", type=int, default=10, help="causal-tracing noise samples")
    parser.add_argument("--window", type=int, default=10, help="causal-tracing window of layers")
    parser.add_argument("--max-rows", type=int, default=256, help="rows per batched causal-tracing forward")
    parser.add_argument("--steps", type=int, default=20, help="integrated-gradient steps")
    parser.add_argument("--mom2-tokens", type=int, default=None, help="MEMIT key-statistics tokens (20,000; tiny 2,000)")
    args = parser.parse_args(argv)

    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.device == "cpu" and not args.tiny:
        args.tiny = True  # a full-size 8B model on CPU would take hours: cpu means the tiny path
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or `bench/gpu.py --tiny` for the CPU check of the same path", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    facts = args.facts or (2 if args.tiny else 20)
    mom2_tokens = args.mom2_tokens or (2_000 if args.tiny else 20_000)
    samples = 3 if args.tiny and args.samples == 10 else args.samples
    steps = 5 if args.tiny and args.steps == 20 else args.steps
    repeats = 1 if args.tiny and args.repeats == 3 else args.repeats
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from bench.common import device_line

    started = time.perf_counter()
    wb = build_workbench(device, dtype, args.tiny)
    sync(device)
    model_line = (f"model: {wb.name} [{wb.arch.family}, {wb.n_layers} layers x {wb.n_neurons} neurons, d_model "
                  f"{wb.d_model}, vocab {wb.summary()['vocab_size']:,}, {str(wb.dtype).replace('torch.', '')}, "
                  f"{wb.n_params / 1e9:.2f} B parameters]")
    print(model_line, flush=True)
    memory = f", {gib(torch.cuda.memory_allocated(device))} allocated" if device.type == "cuda" else ""
    print(f"device: {device_line(wb)}; built in {time.perf_counter() - started:.1f} s{memory}", flush=True)

    with private_caches(facts=80):
        for measure in (lambda: atlas_overhead(wb, facts, repeats),
                        lambda: tracing_speedup(wb, samples, args.window, args.max_rows),
                        lambda: ig_speedup(wb, steps),
                        lambda: lu_lafns_edit(wb, args.tiny),
                        lambda: memit_edit(wb, args.tiny, mom2_tokens),
                        lambda: compare_and_overlap(wb, args.tiny)):
            t0 = time.perf_counter()
            line = measure()
            print(f"{line} [{time.perf_counter() - t0:.0f} s]", flush=True)
    print(f"total: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
