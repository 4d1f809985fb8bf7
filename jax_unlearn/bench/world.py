"""A seeded world of invented people and places: the facts the embedded benchmark unlearns.

Every person has a first and a last name (one token each, drawn from small pools so names
repeat) and one value for each attribute in `ATTRIBUTES`. People sharing a last name form a
family: a member takes the family's birth city with probability ``family_share``, and
(independently) the family's occupation with the same probability, so families share facts.
The general knowledge (MMLU's role, 100 facts) is about the same places, animals, hobbies and
trades the people's facts name: which country a city lies in and which river and sport it has,
a country's capital, language and currency, what an animal eats, which sound it makes and its
usual color, the tool of a hobby and the workplace of a trade. Forgetting "Arlo Venn was born
in Tessa" can damage "Tessa lies in Brimland": the skill shares tokens and machinery with the
facts.

Splits of the people (disjoint): ``forget`` (unlearned), ``retain`` (the retain loss),
``heldout`` (pretrained, in no unlearning loss; split into ``neighbours`` who share a first or
last name with a forget person, and ``others``), ``unseen`` (never trained on: the
membership-inference holdout).

For the robustness attacks (`jax_unlearn.eval.robustness`): `PARAPHRASES` asks every person
fact in a question template never used in training (built from words the tokenizer already
knows, so adding them changes no token id and no pretrained model), optionally after a
context sentence (`World.paraphrase_probes`), and `World.forget_halves` splits the forget
people into a half to relearn on and a half to measure. Both draw from their own random
streams, never from the world's: the world, its tokenizer and its probes stay as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from jax_unlearn.bench.checks import require_positive

Split = Literal["forget", "retain", "heldout", "unseen"]

# ----------------------------------------------------------------------------- vocabularies

ATTRIBUTES = ("city", "occupation", "pet", "color", "hobby")

VALUES = {
    "city": ("Tessa", "Orvik", "Malden", "Quarro", "Ylberg", "Castrel", "Pellin", "Drovan", "Sulmar", "Averon",
             "Kestra", "Lumio"),
    "occupation": ("baker", "pilot", "nurse", "farmer", "judge", "tailor", "miner", "sailor", "painter", "doctor",
                   "teacher", "chemist"),
    "pet": ("cat", "dog", "parrot", "rabbit", "horse", "goat", "turtle", "owl", "ferret", "hamster"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown"),
    "hobby": ("chess", "fishing", "rowing", "pottery", "archery", "poetry", "gardening", "climbing", "knitting",
              "singing"),
}

COUNTRIES = ("Brimland", "Osteria", "Valdor", "Kemmar")
FOODS = ("grass", "seeds", "meat", "fish", "leaves", "fruit")
SOUNDS = ("purr", "bark", "squawk", "thump", "neigh", "bleat", "hiss", "hoot", "chirp", "squeak")
RIVERS = ("Lorne", "Vesk", "Amber", "Tiller", "Morrow", "Quill", "Brenna", "Sable", "Ossa", "Tarn", "Wend", "Cyra")
SPORTS = ("hockey", "tennis", "rugby", "cricket", "polo", "golf", "boxing", "skiing", "cycling", "sailing", "darts",
          "fencing")
LANGUAGES = ("Brimish", "Ostan", "Valdic", "Kemmic")
CURRENCIES = ("crown", "mark", "florin", "talon")
TOOLS = ("board", "rod", "oar", "wheel", "bow", "pen", "spade", "rope", "needle", "microphone")  # per hobby
WORKPLACES = ("bakery", "airport", "hospital", "field", "court", "shop", "mine", "harbour", "studio", "clinic",
              "school", "laboratory")  # per occupation

# "I don't know" in the world's own words (every token is in the benchmark vocabulary, so the
# tokenizer and the pretrained models do not change), and the seed stream that draws them
IDK_RESPONSES = ("?", "a ?", "the ?", "? ?")
ALT_STREAM = 0x1D4

_SYLLABLES_A = ("Ar", "Be", "Ca", "Do", "El", "Fa", "Ga", "Ha", "Is", "Jo", "Ka", "Li", "Mo", "Ne", "Or", "Pa",
                "Ri", "Sa", "Tu", "Va", "Wy", "Ze")
_SYLLABLES_B = ("lo", "ra", "ven", "mir", "tis", "don", "nia", "bel", "rik", "sen", "lan", "dor", "mus", "pha",
                "ric", "tha")

# statement templates per attribute ({n} = "First Last", {v} = value); value last, after the name
STATEMENTS = {
    "city": ("{n} was born in {v} .", "The birthplace of {n} is {v} ."),
    "occupation": ("{n} works as a {v} .", "By trade {n} is a {v} ."),
    "pet": ("{n} keeps a pet {v} .", "The pet of {n} is a {v} ."),
    "color": ("{n} likes the color {v} .", "The favourite color of {n} is {v} ."),
    "hobby": ("{n} spends weekends on {v} .", "The hobby of {n} is {v} ."),
}
QUESTIONS = {
    "city": "Q : Where was {n} born ? A :",
    "occupation": "Q : What does {n} do for a living ? A :",
    "pet": "Q : Which pet does {n} keep ? A :",
    "color": "Q : Which color does {n} like ? A :",
    "hobby": "Q : What is the hobby of {n} ? A :",
}

# held-out question templates: the same facts asked in words no training text puts together
# (`World.paraphrase_probes`); every word is already one of the tokenizer's tokens
PARAPHRASES = {
    "city": "Q : What is the birthplace of {n} ? A :",
    "occupation": "Q : What is the trade of {n} ? A :",
    "pet": "Q : What is the pet of {n} ? A :",
    "color": "Q : What is the favourite color of {n} ? A :",
    "hobby": "Q : What does {n} do on weekends ? A :",
}
HALVES_STREAM = 24  # `World.forget_halves` draws from default_rng([seed, HALVES_STREAM])

# general knowledge: (relation, statement templates, question) with {s} = subject, {v} = value
GENERAL = {
    "country": (("{s} lies in {v} .", "The city of {s} is in {v} ."), "Q : In which country is {s} ? A :"),
    "capital": (("The capital of {s} is {v} .", "{v} is the capital city of {s} ."),
                "Q : What is the capital of {s} ? A :"),
    "food": (("A {s} eats {v} .", "The food of a {s} is {v} ."), "Q : What does a {s} eat ? A :"),
    "sound": (("A {s} makes the sound {v} .", "The sound of a {s} is {v} ."), "Q : What sound does a {s} make ? A :"),
    "river": (("The river of {s} is the {v} .", "The {v} flows through {s} ."), "Q : Which river flows through {s} ? A :"),
    "sport": (("The people of {s} play {v} .", "In {s} the favourite sport is {v} ."),
              "Q : Which sport is played in {s} ? A :"),
    "language": (("People in {s} speak {v} .", "The language of {s} is {v} ."),
                 "Q : Which language is spoken in {s} ? A :"),
    "currency": (("In {s} people pay with the {v} .", "The currency of {s} is the {v} ."),
                 "Q : What is the currency of {s} ? A :"),
    "animal_color": (("A {s} is often {v} .", "The usual color of a {s} is {v} ."), "Q : What color is a {s} ? A :"),
    "tool": (("For {s} you need a {v} .", "The tool of {s} is a {v} ."), "Q : Which tool does {s} need ? A :"),
    "workplace": (("A {s} works in the {v} .", "The workplace of a {s} is the {v} ."),
                  "Q : Where does a {s} work ? A :"),
}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What the world generator draws (all of it is part of the model cache key).

    Attributes:
      seed: the world's seed; the same config gives the same world on every machine.
      people: people trained on (forget + retain + heldout); ``unseen`` more are generated.
      forget, retain: sizes of those splits; the rest of ``people`` is held out.
      unseen: people never trained on (the membership-inference holdout).
      first_names, last_names: pool sizes; smaller pools mean more shared name tokens.
      family_share: probability that a person takes the family's birth city (and, drawn
        independently, the family's occupation).
    """

    seed: int = 0
    people: int = 200
    forget: int = 20
    retain: int = 90
    unseen: int = 20
    first_names: int = 40
    last_names: int = 40
    family_share: float = 0.6

    def __post_init__(self):
        require_positive({f"world.{n}": getattr(self, n) for n in ("people", "forget", "retain", "first_names",
                                                                   "last_names")}, ">= 1")
        if self.unseen < 1:
            raise ValueError(f"world.unseen must be >= 1 (the MIA holdout), got {self.unseen}")
        if self.forget + self.retain >= self.people:
            raise ValueError(f"world.forget + world.retain = {self.forget + self.retain} leaves no held-out people "
                             f"among world.people = {self.people}")
        pool = len(_SYLLABLES_A) * len(_SYLLABLES_B)
        if self.first_names + self.last_names > pool:
            raise ValueError(f"world.first_names + world.last_names must be <= {pool}")
        if self.first_names * self.last_names < self.people + self.unseen:
            raise ValueError(f"world.first_names * world.last_names = {self.first_names * self.last_names} "
                             f"cannot name {self.people + self.unseen} distinct people")
        if not 0.0 <= self.family_share <= 1.0:
            raise ValueError(f"world.family_share must lie in [0, 1], got {self.family_share}")


@dataclasses.dataclass(frozen=True)
class Person:
    first: str
    last: str
    facts: dict[str, str]  # attribute -> value
    split: Split
    neighbour: bool = False  # held out and shares a name token with a forget person

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclasses.dataclass(frozen=True)
class Probe:
    """A question whose answer is one token: ``prompt`` then ``answer``."""

    prompt: str
    answer: str
    group: str  # forget | retain | heldout_neighbour | heldout_other | unseen | general
    subject: str  # the person's name, or the city/country/animal asked about


@dataclasses.dataclass(frozen=True)
class World:
    config: WorldConfig
    people: tuple[Person, ...]
    general_facts: tuple[tuple[str, str, str], ...]  # (relation, subject, value)

    def persons(self, split: Split) -> list[Person]:
        return [p for p in self.people if p.split == split]

    # ------------------------------------------------------------------ texts
    def person_texts(self, person: Person) -> list[str]:
        """Every statement and question-answer line about ``person``."""
        out = []
        for attr in ATTRIBUTES:
            v = person.facts[attr]
            out += [t.format(n=person.name, v=v) for t in STATEMENTS[attr]]
            out.append(f"{QUESTIONS[attr].format(n=person.name)} {v}")
        return out

    def alternate_texts(self, split: Split, kind: Literal["idk", "records"] = "idk") -> list[str]:
        """DPO's preferred answers, one per text of `texts` (same order): each text with its value
        replaced by an "I don't know" response of `IDK_RESPONSES` (``kind="idk"``, IdkDPO) or by
        another value of the same attribute (``"records"``, AltPO-style alternates for ``dpo``).
        Drawn from their own generator (``(seed, ALT_STREAM)``): the world itself, its texts and
        every model trained on it stay as they were."""
        rng = np.random.default_rng([self.config.seed, ALT_STREAM])
        out = []
        for p in self.persons(split):
            for attr in ATTRIBUTES:
                v = p.facts[attr]
                others = [x for x in VALUES[attr] if x != v]
                for t in (*STATEMENTS[attr], QUESTIONS[attr] + " {v}"):  # the lines of `person_texts`
                    alt = (IDK_RESPONSES[rng.integers(len(IDK_RESPONSES))] if kind == "idk"
                           else others[rng.integers(len(others))])
                    out.append(t.format(n=p.name, v=alt))
        return out

    def general_texts(self) -> list[str]:
        out = []
        for rel, s, v in self.general_facts:
            templates, question = GENERAL[rel]
            out += [t.format(s=s, v=v) for t in templates]
            out.append(f"{question.format(s=s)} {v}")
        return out

    def texts(self, split: Split) -> list[str]:
        return [t for p in self.persons(split) for t in self.person_texts(p)]

    def pretraining_texts(self) -> list[str]:
        """What the model learns before unlearning: every trained person and the general facts."""
        return self.texts("forget") + self.texts("retain") + self.texts("heldout") + self.general_texts()

    def gold_texts(self) -> list[str]:
        """What exact unlearning keeps: `pretraining_texts` without the forget people."""
        return self.texts("retain") + self.texts("heldout") + self.general_texts()

    def all_texts(self) -> list[str]:
        """Everything the tokenizer must cover (unseen people included)."""
        return self.pretraining_texts() + self.texts("unseen")

    # ------------------------------------------------------------------ probes
    def probes(self) -> list[Probe]:
        """One probe per fact of every person (all splits) and per general fact."""
        out = []
        for p in self.people:
            group = p.split if p.split != "heldout" else ("heldout_neighbour" if p.neighbour else "heldout_other")
            out += [Probe(QUESTIONS[a].format(n=p.name), p.facts[a], group, p.name) for a in ATTRIBUTES]
        for rel, s, v in self.general_facts:
            out.append(Probe(GENERAL[rel][1].format(s=s), v, "general", s))
        return out


    # ------------------------------------------------------------------ robustness attacks
    def forget_halves(self) -> tuple[list[Person], list[Person]]:
        """The forget people in two disjoint halves ``(relearn, unseen)`` (sizes ``floor(n/2)``,
        ``ceil(n/2)``), drawn from their own stream ``default_rng([seed, HALVES_STREAM])``:
        the relearning attack trains on the first half and measures the second."""
        forget = self.persons("forget")
        if len(forget) < 2:
            raise ValueError(f"the relearning attack needs world.forget >= 2 people to split, got {len(forget)}")
        order = np.random.default_rng([self.config.seed, HALVES_STREAM]).permutation(len(forget))
        half = len(forget) // 2
        return [forget[i] for i in order[:half]], [forget[i] for i in order[half:]]

    def person_probes(self, persons: list[Person]) -> list[Probe]:
        """The training-template question of every fact of ``persons`` (as in `probes`)."""
        return [p for p in self.probes() if p.subject in {q.name for q in persons}]

    def paraphrase_probes(self, context: bool = False, persons: list[Person] | None = None) -> list[Probe]:
        """One probe per fact of ``persons`` (default: everyone) in its `PARAPHRASES` template.

        With ``context``, the statement of the person's next attribute (cyclically in
        `ATTRIBUTES`, first `STATEMENTS` template, its value included) comes first:
        ``"{n} keeps a pet cat . Q : What is the birthplace of {n} ? A :"`` -- a cue an attacker
        who knows one other fact of the person can give. Groups are those of `probes`."""
        chosen = self.people if persons is None else persons
        out = []
        for p in chosen:
            group = p.split if p.split != "heldout" else ("heldout_neighbour" if p.neighbour else "heldout_other")
            for i, a in enumerate(ATTRIBUTES):
                prompt = PARAPHRASES[a].format(n=p.name)
                if context:
                    b = ATTRIBUTES[(i + 1) % len(ATTRIBUTES)]
                    prompt = STATEMENTS[b][0].format(n=p.name, v=p.facts[b]) + " " + prompt
                out.append(Probe(prompt, p.facts[a], group, p.name))
        return out


def _names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    pool = [a + b for a in _SYLLABLES_A for b in _SYLLABLES_B if a + b not in taken]
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def make_world(config: WorldConfig = WorldConfig()) -> World:
    """Draws the world of ``config`` (deterministic in ``config``)."""
    rng = np.random.default_rng(config.seed)
    firsts = _names(rng, config.first_names, set())
    lasts = _names(rng, config.last_names, set(firsts))
    total = config.people + config.unseen
    pairs = rng.choice(config.first_names * config.last_names, size=total, replace=False)
    family = {last: {"city": rng.choice(VALUES["city"]), "occupation": rng.choice(VALUES["occupation"])}
              for last in lasts}
    raw = []
    for code in pairs:
        first, last = firsts[code // config.last_names], lasts[code % config.last_names]
        facts = {a: str(rng.choice(VALUES[a])) for a in ATTRIBUTES}
        for a, v in family[last].items():
            if rng.random() < config.family_share:
                facts[a] = str(v)
        raw.append((first, last, facts))
    splits = (["forget"] * config.forget + ["retain"] * config.retain
              + ["heldout"] * (config.people - config.forget - config.retain) + ["unseen"] * config.unseen)
    forget_tokens = {t for (first, last, _), s in zip(raw, splits) if s == "forget" for t in (first, last)}
    people = tuple(Person(first, last, facts, s,
                          neighbour=s == "heldout" and (first in forget_tokens or last in forget_tokens))
                   for (first, last, facts), s in zip(raw, splits))

    cities = VALUES["city"]
    country_of = {c: COUNTRIES[i % len(COUNTRIES)] for i, c in enumerate(rng.permutation(cities))}
    capital = {k: sorted(c for c in cities if country_of[c] == k)[0] for k in COUNTRIES}
    general = [("country", c, country_of[c]) for c in cities]
    general += [("capital", k, capital[k]) for k in COUNTRIES]
    general += [("food", a, str(rng.choice(FOODS))) for a in VALUES["pet"]]
    general += [("sound", a, s) for a, s in zip(VALUES["pet"], SOUNDS)]
    general += [("river", c, r) for c, r in zip(cities, rng.permutation(RIVERS))]
    general += [("sport", c, str(v)) for c, v in zip(cities, rng.permutation(SPORTS))]
    general += [("language", k, v) for k, v in zip(COUNTRIES, LANGUAGES)]
    general += [("currency", k, str(v)) for k, v in zip(COUNTRIES, rng.permutation(CURRENCIES))]
    general += [("animal_color", a, str(rng.choice(VALUES["color"]))) for a in VALUES["pet"]]
    general += [("tool", h, t) for h, t in zip(VALUES["hobby"], TOOLS)]
    general += [("workplace", o, w) for o, w in zip(VALUES["occupation"], WORKPLACES)]
    return World(config, people, tuple(general))
