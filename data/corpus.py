"""The one corpus type of Neuroglot: facts x languages x prompt templates.

A :class:`Corpus` is a table with one row per (fact, language, template):

============  ===============================================================
fact_id       aligns one fact across languages, e.g. ``"P36:17"``
relation      Wikidata property id such as ``"P36"`` (or a data set name)
language      ISO 639-1 code, normalised (``"zh-hans"`` -> ``"zh"``)
subject       the subject label in that language
object        the object label in that language (the answer)
prompt        the template with [X] filled by the subject, cut just before
              [Y], trailing spaces stripped: the text a model continues
template_id   identifies the template, e.g. ``"P36.en.1"``
template      the raw template with [X] and [Y], to rebuild full statements
============  ===============================================================

Every loader in :mod:`data.loaders` returns one; validation lives in
:meth:`Corpus.validate`, run on construction.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from analysis.errors import CorpusError

# ISO 639-1 codes (plus three ISO 639-3 codes, ceb, ilo and war, for languages
# of X-FACTR that have no two-letter code).  Covers every language of mParaRel,
# X-FACTR, MzsRE and the FLORES-200 files in shared/, and common others.
LANGUAGES: dict[str, str] = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani",
    "be": "Belarusian", "bg": "Bulgarian", "bn": "Bengali", "bs": "Bosnian",
    "ca": "Catalan", "ceb": "Cebuano", "cs": "Czech", "cy": "Welsh",
    "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "ga": "Irish",
    "gl": "Galician", "gu": "Gujarati", "ha": "Hausa", "he": "Hebrew",
    "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "ig": "Igbo", "ilo": "Ilocano", "is": "Icelandic",
    "it": "Italian", "ja": "Japanese", "jv": "Javanese", "ka": "Georgian",
    "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "ko": "Korean",
    "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish",
    "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi",
    "ms": "Malay", "mt": "Maltese", "my": "Burmese", "nb": "Norwegian Bokmål",
    "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian Nynorsk", "no": "Norwegian",
    "pa": "Punjabi", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "si": "Sinhala", "sk": "Slovak",
    "sl": "Slovenian", "so": "Somali", "sq": "Albanian", "sr": "Serbian",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu",
    "tg": "Tajik", "th": "Thai", "tk": "Turkmen", "tl": "Tagalog",
    "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek",
    "vi": "Vietnamese", "war": "Waray", "xh": "Xhosa", "yo": "Yoruba",
    "zh": "Chinese", "zu": "Zulu",
}

# ISO code -> file stem of the FLORES-200 devtest files (shared/data/flores200_devtest).
FLORES_CODES: dict[str, str] = {
    "ar": "arb_Arab", "cs": "ces_Latn", "de": "deu_Latn", "en": "eng_Latn",
    "es": "spa_Latn", "fr": "fra_Latn", "it": "ita_Latn", "ja": "jpn_Jpan",
    "ko": "kor_Hang", "nl": "nld_Latn", "pl": "pol_Latn", "pt": "por_Latn",
    "ru": "rus_Cyrl", "th": "tha_Thai", "tr": "tur_Latn", "uk": "ukr_Cyrl",
    "vi": "vie_Latn", "zh": "zho_Hans",
}

# Non-standard codes used by the data sets we read.
LANGUAGE_ALIASES: dict[str, str] = {
    "zh-hans": "zh", "zh-hant": "zh", "zh-cn": "zh", "zh-tw": "zh",  # mParaRel and friends
    "cz": "cs",  # MzsRE
    "du": "nl",  # MzsRE
    **{stem.lower().replace("_", "-"): code for code, stem in FLORES_CODES.items()},  # "eng_Latn"
}

# Languages written without spaces between words: a question or prompt is
# joined to its answer without a space.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my"})

REQUIRED_COLUMNS = (
    "fact_id", "relation", "language", "subject", "object", "prompt", "template_id", "template",
)


def normalize_language(code: str, where: str | None = None) -> str:
    """Return the ISO code for ``code`` ("zh-hans" -> "zh", "cz" -> "cs", "eng_Latn" -> "en").

    Raises CorpusError for an unknown code; ``where`` (e.g. "facts.jsonl, line 3")
    is put in front of the message.
    """
    raw = "" if code is None else str(code)
    key = raw.strip().lower().replace("_", "-")
    key = LANGUAGE_ALIASES.get(key, key)
    if key in LANGUAGES:
        return key
    base = key.split("-", 1)[0]  # "pt-br" -> "pt"
    if "-" in key and base in LANGUAGES:
        return base
    prefix = f"{where}: " if where else ""
    raise CorpusError(
        f"{prefix}unknown language code {raw!r}. Use an ISO 639-1 code such as "
        f"'en', 'zh' or 'de'; the known codes are {', '.join(sorted(LANGUAGES))}."
    )


def check_template(template: str, where: str) -> None:
    """A pattern must contain [X] and [Y]; CorpusError naming ``where`` otherwise."""
    missing = [slot for slot in ("[X]", "[Y]") if slot not in template]
    if missing:
        raise CorpusError(f"{where}: pattern {template!r} has no {' and no '.join(missing)} slot.")


def prompt_from_template(template: str, subject: str) -> str:
    """The query text: ``template`` up to [Y], with [X] filled by ``subject``, right-stripped."""
    head = template.split("[Y]", 1)[0]
    return head.replace("[X]", subject).rstrip()


def subject_before_object(template: str) -> bool:
    """True when [X] comes before [Y], i.e. the prompt (text before [Y]) contains the subject."""
    x, y = template.find("[X]"), template.find("[Y]")
    return 0 <= x < y


def _stable_seed(seed: int, text: str) -> list[int]:
    return [int(seed), zlib.crc32(text.encode("utf-8"))]


@dataclass(repr=False, eq=False)
class Corpus:
    """Facts in several languages with prompt templates; see the module docstring.

    ``rows`` may carry extra columns (e.g. ``sub_uri``); they travel along.
    """

    rows: pd.DataFrame
    name: str = "corpus"
    source: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # --- validation (the one place) -------------------------------------------------
    def validate(self) -> None:
        """Check columns, emptiness and language codes; normalise dtypes. CorpusError on failure."""
        if not isinstance(self.rows, pd.DataFrame):
            raise CorpusError(f"corpus {self.name!r}: rows must be a pandas DataFrame, got {type(self.rows).__name__}.")
        missing = [c for c in REQUIRED_COLUMNS if c not in self.rows.columns]
        if missing:
            raise CorpusError(f"corpus {self.name!r}: missing column(s) {', '.join(missing)}.")
        if len(self.rows) == 0:
            raise CorpusError(
                f"corpus {self.name!r} ({self.source or 'no source'}) is empty: no facts left. "
                "Check the path and the language/relation filters."
            )
        rows = self.rows
        extra = [c for c in rows.columns if c not in REQUIRED_COLUMNS]
        rows = rows.loc[:, list(REQUIRED_COLUMNS) + extra].reset_index(drop=True)
        for col in REQUIRED_COLUMNS:
            s = rows[col]
            if s.isna().any():
                i = int(np.flatnonzero(s.isna().to_numpy())[0])
                raise CorpusError(f"corpus {self.name!r}: row {i} ({self._describe(rows, i)}) has no {col}.")
            if not pd.api.types.is_string_dtype(s):
                s = rows[col] = s.astype(str)
            blank = s.str.strip().eq("").to_numpy()
            if blank.any():
                i = int(np.flatnonzero(blank)[0])
                raise CorpusError(f"corpus {self.name!r}: row {i} ({self._describe(rows, i)}) has an empty {col}.")
        bad = [code for code in pd.unique(rows["language"]) if code not in LANGUAGES]
        if bad:
            fixed = {}
            for code in bad:
                fixed[code] = normalize_language(code, where=f"corpus {self.name!r}")
            rows["language"] = rows["language"].replace(fixed)
        no_y = [t for t in pd.unique(rows["template"]) if "[Y]" not in t]
        if no_y:
            raise CorpusError(f"corpus {self.name!r}: template {no_y[0]!r} has no [Y] slot.")
        self.rows = rows

    @staticmethod
    def _describe(rows: pd.DataFrame, i: int) -> str:
        r = rows.iloc[i]
        return f"fact {r.get('fact_id')!s}, language {r.get('language')!s}"

    # --- basic views ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        n_facts = self.rows[["relation", "fact_id"]].drop_duplicates().shape[0]
        return (
            f"Corpus(name={self.name!r}, rows={len(self.rows)}, facts={n_facts}, "
            f"relations={len(self.relations)}, languages={self.languages})"
        )

    def summary(self, sep: str = ", ") -> str:
        """Its size, as ``neuroglot corpus`` and the Home page print it: ``120 prompts, 40 facts, 4 relations,
        3 languages``."""
        return sep.join([f"{len(self):,} prompts", f"{self.rows['fact_id'].nunique():,} facts",
                         f"{len(self.relations)} relations", f"{len(self.languages)} languages"])

    @property
    def languages(self) -> list[str]:
        return sorted(pd.unique(self.rows["language"]).tolist())

    @property
    def relations(self) -> list[str]:
        return sorted(pd.unique(self.rows["relation"]).tolist())

    def facts(self) -> pd.DataFrame:
        """One row per (fact, language): fact_id, relation, language, subject, object."""
        cols = ["fact_id", "relation", "language", "subject", "object"]
        return self.rows[cols].drop_duplicates(["relation", "fact_id", "language"]).reset_index(drop=True)

    def _isin(self, column: str, wanted: list[str], present: list[str], what: str) -> np.ndarray:
        """Rows whose ``column`` is in ``wanted``; asking for a value the corpus lacks is an error."""
        absent = sorted(set(wanted) - set(present))
        if absent:
            raise CorpusError(f"corpus {self.name!r} has no {what} {', '.join(absent)}; it has: {', '.join(present)}.")
        return self.rows[column].isin(wanted).to_numpy()

    def statements(self, language: str | None = None) -> pd.Series:
        """The full sentences: each row's template with [X] and [Y] filled (of one language, if given)."""
        rows = self.rows if language is None else self.rows[self.rows["language"] == language]
        out = [
            t.replace("[X]", s).replace("[Y]", o)
            for t, s, o in zip(rows["template"], rows["subject"], rows["object"])
        ]
        return pd.Series(out, index=rows.index, name="statement", dtype=object)

    def counts(self, margins: bool = False) -> pd.DataFrame:
        """Distinct facts per relation (index) and language (columns).

        ``margins=True`` adds a ``total`` column (facts of the relation in any
        language) and a ``total`` row (facts per language over all relations).
        """
        keyed = self.rows[["relation", "language", "fact_id"]].drop_duplicates()
        table = keyed.groupby(["relation", "language"]).size().unstack("language", fill_value=0)
        table = table.reindex(index=self.relations, columns=self.languages, fill_value=0).astype(int)
        table.index.name, table.columns.name = "relation", "language"
        if margins:
            per_relation = keyed.drop_duplicates(["relation", "fact_id"]).groupby("relation").size()
            table["total"] = per_relation.reindex(table.index).astype(int)
            total_row = table.sum(axis=0)
            total_row["total"] = int(per_relation.sum())
            table.loc["total"] = total_row.astype(int)
        return table

    # --- selections -----------------------------------------------------------------
    def _new(self, rows: pd.DataFrame) -> "Corpus":
        return Corpus(rows.reset_index(drop=True), name=self.name, source=self.source)

    def filter(
        self,
        languages: Iterable[str] | None = None,
        relations: Iterable[str] | None = None,
        max_facts: int | None = None,
        seed: int = 0,
    ) -> "Corpus":
        """Keep some languages and relations, and at most ``max_facts`` facts per relation.

        Facts are sampled per relation, reproducibly from ``seed``; a kept fact
        keeps all its languages and templates.
        """
        mask = np.ones(len(self.rows), dtype=bool)
        if languages is not None:
            mask &= self._isin("language", [normalize_language(c) for c in _as_list(languages)], self.languages,
                               "language(s)")
        if relations is not None:
            mask &= self._isin("relation", [str(r) for r in _as_list(relations)], self.relations, "relation(s)")
        rows = self.rows[mask]
        if max_facts is not None:
            if isinstance(max_facts, bool) or not isinstance(max_facts, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(max_facts) or int(max_facts) != max_facts or max_facts < 1:
                raise CorpusError(f"max_facts must be a whole number of at least 1, got {max_facts!r}.")
            rows = _sample_facts(rows, int(max_facts), seed)
        return self._new(rows)

    def aligned(self, languages: Iterable[str] | None = None) -> "Corpus":
        """Only the given languages (default: all), and only facts present in every one of them."""
        if languages is None:
            languages = self.languages
        elif isinstance(languages, str):
            languages = [languages]
        wanted = sorted({normalize_language(code) for code in languages})
        sub = self.filter(languages=wanted).rows
        per_fact = sub[["relation", "fact_id", "language"]].drop_duplicates().groupby(["relation", "fact_id"]).size()
        full = per_fact[per_fact == len(wanted)].index
        keep = pd.MultiIndex.from_frame(sub[["relation", "fact_id"]]).isin(full)
        if not keep.any():
            raise CorpusError(f"corpus {self.name!r}: no fact is present in all of {', '.join(wanted)}.")
        return self._new(sub[keep])

    # --- output ---------------------------------------------------------------------
    def to_jsonl(self, path: str | Path) -> Path:
        """Write one JSON object per row (the user-corpus format that ``load_corpus`` reads)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = list(REQUIRED_COLUMNS)
        with path.open("w", encoding="utf-8") as f:
            for rec in self.rows[cols].itertuples(index=False, name=None):
                f.write(json.dumps(dict(zip(cols, rec)), ensure_ascii=False) + "\n")
        return path


def _sample_facts(rows: pd.DataFrame, max_facts: int, seed: int) -> pd.DataFrame:
    keep_parts = []
    for relation, group in rows.groupby("relation", sort=True):
        ids = np.array(sorted(pd.unique(group["fact_id"])), dtype=object)
        if len(ids) > max_facts:
            rng = np.random.default_rng(_stable_seed(seed, str(relation)))
            ids = ids[np.sort(rng.choice(len(ids), size=max_facts, replace=False))]
        keep_parts.append(group.index[group["fact_id"].isin(ids).to_numpy()])
    keep = keep_parts[0].append(keep_parts[1:]) if keep_parts else rows.index[:0]
    return rows.loc[rows.index.isin(keep)]


def _as_list(value) -> list:
    """A single string means one item, not its characters."""
    return [value] if isinstance(value, str) else list(value)
