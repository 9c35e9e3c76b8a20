"""Turns the English conversations of the chatterbot-corpus wheel into chat JSONL.

Usage: python3 chatterbot_to_jsonl.py CHATTERBOT_WHEEL OUT.jsonl

The data: `chatterbot-corpus` 1.3.3 from PyPI (https://github.com/gunthercox/chatterbot-corpus),
BSD-3-Clause, (c) Gunther Cox. Its `chatterbot_corpus/data/english/*.yml` files hold
`conversations:`, each a list of lines spoken in turn. Read straight from the wheel (a zip):
every English file except `coding.yml` (long code listings that would dominate the tokens of
a short CPU run), conversations in file and list order, exact duplicates dropped. Lines
alternate user / assistant, starting with the user; an unanswered last line is dropped.
Each output line is `{"id": N, "messages": [{"role", "content"}, ...], "source": FILE}`
with sorted keys, the layout of `datasets/chat.jsonl`. Same wheel, same bytes.

Needs PyYAML (`pip install pyyaml`).
"""

import json
import sys
import zipfile

import yaml

PREFIX = "chatterbot_corpus/data/english/"
SKIP = {"coding.yml"}


def conversations(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = sorted(
            n for n in z.namelist() if n.startswith(PREFIX) and n.endswith(".yml")
        )
        for name in names:
            short = name[len(PREFIX):]
            if short in SKIP:
                continue
            doc = yaml.safe_load(z.read(name).decode("utf-8"))
            for conv in doc.get("conversations") or []:
                lines = [str(x).strip() for x in conv if x is not None]
                yield short, [x for x in lines if x]


def main():
    wheel, out = sys.argv[1], sys.argv[2]
    seen = set()
    rows = []
    for source, lines in conversations(wheel):
        lines = lines[: len(lines) // 2 * 2]
        if not lines or tuple(lines) in seen:
            continue
        seen.add(tuple(lines))
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text}
            for i, text in enumerate(lines)
        ]
        rows.append({"id": len(rows), "messages": messages, "source": "english/" + source})
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"{len(rows)} conversations -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
