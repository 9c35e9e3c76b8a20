#!/usr/bin/env python3
"""Writes datasets/chat.jsonl and datasets/prompts.txt: taper's embedded quickstart corpus.

The corpus is generated here, from templates, so its licence is the project's own
(Apache-2.0); no third-party text is included. It is deliberately regular -- small
arithmetic, colour mixing and day-order facts phrased as short conversations -- so that a
LoRA adapter on the tiny model measurably lowers held-out loss within a minute of CPU.
Deterministic: the same script always writes the same bytes.
"""
import json
import random

rng = random.Random(20261126)
ones = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
tens = ["", "", "twenty", "thirty"]
numbers = ones + [tens[n // 10] + ("" if n % 10 == 0 else "-" + ones[n % 10]) for n in range(20, 40)]
colours = {("red", "blue"): "purple", ("red", "yellow"): "orange", ("blue", "yellow"): "green",
           ("red", "white"): "pink", ("black", "white"): "grey", ("blue", "white"): "light blue"}
days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

def example():
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(20), rng.randrange(20)
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
                        "Please add {a} to {b}.", "What do {a} and {b} make together?"])
        return q.format(a=numbers[a], b=numbers[b]), f"{numbers[a].capitalize()} plus {numbers[b]} is {numbers[a + b]}."
    if kind == 1 and rng.random() < 0.2:
        (x, y), z = rng.choice(sorted(colours.items()))
        q = rng.choice(["What do you get when you mix {x} and {y}?", "Mix {x} with {y}: what colour is it?"])
        return q.format(x=x, y=y), f"Mixing {x} and {y} gives {z}."
    d = rng.randrange(7)
    q = rng.choice(["What day comes after {d}?", "Which day follows {d}?"])
    return q.format(d=days[d]), f"The day after {days[d]} is {days[(d + 1) % 7]}."

seen = set()
pairs = []
while len(pairs) < 1200:  # unique conversations only, so held-out examples are unseen
    pair = example()
    if pair not in seen:
        seen.add(pair)
        pairs.append(pair)
with open("chat.jsonl", "w") as f:
    for i, (user, assistant) in enumerate(pairs):
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        f.write(json.dumps({"id": i, "messages": msgs}, sort_keys=True) + "\n")

with open("prompts.txt", "w") as f:
    f.write("What is three plus four?\nWhat do you get when you mix red and blue?\nWhat day comes after Friday?\n")
