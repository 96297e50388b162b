"""Indirect object identification (IOI): does the model complete "... John gave a drink to" with the other name?

Two prompt sets:
- "official": the four prompts of Burns et al.'s `small-LM/IOI_task.py`, each in both name orders (8 prompts).
- "wang": the 15 BABA templates of Wang et al. 2022 (`ioi_dataset.py`) and their ABBA twins (first-clause names
  swapped), filled with TinyStories-friendly names, places and objects (`--vocabulary tinystories`, default)
  or with Wang et al.'s own name/place/object lists (`--vocabulary wang`).
The prompt ends before the indirect object; IO and S are scored as continuations " IO" / " S" by summed
log-probability, so names that split into several tokens are handled. Per prompt we record log P(IO),
log P(S) and their difference (equal to the logit difference logit(IO) - logit(S) when both names are single
tokens); accuracy is the fraction with P(IO) > P(S), and mean P(IO) averages exp(log P(IO)).
"""

import math
import random
import statistics
import time

from .common import load_model, save_result, score_continuations
from .results import IOI_HEADLINE_SET, format_table

# Burns et al. small-LM/IOI_task.py, as (template, IO, S) in the file's order: "After John and Mary went to the
# store, John gave a bottle of milk to" -> " Mary". The "swapped" order exchanges the names everywhere.
OFFICIAL_PROMPTS = [
    ("After {S} and {IO} went to the store, {S} gave a bottle of milk to", "Mary", "John"),
    ("When {S} and {IO} went to the park, {S} gave the ball to", "James", "Tom"),
    ("When {S} and {IO} went to the shops, {S} gave an apple to", "Emily", "Dan"),
    ("After {S} and {IO} went to the park, {S} gave a drink to", "Amy", "Sam"),
]

# Wang et al. 2022 BABA_TEMPLATES ([B] = subject, repeated; [A] = indirect object, the answer), final [A] removed.
WANG_BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
]

VOCABULARIES = {
    "tinystories": {
        "names": ["Lily", "Tom", "Ben", "Sue", "Tim", "Anna", "Max", "Mia", "Sam", "Lucy", "Jack", "Sara"],
        "places": ["park", "house", "school", "garden", "beach", "forest", "store", "zoo"],
        "objects": ["ball", "toy", "cake", "apple", "book", "flower", "hat", "cookie"],
    },
    "wang": {
        "names": [
            "Michael",
            "Christopher",
            "Jessica",
            "Matthew",
            "Ashley",
            "Jennifer",
            "Joshua",
            "Amanda",
            "Daniel",
            "David",
            "James",
            "Robert",
            "John",
            "Joseph",
            "Andrew",
            "Ryan",
            "Brandon",
            "Jason",
            "Justin",
            "Sarah",
            "William",
            "Jonathan",
            "Stephanie",
            "Brian",
            "Nicole",
            "Nicholas",
            "Anthony",
            "Heather",
            "Eric",
            "Elizabeth",
            "Adam",
            "Megan",
            "Melissa",
            "Kevin",
            "Steven",
            "Thomas",
            "Timothy",
            "Christina",
            "Kyle",
            "Rachel",
            "Laura",
            "Lauren",
            "Amber",
            "Brittany",
            "Danielle",
            "Richard",
            "Kimberly",
            "Jeffrey",
            "Amy",
            "Crystal",
            "Michelle",
            "Tiffany",
            "Jeremy",
            "Benjamin",
            "Mark",
            "Emily",
            "Aaron",
            "Charles",
            "Rebecca",
            "Jacob",
            "Stephen",
            "Patrick",
            "Sean",
            "Erin",
            "Jamie",
            "Kelly",
            "Samantha",
            "Nathan",
            "Sara",
            "Dustin",
            "Paul",
            "Angela",
            "Tyler",
            "Scott",
            "Katherine",
            "Andrea",
            "Gregory",
            "Erica",
            "Mary",
            "Travis",
            "Lisa",
            "Kenneth",
            "Bryan",
            "Lindsey",
            "Kristen",
            "Jose",
            "Alexander",
            "Jesse",
            "Katie",
            "Lindsay",
            "Shannon",
            "Vanessa",
            "Courtney",
            "Christine",
            "Alicia",
            "Cody",
            "Allison",
            "Bradley",
            "Samuel",
        ],
        "places": ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"],
        "objects": ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"],
    },
}


def official_prompts() -> list[dict]:
    """The 4 official prompts in both orders: 'original' (as in the file) and 'swapped' (names exchanged)."""
    prompts = []
    for index, (template, first, second) in enumerate(OFFICIAL_PROMPTS):
        for order, (io, s) in (("original", (first, second)), ("swapped", (second, first))):
            text = template.format(S=s, IO=io)
            prompts.append({"set": "official", "template": index, "order": order, "prompt": text, "io": io, "s": s})
    return prompts


def wang_prompts(vocabulary: str = "tinystories", per_template: int = 10, seed: int = 0) -> list[dict]:
    """`per_template` random fillings of each of the 15 templates, each in BABA and ABBA order."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"Unknown IOI vocabulary {vocabulary!r}; choose from {sorted(VOCABULARIES)}.")
    words = VOCABULARIES[vocabulary]
    rng = random.Random(seed)
    prompts = []
    for index, template in enumerate(WANG_BABA_TEMPLATES):
        for _ in range(per_template):
            io, s = rng.sample(words["names"], 2)
            place, obj = rng.choice(words["places"]), rng.choice(words["objects"])
            filled = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
            baba = filled.replace("[B]", s).replace("[A]", io)
            # ABBA: the first clause names IO first; the repeated subject stays S.
            abba = filled.replace("[B] and [A]", "[A] and [B]", 1).replace("[B]", s).replace("[A]", io)
            for order, text in (("BABA", baba), ("ABBA", abba)):
                prompts.append(
                    {"set": f"wang-{vocabulary}", "template": index, "order": order, "prompt": text, "io": io, "s": s}
                )
    return prompts


def score_prompts(model, tokenizer, prompts: list[dict], batch_size: int = 16, desc: str | None = None) -> list[dict]:
    pairs = [(p["prompt"], " " + p["io"]) for p in prompts] + [(p["prompt"], " " + p["s"]) for p in prompts]
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, desc=desc)
    rows = []
    for p, io_score, s_score in zip(prompts, scores[: len(prompts)], scores[len(prompts) :]):
        rows.append(
            {
                **p,
                "logprob_io": io_score.logprob,
                "logprob_s": s_score.logprob,
                "io_tokens": io_score.num_tokens,
                "s_tokens": s_score.num_tokens,
                "logit_diff": io_score.logprob - s_score.logprob,
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    diffs = [r["logit_diff"] for r in rows]
    return {
        "n": len(rows),
        "accuracy": sum(d > 0 for d in diffs) / len(rows),
        "mean_p_io": statistics.fmean(math.exp(r["logprob_io"]) for r in rows),
        "mean_p_s": statistics.fmean(math.exp(r["logprob_s"]) for r in rows),
        "mean_logit_diff": statistics.fmean(diffs),
        "std_logit_diff": statistics.pstdev(diffs),
        "single_token_fraction": sum(r["io_tokens"] == 1 and r["s_tokens"] == 1 for r in rows) / len(rows),
    }


def evaluate(model, tokenizer, per_template: int = 10, seed: int = 0, limit: int | None = None, batch_size=16):
    sets = {
        "official": official_prompts(),
        "wang-tinystories": wang_prompts("tinystories", per_template, seed),
        "wang-wang": wang_prompts("wang", per_template, seed),
    }
    summary, per_prompt = {}, {}
    for name, prompts in sets.items():
        rows = score_prompts(model, tokenizer, prompts[:limit] if limit else prompts, batch_size, desc=f"ioi {name}")
        summary[name] = summarise(rows)
        per_prompt[name] = rows
    by_order = {}
    for name, rows in per_prompt.items():
        for order in sorted({r["order"] for r in rows}):
            by_order[f"{name}/{order}"] = summarise([r for r in rows if r["order"] == order])
    return {"summary": summary, "by_order": by_order, "prompts": per_prompt}


def main(args) -> dict:
    started = time.time()
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tokenizer, args.per_template, args.seed, args.limit, args.batch_size)
    rows = [{"set": k, **v} for k, v in {**result["summary"], **result["by_order"]}.items()]
    print(format_table(rows, ["set", "n", "accuracy", "mean_p_io", "mean_p_s", "mean_logit_diff"]))
    settings = {"per_template": args.per_template, "seed": args.seed, "limit": args.limit}
    save_result(
        args, "ioi", settings=settings, metrics=headline_metrics(result), tables=result_tables(result), model=model,
        started=started,
    )  # fmt: skip
    return result


def headline_metrics(result: dict) -> dict:
    """The declared IOI metrics of an `evaluate` result (the headline set and the official prompts)."""
    summary = result["summary"]
    metrics = {}
    if IOI_HEADLINE_SET in summary:
        metrics["ioi_accuracy"] = summary[IOI_HEADLINE_SET]["accuracy"]
        metrics["ioi_mean_logit_diff"] = summary[IOI_HEADLINE_SET]["mean_logit_diff"]
    if "official" in summary:
        metrics["ioi_official_accuracy"] = summary["official"]["accuracy"]
        metrics["ioi_official_mean_p_io"] = summary["official"]["mean_p_io"]
    return metrics


def result_tables(result: dict) -> dict:
    """sets (one row per prompt set), by_order (per set and name order) and prompts (every scored prompt)."""
    return {
        "sets": [{"set": name, **values} for name, values in result["summary"].items()],
        "by_order": [{"set": name, **values} for name, values in result["by_order"].items()],
        "prompts": [{"set": name, **row} for name, rows in result["prompts"].items() for row in rows],
    }


def add_arguments(parser):
    parser.add_argument("--per-template", type=int, default=10, help="fillings per Wang template and order")
    parser.add_argument("--seed", type=int, default=0)
