"""FLORES-200 sentences and the other texts that FFN key statistics are computed on.

DESIGN.md Decision 7: the key statistics of MEMIT, AlphaEdit and LangEdit
(:mod:`analysis.stats`, which takes texts) come from multilingual text:
FLORES-200 devtest sentences of the edit languages (:func:`flores_sentences`;
the folder is ``NEUROGLOT_FLORES`` or ``../shared/data/flores200_devtest``,
one ``<FLORES code>.devtest`` file per language) or the statements of a corpus.
:func:`statistics_texts` picks them per language and says where each
language's texts came from::

    texts, sources = statistics_texts(["en", "zh"])          # FLORES-200
    stats, folder, from_disk = cached_key_statistics(wb, [4, 5], texts, sources)
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from analysis.errors import CorpusError, InputError
from analysis.stats import FLORES, check_positive
from data.corpus import FLORES_CODES, normalize_language

FLORES_ENV = "NEUROGLOT_FLORES"
FLORES_SUFFIX = ".devtest"


def default_flores_folder() -> Path:
    """``NEUROGLOT_FLORES`` if set, else ``shared/data/flores200_devtest`` beside the repository."""
    if os.environ.get(FLORES_ENV):
        return Path(os.environ[FLORES_ENV]).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "flores200_devtest"


def flores_folder(folder: str | Path | None = None) -> Path:
    """The FLORES-200 folder to read (``folder`` or :func:`default_flores_folder`); InputError if absent."""
    path = Path(folder).expanduser() if folder is not None else default_flores_folder()
    if not path.is_dir():
        raise InputError(f"No FLORES-200 folder at {path}. Point {FLORES_ENV} (or folder=) at a folder of "
                         f"<code>{FLORES_SUFFIX} files such as eng_Latn{FLORES_SUFFIX}, or give a corpus.")
    return path


def flores_languages(folder: str | Path | None = None) -> dict[str, str]:
    """The languages with a FLORES file in the folder: {our code (or the file stem): file stem}."""
    by_stem = {stem: code for code, stem in FLORES_CODES.items()}
    stems = sorted(p.name[:-len(FLORES_SUFFIX)] for p in flores_folder(folder).glob(f"*{FLORES_SUFFIX}"))
    return {by_stem.get(stem, stem): stem for stem in stems}


def _describe_flores(available: Mapping[str, str]) -> str:
    return ", ".join(f"{code} ({stem})" if code != stem else stem for code, stem in available.items()) or "none"


def language_code(language: str) -> str:
    """Our ISO code for ``language`` ("en", "zh-hans" → "zh", "eng_Latn" → "en"); InputError if unknown."""
    try:
        return normalize_language(language)
    except CorpusError as exc:
        raise InputError(str(exc)) from None


def flores_file(language: str, folder: str | Path | None = None) -> tuple[str, Path | None]:
    """``(code, path)`` of a language's FLORES file; ``path`` is None when the folder has none.

    ``language`` is one of our codes ("de") or a FLORES file stem ("deu_Latn").
    """
    folder = flores_folder(folder)
    if re.fullmatch(r"[a-z]{3}_[A-Za-z]{4}", str(language)) and (folder / f"{language}{FLORES_SUFFIX}").is_file():
        stem = str(language)
        code = next((c for c, s in FLORES_CODES.items() if s == stem), stem)
        return code, folder / f"{stem}{FLORES_SUFFIX}"
    code = language_code(language)
    stem = FLORES_CODES.get(code)
    path = folder / f"{stem}{FLORES_SUFFIX}" if stem else None
    return code, path if path is not None and path.is_file() else None


def read_sentences(path: Path, max_sentences: int | None = None) -> list[str]:
    """The non-empty lines of a one-sentence-per-line file (the first ``max_sentences``)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    return lines if max_sentences is None else lines[:max_sentences]


def flores_sentences(languages: Sequence[str] | str, folder: str | Path | None = None,
                     max_sentences: int | None = None) -> dict[str, list[str]]:
    """FLORES-200 sentences per language, in file order: ``{code: [sentence, ...]}``.

    Reads ``<folder>/<FLORES code>.devtest`` (one sentence per line); ``folder``
    defaults to :func:`default_flores_folder`. A language without a file is an
    InputError that lists the languages the folder has.
    """
    if max_sentences is not None:
        max_sentences = check_positive(max_sentences, "max_sentences")
    out: dict[str, list[str]] = {}
    for language in check_language_list(languages):
        code, path = flores_file(language, folder)
        if path is None:
            raise InputError(f"No FLORES-200 sentences for {language!r} in {flores_folder(folder)}; "
                             f"it has: {_describe_flores(flores_languages(folder))}.")
        out[code] = read_sentences(path, max_sentences)
    return out


def corpus_sentences(corpus, language: str, seed: int = 0) -> list[str]:
    """A corpus's full statements in ``language``, without repeats, in a fixed shuffled order.

    Corpora are sorted by relation; shuffling (seeded) lets a token budget
    smaller than the corpus see every relation.
    """
    statements = list(dict.fromkeys(str(s) for s in corpus.statements(language) if str(s).strip()))
    order = np.random.default_rng(seed).permutation(len(statements))
    return [statements[i] for i in order]


def _corpus_label(corpus) -> str:
    return f"corpus:{getattr(corpus, 'name', 'corpus')}"


def statistics_texts(languages: Sequence[str] | str, source: Any = FLORES, folder: str | Path | None = None,
                     corpus=None, max_sentences: int | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Texts per language for key statistics, and where each language's texts came from.

    ``source="flores"``: FLORES-200 sentences; a language without a FLORES file
    (or every language, when there is no FLORES folder) takes the statements
    of ``corpus`` instead, and is an InputError when no corpus is given.
    ``source=<Corpus>``: that corpus's statements. Returns
    ``({code: texts}, {code: "flores" | "corpus:<name>"})``.
    """
    languages = check_language_list(languages)
    if max_sentences is not None:
        max_sentences = check_positive(max_sentences, "max_sentences")
    if hasattr(source, "statements"):  # a Corpus
        corpus, use_flores = source, False
    elif source == FLORES:
        use_flores = True
    else:
        raise InputError(f"Unknown source {source!r}: use 'flores' or a corpus.")
    texts: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    for language in languages:
        path = None
        if use_flores:
            try:
                code, path = flores_file(language, folder)
            except InputError:
                if corpus is None:
                    raise
                code = language_code(language)  # no FLORES folder: the corpus for every language
            if path is not None:
                texts[code], sources[code] = read_sentences(path, max_sentences), FLORES
                continue
        else:
            code = language_code(language)
        if corpus is None:
            raise InputError(f"No FLORES-200 sentences for {language!r} in {flores_folder(folder)}; it has: "
                             f"{_describe_flores(flores_languages(folder))}. Give a corpus to use its statements.")
        if code not in set(corpus.languages):
            no_flores = f"No FLORES-200 sentences for {language!r} and t" if use_flores else "T"
            raise InputError(f"{no_flores}he corpus {getattr(corpus, 'name', '')!r} has no statements in {code}; "
                             f"it has {', '.join(corpus.languages)}.")
        sentences = corpus_sentences(corpus, code)
        texts[code] = sentences if max_sentences is None else sentences[:max_sentences]
        sources[code] = _corpus_label(corpus)
    return texts, sources


def check_language_list(languages: Sequence[str] | str) -> list[str]:
    """Languages as a list without repeats (a single string is one language)."""
    if isinstance(languages, str):
        languages = [languages]
    languages = list(dict.fromkeys(str(lang).strip() for lang in languages))
    if not languages or not all(languages):
        raise InputError(f"Choose at least one language for the key statistics; got {languages or 'none'}.")
    return languages
