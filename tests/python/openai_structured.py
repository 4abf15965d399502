"""Structured output from the local model through the official OpenAI Python SDK (run by
tests/local_structured.rs): `chat.completions.parse` with a pydantic model, and 20 seeded,
sampled answers to a strict nested `json_schema` (its strings bounded, so that 200 tokens
always suffice), every one of which must parse and validate.

Usage: python3 openai_structured.py BASE_URL API_KEY MODEL
"""

import sys
from typing import Annotated

from openai import OpenAI
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel, ConfigDict, Field

base_url, api_key, model = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    country: str
    population_millions: float


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=40)
    zip: str = Field(max_length=10)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=40)
    age: int
    tags: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)
    address: Address


ask = [{"role": "user", "content": "Describe the city of Paris."}]
done = client.chat.completions.parse(
    model=model, messages=ask, response_format=City, max_tokens=60, temperature=0
)
city = done.choices[0].message.parsed
assert isinstance(city, City), done
print("parse:", city.model_dump_json())

person = [{"role": "user", "content": "Invent a person who lives in a city."}]
schema = type_to_response_format_param(Person)
for seed in range(20):
    answer = client.chat.completions.create(
        model=model, messages=person, response_format=schema, max_tokens=200,
        temperature=0.9, seed=seed,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", (seed, choice)
    Person.model_validate_json(choice.message.content)
print("strict json_schema, 20 seeded answers: ok")
