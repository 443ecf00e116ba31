"""Predictions made elsewhere (vLLM, another harness), read for `knowstack score`."""

from __future__ import annotations

import json
from pathlib import Path

from knowstack.errors import KnowstackError


def read_predictions(path: Path, expected: int) -> list[str]:
    """FILE: JSON Lines of {"prediction": "..."} in test order, or a JSON list of strings; exactly `expected`
    of them. Every problem is one error naming the file and the item."""
    path = Path(path)
    if not path.is_file():
        raise KnowstackError("predictions file not found", path=path)
    text = path.read_text(encoding="utf-8")
    predictions = _json_list(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    if len(predictions) != expected:
        raise KnowstackError(f"{len(predictions)} predictions for {expected} test items: give one per test item, "
                             "in test order", path=path)
    return predictions


def _json_list(path: Path, text: str) -> list[str]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise KnowstackError(f"not valid JSON ({err.msg} at line {err.lineno})", path=path) from None
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise KnowstackError(f"item {index} is not a string (a JSON list of predictions holds strings)", path=path)
    return items


def _json_lines(path: Path, text: str) -> list[str]:
    predictions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise KnowstackError(f"line {number} is not valid JSON ({err.msg})", path=path) from None
        if not isinstance(record, dict) or not isinstance(record.get("prediction"), str):
            raise KnowstackError(f"line {number} has no string \"prediction\"", path=path, field="prediction")
        predictions.append(record["prediction"])
    return predictions
