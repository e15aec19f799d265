"""Tiny random models of every architecture family, and a tiny tokenizer. No downloads.

``tiny_model(family)`` builds the family's transformers config class with tiny sizes
and random (seeded) weights. The weights are rescaled so that activations are
O(1): the default init (std 0.02, zero biases, unit norms) makes every FFN value
so small that comparisons against ``assert_close``'s absolute tolerance would pass
for wrong code.

``tiny_tokenizer()`` is a byte-level BPE trained in memory (well under a second) on
the small multilingual text embedded below (English, German, French, Spanish,
Chinese), so it never depends on files outside the repository. Its vocabulary has
at most ``TINY_VOCAB_SIZE`` entries; every tiny model's embedding has exactly
``TINY_VOCAB_SIZE`` rows. Special tokens: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2,
``<unk>`` 3; encoding with ``add_special_tokens=True`` prepends ``<bos>``.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import threading
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TINY_FAMILIES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "gpt2", "gptj", "gpt_neox", "bloom", "xglm",
)
#: Also buildable: "gemma3", the multimodal Gemma3ForConditionalGeneration wrapper
#: (tiny SigLIP vision tower) whose text layers sit under ``model.language_model``.
EXTRA_FAMILIES: tuple[str, ...] = ("gemma3",)

TINY_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

D_MODEL = 32
D_FF = 80          # deliberately not 4 * D_MODEL (bloom is fixed at 4 * D_MODEL = 128)
N_LAYERS = 3
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = D_MODEL // N_HEADS
MAX_POSITIONS = 256

# ---------------------------------------------------------------------------------
# Embedded multilingual text: facts in five languages (aligned by index, as a
# fact corpus would be) plus free sentences.
# ---------------------------------------------------------------------------------
_COUNTRIES = {
    # en, de, fr, es, zh : (country, capital, language)
    "en": [("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
           ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("China", "Beijing", "Chinese"),
           ("Russia", "Moscow", "Russian"), ("Egypt", "Cairo", "Arabic"), ("Poland", "Warsaw", "Polish"),
           ("Greece", "Athens", "Greek"), ("Austria", "Vienna", "German"), ("Portugal", "Lisbon", "Portuguese")],
    "de": [("Frankreich", "Paris", "Französisch"), ("Deutschland", "Berlin", "Deutsch"), ("Italien", "Rom", "Italienisch"),
           ("Spanien", "Madrid", "Spanisch"), ("Japan", "Tokio", "Japanisch"), ("China", "Peking", "Chinesisch"),
           ("Russland", "Moskau", "Russisch"), ("Ägypten", "Kairo", "Arabisch"), ("Polen", "Warschau", "Polnisch"),
           ("Griechenland", "Athen", "Griechisch"), ("Österreich", "Wien", "Deutsch"), ("Portugal", "Lissabon", "Portugiesisch")],
    "fr": [("la France", "Paris", "français"), ("l'Allemagne", "Berlin", "allemand"), ("l'Italie", "Rome", "italien"),
           ("l'Espagne", "Madrid", "espagnol"), ("le Japon", "Tokyo", "japonais"), ("la Chine", "Pékin", "chinois"),
           ("la Russie", "Moscou", "russe"), ("l'Égypte", "Le Caire", "arabe"), ("la Pologne", "Varsovie", "polonais"),
           ("la Grèce", "Athènes", "grec"), ("l'Autriche", "Vienne", "allemand"), ("le Portugal", "Lisbonne", "portugais")],
    "es": [("Francia", "París", "francés"), ("Alemania", "Berlín", "alemán"), ("Italia", "Roma", "italiano"),
           ("España", "Madrid", "español"), ("Japón", "Tokio", "japonés"), ("China", "Pekín", "chino"),
           ("Rusia", "Moscú", "ruso"), ("Egipto", "El Cairo", "árabe"), ("Polonia", "Varsovia", "polaco"),
           ("Grecia", "Atenas", "griego"), ("Austria", "Viena", "alemán"), ("Portugal", "Lisboa", "portugués")],
    "zh": [("法国", "巴黎", "法语"), ("德国", "柏林", "德语"), ("意大利", "罗马", "意大利语"),
           ("西班牙", "马德里", "西班牙语"), ("日本", "东京", "日语"), ("中国", "北京", "汉语"),
           ("俄罗斯", "莫斯科", "俄语"), ("埃及", "开罗", "阿拉伯语"), ("波兰", "华沙", "波兰语"),
           ("希腊", "雅典", "希腊语"), ("奥地利", "维也纳", "德语"), ("葡萄牙", "里斯本", "葡萄牙语")],
}
_TEMPLATES = {
    "en": ["The capital of {c} is {k}.", "{k} is the capital city of {c}.",
           "People in {c} speak {l}.", "The official language of {c} is {l}."],
    "de": ["Die Hauptstadt von {c} ist {k}.", "{k} ist die Hauptstadt von {c}.",
           "In {c} spricht man {l}.", "Die Amtssprache von {c} ist {l}."],
    "fr": ["La capitale de {c} est {k}.", "{k} est la capitale de {c}.",
           "En {c}, on parle {l}.", "La langue officielle de {c} est le {l}."],
    "es": ["La capital de {c} es {k}.", "{k} es la capital de {c}.",
           "En {c} se habla {l}.", "El idioma oficial de {c} es el {l}."],
    "zh": ["{c}的首都是{k}。", "{k}是{c}的首都。", "{c}人说{l}。", "{c}的官方语言是{l}。"],
}
_PEOPLE = {
    "en": [("Albert Einstein", "physicist", "Ulm"), ("Marie Curie", "chemist", "Warsaw"),
           ("Pablo Picasso", "painter", "Málaga"), ("Ludwig van Beethoven", "composer", "Bonn"),
           ("Lu Xun", "writer", "Shaoxing"), ("Victor Hugo", "writer", "Besançon")],
    "de": [("Albert Einstein", "Physiker", "Ulm"), ("Marie Curie", "Chemikerin", "Warschau"),
           ("Pablo Picasso", "Maler", "Málaga"), ("Ludwig van Beethoven", "Komponist", "Bonn"),
           ("Lu Xun", "Schriftsteller", "Shaoxing"), ("Victor Hugo", "Schriftsteller", "Besançon")],
    "fr": [("Albert Einstein", "physicien", "Ulm"), ("Marie Curie", "chimiste", "Varsovie"),
           ("Pablo Picasso", "peintre", "Malaga"), ("Ludwig van Beethoven", "compositeur", "Bonn"),
           ("Lu Xun", "écrivain", "Shaoxing"), ("Victor Hugo", "écrivain", "Besançon")],
    "es": [("Albert Einstein", "físico", "Ulm"), ("Marie Curie", "química", "Varsovia"),
           ("Pablo Picasso", "pintor", "Málaga"), ("Ludwig van Beethoven", "compositor", "Bonn"),
           ("Lu Xun", "escritor", "Shaoxing"), ("Victor Hugo", "escritor", "Besanzón")],
    "zh": [("阿尔伯特·爱因斯坦", "物理学家", "乌尔姆"), ("玛丽·居里", "化学家", "华沙"),
           ("巴勃罗·毕加索", "画家", "马拉加"), ("路德维希·凡·贝多芬", "作曲家", "波恩"),
           ("鲁迅", "作家", "绍兴"), ("维克多·雨果", "作家", "贝桑松")],
}
_PEOPLE_TEMPLATES = {
    "en": ["{p} was a famous {o}.", "{p} was born in {b}."],
    "de": ["{p} war ein berühmter {o}.", "{p} wurde in {b} geboren."],
    "fr": ["{p} était un célèbre {o}.", "{p} est né à {b}."],
    "es": ["{p} fue un famoso {o}.", "{p} nació en {b}."],
    "zh": ["{p}是一位著名的{o}。", "{p}出生于{b}。"],
}
_FREE = {
    "en": """The weather was cold, so we stayed at home and read books.
Scientists announced on Monday that they had found a new species of bird.
The train to the airport leaves every twenty minutes.
She opened the window and listened to the rain.
Children learn languages faster than most adults.
The museum is closed on Tuesdays and public holidays.
He bought three apples, two pears and a loaf of bread.
Water boils at one hundred degrees Celsius at sea level.
The river flows through the old town towards the sea.
Our team won the match after a very long season.""",
    "de": """Das Wetter war kalt, also blieben wir zu Hause und lasen Bücher.
Wissenschaftler gaben am Montag bekannt, dass sie eine neue Vogelart gefunden hatten.
Der Zug zum Flughafen fährt alle zwanzig Minuten.
Sie öffnete das Fenster und hörte dem Regen zu.
Kinder lernen Sprachen schneller als die meisten Erwachsenen.
Das Museum ist dienstags und an Feiertagen geschlossen.
Er kaufte drei Äpfel, zwei Birnen und ein Brot.
Wasser kocht auf Meereshöhe bei hundert Grad Celsius.
Der Fluss fließt durch die Altstadt zum Meer.
Unsere Mannschaft gewann das Spiel nach einer sehr langen Saison.""",
    "fr": """Il faisait froid, alors nous sommes restés à la maison pour lire.
Des scientifiques ont annoncé lundi la découverte d'une nouvelle espèce d'oiseau.
Le train pour l'aéroport part toutes les vingt minutes.
Elle a ouvert la fenêtre et a écouté la pluie.
Les enfants apprennent les langues plus vite que les adultes.
Le musée est fermé le mardi et les jours fériés.
Il a acheté trois pommes, deux poires et un pain.
L'eau bout à cent degrés Celsius au niveau de la mer.""",
    "es": """Hacía frío, así que nos quedamos en casa leyendo libros.
Los científicos anunciaron el lunes que habían encontrado una nueva especie de ave.
El tren al aeropuerto sale cada veinte minutos.
Ella abrió la ventana y escuchó la lluvia.
Los niños aprenden idiomas más rápido que los adultos.
El museo cierra los martes y los días festivos.
Compró tres manzanas, dos peras y una barra de pan.
El agua hierve a cien grados Celsius al nivel del mar.""",
    "zh": """天气很冷，所以我们待在家里看书。
科学家们周一宣布，他们发现了一种新的鸟类。
去机场的火车每二十分钟一班。
她打开窗户，听着雨声。
孩子们学习语言比大多数成年人快。
博物馆每周二和公共假日闭馆。
他买了三个苹果、两个梨和一个面包。
在海平面上，水在一百摄氏度时沸腾。
这条河穿过老城流向大海。
经过一个漫长的赛季，我们的球队赢得了比赛。""",
}


def tiny_corpus() -> list[str]:
    """The embedded multilingual sentences (a few hundred), deterministic order."""
    lines: list[str] = []
    for lang, rows in _COUNTRIES.items():
        for (c, k, l), t in itertools.product(rows, _TEMPLATES[lang]):
            lines.append(t.format(c=c, k=k, l=l))
        for (p, o, b), t in itertools.product(_PEOPLE[lang], _PEOPLE_TEMPLATES[lang]):
            lines.append(t.format(p=p, o=o, b=b))
        lines.extend(s.strip() for s in _FREE[lang].splitlines() if s.strip())
    return lines


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", BOS_ID)]
    )
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
    assert tok.get_vocab_size() <= TINY_VOCAB_SIZE
    return tok.to_str()


def tiny_tokenizer(padding_side: str = "right") -> transformers.PreTrainedTokenizerFast:
    """A fresh tokenizer object each call (cheap); the BPE training itself is cached."""
    backend = Tokenizer.from_str(_trained_tokenizer_json())
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side=padding_side,
        model_max_length=MAX_POSITIONS,
    )


# ---------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------
_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def _gated_kwargs() -> dict:
    return dict(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=D_MODEL, intermediate_size=D_FF,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS, **_IDS,
    )


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """The family's config class with tiny sizes (d_model 32, d_ff 80 or 128, 3 layers)."""
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**_gated_kwargs())
    if family == "mistral":
        return t.MistralConfig(**_gated_kwargs(), sliding_window=None)
    if family == "qwen2":
        return t.Qwen2Config(**_gated_kwargs())
    if family == "qwen3":
        return t.Qwen3Config(**_gated_kwargs(), head_dim=HEAD_DIM)
    if family == "gemma":
        return t.GemmaConfig(**_gated_kwargs(), head_dim=HEAD_DIM)
    if family == "gemma2":
        return t.Gemma2Config(**_gated_kwargs(), head_dim=HEAD_DIM, sliding_window=4,
                              query_pre_attn_scalar=HEAD_DIM)
    if family == "gemma3_text":
        return t.Gemma3TextConfig(**_gated_kwargs(), head_dim=HEAD_DIM, sliding_window=4,
                                  query_pre_attn_scalar=HEAD_DIM)
    if family == "gemma3":
        vision = t.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=8)
        return t.Gemma3Config(text_config=tiny_config("gemma3_text").to_dict(),
                              vision_config=vision.to_dict(), mm_tokens_per_image=4)
    if family == "gpt2":
        return t.GPT2Config(vocab_size=TINY_VOCAB_SIZE, n_embd=D_MODEL, n_inner=D_FF, n_layer=N_LAYERS,
                            n_head=N_HEADS, n_positions=MAX_POSITIONS, **_IDS)
    if family == "gptj":
        return t.GPTJConfig(vocab_size=TINY_VOCAB_SIZE, n_embd=D_MODEL, n_inner=D_FF, n_layer=N_LAYERS,
                            n_head=N_HEADS, rotary_dim=4, n_positions=MAX_POSITIONS, **_IDS)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=D_MODEL, intermediate_size=D_FF,
                               num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                               max_position_embeddings=MAX_POSITIONS, use_parallel_residual=True, **_IDS)
    if family == "bloom":
        return t.BloomConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=D_MODEL, n_layer=N_LAYERS,
                             n_head=N_HEADS, **_IDS)
    if family == "xglm":
        return t.XGLMConfig(vocab_size=TINY_VOCAB_SIZE, d_model=D_MODEL, ffn_dim=D_FF, num_layers=N_LAYERS,
                            attention_heads=N_HEADS, max_position_embeddings=MAX_POSITIONS, **_IDS)
    raise ValueError(f"No tiny config for {family!r}; families: {TINY_FAMILIES + EXTRA_FAMILIES}")


@torch.no_grad()
def _rescale_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights so activations are O(1) and biases/norm gains are non-trivial."""
    gen = torch.Generator().manual_seed(seed + 12345)
    seen: set[int] = set()
    for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(param) in seen:  # tied embeddings / LM head
            continue
        seen.add(id(param))
        noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        if param.ndim >= 2:
            fan_in = min(param.shape)  # Linear [out, in], Conv1D [in, out], Embedding [V, d]
            param.copy_(noise * (1.0 / fan_in**0.5))
        else:  # biases and norm gains (gemma's (1 + w) norms start at w = 0)
            param.add_(0.1 * noise)


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random ``*ForCausalLM`` of ``family`` in eval mode, float32, eager attention."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    if family == "gemma3":
        model = transformers.Gemma3ForConditionalGeneration._from_config(
            config, attn_implementation="eager", dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32)
    _rescale_weights(model, seed)
    return model.eval()


def tiny_model_and_tokenizer(family: str, seed: int = 0, padding_side: str = "right"):
    return tiny_model(family, seed), tiny_tokenizer(padding_side)


def save_tiny_checkpoint(family: str, folder) -> transformers.PreTrainedModel:
    """Write a tiny model and its tokenizer as a Hugging Face checkpoint folder; return the model."""
    model, tok = tiny_model_and_tokenizer(family)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


# ---------------------------------------------------------------- shared test helpers


@functools.lru_cache(maxsize=None)
def tiny_workbench(family: str = "llama"):
    """A cached Workbench over the tiny ``family`` model (spec and name ``tiny-<family>``)."""
    from analysis.model import Workbench

    model, tok = tiny_model_and_tokenizer(family)
    return Workbench.from_loaded(model, tok, spec=f"tiny-{family}", name=f"tiny-{family}")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model equals its ``snapshot`` bit for bit."""
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for name, value in snap.items():
        assert torch.equal(state[name], value), name


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


#: The shared data sets beside the repository (``../shared/data``), as CI provides them.
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MZSRE_DEV = SHARED_DATA / "mzsre" / "dev"


def target_nll(wb, prompt: str, target: str, mean: bool = False) -> float:
    """-log P(target | prompt) by a plain full forward, teacher forced: summed over the target's tokens
    (``mean=True``: averaged over them)."""
    from analysis.tokens import answer_ids

    ids = wb.tokenizer(prompt, return_tensors="pt")["input_ids"]
    ans = answer_ids(wb.tokenizer, prompt, target)
    full = torch.cat([ids, torch.tensor([ans])], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(wb.model(input_ids=full).logits[0].float(), -1)
    n = ids.shape[1]
    total = float(-sum(logp[n - 1 + k, a] for k, a in enumerate(ans)))
    return total / len(ans) if mean else total


def lock_is_free(wb) -> bool:
    """Whether another thread can take ``wb.lock`` (an application must release it on exit)."""
    got: list[bool] = []

    def try_lock() -> None:
        ok = wb.lock.acquire(timeout=1)
        got.append(ok)
        if ok:
            wb.lock.release()

    thread = threading.Thread(target=try_lock)
    thread.start()
    thread.join()
    return got[0]


def write_dataset(folder) -> str:
    """A two-record MzsRE-format file in en and de (the tiny tokenizer's languages)."""
    items = []
    for country, land, capital in (("France", "Frankreich", "Berlin"), ("Spain", "Spanien", "Rome")):
        items.append({
            "en": {"subject": country, "src": f"The capital of {country} is", "rephrase": f"{country} has the capital",
                   "alt": capital, "loc": "nq question: The capital of Italy is", "loc_ans": "Rome",
                   "portability": {"New Question": f"The language of {country} is", "New Answer": "German"}},
            "de": {"subject": land, "src": f"Die Hauptstadt von {land} ist", "rephrase": f"Hauptstadt von {land}",
                   "alt": capital, "loc": "Die Hauptstadt von Italien ist", "loc_ans": "Rom",
                   "portability": {"New Question": f"Die Sprache von {land} ist", "New Answer": "Deutsch"}},
        })
    path = folder / "mzsre_test_duplicate_ende.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return str(folder)


def fake_run(folder, method: str, dataset: str = "d", em: float = 1.0, offset: int = 0, record: str = "r1") -> None:
    """A run folder written by hand: one record, one probe per kind in en."""
    from editors.evaluate import EvalConfig

    folder.mkdir(parents=True)
    config = EvalConfig(dataset=dataset, methods=[method], edit_sets=[["en"]], test_languages=["en"], n=1,
                        offset=offset)
    (folder / "config.json").write_text(json.dumps(config.__dict__), encoding="utf-8")
    probes_ = [{"language": "en", "kind": k, "prompt": "p", "reference": "r", "answer": "r", "f1": em, "em": em}
               for k in ("reliability", "generality", "locality", "portability")]
    rows = [{"method": "unedited", "edit_languages": "-", "record": record, "done": True, "seconds": 0.1,
             "probes": probes_},
            {"method": method, "edit_languages": "en", "record": record, "done": True, "seconds": 2.0,
             "probes": probes_}]
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


@contextlib.contextmanager
def neuroglot_cache(folder):
    """``NEUROGLOT_CACHE`` set to ``folder`` inside the block, the earlier value (or its absence) restored after: for
    module-scoped fixtures, which cannot use ``monkeypatch``."""
    before = os.environ.get("NEUROGLOT_CACHE")
    os.environ["NEUROGLOT_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("NEUROGLOT_CACHE", None)
        else:
            os.environ["NEUROGLOT_CACHE"] = before


def run_small_evaluation(base: Path, name: str) -> Path:
    """The run folder ``base/name`` of a real evaluation: IKE and LU-LAFNs on the tiny llama, the two records of
    :func:`write_dataset` (written to ``base/data``), edit sets en+de, en and de, tested in en and de. Run it inside
    :func:`neuroglot_cache` so the tiny model's key statistics stay out of the user's cache."""
    from editors.evaluate import EvalConfig, run_evaluation

    (base / "data").mkdir()
    config = EvalConfig(dataset=write_dataset(base / "data"), methods=["ike", "lu-lafns"],
                        edit_sets=[["en", "de"], ["en"], ["de"]], test_languages=["en", "de"], n=2,
                        model="tiny-llama",
                        hparams={"ike": dict(k=2), "lu-lafns": dict(layers=[0, 1, 2], beta=0.1, steps=3, lr=0.5,
                                                                    n_prefixes=1, prefix_length=2)})
    run_evaluation(tiny_workbench("llama"), config, base / name)
    return base / name


#: MEMIT on the tiny llama with few optimisation steps: a small sequential run in seconds.
TINY_SEQUENTIAL_MEMIT = dict(v_lr=1.0, v_num_grad_steps=4, clamp_norm_factor=0.0, v_weight_decay=0.0,
                             context_template_length_params=[[4, 1]], mom2_n_tokens=1000, layers=[0, 1],
                             mom2_update_weight=1.0)


def run_small_sequential(base: Path, name: str) -> Path:
    """The run folder ``base/name`` of a real sequential run: MEMIT on the tiny llama, two interleaved steps (en, de)
    of two MzsRE dev records (100-149), each asked in en and de. Needs :data:`MZSRE_DEV`; run it inside
    :func:`neuroglot_cache` so the tiny model's key statistics stay out of the user's cache."""
    from editors.sequential_run import StreamConfig, run_sequential

    stream = StreamConfig(dataset=str(MZSRE_DEV), languages=["en", "de"], batch=2, steps=2, order="interleaved",
                          records="100-149", flores_sentences=3)
    run_sequential(tiny_workbench("llama"), stream, ["memit"], base / name, hparams={"memit": TINY_SEQUENTIAL_MEMIT})
    return base / name


def raw_sequential_probes(folder) -> list[dict]:
    """Every probe row of a sequential folder's steps with its step, method, the unedited model's prediction and
    top-1 (``before``, ``top1_before``) and whether it failed (top-1 below 1; specificity: the prediction
    changed), read here rather than by the code under test."""
    folder = Path(folder)
    before = {(p["batch"], p["record"], p["language"], p["kind"]): p
              for p in json.loads((folder / "baseline.json").read_text(encoding="utf-8"))["probes"]}
    out = []
    for method_dir in sorted(p.parent for p in folder.glob("*/steps.jsonl")):
        for line in (method_dir / "steps.jsonl").read_text(encoding="utf-8").splitlines():
            step = json.loads(line)
            for p in step["probes"]:
                b = before[(p["batch"], p["record"], p["language"], p["kind"])]
                failed = p["predicted"] != b["predicted"] if p["kind"] == "specificity" else p["top1"] < 1
                out.append({**p, "step": step["step"], "method": method_dir.name, "failed": failed,
                            "before": b["predicted"], "top1_before": b["top1"]})
    return out


def raw_probes(folder) -> list[dict]:
    """Every probe of an evaluation folder's rows.jsonl with its row's method, edit set and record, read here rather
    than by the code under test."""
    out = []
    for line in (Path(folder) / "rows.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out += [dict(p, method=row["method"], edit_languages=row["edit_languages"], record=row["record"])
                for p in row["probes"]]
    return out


def run_cli(args: list[str]):
    """``neuroglot ARGS`` in this process through typer's CliRunner; the click ``Result`` (``exit_code``,
    ``output``)."""
    from typer.testing import CliRunner

    from app.cli import cli

    return CliRunner().invoke(cli, args)


#: One fact typed in English and German, as the Edit lab and Compare pages' forms take it.
TYPED_FACT = {
    "en": dict(prompt="The capital of France", subject="France", new="Berlin", old="Paris",
               para="Capital city of France", loc="The capital of Japan is | Tokyo"),
    "de": dict(prompt="Die Hauptstadt von Frankreich", subject="Frankreich", new="Berlin", old="Paris",
               para="Hauptstadt von Frankreich", loc=""),
}


def type_fact(at, prefix: str, fact: dict = TYPED_FACT) -> None:
    """On a page's fact form (widget keys ``<prefix>-…``, an AppTest ``at``), choose "Type a fact" and fill in
    ``fact``'s languages; the caller runs the page."""
    at.radio(key=f"{prefix}-source").set_value("Type a fact").run()
    at.multiselect(key=f"{prefix}-typed-languages").set_value(list(fact)).run()
    for lang, f in fact.items():
        at.text_input(key=f"{prefix}-prompt-{lang}").set_value(f["prompt"])
        at.text_input(key=f"{prefix}-subject-{lang}").set_value(f["subject"])
        at.text_input(key=f"{prefix}-new-{lang}").set_value(f["new"])
        at.text_input(key=f"{prefix}-old-{lang}").set_value(f["old"])
        at.text_area(key=f"{prefix}-para-{lang}").set_value(f["para"])
        at.text_area(key=f"{prefix}-loc-{lang}").set_value(f["loc"])
        at.text_area(key=f"{prefix}-port-{lang}").set_value("")


def app_page(view: str, spec: str | None = None, timeout: float = 120):
    """Streamlit's AppTest of the page ``app/views/<view>.py``, not run yet; with ``spec``, its session works on
    that model."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app" / "views" / f"{view}.py"),
                           default_timeout=timeout)
    if spec is not None:
        at.session_state["model_spec"] = spec
    return at


# ------------------------------------------------------------------ a tiny fact corpus

# Words of tests/tiny.py's sentences, so the tiny BPE tokenizer splits them into few tokens.
# "Japan" / "Japanese" (and "Japanisch"): the object repeats the subject, which must still be
# found in the prompt part of the statement, not inside the object.
_CORPUS_FACTS = {
    "en": [("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Japan", "Tokyo", "Japanese"),
           ("Portugal", "Lisbon", "Portuguese"), ("Greece", "Athens", "Greek")],
    "de": [("Frankreich", "Paris", "Französisch"), ("Deutschland", "Berlin", "Deutsch"),
           ("Japan", "Tokio", "Japanisch"), ("Portugal", "Lissabon", "Portugiesisch"),
           ("Griechenland", "Athen", "Griechisch")],
    "zh": [("法国", "巴黎", "法语"), ("德国", "柏林", "德语"), ("日本", "东京", "日语"),
           ("葡萄牙", "里斯本", "葡萄牙语"), ("希腊", "雅典", "希腊语")],
}
_CORPUS_TEMPLATES = {  # relation -> language -> templates ([X] before [Y])
    "P36": {"en": ["The capital of [X] is [Y]."], "de": ["Die Hauptstadt von [X] ist [Y]."],
            "zh": ["[X]的首都是[Y]。"]},
    "P37": {"en": ["People in [X] speak [Y].", "The official language of [X] is [Y]."],
            "de": ["In [X] spricht man [Y].", "Die Amtssprache von [X] ist [Y]."],
            "zh": ["[X]人说[Y]。", "[X]的官方语言是[Y]。"]},
}


def make_corpus(languages=("en", "de", "zh"), n_facts: int = 5, name: str = "tiny"):
    """A tiny ParaRel-style :class:`data.corpus.Corpus`: 15 statements per language (of different lengths) in two relations."""
    import pandas as pd

    from data.corpus import Corpus, prompt_from_template

    rows = []
    for relation, per_lang in _CORPUS_TEMPLATES.items():
        for lang in languages:
            for i, (country, capital, language) in enumerate(_CORPUS_FACTS[lang][:n_facts]):
                obj = capital if relation == "P36" else language
                for j, template in enumerate(per_lang[lang]):
                    rows.append(dict(fact_id=f"{relation}:{i}", relation=relation, language=lang, subject=country,
                                     object=obj, prompt=prompt_from_template(template, country),
                                     template_id=f"{relation}.{lang}.{j}", template=template))
    return Corpus(pd.DataFrame(rows), name=name)


# ------------------------------------------------------------------ a small overlap run folder

#: The points of :func:`write_overlap_run`: five records of LangEdit (agnostic share rising with transfer, so ρ is
#: +1) and of MPN (its weight all on its added neurons: agnostic share 0, ρ undefined), and one MPN error.
OVERLAP_RECORDS = [f"mzsre:{i}" for i in range(5)]


def overlap_points():
    """One row per record and editor, with the columns ``editors.overlap.overlap_transfer`` writes."""
    import pandas as pd

    rows = []
    for i, record in enumerate(OVERLAP_RECORDS):
        rows.append({"record": record, "method": "langedit", "agnostic share": 0.05 + 0.04 * i,
                     "edit-language share": 0.06, "other-language share": 0.07, "added share": 0.0,
                     "agnostic overlap": 300 + 10 * i, "top neurons": 2900, "transfer": 10.0 + 10 * i,
                     "reliability": 60.0, "cached": True, "seconds": 0.2, "error": "", "pooled": False})
        if i == 4:
            rows.append({"record": record, "method": "mpn", "error": "mpn: no subject token found in the prompt."})
            continue
        rows.append({"record": record, "method": "mpn", "agnostic share": 0.0, "edit-language share": 0.0,
                     "other-language share": 0.0, "added share": 1.0, "agnostic overlap": 0, "top neurons": 1,
                     "transfer": 50.0 - 5 * i, "reliability": 100.0, "cached": False, "seconds": 0.01, "error": "",
                     "pooled": True})
    return pd.DataFrame(rows)


def write_overlap_run(folder: Path, with_p: bool = True) -> Path:
    """An overlap run folder written as ``neuroglot overlap`` writes it (points.csv, correlations.csv and run.json
    through ``analysis.runs.write_run``), from :func:`overlap_points`; ``with_p=False``: correlations.csv without
    the p column, as folders written before it was added."""
    from analysis import runs
    from editors.overlap import rank_correlations

    points = overlap_points()
    corr = rank_correlations(points[points["error"] == ""])
    if not with_p:
        corr = corr.drop(columns=["p (permutation)"])
    job = {"model": "tiny-llama", "dtype": "auto", "dataset": "data/mzsre", "records": "0-4",
           "methods": ["langedit", "mpn"], "hparams": {}, "edit_language": "en", "test_languages": ["en", "zh", "de"],
           "beta": 0.5, "top_share": 0.9}

    def write(tmp: Path) -> None:
        points.to_csv(tmp / "points.csv", index=False)
        corr.to_csv(tmp / "correlations.csv", index=False)

    return runs.write_run(folder, "overlap", runs.request_key(job), job, write)
