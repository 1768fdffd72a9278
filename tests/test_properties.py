"""Properties of validation and fingerprinting, over generated inputs."""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.domain.cache import fingerprint
from proxy.domain.catalog import load_catalog
from proxy.domain.errors import BadRequest
from proxy.domain.validate import check_value, normalize
from tests.conftest import POLICIES

CATALOG = load_catalog(POLICIES)
MODELS = list(CATALOG.models.values())
TEXT = CATALOG.models["grok-imagine-video-text-to-video"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-20, 40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def valid_params(model_index: int) -> st.SearchStrategy[dict[str, Any]]:
    model = MODELS[model_index]
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, spec in model.fields.items():
        if spec.kind == "integer":
            fields[name] = st.integers(spec.minimum or 0, spec.maximum or 100)
        elif spec.kind == "enum":
            fields[name] = st.sampled_from(spec.values)
        elif spec.kind == "url":
            fields[name] = st.sampled_from(["https://a.example/x.png", "http://b.example/y.mp4"])
        elif spec.kind == "url_list":
            fields[name] = st.lists(st.just("https://a.example/x.png"), min_size=spec.min_items, max_size=spec.max_items)
        else:
            fields[name] = st.text(min_size=1, max_size=30).filter(str.strip)
    return st.fixed_dictionaries(fields)


@settings(max_examples=200)
@given(data=st.data(), model_index=st.integers(0, len(MODELS) - 1))
def test_equivalent_bodies_share_one_fingerprint(data: st.DataObject, model_index: int) -> None:
    model = MODELS[model_index]
    full = normalize(model, data.draw(valid_params(model_index)))
    # the same request written differently: defaults left out or spelled out, keys in another order
    sparse = {name: value for name, value in full.items()
              if model.fields[name].default != value or data.draw(st.booleans())}
    keys = list(sparse)
    random.Random(data.draw(st.integers())).shuffle(keys)
    reordered = json.loads(json.dumps({key: sparse[key] for key in keys}))

    assert fingerprint(model.id, normalize(model, reordered), "team") == fingerprint(model.id, full, "team")


@settings(max_examples=200)
@given(data=st.data(), model_index=st.integers(0, len(MODELS) - 1))
def test_different_requests_never_share_a_fingerprint(data: st.DataObject, model_index: int) -> None:
    model = MODELS[model_index]
    first = normalize(model, data.draw(valid_params(model_index)))
    second = normalize(model, data.draw(valid_params(model_index)))
    other_model = MODELS[(model_index + 1) % len(MODELS)]

    assert (fingerprint(model.id, first, "team") == fingerprint(model.id, second, "team")) == (first == second)
    assert fingerprint(model.id, first, "a") != fingerprint(model.id, first, "b")
    assert fingerprint(model.id, first, None) != fingerprint(other_model.id, first, None)


@settings(max_examples=500)
@given(body=st.dictionaries(st.sampled_from(list(TEXT.fields) + ["seed", "fps"]), json_values, max_size=6) | json_values)
def test_validation_either_returns_valid_params_or_says_why(body: Any) -> None:
    try:
        params = normalize(TEXT, body)
    except BadRequest as exc:
        assert exc.status == 400 and exc.message
        return
    assert set(params) == set(TEXT.fields)
    assert all(check_value(TEXT.fields[name], value) is None for name, value in params.items())
    assert all(body.get(name) in (None, value) for name, value in params.items())
