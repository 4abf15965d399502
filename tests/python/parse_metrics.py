"""Parses an OpenMetrics exposition from stdin with the reference parser (prometheus_client)
and prints every sample as one JSON object: {"name{label=value,...}": value}. A malformed
exposition raises, and the test that runs this fails with the parser's message."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        samples[f"{s.name}{{{labels}}}"] = s.value
json.dump(samples, sys.stdout)
