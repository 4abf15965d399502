"""A tool loop through the official OpenAI Python SDK (run by tests/openai_tools.rs): the call
streamed in fragments and put together, the same call unstreamed, the tool's result sent back,
and the final answer.

Usage: python3 openai_tools.py BASE_URL API_KEY MODEL
"""

import json
import sys

from openai import OpenAI

base_url, api_key, model = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]

stream = client.chat.completions.create(
    model=model, messages=messages, tools=tools, tool_choice="auto", stream=True
)
calls, finish = {}, None
for chunk in stream:
    for choice in chunk.choices:
        finish = choice.finish_reason or finish
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            if d.function:
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
assert finish == "tool_calls", finish
assert list(calls) == [0], calls
call = calls[0]
assert call["id"] == "call_1" and call["name"] == "get_weather", call
assert json.loads(call["arguments"]) == {"city": "Paris"}, call

done = client.chat.completions.create(model=model, messages=messages, tools=tools)
message = done.choices[0].message
assert done.choices[0].finish_reason == "tool_calls", done
assert message.content is None, message
[same] = message.tool_calls
assert (same.id, same.function.name, json.loads(same.function.arguments)) == (
    "call_1", "get_weather", {"city": "Paris"}), same

messages.append(message.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": same.id, "content": '{"celsius": 21}'})
final = client.chat.completions.create(model=model, messages=messages, tools=tools)
assert final.choices[0].finish_reason == "stop", final
assert final.choices[0].message.content == "It is 21 degrees in Paris.", final
print("tool loop: ok")
