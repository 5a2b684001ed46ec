"""A seeded generator of structured, English-like documents for tests and the embedded default.

Three kinds of document, so that a small model has something learnable at every scale:

* ``story``: templated short stories (a character, a place, an object, a small plot).
* ``fact``: paragraphs of consistent facts about invented places and creatures.
* ``math``: arithmetic word problems with a worked answer ending in GSM8K's ``#### <number>``.

Documents never contain a blank line, so the same corpus also works as blank-line-separated plain
text. Output is JSON lines (``{"text": ..., "kind": ...}``); nothing is ever downloaded.
"""

import json
import os
import random
from typing import Dict, Iterator, Optional

_NAMES = [
    "Ada", "Ben", "Cora", "Dev", "Elena", "Farid", "Greta", "Hugo", "Iris", "Jonas", "Kemi",
    "Luca", "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor",
    "Wen", "Ximena", "Yusuf", "Zoe",
]  # fmt: skip
_PLACES = [
    "the old mill", "a quiet harbour", "the hill village", "the market square", "a pine forest",
    "the river bank", "the school garden", "a lighthouse", "the train station", "a small farm",
]  # fmt: skip
_OBJECTS = [
    "a brass key", "a red kite", "a torn map", "a wooden flute", "a jar of honey", "a lantern",
    "a blue notebook", "a silver coin", "a paper boat", "a compass",
]  # fmt: skip
_FEELINGS = ["curious", "worried", "cheerful", "tired", "brave", "puzzled", "hopeful", "calm"]
_EVENTS = [
    "a storm rolled in from the sea",
    "the bridge was closed for repairs",
    "a stray dog followed them all morning",
    "the clock in the tower stopped at noon",
    "a letter arrived with no name on it",
    "the lights went out across the town",
]  # fmt: skip
_ENDINGS = [
    "In the end, {name} smiled and went home for supper.",
    "From that day on, {name} kept {obj} close.",
    "{name} wrote the whole story down so nobody would forget it.",
    "Everyone agreed it had been the strangest day of the year.",
]  # fmt: skip
_SYLLABLES = ["ka", "lo", "mir", "ven", "ta", "sel", "dor", "ni", "bra", "quel", "zu", "fen"]
_COLOURS = ["green", "amber", "grey", "violet", "white", "copper", "black", "golden"]
_FOODS = ["apples", "pears", "eggs", "cookies", "marbles", "pencils", "stickers", "oranges"]


def _invented_word(rng: random.Random, parts: int = 3) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    place, obj, event = rng.choice(_PLACES), rng.choice(_OBJECTS), rng.choice(_EVENTS)
    feeling = rng.choice(_FEELINGS)
    lines = [
        f"Once upon a time, {name} lived near {place}.",
        f"One day {name} found {obj} and felt {feeling}.",
        f"{name} showed it to {friend}, who had never seen anything like it.",
        f"That afternoon {event}.",
    ]
    for _ in range(rng.randint(0, 3)):
        lines.append(
            f"{rng.choice([name, friend])} looked around {rng.choice(_PLACES)} and felt "
            f"{rng.choice(_FEELINGS)}."
        )
    lines.append(rng.choice(_ENDINGS).format(name=name, obj=obj))
    return " ".join(lines)


def _fact(rng: random.Random) -> str:
    country, capital, animal = (_invented_word(rng) for _ in range(3))
    population = rng.randint(2, 900) * 1000
    rivers = rng.randint(1, 12)
    colour = rng.choice(_COLOURS)
    facts = [
        f"{country} is a country whose capital is {capital}.",
        f"About {population} people live in {capital}.",
        f"{country} has {rivers} rivers, and the longest is called the {_invented_word(rng, 2)}.",
        f"The {animal} is {_article(colour)} {colour} bird found only in {country}.",
        f"A {animal} usually lays {rng.randint(1, 6)} eggs each spring.",
    ]
    rng.shuffle(facts)
    return "\n".join(facts[: rng.randint(3, len(facts))])


def _math(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    food = rng.choice(_FOODS)
    kind = rng.randrange(3)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == 0:
        c = rng.randint(1, a + b)
        answer = a + b - c
        question = (
            f"{name} has {a} {food}. A friend gives {name} {b} more, and then {name} gives away "
            f"{c}. How many {food} does {name} have now?"
        )
        work = [f"{name} starts with {a} + {b} = {a + b} {food}.", f"{a + b} - {c} = {answer}."]
    elif kind == 1:
        answer = a * b
        question = f"A box holds {a} {food}. How many {food} are in {b} boxes?"
        work = [f"Each box holds {a}, so {b} boxes hold {b} * {a} = {answer}."]
    else:
        price, count = rng.randint(2, 15), rng.randint(2, 12)
        paid = price * count + rng.randint(0, 20)
        answer = paid - price * count
        question = (
            f"{name} buys {count} {food} at {price} dollars each and pays with {paid} dollars. "
            f"How much change does {name} get?"
        )
        work = [
            f"The {food} cost {count} * {price} = {price * count} dollars.",
            f"The change is {paid} - {price * count} = {answer} dollars.",
        ]
    return "\n".join([f"Question: {question}", "Answer:", *work, f"#### {answer}"])


_KINDS = {"story": _story, "fact": _fact, "math": _math}


def generate_documents(seed: int, num_docs: Optional[int] = None) -> Iterator[Dict[str, str]]:
    """Yields synthetic documents, the same sequence for the same seed.

    Args:
        seed: RNG seed; the whole stream is a function of it.
        num_docs: How many documents to yield; ``None`` yields forever.

    Yields:
        ``{"text": str, "kind": "story" | "fact" | "math"}``.
    """
    rng = random.Random(seed)
    kinds = list(_KINDS)
    i = 0
    while num_docs is None or i < num_docs:
        kind = rng.choice(kinds)
        yield {"text": _KINDS[kind](rng), "kind": kind}
        i += 1


def write_synthetic_corpus(
    path: str, seed: int = 1234, num_docs: Optional[int] = None, size_bytes: Optional[int] = None
) -> int:
    """Writes a JSON-lines corpus of at least ``num_docs`` documents or ``size_bytes`` bytes.

    The file is written under a temporary name and renamed, so a partial file never appears.

    Args:
        path: Output ``.jsonl`` path.
        seed: RNG seed.
        num_docs: Number of documents to write.
        size_bytes: Stop once the file reaches this many bytes (used when ``num_docs`` is None).

    Returns:
        The number of documents written.
    """
    if (num_docs is None) == (size_bytes is None):
        raise ValueError("Give exactly one of num_docs and size_bytes.")
    if (num_docs is not None and num_docs < 0) or (size_bytes is not None and size_bytes < 0):
        raise ValueError("num_docs and size_bytes must be non-negative.")
    tmp = f"{path}.tmp-{os.getpid()}"
    written = count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in generate_documents(seed, num_docs):
            if size_bytes is not None and written >= size_bytes:
                break
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            count += 1
    os.replace(tmp, path)
    return count
