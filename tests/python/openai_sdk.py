"""The official OpenAI Python SDK against edgechat's OpenAI face (run by tests/openai_sdk.rs).

Usage: python3 openai_sdk.py BASE_URL API_KEY MODEL
"""

import sys

import openai
from openai import OpenAI

base_url, api_key, model = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

ids = [m.id for m in client.models.list()]
assert model in ids, ids

messages = [
    {"role": "system", "content": "You are a helpful assistant. Answer in English."},
    {"role": "user", "content": "What is the capital of France?"},
]
done = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
text = done.choices[0].message.content
assert "Paris" in text, text
assert done.model == model, done.model
assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, usage = [], None
for chunk in stream:
    usage = chunk.usage or usage
    for choice in chunk.choices:
        parts.append(choice.delta.content or "")
assert "".join(parts) == text, ("".join(parts), text)
assert usage is not None and usage.completion_tokens == done.usage.completion_tokens, usage
# The same prompt again: all of it but its last token came from the local prompt cache.
assert done.usage.prompt_tokens_details.cached_tokens == 0, done.usage
assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1, usage

short = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
assert short.choices[0].finish_reason == "length", short
assert short.usage.completion_tokens == 2, short.usage

try:
    OpenAI(base_url=base_url, api_key="ec_not-a-real-key", max_retries=0).models.list()
    raise SystemExit("a bad key was accepted")
except openai.AuthenticationError:
    pass

print(f"openai {openai.__version__}: ok")
