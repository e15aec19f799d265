"""Corpora for Neuroglot: the Corpus type, its loaders, edit-record loaders and the bundled demo.

    from data import load_corpus
    corpus = load_corpus("demo", languages=["en", "zh"], max_facts=20)
"""
from data.corpus import (
    FLORES_CODES,
    LANGUAGES,
    REQUIRED_COLUMNS,
    Corpus,
    normalize_language,
    prompt_from_template,
)
from data.edit_records import EditRecord, as_corpus, load_mlake, load_mzsre
from data.loaders import (
    detect_layout,
    load_corpus,
    load_demo,
    load_mpararel,
    load_pararel,
    load_user_corpus,
    load_xfactr,
    reduce_xfactr_markup,
)

__all__ = [
    "Corpus", "EditRecord", "FLORES_CODES", "LANGUAGES", "REQUIRED_COLUMNS",
    "as_corpus", "detect_layout", "load_corpus", "load_demo", "load_mlake", "load_mpararel",
    "load_mzsre", "load_pararel", "load_user_corpus", "load_xfactr", "normalize_language",
    "prompt_from_template", "reduce_xfactr_markup",
]
