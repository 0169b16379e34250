"""The embedded default task: short instructions with one exactly right answer, and a gold judge.

The judge stands in for human raters: it scores any response to any of the task's prompts, so we can
see whether alignment improves the model. Three categories of short factual questions, each answered by
one word that a tiny model can learn on a CPU in a minute or two:

    sound     "Maria asks: what sound does a cow make?"    -> "moo"
    color     "Omar wonders: what color is a banana?"      -> "yellow"
    opposite  "Lena wants to know: what is the opposite of hot?" -> "cold"

Gold score of a response: 1.0 if it is exactly the answer; 0.5 if it holds the answer as a clause of its
own wrapped in chatter ("Sure! Here it is: ..."); 0.0 otherwise. Pass = score 1.0.

The SFT demonstrations are deliberately imperfect (some chatty, some wrong), as human demonstrations
are, so that the SFT model lands well above an untrained model but clearly below 1, and the reward
model, rejection sampling and DPO have room to improve it. The preference data ranks responses
edited (exact) > chosen (chatty) > rejected (wrong), with a little label noise, as human raters have.
Everything is generated deterministically from a seed.
"""

from __future__ import annotations

import random
import re

from data.formats import DataError

FACTS = {
    "sound": {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "lion": "roar",
              "owl": "hoot", "snake": "hiss", "horse": "neigh", "pig": "oink", "bee": "buzz", "frog": "croak"},
    "color": {"banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black", "cherry": "red",
              "carrot": "orange", "plum": "purple", "chocolate": "brown", "flamingo": "pink", "elephant": "gray",
              "lemon": "yellow"},
    "opposite": {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
                 "early": "late", "open": "closed", "hard": "soft", "full": "empty", "loud": "quiet", "old": "new"},
}
CATEGORIES = tuple(FACTS)
QUESTIONS = {"sound": "what sound does a {} make?", "color": "what color is a {}?", "opposite": "what is the opposite of {}?"}
NAMES = ("Maria Omar Lena Kenji Ava Noah Priya Lucas Zara Ivan Chloe Mateo Amara Felix Hana Diego Sofia Yusuf Nina "
         "Leo Ines Tariq Mila Oscar Aiko Ravi Elena Jonas Fatima Hugo").split()
VERBS = ("asks", "wonders", "wants to know", "would like to know", "is curious")
CHATTER_PREFIX = ("Sure! Here it is:", "Of course, the answer is:", "Here you go:", "Happy to help:")
CHATTER_SUFFIX = ("Hope this helps!", "Let me know if you need more.")
# Mixture of the SFT demonstrations: exact, chatty (gold 0.5), wrong (gold 0).
SFT_MIX = {"exact": 0.40, "chatty": 0.35, "wrong": 0.25}
LABEL_NOISE = 0.03

_PATTERN = re.compile(r"^([A-Z][a-z]+) ([a-z ]+): (what sound does a (\w+) make|what color is a (\w+)|what is the opposite of (\w+))\?$")


# -- prompts and answers --------------------------------------------------------------------------------
def make_prompt(rng: random.Random, category: str) -> str:
    item = rng.choice(sorted(FACTS[category]))
    return f"{rng.choice(NAMES)} {rng.choice(VERBS)}: {QUESTIONS[category].format(item)}"


def parse_prompt(text: str) -> tuple[str, str] | None:
    """(category, exact answer) for a task prompt, or None if the text is not one of the task's prompts."""
    m = _PATTERN.match(text.strip())
    if not m:
        return None
    for cat, item in zip(CATEGORIES, m.groups()[3:]):
        if item is not None:
            answer = FACTS[cat].get(item)
            return (cat, answer) if answer else None
    return None


def wrong_answer(rng: random.Random, prompt: str) -> str:
    """A plausible mistake: the answer to another question of the same kind."""
    cat, answer = parse_prompt(prompt)
    return rng.choice(sorted({v for v in FACTS[cat].values() if v != answer}))


def chatty_answer(rng: random.Random, answer: str) -> str:
    if rng.random() < 0.7:
        return f"{rng.choice(CHATTER_PREFIX)} {answer}"
    return f"{answer}. {rng.choice(CHATTER_SUFFIX)}"


def respond(rng: random.Random, prompt: str, kind: str) -> str:
    answer = parse_prompt(prompt)[1]
    return {"exact": lambda: answer, "chatty": lambda: chatty_answer(rng, answer), "wrong": lambda: wrong_answer(rng, prompt)}[kind]()


# -- the gold judge -------------------------------------------------------------------------------------
def gold_score(prompt: str | list[dict], response: str) -> float:
    """1.0 exact; 0.5 if one sentence or clause of it (split at : . ! ? and newlines) is exactly the answer;
    0.0 otherwise. `prompt` is the prompt text or its message list."""
    if isinstance(prompt, list):
        prompt = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a default-task prompt: {prompt!r}")
    answer = parsed[1]
    response = response.strip()
    if response == answer:
        return 1.0
    if any(seg.strip() == answer for seg in re.split(r"[:.!?\n]", response)):
        return 0.5
    return 0.0


# -- data sets ------------------------------------------------------------------------------------------
MAX_MISSES = 20_000  # draws in a row that give no new prompt: the category has run out of distinct prompts


def _prompts(rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    """n distinct prompts, categories in turn, none in `exclude` (the held-out sets). A category whose distinct
    prompts run out is a DataError naming the sizes to lower (it looped forever before)."""
    out, seen, misses = [], set(), 0
    while len(out) < n:
        cat = CATEGORIES[len(out) % len(CATEGORIES)]
        p = make_prompt(rng, cat)
        if p in exclude or p in seen:
            misses += 1
            if misses >= MAX_MISSES:
                raise DataError(f"default task: {n} distinct prompts asked, but category '{cat}' ran out after "
                                f"{len(out)} in all: lower task.n_sft + task.n_preference + task.n_sampling_prompts "
                                "(or the eval sizes)")
            continue
        misses = 0
        seen.add(p)
        out.append((cat, p))
    return out


def _user(p: str) -> list[dict]:
    return [{"role": "user", "content": p}]


def generate(seed: int = 0, n_sft: int = 2000, n_preference: int = 2000, n_eval_preference: int = 300,
             n_eval_prompts: int = 200, n_sampling_prompts: int = 400) -> dict[str, list[dict]]:
    """All data sets of the task, deterministic in `seed`. Eval prompts share no prompt with training."""
    rng = random.Random(seed)
    eval_prompts = _prompts(rng, n_eval_prompts + n_eval_preference, set())
    held_out = {p for _, p in eval_prompts}
    train_prompts = _prompts(rng, n_sft + n_preference + n_sampling_prompts, held_out)
    sft_p = train_prompts[:n_sft]
    pref_p = train_prompts[n_sft : n_sft + n_preference]
    samp_p = train_prompts[n_sft + n_preference :]
    kinds, weights = list(SFT_MIX), list(SFT_MIX.values())

    sft = []
    for i, (cat, p) in enumerate(sft_p):
        kind = rng.choices(kinds, weights)[0]
        sft.append({"id": f"sft-{i}", "category": cat, "messages": _user(p) + [{"role": "assistant", "content": respond(rng, p, kind)}]})

    def ranked(i: int, cat: str, p: str, prefix: str) -> dict:
        responses = {"edited": respond(rng, p, "exact"), "chosen": respond(rng, p, "chatty"), "rejected": respond(rng, p, "wrong")}
        shape = rng.random()
        if shape < 0.4:  # three ranked responses, Llama 3 style
            rec = {"prompt": _user(p), **{k: [{"role": "assistant", "content": v}] for k, v in responses.items()}}
        else:  # a plain pair, one of the three orderings
            hi, lo = rng.choice([("edited", "chosen"), ("chosen", "rejected"), ("edited", "rejected")])
            rec = {"prompt": _user(p), "chosen": [{"role": "assistant", "content": responses[hi]}],
                   "rejected": [{"role": "assistant", "content": responses[lo]}]}
        if rng.random() < LABEL_NOISE:  # raters disagree sometimes
            rec["chosen"], rec["rejected"] = rec["rejected"], rec["chosen"]
        return {"id": f"{prefix}-{i}", "category": cat, **rec}

    preference = [ranked(i, c, p, "pref") for i, (c, p) in enumerate(pref_p)]
    eval_preference = [ranked(i, c, p, "evalpref") for i, (c, p) in enumerate(eval_prompts[n_eval_prompts:])]
    return {
        "sft": sft,
        "preference": preference,
        "eval_preference": eval_preference,
        "prompts": [{"id": f"prompt-{i}", "category": c, "prompt": _user(p)} for i, (c, p) in enumerate(samp_p)],
        "eval_prompts": [{"id": f"eval-{i}", "category": c, "prompt": _user(p)} for i, (c, p) in enumerate(eval_prompts[:n_eval_prompts])],
    }


def pretraining_text(rng: random.Random) -> str:
    """A line of the tiny base model's pretraining corpus: questions of the task followed by their answers.

    Plain text with no chat format and no chatter, as web text would hold: it gives the randomly
    initialised model the knowledge a real base model brings to SFT. SFT then teaches the chat format,
    when to stop, and (from the imperfect demonstrations) the habits that alignment must remove."""
    lines = []
    for _ in range(4):
        p = make_prompt(rng, rng.choice(CATEGORIES))
        lines.append(f"{p} {parse_prompt(p)[1]}")
    return "\n".join(lines)


def corpus(datasets: dict[str, list[dict]]) -> list[str]:
    """Every text of the task (for training the tiny tokenizer), plus each category's wrong/chatty forms."""
    texts = []
    for recs in datasets.values():
        for r in recs:
            for key in ("messages", "prompt", "edited", "chosen", "rejected"):
                texts += [m["content"] for m in r.get(key, [])]
    rng = random.Random(1)
    texts += list(CHATTER_PREFIX) + list(CHATTER_SUFFIX)
    texts += [" ".join(FACTS[c]) + " " + " ".join(FACTS[c].values()) for c in CATEGORIES]
    texts += [respond(rng, make_prompt(rng, c), "wrong") for c in CATEGORIES for _ in range(50)]
    return texts


def judge(prompt: str | list[dict], text: str) -> float | None:
    """The gold judge's score of a response, or None when the prompt (its text or its messages) is not a
    default-task prompt: the one gold check of every stage, the eval and the dashboard."""
    user = prompt if isinstance(prompt, str) else next((m["content"] for m in reversed(prompt) if m["role"] == "user"), None)
    return gold_score(prompt, text) if user is not None and parse_prompt(user) is not None else None
