"""A synthetic English NER set (BIO tags, PER / LOC / ORG) on which unlabelled text helps.

`write_tagging_set(directory, seed, ...)` writes `tagging_train.conll` and `tagging_dev.conll`
(CoNLL: `token tag` per line, a blank line between sentences) and `tagging_unlabeled.txt` (one
sentence per line) and returns their paths. The shipped sample
(`mobilebert_jax/data/assets/tagging_*`, `mobilebert_jax.data.sample_tagging_paths()`) is
`write_tagging_set(dir, SEED, **SHIPPED)`; tests/test_cvt.py checks it still is.

The entity names are real names (cities, first and last names, companies), each split once per
seed into a "labelled" half and an "unlabelled" half:

  train      labelled-half names; 70% in sentences whose context names the type (a left or a
             right cue: "flights to X", "X told reporters", "shares of X") and 30% in neutral
             contexts ("we talked about X yesterday"), so a tagger learns both the cues and
             the names themselves.
  unlabeled  85% cue contexts; 75% of the entities are unlabelled-half names, never seen with a
             tag.
  dev        80% neutral contexts; 75% of the entities are unlabelled-half names. In a neutral
             context only the name tells its type, so a tagger gets these right only by having
             learned the names from the unlabelled text (e.g. by cross-view training: the
             auxiliary modules that see one side of "flights to X" must recover the type from
             X itself).

Sentence-initial words, days and months are capitalized (so case alone does not mark an
entity); PER entities are a first name or a first and a last name (B-PER I-PER). Every word is
tokenised by the shipped WordPiece vocab without [UNK].
"""

from __future__ import annotations

import os
import random

SEED = 2018
SHIPPED = dict(num_train=400, num_unlabeled=2000, num_dev=200)
FILES = ("tagging_train.conll", "tagging_dev.conll", "tagging_unlabeled.txt")

LOC = """Paris Berlin Madrid Oslo Lisbon Vienna Prague Dublin Cairo Lima Quito Denver Boston
Austin Dallas Seattle Chicago Toronto Sydney Melbourne Tokyo Osaka Mumbai Delhi Nairobi Lagos
Athens Rome Milan Naples Warsaw Krakow Budapest Helsinki Stockholm Geneva Zurich Hamburg Munich
Brussels Amsterdam Rotterdam Seville Valencia Porto Manila Jakarta Hanoi Seoul Beijing Shanghai
Santiago Bogota Caracas Havana Montreal Calgary Phoenix Atlanta Houston""".split()
FIRST = """John Peter Maria Anna Laura David Carlos Elena James Robert Michael Sarah Emma Olivia
Daniel Thomas Sophie Lucas Hannah Jacob Rachel Martin Julia Paul Victor Nina Oscar Ivan Marco
Clara Simon Helen Ruth Frank George Alice Henry Diana Felix Irene""".split()
LAST = """Smith Garcia Miller Lopez Johnson Wilson Taylor Anderson Martinez Clark Lewis Walker
Wright Scott Adams Nelson Campbell Mitchell Roberts Phillips Evans Turner Parker Collins Edwards
Stewart Morris Murphy Rogers Morgan Cooper Peterson Hughes Bennett Foster Russell Sanders Ortiz
Fischer Novak""".split()
ORG = """Google Siemens Boeing Nokia Sony Toyota Intel Oracle Reuters Nestle Unilever Microsoft
Amazon Samsung Honda Nissan Volvo Philips Ericsson Airbus Pfizer Novartis Bayer Adidas Puma Lego
Ikea Spotify Netflix Tesla Nvidia Cisco Fiat Renault Heineken Danone Barclays Citigroup Vodafone
Lufthansa Qantas Walmart Kodak Xerox Motorola Panasonic Hyundai Ferrari""".split()

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October".split()

# Contexts that name the type: {E} is the entity, {D} a day, {M} a month, {N} a number.
CUES = {
    "PER": [
        "{E} said on {D} that the deal was off .",
        "{E} told reporters that prices would rise .",
        "spokesman {E} declined to comment .",
        "{E} , the chief executive , resigned on {D} .",
        "an interview with minister {E} was broadcast on {D} .",
        "the novel was written by author {E} .",
        "coach {E} praised the young players .",
        "{E} smiled and waved to the crowd .",
        "the award went to actress {E} .",
        "{E} said she would run again in {M} .",
    ],
    "LOC": [
        "the meeting was held in {E} on {D} .",
        "she traveled to {E} last {M} .",
        "flights to {E} were cancelled because of snow .",
        "heavy rain fell across {E} on {D} .",
        "{E} is a large city on the coast .",
        "the population of {E} grew quickly .",
        "{E} airport was closed for {N} hours .",
        "tourists crowded the streets of {E} .",
        "police in {E} arrested {N} men .",
        "he was born in {E} in {M} .",
    ],
    "ORG": [
        "shares of {E} rose {N} percent on {D} .",
        "{E} reported higher profits this quarter .",
        "analysts at {E} expect slower growth .",
        "{E} announced plans to cut {N} jobs .",
        "the chief executive of {E} resigned .",
        "{E} shares fell sharply after the report .",
        "investors sold {E} stock on {D} .",
        "{E} agreed to buy a rival firm .",
        "a spokesman for {E} declined to comment .",
        "{E} opened a new factory in {M} .",
    ],
}
# Contexts that do not: any type fits.
NEUTRAL = [
    "{E} was mentioned again .",
    "we talked about {E} yesterday .",
    "nobody expected {E} .",
    "{E} appeared in the report .",
    "there was news about {E} on {D} .",
    "{E} and {F} were discussed .",
    "everyone remembers {E} .",
    "the article was about {E} .",
    "{E} came up during the debate .",
    "in the end it was all about {E} .",
]
TYPES = ("PER", "LOC", "ORG")


def split_names(seed: int) -> dict[str, dict[str, list[str]]]:
  """{"labeled"|"unlabeled": {pool: names}}: each pool shuffled by `seed` and halved."""
  rng = random.Random(seed)
  halves = {"labeled": {}, "unlabeled": {}}
  for pool, names in (("LOC", LOC), ("FIRST", FIRST), ("LAST", LAST), ("ORG", ORG)):
    names = list(names)
    rng.shuffle(names)
    half = len(names) // 2
    halves["labeled"][pool], halves["unlabeled"][pool] = names[:half], names[half:]
  return halves


def entity(rng: random.Random, kind: str, names: dict[str, list[str]]) -> list[tuple[str, str]]:
  """One entity of type `kind` as (token, tag) pairs."""
  if kind == "PER":
    tokens = [rng.choice(names["FIRST"])]
    if rng.random() < 0.5:
      tokens.append(rng.choice(names["LAST"]))
  else:
    tokens = [rng.choice(names[kind])]
  return [(t, ("B-" if i == 0 else "I-") + kind) for i, t in enumerate(tokens)]


def sentence(rng: random.Random, cue: bool, halves, unseen_share: float
             ) -> list[tuple[str, str]]:
  """One tagged sentence: a cue or a neutral template with its entities filled in."""
  pick = lambda: halves["unlabeled" if rng.random() < unseen_share else "labeled"]
  kind = rng.choice(TYPES)
  template = rng.choice(CUES[kind] if cue else NEUTRAL)
  out = []
  for slot in template.split():
    if slot == "{E}":
      out += entity(rng, kind, pick())
    elif slot == "{F}":
      out += entity(rng, rng.choice(TYPES), pick())
    elif slot == "{D}":
      out.append((rng.choice(DAYS), "O"))
    elif slot == "{M}":
      out.append((rng.choice(MONTHS), "O"))
    elif slot == "{N}":
      out.append((str(rng.randint(2, 40)), "O"))
    else:
      out.append((slot, "O"))
  first, tag = out[0]
  out[0] = (first[:1].upper() + first[1:], tag)
  return out


def make_tagging_set(seed: int, num_train: int, num_unlabeled: int, num_dev: int):
  """(train, unlabeled, dev): lists of [(token, tag), ...] sentences (module docstring)."""
  halves = split_names(seed)
  rng = random.Random(seed + 1)
  train = [sentence(rng, rng.random() < 0.7, halves, 0.0) for _ in range(num_train)]
  unlabeled = [sentence(rng, rng.random() < 0.85, halves, 0.75) for _ in range(num_unlabeled)]
  dev = [sentence(rng, rng.random() < 0.2, halves, 0.75) for _ in range(num_dev)]
  return train, unlabeled, dev


def write_tagging_set(directory, seed: int = SEED, num_train: int = 400,
                      num_unlabeled: int = 2000, num_dev: int = 200) -> dict[str, str]:
  """Writes the three files into `directory`; returns {"train_file", "dev_file",
  "unlabeled_file"} (the keys of `config.tagging`)."""
  train, unlabeled, dev = make_tagging_set(seed, num_train, num_unlabeled, num_dev)
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(os.fspath(directory), name) for name in FILES]
  conll = lambda sentences: "".join(
      "".join(f"{token} {tag}\n" for token, tag in s) + "\n" for s in sentences)
  texts = (conll(train), conll(dev), "".join(" ".join(t for t, _ in s) + "\n" for s in unlabeled))
  for path, text in zip(paths, texts):
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  return dict(zip(("train_file", "dev_file", "unlabeled_file"), paths))


if __name__ == "__main__":  # regenerates the shipped sample
  import sys
  target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
      os.path.dirname(os.path.abspath(__file__)), os.pardir, "mobilebert_jax", "data", "assets")
  print(write_tagging_set(target, SEED, **SHIPPED))
