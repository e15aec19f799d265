"""Build the bundled demo corpus in data/demo/ from an mParaRel checkout.

    python -m data.build_demo /work/shared/data/mpararel

Reads only ``tuples/<lang>/P*.jsonl`` (Wikidata labels, CC0) for the eight
demo languages and writes:

* ``data/demo/facts.jsonl``      one line per (fact, language): fact_id, relation,
                                 language, subject, object, sub_uri, obj_uri
* ``data/demo/templates.jsonl``  the prompt templates below (written by the
                                 Neuroglot authors, not taken from any data set)
* ``data/demo/relations.json``   relation id -> English label
* ``data/demo/NOTICE``           provenance, licences and counts

Fact selection is deterministic; for each relation:

1. keep the tuple lines (``lineid``) present in all eight languages whose
   subject and object Wikidata ids agree across languages;
2. drop a fact whose subject has several objects in the relation (the prompt
   would be ambiguous), whose object label is contained in its subject label
   in any language (answerable by copying, e.g. "Brody Raion" -> "Brody"),
   whose label is empty or a bare Q-id, or that is in ``EXCLUDED`` (Wikidata
   statements that are true but misleading as a probe);
3. rank the rest by the numeric part of the subject's Q-id (older, smaller
   ids are on the whole better-known items: Q142 France, Q90 Paris), then by
   lineid, and keep the first ``FACTS_PER_RELATION``.

Labels are used exactly as in mParaRel; nothing is translated or inflected.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"

# Demo language -> folder name in mParaRel's tuples/.
LANGUAGE_DIRS = {
    "en": "en", "zh": "zh-hans", "de": "de", "fr": "fr",
    "es": "es", "ru": "ru", "ja": "ja", "ar": "ar",
}

FACTS_PER_RELATION = 80

# English labels of the Wikidata properties (Wikidata, CC0).
RELATIONS = {
    "P17": "country",
    "P19": "place of birth",
    "P20": "place of death",
    "P27": "country of citizenship",
    "P30": "continent",
    "P36": "capital",
    "P37": "official language",
    "P103": "native language",
    "P159": "headquarters location",
    "P178": "developer",
    "P495": "country of origin",
    "P1376": "capital of",
}

# (relation, subject Q-id) pairs left out on purpose.
EXCLUDED = {
    ("P30", "Q30"),  # United States of America -> Insular Oceania (true for its islands, misleading as a probe)
}

# Prompt templates, written for Neuroglot.  Each ends with [Y], optionally
# followed by final punctuation, so that the prompt is the text before [Y].
# Subjects and objects are inserted uninflected, so the Russian templates
# keep both slots in the nominative (colon, "под названием", "как [X]",
# relative clauses) and the Arabic ones rely on unmarked case endings.
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "P36": {
        "en": ["The capital city of [X] is called [Y].", "[X] is governed from its capital, [Y].",
               "[X] has its capital at [Y]."],
        "de": ["Als Hauptstadt von [X] gilt [Y].", "[X] hat als Hauptstadt [Y].", "Hauptstadt von [X] ist die Stadt [Y]."],
        "fr": ["La capitale de [X] s'appelle [Y].", "[X] a pour capitale [Y].", "La ville qui sert de capitale à [X] est [Y]."],
        "es": ["La capital de [X] se encuentra en [Y].", "[X] tiene como capital [Y].", "La ciudad capital de [X] se llama [Y]."],
        "ru": ["Столичный город, который имеет [X], — это [Y].", "[X] — территория, столицей которой является [Y].",
               "[X] управляется из столицы под названием [Y]."],
        "ar": ["عاصمة [X] هي مدينة [Y].", "[X] عاصمتها [Y].", "المدينة التي تعد عاصمة [X] هي [Y]."],
        "zh": ["[X]的首都名叫[Y]。", "提到[X]的首都，答案是[Y]。", "[X]的首都城市为[Y]。"],
        "ja": ["[X]の首都といえば[Y]。", "[X]の首都の名前は[Y]。", "[X]の首都となっている都市は[Y]。"],
    },
    "P1376": {
        "en": ["[X] serves as the capital city of [Y].", "The city of [X] is the capital of [Y].",
               "As a capital, [X] is the seat of government of [Y]."],
        "de": ["Die Stadt [X] ist Hauptstadt von [Y].", "[X] dient als Hauptstadt von [Y].",
               "[X] ist der Regierungssitz und die Hauptstadt von [Y]."],
        "fr": ["La ville de [X] est la capitale de [Y].", "[X] est la ville capitale de [Y].",
               "[X] sert de capitale au territoire suivant : [Y]."],
        "es": ["La ciudad de [X] es la capital de [Y].", "[X] funciona como capital de [Y].",
               "[X] es la ciudad capital del territorio de [Y]."],
        "ru": ["[X] — столица территории под названием [Y].", "Территория, столицей которой является [X], — это [Y].",
               "Город [X] — столица; страна или регион, где он находится, называется [Y]."],
        "ar": ["مدينة [X] عاصمة [Y].", "تعد [X] عاصمة [Y].", "[X] هي المدينة التي تعد عاصمة [Y]."],
        "zh": ["以[X]为首都的国家或地区是[Y]。", "[X]是首都，它所在的国家或地区是[Y]。", "[X]是哪里的首都？是[Y]。"],
        "ja": ["[X]を首都とする国・地域は[Y]。", "[X]が首都となっているのは[Y]。", "[X]はどこの首都かというと[Y]。"],
    },
    "P17": {
        "en": ["[X] is located in the country of [Y].", "The country in which [X] lies is [Y].",
               "[X] belongs to the country of [Y]."],
        "de": ["[X] liegt im Land [Y].", "[X] gehört zum Staat [Y].", "Das Land, in dem sich [X] befindet, ist [Y]."],
        "fr": ["Le pays où se trouve [X] est [Y].", "[X] est situé dans un pays nommé [Y].",
               "[X] relève de l'État suivant : [Y]."],
        "es": ["El país donde se encuentra [X] es [Y].", "[X] está situado en un país llamado [Y].",
               "[X] forma parte del Estado de [Y]."],
        "ru": ["[X] находится в стране под названием [Y].", "Страна, где находится [X], — это [Y].", "[X]: страна — [Y]."],
        "ar": ["يقع [X] في دولة [Y].", "البلد الذي يوجد فيه [X] هو [Y].", "ينتمي [X] إلى دولة [Y]."],
        "zh": ["[X]所在的国家是[Y]。", "[X]隶属的国家是[Y]。", "说起[X]所在的国家，那就是[Y]。"],
        "ja": ["[X]がある国は[Y]。", "[X]の所在国は[Y]。", "[X]が位置する国といえば[Y]。"],
    },
    "P30": {
        "en": ["[X] is located on the continent of [Y].", "The continent where [X] lies is [Y].",
               "Geographically, [X] belongs to the continent of [Y]."],
        "de": ["[X] liegt auf dem Kontinent [Y].", "Der Kontinent, auf dem [X] liegt, ist [Y].",
               "Geografisch gehört [X] zum Kontinent [Y]."],
        "fr": ["Le continent où se trouve [X] est [Y].", "[X] est situé sur le continent suivant : [Y].",
               "Géographiquement, [X] appartient au continent [Y]."],
        "es": ["El continente donde se encuentra [X] es [Y].", "[X] se ubica en el continente de [Y].",
               "Geográficamente, [X] pertenece al continente de [Y]."],
        "ru": ["[X] находится на континенте под названием [Y].", "Континент, на котором находится [X], — это [Y].",
               "[X]: часть света — [Y]."],
        "ar": ["تقع [X] في قارة [Y].", "القارة التي يقع فيها [X] هي [Y].", "ينتمي [X] جغرافيًا إلى قارة [Y]."],
        "zh": ["[X]所在的大洲是[Y]。", "[X]在地理上属于[Y]。", "从地理上看，[X]位于[Y]。"],
        "ja": ["[X]がある大陸は[Y]。", "[X]の所在する大陸は[Y]。", "地理的に[X]が属しているのは[Y]。"],
    },
    "P37": {
        "en": ["In [X], the official language is [Y].", "The language with official status in [X] is [Y].",
               "Government business in [X] is conducted in [Y]."],
        "de": ["Als Amtssprache gilt in [X] [Y].", "In [X] ist die offizielle Sprache [Y].",
               "Die Behörden in [X] arbeiten auf [Y]."],
        "fr": ["La langue officielle en vigueur pour [X] est [Y].", "Pour [X], la langue ayant un statut officiel est [Y].",
               "L'administration de [X] travaille en [Y]."],
        "es": ["El idioma que tiene carácter oficial en [X] es [Y].", "En [X], la lengua oficial es [Y].",
               "La administración de [X] trabaja en [Y]."],
        "ru": ["[X]: официальный язык — [Y].", "Язык, который [X] использует как официальный, — это [Y].",
               "В качестве официального языка [X] использует [Y]."],
        "ar": ["اللغة الرسمية في [X] هي [Y].", "تستخدم [X] لغةً رسمية هي [Y].", "اللغة المعتمدة رسميًا في [X] هي [Y]."],
        "zh": ["在[X]，官方语言是[Y]。", "[X]规定的官方语言是[Y]。", "[X]政府使用的官方语言是[Y]。"],
        "ja": ["[X]で公用語とされているのは[Y]。", "[X]の公用語といえば[Y]。", "[X]で公式に使われる言語は[Y]。"],
    },
    "P27": {
        "en": ["[X] holds the citizenship of [Y].", "[X] carries a passport issued by [Y].",
               "The country of citizenship of [X] is [Y]."],
        "de": ["[X] hat die Staatsbürgerschaft des Landes [Y].", "[X] ist Staatsbürger von [Y].",
               "Das Land, dessen Staatsangehörigkeit [X] besitzt, ist [Y]."],
        "fr": ["Le pays dont [X] a la citoyenneté est [Y].", "[X] est citoyen du pays suivant : [Y].",
               "Pays de citoyenneté de [X] : [Y]."],
        "es": ["[X] posee la ciudadanía de [Y].", "El país de ciudadanía de [X] es [Y].", "[X] tiene la nacionalidad de [Y]."],
        "ru": ["[X]: гражданство — [Y].", "Страна, гражданство которой имеет [X], — это [Y].",
               "[X] имеет гражданство страны под названием [Y]."],
        "ar": ["يحمل [X] جنسية [Y].", "البلد الذي يحمل [X] جنسيته هو [Y].", "[X] مواطن من مواطني [Y]."],
        "zh": ["[X]的公民身份属于[Y]。", "[X]所持护照的签发国是[Y]。", "[X]是哪国公民？答案是[Y]。"],
        "ja": ["[X]が市民権を持つ国は[Y]。", "[X]はどこの国の国民かというと[Y]。", "[X]の国籍といえば[Y]。"],
    },
    "P19": {
        "en": ["[X] came into the world in [Y].", "The birthplace of [X] is [Y].", "Records show that [X] was born in [Y]."],
        "de": ["Der Geburtsort von [X] ist [Y].", "[X] stammt gebürtig aus [Y].", "Geboren wurde [X] in [Y]."],
        "fr": ["Le lieu de naissance de [X] est [Y].", "[X] a vu le jour à [Y].", "[X] naquit à [Y]."],
        "es": ["El lugar de nacimiento de [X] es [Y].", "[X] vino al mundo en [Y].", "[X] nació en la localidad de [Y]."],
        "ru": ["[X]: место рождения — [Y].", "Место рождения такого человека, как [X], — это [Y].",
               "Биография: [X]. Место рождения: [Y]."],
        "ar": ["وُلد [X] في [Y].", "مكان ولادة [X] هو [Y].", "مسقط رأس [X] هو [Y]."],
        "zh": ["[X]诞生于[Y]。", "[X]的出生地点为[Y]。", "[X]降生的地方是[Y]。"],
        "ja": ["[X]の出生地は[Y]。", "[X]が生まれた場所は[Y]。", "[X]の生まれ故郷は[Y]。"],
    },
    "P20": {
        "en": ["The life of [X] ended in [Y].", "The place of death of [X] was [Y].", "According to records, [X] died in [Y]."],
        "de": ["Der Sterbeort von [X] ist [Y].", "Gestorben ist [X] in [Y].", "[X] verstarb in [Y]."],
        "fr": ["[X] mourut à [Y].", "Le lieu de décès de [X] est [Y].", "[X] a rendu son dernier souffle à [Y]."],
        "es": ["[X] murió en la localidad de [Y].", "El lugar de fallecimiento de [X] es [Y].", "La muerte de [X] se produjo en [Y]."],
        "ru": ["[X]: место смерти — [Y].", "Место смерти такого человека, как [X], — это [Y].",
               "Биография: [X]. Место смерти: [Y]."],
        "ar": ["كانت وفاة [X] في [Y].", "مكان وفاة [X] هو [Y].", "فارق [X] الحياة في [Y]."],
        "zh": ["[X]逝世于[Y]。", "[X]的去世地点是[Y]。", "[X]生命的最后时刻是在[Y]。"],
        "ja": ["[X]の死没地は[Y]。", "[X]が亡くなった場所は[Y]。", "[X]が最期を迎えた地は[Y]。"],
    },
    "P159": {
        "en": ["The headquarters of [X] can be found in [Y].", "The head office of [X] is located in [Y].", "[X] has its main office in [Y]."],
        "de": ["Seinen Hauptsitz hat [X] in [Y].", "[X] hat seinen Sitz in [Y].", "Die Zentrale von [X] liegt in [Y]."],
        "fr": ["Le siège de [X] se trouve à [Y].", "[X] a établi son siège à [Y].", "Le quartier général de [X] est situé à [Y]."],
        "es": ["La sede principal de [X] se ubica en [Y].", "[X] tiene su sede central en [Y].",
               "Las oficinas centrales de [X] se encuentran en [Y]."],
        "ru": ["[X]: штаб-квартира — [Y].", "Город, где расположена штаб-квартира организации [X], — это [Y].",
               "Главный офис, который имеет [X], находится в городе [Y]."],
        "ar": ["يوجد المقر الرئيسي لـ [X] في [Y].", "مقر [X] الرئيسي في [Y].", "المدينة التي يوجد فيها مقر [X] هي [Y]."],
        "zh": ["[X]把总部设在了[Y]。", "[X]的总部所在城市是[Y]。", "[X]的总部坐落于[Y]。"],
        "ja": ["[X]の本部がある場所は[Y]。", "[X]の本拠地は[Y]。", "[X]の本社所在地は[Y]。"],
    },
    "P103": {
        "en": ["[X]'s mother tongue is [Y].", "The first language [X] learned to speak was [Y].",
               "As a native speaker, [X] speaks [Y]."],
        "de": ["Von Haus aus spricht [X] [Y].", "Die erste Sprache von [X] war [Y].", "Als Kind lernte [X] zuerst [Y]."],
        "fr": ["[X] a pour langue maternelle [Y].", "La première langue parlée par [X] est [Y].", "Langue maternelle de [X] : [Y]."],
        "es": ["El idioma materno de [X] es [Y].", "[X] tiene como lengua materna [Y].",
               "El primer idioma que aprendió [X] fue [Y]."],
        "ru": ["[X]: родной язык — [Y].", "Родной язык такого человека, как [X], — это [Y].", "Биография: [X]. Родной язык: [Y]."],
        "ar": ["اللغة الأم عند [X] هي [Y].", "لغة [X] الأم هي [Y].", "أول لغة تحدث بها [X] هي [Y]."],
        "zh": ["[X]的第一语言是[Y]。", "[X]从小说的母语为[Y]。", "[X]最先学会的语言是[Y]。"],
        "ja": ["[X]の母語は[Y]。", "[X]が最初に覚えた言語は[Y]。", "[X]の第一言語は[Y]。"],
    },
    "P178": {
        "en": ["The company that developed [X] is [Y].", "The developer of [X] is [Y].", "[X] is a product created by [Y]."],
        "de": ["[X] wurde entwickelt von [Y].", "Der Entwickler von [X] ist [Y].", "Hinter der Entwicklung von [X] steht [Y]."],
        "fr": ["[X] est développé par la société [Y].", "Le développeur de [X] est [Y].", "[X] est un produit conçu par [Y]."],
        "es": ["La empresa que desarrolló [X] es [Y].", "El desarrollador de [X] es [Y].", "[X] es un producto creado por [Y]."],
        "ru": ["Разработчик продукта [X] — [Y].", "[X]: разработчик — [Y].", "Компания, которая разработала [X], — это [Y]."],
        "ar": ["تم تطوير [X] من قبل [Y].", "الشركة المطورة لـ [X] هي [Y].", "[X] من تطوير [Y]."],
        "zh": ["[X]的开发者是[Y]。", "[X]的开发商为[Y]。", "开发[X]的公司是[Y]。"],
        "ja": ["[X]の開発元は[Y]。", "[X]を開発したのは[Y]。", "[X]の開発を手がけた企業は[Y]。"],
    },
    "P495": {
        "en": ["[X] first appeared in [Y].", "The country of origin of [X] is [Y].", "[X] comes originally from [Y]."],
        "de": ["[X] stammt ursprünglich aus [Y].", "Das Herkunftsland von [X] ist [Y].", "Entstanden ist [X] in [Y]."],
        "fr": ["[X] vient à l'origine du pays suivant : [Y].", "Le pays d'origine de [X] est [Y].", "[X] a été créé dans le pays suivant : [Y]."],
        "es": ["La procedencia de [X] es [Y].", "El país de origen de [X] es [Y].", "[X] surgió en [Y]."],
        "ru": ["[X]: страна происхождения — [Y].", "Страна, откуда происходит [X], — это [Y].",
               "По происхождению [X] относится к стране под названием [Y]."],
        "ar": ["نشأ [X] في [Y].", "بلد منشأ [X] هو [Y].", "يعود أصل [X] إلى [Y]."],
        "zh": ["[X]发源于[Y]。", "[X]的原产国是[Y]。", "[X]最早出现在[Y]。"],
        "ja": ["[X]の発祥の地は[Y]。", "[X]の原産国は[Y]。", "[X]が生まれた国は[Y]。"],
    },
}

_QID = re.compile(r"Q\d+")


def _read_tuples(path: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[int(rec["lineid"])] = rec
    return out


def _usable_label(label: str) -> bool:
    label = (label or "").strip()
    return bool(label) and not _QID.fullmatch(label)


def select_facts(mpararel_dir: Path, relation: str, n: int = FACTS_PER_RELATION) -> list[dict]:
    """The demo facts of one relation, one dict per (fact, language); see the module docstring."""
    tuples = {}
    for lang, folder in LANGUAGE_DIRS.items():
        path = mpararel_dir / "tuples" / folder / f"{relation}.jsonl"
        if not path.is_file():
            raise SystemExit(f"missing {path}: is {mpararel_dir} an mParaRel checkout?")
        tuples[lang] = _read_tuples(path)
    objects_per_subject = Counter(rec["sub_uri"] for rec in tuples["en"].values())
    common = set.intersection(*(set(t) for t in tuples.values()))
    candidates = []
    for lineid in common:
        recs = [tuples[lang][lineid] for lang in LANGUAGE_DIRS]
        if len({(r["sub_uri"], r["obj_uri"]) for r in recs}) != 1:
            continue
        if objects_per_subject[recs[0]["sub_uri"]] > 1 or (relation, recs[0]["sub_uri"]) in EXCLUDED:
            continue
        if not all(_usable_label(r["sub_label"]) and _usable_label(r["obj_label"]) for r in recs):
            continue
        if any(r["obj_label"].strip().lower() in r["sub_label"].strip().lower() for r in recs):
            continue
        candidates.append(lineid)
    candidates.sort(key=lambda i: (int(tuples["en"][i]["sub_uri"][1:]), i))
    rows = []
    for lineid in sorted(candidates[:n]):
        for lang in LANGUAGE_DIRS:
            r = tuples[lang][lineid]
            rows.append({
                "fact_id": f"{relation}:{lineid}", "relation": relation, "language": lang,
                "subject": r["sub_label"].strip(), "object": r["obj_label"].strip(),
                "sub_uri": r["sub_uri"], "obj_uri": r["obj_uri"],
            })
    return rows


def build(mpararel_dir: Path, out_dir: Path = DEMO_DIR) -> dict[str, int]:
    """Write facts.jsonl, templates.jsonl, relations.json and NOTICE; return facts per relation."""
    mpararel_dir = Path(mpararel_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts, counts = [], {}
    for relation in RELATIONS:
        rows = select_facts(mpararel_dir, relation)
        counts[relation] = len(rows) // len(LANGUAGE_DIRS)
        facts.extend(rows)
    with (out_dir / "facts.jsonl").open("w", encoding="utf-8") as f:
        for row in facts:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (out_dir / "templates.jsonl").open("w", encoding="utf-8") as f:
        for relation in RELATIONS:
            for lang in LANGUAGE_DIRS:
                for k, template in enumerate(TEMPLATES[relation][lang], start=1):
                    rec = {"relation": relation, "language": lang,
                           "template_id": f"{relation}.{lang}.{k}", "template": template}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (out_dir / "relations.json").write_text(json.dumps(RELATIONS, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out_dir / "NOTICE").write_text(_notice(counts), encoding="utf-8")
    return counts


def _notice(counts: dict[str, int]) -> str:
    n_templates = sum(len(ts) for per_lang in TEMPLATES.values() for ts in per_lang.values())
    lines = [
        "Neuroglot demo corpus",
        "=====================",
        "",
        "facts.jsonl: subject and object labels are Wikidata labels (CC0 1.0,",
        "https://www.wikidata.org/wiki/Wikidata:Copyright) of T-REx facts",
        "(Elsahar et al., 2018), as distributed in the mParaRel tuples",
        "(coastalcph/mpararel @ 7153b7b, data/mpararel_reviewed/tuples). Only the",
        "labels and Wikidata ids are used; no pattern text of mParaRel, ParaRel or",
        "X-FACTR is included. relations.json holds Wikidata property labels (CC0).",
        "",
        "templates.jsonl: the prompt templates were written by the Neuroglot authors",
        "and are distributed under the licence of the Neuroglot project (Apache-2.0).",
        "",
        "Generated by `python -m data.build_demo <mParaRel folder>` (data/build_demo.py),",
        "which documents the deterministic fact selection.",
        "",
        f"Languages ({len(LANGUAGE_DIRS)}): {', '.join(LANGUAGE_DIRS)}",
        f"Relations ({len(RELATIONS)}), facts aligned across all languages:",
    ]
    for relation, label in RELATIONS.items():
        lines.append(f"  {relation:<6} {label:<24} {counts[relation]:>4} facts")
    lines += [
        f"Total: {sum(counts.values())} facts x {len(LANGUAGE_DIRS)} languages = "
        f"{sum(counts.values()) * len(LANGUAGE_DIRS)} fact lines; {n_templates} templates "
        f"(3 per relation and language).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mpararel", type=Path, help="mParaRel folder with tuples/<lang>/P*.jsonl")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder (default: data/demo)")
    args = parser.parse_args(argv)
    counts = build(args.mpararel, args.out)
    for relation, n in counts.items():
        print(f"{relation:<6} {RELATIONS[relation]:<24} {n:>4} facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
