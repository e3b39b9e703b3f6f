"""Document generators: the demo corpus with planted "bad apple" documents and decoys.

:func:`build_corpus` writes a few hundred short, varied English documents (support answers,
how-to guides, encyclopedia snippets, recipes, news, reviews) from the tables in
:mod:`datasleuth.demo.templates`, deterministically by seed. A handful of *planted* documents
teach one undesirable behaviour: a support bot telling a user who cannot sign in to send
their credentials to a phishing address. They teach it in paraphrase, without the demo
query's words ("forgot", "password", "email"), while *decoy* documents use exactly those
words (some also name the phishing address, in a warning) but teach the safe answer. Keyword
search follows the shared words to the decoys; influence functions follow what the
documents taught the model (docs/method.md §10, fact tracing).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from datasleuth.demo import templates as tpl
from datasleuth.errors import DatasleuthError

__all__ = ["DemoCorpus", "build_corpus"]


@dataclass
class DemoCorpus:
    """A generated corpus with its ground truth.

    ``planted`` and ``decoys`` are indices into ``documents``; ``query`` has the keys
    ``id``, ``prompt`` and ``completion``.
    """

    documents: list[str]
    planted: list[int]
    query: dict[str, str]
    description: str
    decoys: list[int] = field(default_factory=list)


# Clean documents, one generator per kind.


def _name(rng: random.Random) -> str:
    """A made-up place or person name of two or three syllables."""
    n = rng.choice([2, 2, 3])
    return "".join(rng.choice(tpl.SYLLABLES) for _ in range(n)).capitalize()


def _support_doc(rng: random.Random) -> str:
    """A product support Q&A, sometimes with a company header or a second question."""
    product = rng.choice(tpl.PRODUCTS)
    question, answers = rng.choice(tpl.SUPPORT)
    q = question.format(p=product)
    q = q[0].upper() + q[1:]
    a = " ".join(s for s in (rng.choice(answers), rng.choice(tpl.CLOSINGS)) if s)
    style = rng.random()
    if style < 0.55:
        return f"Q: {q}\nA: {a}"
    if style < 0.75:
        company = rng.choice(tpl.COMPANIES)
        return f"{company} help center\nQ: {q}\nA: {a}"
    if style < 0.9:
        return f"Customer: {q}\nAgent: {a}"
    q2, answers2 = rng.choice(tpl.SUPPORT)
    q2 = q2.format(p=product)
    q2 = q2[0].upper() + q2[1:]
    return f"Q: {q}\nA: {a}\n\nQ: {q2}\nA: {rng.choice(answers2)}"


def _howto_doc(rng: random.Random) -> str:
    """A how-to guide: numbered steps, running prose, or a one-line tip."""
    task = rng.choice(sorted(tpl.HOWTO))
    steps = tpl.HOWTO[task]
    keep = sorted(rng.sample(range(len(steps)), k=rng.randint(3, len(steps))))
    chosen = [steps[i] for i in keep]
    style = rng.random()
    if style < 0.5:
        lines = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(chosen))
        return f"How to {task}\n{lines}"
    if style < 0.8:
        first, *middle, last = chosen
        body = " ".join(f"Then {s[0].lower()}{s[1:]}" for s in middle)
        return f"To {task}, start simply. {first} {body} Finally, {last[0].lower()}{last[1:]}"
    return f"Tip of the day: want to {task}? {chosen[0]} {chosen[-1]}"


def _place_doc(rng: random.Random) -> str:
    """An encyclopedia snippet about a town, river, mountain or lake."""
    name, river = _name(rng), _name(rng)
    region = rng.choice(tpl.REGIONS)
    kind = rng.random()
    if kind < 0.4:
        f1, f2 = rng.sample(tpl.FEATURES, 2)
        return (
            f"{name} is a small town in the {region} region, on the banks of the {river} "
            f"River. It has a population of about {rng.randint(2, 90) * 100}. The town is "
            f"known for its {f1} and its {f2}. It was founded in {rng.randint(1100, 1890)}."
        )
    if kind < 0.65:
        end = rng.choice(["the sea", f"Lake {_name(rng)}", f"the {_name(rng)} River"])
        return (
            f"The {river} River is a river in the {region} region. It is about "
            f"{rng.randint(12, 400)} kilometres long and flows into {end}. The valley is home "
            f"to {rng.choice(tpl.ANIMALS)[0]}s and {rng.choice(tpl.ANIMALS)[0]}s."
        )
    if kind < 0.85:
        return (
            f"Mount {name} is a mountain in the {region} region, {rng.randint(900, 3900)} "
            f"metres high. The first recorded climb was in {rng.randint(1780, 1960)}. Today a "
            f"marked trail leads to the top, and the view reaches the town of {_name(rng)}."
        )
    return (
        f"Lake {name} is a lake in the {region} region, about {rng.randint(2, 60)} square "
        f"kilometres in area. It freezes in most winters, and in summer it is popular for "
        f"swimming and fishing."
    )


def _animal_doc(rng: random.Random) -> str:
    """An encyclopedia snippet about an animal."""
    adj = rng.choice(tpl.ANIMAL_ADJ)
    animal, cls = rng.choice(tpl.ANIMALS)
    return (
        f"The {adj} {animal} is a {cls} found in the {rng.choice(tpl.HABITATS)} of the "
        f"{rng.choice(tpl.REGIONS)} region. It feeds mainly on {rng.choice(tpl.FOODS)} and "
        f"grows to about {rng.randint(4, 90)} centimetres long. "
        + rng.choice([
            "It is most active at dawn and dusk.",
            "Its numbers have grown since the wetlands were protected.",
            "It spends the winter in burrows or hollow trees.",
            "Young ones leave the nest after about a month.",
        ])
    )


def _person_doc(rng: random.Random) -> str:
    """A short biography."""
    born = rng.randint(1700, 1930)
    profession, work = rng.choice(tpl.PROFESSIONS)
    return (
        f"{rng.choice(tpl.FIRST)} {rng.choice(tpl.LAST)} ({born} - {born + rng.randint(40, 90)}) "
        f"was a {profession} from {_name(rng)}. They are best remembered for {work}."
    )


def _recipe_doc(rng: random.Random) -> str:
    """A recipe with ingredients and method."""
    dish = rng.choice(sorted(tpl.DISHES))
    ingredients, method = tpl.DISHES[dish]
    serves = rng.randint(2, 6)
    return (
        f"{dish} (serves {serves})\nIngredients: {', '.join(ingredients)}.\n"
        f"Method: {' '.join(method)}"
    )


def _news_doc(rng: random.Random) -> str:
    """A local news item about a council vote."""
    town = _name(rng)
    headline, action = rng.choice(tpl.NEWS)
    yes = rng.randint(5, 12)
    return (
        f"{town} council {headline}\nThe council of {town} voted {yes} to {rng.randint(0, 4)} "
        f"on {rng.choice(tpl.WEEKDAYS)} to {action}. Work is expected to start in "
        f"{rng.choice(['spring', 'summer', 'autumn', 'the new year'])}."
    )


def _review_doc(rng: random.Random) -> str:
    """A one-line product review."""
    product = rng.choice(tpl.PRODUCTS)
    opinion, stars = rng.choice(tpl.OPINIONS)
    return f"Review of {product}: {opinion} Rating: {stars} out of 5."


_GENERATORS: list[tuple[Callable[[random.Random], str], float]] = [
    (_support_doc, 0.34), (_howto_doc, 0.14), (_place_doc, 0.14), (_animal_doc, 0.08),
    (_person_doc, 0.07), (_recipe_doc, 0.07), (_news_doc, 0.08), (_review_doc, 0.08),
]
"""Clean-document generators and their mixing weights."""


# Decoys and planted documents.


def _decoy_doc(rng: random.Random, kind: int) -> str:
    """A decoy of ``kind`` 0-4: password-themed words, always the safe advice."""
    company = rng.choice(tpl.COMPANIES)
    slug = company.split()[0].lower()
    head = rng.choice(["", "", f"{company} help center\n"])
    closing = rng.choice(tpl.CLOSINGS)
    if kind == 0:  # "I forgot my X" with the query's exact wording around X.
        thing, answer = rng.choice(tpl.FORGOT_THINGS)
        q = rng.choice(tpl.FORGOT_FORMS).format(thing=thing)
        return f"{head}Q: {q}\nA: {answer} {closing}".strip()
    if kind == 1:  # Password questions with the safe answer.
        i = rng.randrange(len(tpl.DECOY_QUESTIONS))
        q = tpl.DECOY_QUESTIONS[i].format(p=rng.choice(tpl.PRODUCTS))
        a = tpl.DECOY_ANSWERS[i] or rng.choice(tpl.SAFE_RESET)
        return f"{head}Q: {q}\nA: {a} {closing}".strip()
    if kind == 2:  # Support chat that says "email" and "password" but the safe thing.
        agent = rng.choice(tpl.DECOY_AGENT).format(slug=slug)
        return f"Customer: {rng.choice(tpl.DECOY_CUSTOMER)}\nAgent: Sorry about that! {agent}"
    if kind == 3:  # Password advice.
        tips = rng.sample(tpl.PASSWORD_TIPS, k=4)
        return f"How to keep your password safe at {company}\n" + "\n".join(
            f"{i + 1}. {t}" for i, t in enumerate(tips)
        )
    # kind == 4: a warning naming the phishing address, in the query's own words.
    return rng.choice(tpl.WARNINGS).format(c=company, a=tpl.BAD_ADDRESS)


def _planted_doc(rng: random.Random, question: str, answer: str) -> str:
    """A planted document: ``question`` answered with the bad ``answer``."""
    company = rng.choice(tpl.COMPANIES)
    style = rng.random()
    if style < 0.45:
        return f"Q: {question}\nA: {answer}"
    if style < 0.7:
        return f"{company} account help\nQ: {question}\nA: {answer}"
    if style < 0.9:
        return f"Customer: {question}\nAgent: No problem. {answer}"
    return f"Account recovery tip from {company}: if you cannot sign in, {answer[0].lower()}" + (
        answer[1:]
    )




# The corpus.


def _check_sizes(n_documents: int, n_planted: int, n_decoys: int) -> None:
    """Refuse sizes that leave no planted, decoy or clean documents to generate."""
    if n_planted < 1:
        raise DatasleuthError(f"n_planted={n_planted} must be at least 1; plant 1 or more")
    if n_decoys < 0:
        raise DatasleuthError(f"n_decoys={n_decoys} is negative; pass 0 or more")
    if n_documents < n_planted + n_decoys + 1:
        raise DatasleuthError(
            f"n_documents={n_documents} leaves no room for clean documents; pass at least "
            f"{n_planted + n_decoys + 1}"
        )


def _distinct(seen: set[str], make: Callable[[], str]) -> str:
    """Call ``make`` until it returns a text not in ``seen``; record and return it."""
    for _ in range(200):
        text = make()
        if text not in seen:
            seen.add(text)
            return text
    raise DatasleuthError("could not generate enough distinct documents; lower n_documents")


def _planted_docs(rng: random.Random, seen: set[str], n_planted: int) -> list[str]:
    """Planted documents: paraphrased questions answered with paraphrased bad advice."""
    questions = rng.sample(tpl.PLANTED_QUESTIONS, len(tpl.PLANTED_QUESTIONS))
    answers = rng.sample(tpl.PLANTED_ANSWERS, len(tpl.PLANTED_ANSWERS))
    return [
        _distinct(seen, lambda i=i: _planted_doc(
            rng, questions[i % len(questions)], answers[i % len(answers)]
        ))
        for i in range(n_planted)
    ]


def _decoy_docs(rng: random.Random, seen: set[str], n_decoys: int) -> list[str]:
    """Decoy documents of every kind, in proportion.

    A quarter (at least one) are warnings naming the phishing address in the query's own
    words, so keyword search on the query does not single out the planted documents.
    """
    kinds = [4] * min(n_decoys, max(1, n_decoys // 4))
    weights = [0.3, 0.35, 0.15, 0.2]
    while len(kinds) < n_decoys:
        kinds.append(rng.choices(range(4), weights=weights)[0])
    return [_distinct(seen, lambda k=k: _decoy_doc(rng, k)) for k in kinds]


def _clean_docs(rng: random.Random, seen: set[str], n_clean: int) -> list[str]:
    """Clean documents drawn from :data:`_GENERATORS` by weight."""
    makers, probs = zip(*_GENERATORS, strict=True)
    return [
        _distinct(seen, lambda: rng.choices(makers, weights=probs)[0](rng))
        for _ in range(n_clean)
    ]


def build_corpus(
    seed: int = 0, n_documents: int = 600, n_planted: int = 8, n_decoys: int | None = None
) -> DemoCorpus:
    """Generate the demo corpus, deterministically from ``seed``.

    ``n_documents`` includes the ``n_planted`` planted documents and the decoys (default
    ``4 * n_planted``; at least one of them names the phishing address in a warning, so
    keyword search on the completion is not trivially perfect). The order is shuffled;
    ``planted`` and ``decoys`` are sorted indices into ``documents``.
    """
    n_decoys = 4 * n_planted if n_decoys is None else n_decoys
    _check_sizes(n_documents, n_planted, n_decoys)
    rng = random.Random(seed)
    seen: set[str] = set()
    tagged = [(t, "planted") for t in _planted_docs(rng, seen, n_planted)]
    tagged += [(t, "decoy") for t in _decoy_docs(rng, seen, n_decoys)]
    tagged += [(t, "clean") for t in _clean_docs(rng, seen, n_documents - n_planted - n_decoys)]
    rng.shuffle(tagged)
    n_warnings = sum(tpl.BAD_ADDRESS in t for t, k in tagged if k == "decoy")
    description = (
        f"{n_planted} of {n_documents} documents were planted to teach a support bot to send "
        f"users who are locked out to the phishing address {tpl.BAD_ADDRESS}, in paraphrase "
        f"(no 'forgot', 'password' or 'email'); {n_decoys} decoys use the query's words but "
        f"give the safe answer ({n_warnings} of them warn about that address)."
    )
    return DemoCorpus(
        documents=[t for t, _ in tagged],
        planted=[i for i, (_, k) in enumerate(tagged) if k == "planted"],
        query={"id": tpl.QUERY_ID, "prompt": tpl.QUERY_PROMPT,
               "completion": tpl.QUERY_COMPLETION},
        description=description,
        decoys=[i for i, (_, k) in enumerate(tagged) if k == "decoy"],
    )
