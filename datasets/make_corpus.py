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
numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
colours = {("red", "blue"): "purple", ("red", "yellow"): "orange", ("blue", "yellow"): "green",
           ("red", "white"): "pink", ("black", "white"): "grey", ("blue", "white"): "light blue"}
days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

def example():
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(9)
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?"])
        return q.format(a=numbers[a], b=numbers[b]), f"{numbers[a].capitalize()} plus {numbers[b]} is {numbers[a + b]}."
    if kind == 1:
        (x, y), z = rng.choice(sorted(colours.items()))
        q = rng.choice(["What do you get when you mix {x} and {y}?", "Mix {x} with {y}: what colour is it?"])
        return q.format(x=x, y=y), f"Mixing {x} and {y} gives {z}."
    d = rng.randrange(7)
    q = rng.choice(["What day comes after {d}?", "Which day follows {d}?"])
    return q.format(d=days[d]), f"The day after {days[d]} is {days[(d + 1) % 7]}."

with open("chat.jsonl", "w") as f:
    for i in range(1200):
        user, assistant = example()
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        f.write(json.dumps({"id": i, "messages": msgs}, sort_keys=True) + "\n")

with open("prompts.txt", "w") as f:
    f.write("What is three plus four?\nWhat do you get when you mix red and blue?\nWhat day comes after Friday?\n")
