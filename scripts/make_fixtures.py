#!/usr/bin/env python3
"""Writes the tokenizer and chat-template fixtures for the default model, once, from
implementations independent of ours:

- tokens: a from-scratch GPT-2 byte-level BPE in this file over the GGUF's own vocabulary and
  merges (read with the `gguf` package), pre-tokenized as llama.cpp does for `pre = smollm`
  (each digit alone, then GPT-2's regex); it must reproduce a pair taken from llama.cpp's
  `llama-server /tokenize` before it writes anything;
- template: Jinja2 with the settings `transformers` uses for `apply_chat_template`
  (trim_blocks, lstrip_blocks), on the GGUF's `tokenizer.chat_template`.

Usage: pip install gguf regex jinja2 && python3 scripts/make_fixtures.py
"""
import json
import pathlib
import sys

import gguf
import jinja2
import regex

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "tests" / "fixtures"

GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
DIGIT = regex.compile(r"\p{N}")

# From llama.cpp's llama-server (/tokenize, parse_special) on the same file.
LLAMA_CPP_PAIR = (
    "café 東京 🚀  spaces\n\nnew <|im_start|>user",
    [83, 1939, 2756, 17097, 247, 126, 16736, 122, 15107, 244, 218, 216, 5600, 198, 198, 2241,
     216, 1, 4093],
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "It's 2024: we've got 1234567 apples and 3.14 pies.",
    "café naïve résumé Zürich façade",
    "Ångström, Ærø, Øresund, ß",
    "🚀 🎉👍🏽 👨‍👩‍👧",
    "東京は日本の首都です。",
    "北京欢迎你",
    "한국어 텍스트",
    "Привет, мир!",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\tmore\ttabs",
    "a\n\nb\r\nc\n\n\n",
    "two  spaces   three    four",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|>",
    "def f(x):\n    return x ** 2  # square\n",
    "mixed: ASCII, émoji 😀, 中文, and numbers 42!",
    LLAMA_CPP_PAIR[0],
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, with émoji 🚀?"},
    ],
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Bpe:
    def __init__(self, reader):
        fields = reader.fields
        self.tokens = fields["tokenizer.ggml.tokens"].contents()
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        merges = fields["tokenizer.ggml.merges"].contents()
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        types = fields["tokenizer.ggml.token_type"].contents()
        # llama.cpp matches control (3) and user-defined (4) tokens whole.
        self.specials = sorted((t for t, ty in zip(self.tokens, types) if ty in (3, 4)),
                               key=len, reverse=True)
        self.byte_map = bytes_to_unicode()

    def encode(self, text):
        ids = []
        for piece, special in self.split_specials(text):
            if special:
                ids.append(self.ids[piece])
            else:
                for word in self.pre_tokenize(piece):
                    ids.extend(self.ids[t] for t in self.merge(word))
        return ids

    def split_specials(self, text):
        out, start, i = [], 0, 0
        while i < len(text):
            hit = next((s for s in self.specials if text.startswith(s, i)), None)
            if hit:
                if start < i:
                    out.append((text[start:i], False))
                out.append((hit, True))
                i += len(hit)
                start = i
            else:
                i += 1
        if start < len(text):
            out.append((text[start:], False))
        return out

    def pre_tokenize(self, text):
        for chunk in split_isolated(DIGIT, text):
            for word in GPT2_SPLIT.findall(chunk):
                yield "".join(self.byte_map[b] for b in word.encode("utf-8"))

    def merge(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            pairs = [(r, i) for r, i in pairs if r is not None]
            if not pairs:
                break
            rank = min(pairs)[0]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and self.ranks.get((parts[i], parts[i + 1])) == rank:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts


def split_isolated(pattern, text):
    """Splits text around each match, keeping matches as their own pieces."""
    out, last = [], 0
    for m in pattern.finditer(text):
        if m.start() > last:
            out.append(text[last:m.start()])
        out.append(m.group())
        last = m.end()
    if last < len(text):
        out.append(text[last:])
    return out


def main():
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: run bash models/fetch-default.sh")
    reader = gguf.GGUFReader(str(MODEL))
    bpe = Bpe(reader)
    got = bpe.encode(LLAMA_CPP_PAIR[0])
    if got != LLAMA_CPP_PAIR[1]:
        sys.exit(f"reference BPE disagrees with llama.cpp: {got}")
    cases = [{"text": t, "ids": bpe.encode(t)} for t in TEXTS]
    write("tokenizer_smollm2.json", {
        "model": MODEL.name,
        "reference": "scripts/make_fixtures.py: Python GPT-2 BPE over the GGUF metadata, "
                     "checked against llama.cpp's /tokenize",
        "cases": cases,
    })

    source = reader.fields["tokenizer.chat_template"].contents()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(source)
    bos = bpe.tokens[reader.fields["tokenizer.ggml.bos_token_id"].contents()]
    eos = bpe.tokens[reader.fields["tokenizer.ggml.eos_token_id"].contents()]
    renders = [{
        "messages": m,
        "prompt": template.render(messages=m, add_generation_prompt=True, bos_token=bos,
                                  eos_token=eos),
    } for m in CONVERSATIONS]
    write("template_smollm2.json", {
        "model": MODEL.name,
        "reference": "scripts/make_fixtures.py: Jinja2 with trim_blocks and lstrip_blocks, "
                     "as transformers' apply_chat_template renders",
        "cases": renders,
    })


def write(name, value):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    # One case a line keeps the fixture readable and its diffs small.
    head = {k: v for k, v in value.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False) for c in value["cases"]]
    text = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    text += ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"
    json.loads(text)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
