"""Hostile input on a real server: schema-driven fuzzing of /v1 (schemathesis), huge, deeply
nested and non-UTF-8 bodies, a 200k-character prompt, path-like model names, header injection in
X-Forwarded-Prefix, and property-based fuzzing of the manifest loader (hypothesis)."""
from __future__ import annotations

import json
import string

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import ManifestError, load_manifest
from backends.config.loading import iter_fields
from helpers.server import read_metric

MODEL = "vibethinker-1.5b"
ADD = [{"role": "user", "content": "What is 2+2?"}]
CHAT = "/v1/chat/completions"


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "param" in error and "code" in error
    return error


@pytest.mark.parametrize("method, path, examples", [("POST", CHAT, 60), ("GET", "/v1/models", 5)])
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_fuzzing_never_500_never_hangs_errors_are_openai_shaped(echo_server, method, path, examples, mode):
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(echo_server.url + "/v1/openapi.json")
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    seen: dict[int, int] = {}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case) -> None:
        r = case.call(base_url=echo_server.url, timeout=30)  # a hang fails here
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:500], case.body)
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and error["type"] and "param" in error and "code" in error, r.text
            if r.status_code == 400 and "JSON" not in error["message"]:
                assert error["param"] or error["code"], r.text  # names the field (or the rule)
        elif "text/event-stream" in str(r.headers.get("content-type", "")):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            for event in events[:-1]:
                json.loads(event)

    check()
    assert sum(seen.values()) >= 1
    if mode == "negative" and method == "POST":
        assert 400 in seen, seen  # the fuzzer did reach the validation


def test_body_over_10_mb_is_413_before_parsing(echo_server):
    junk = b"x" * (10 * 1024 * 1024 + 1)  # not JSON at all: a parser would say 400
    r = httpx.post(echo_server.url + CHAT, content=junk, headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(r, 413)

    def chunks():  # no Content-Length: cut while reading
        for _ in range(11):
            yield b"y" * (1024 * 1024)

    r = httpx.post(echo_server.url + CHAT, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(r, 413)
    ok = httpx.post(echo_server.url + CHAT, json={"model": MODEL, "messages": ADD}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize("depth", [50, 5_000, 200_000])
def test_deeply_nested_json_is_a_400(echo_server, depth):
    body = '{"model": "%s", "messages": %s%s}' % (MODEL, "[" * depth, "]" * depth)
    r = httpx.post(echo_server.url + CHAT, content=body.encode(), headers={"content-type": "application/json"},
                   timeout=30)
    assert_openai_error(r, 400)
    nested_content = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": None}
    obj: object = "end"
    for _ in range(min(depth, 500)):
        obj = {"a": obj}
    nested_content["metadata"] = obj
    r = httpx.post(echo_server.url + CHAT, json=nested_content, timeout=30)
    assert r.status_code in (200, 400), r.text[:300]


def test_invalid_utf8_is_a_400(echo_server):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "\xff\xfe\xc3("}]}' % MODEL.encode()
    r = httpx.post(echo_server.url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(r, 400)
    r = httpx.post(echo_server.url + CHAT, content=b"\xff" * 100, headers={"content-type": "application/json"},
                   timeout=30)
    assert_openai_error(r, 400)


@pytest.mark.parametrize("model", ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini",
                                   "file:///etc/passwd", "vibethinker-1.5b/../../etc/passwd", "%2e%2e%2f"])
def test_path_like_model_is_404_naming_the_field(echo_server, model):
    r = httpx.post(echo_server.url + CHAT, json={"model": model, "messages": ADD}, timeout=30)
    error = assert_openai_error(r, 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "root:" not in r.text  # nothing was read from that path


@pytest.mark.parametrize("prefix", ['"><script>alert(1)</script>', "//evil.com", "http://evil.com/x",
                                    "/ok/</script><script>alert(1)</script>", "javascript:alert(1)",
                                    "/a\"onload=\"alert(1)"])
def test_forwarded_prefix_cannot_inject_into_the_page(echo_server, prefix):
    r = httpx.get(echo_server.url + "/", headers={"X-Forwarded-Prefix": prefix}, timeout=30)
    assert r.status_code == 200
    html = r.text
    assert "alert(1)" not in html and "evil.com" not in html
    config = httpx.get(echo_server.url + "/config", headers={"X-Forwarded-Prefix": prefix}, timeout=30).json()
    assert "evil" not in config["root"] and "<" not in config["root"] and '"' not in config["root"]
    # A plain prefix still works (the sub-path proxy case).
    good = httpx.get(echo_server.url + "/config", headers={"X-Forwarded-Prefix": "/proxy/8080/"}, timeout=30)
    assert good.json()["root"].endswith("/proxy/8080")


def test_200k_character_prompt_is_context_length_exceeded_without_running_the_engine(busy_server):
    before = read_metric(busy_server.url, "vibethinker_requests_total")
    prompt = "word " * 40_000
    r = httpx.post(busy_server.url + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": prompt}]},
                   timeout=120)
    error = assert_openai_error(r, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    r = httpx.post(busy_server.url + CHAT, timeout=120, json={"model": MODEL, "stream": True,
                                                              "messages": [{"role": "user", "content": prompt}]})
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    assert read_metric(busy_server.url, "vibethinker_requests_total") == before  # no generation ran


# ---- the manifest loader -----------------------------------------------------------------------
KNOWN = [dotted for dotted, _ in iter_fields()]
SECTIONS = sorted({k.split(".")[0] for k in KNOWN})
NAME = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
KEYS = st.one_of(st.sampled_from(KNOWN), NAME, st.builds(lambda s, n: f"{s}.{n}", st.sampled_from(SECTIONS), NAME))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(NAME, SCALARS, max_size=3))


def _nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node
        node[leaf] = value
    return out


def _check(settings_: dict[str, object], load) -> None:
    try:
        load()
    except ManifestError as exc:
        text = str(exc)
        named = any(k in text or k.split(".")[0] in text for k in settings_)
        assert named, (settings_, text)
    # Anything else (TypeError, KeyError, AttributeError...) fails the test.


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
def test_manifest_overrides_fuzzed_fail_only_with_manifest_error_naming_the_key(flat):
    _check(flat, lambda: load_manifest(env={}, overrides=flat))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
def test_manifest_file_fuzzed_fails_only_with_manifest_error_naming_the_key(tmp_path_factory, flat):
    path = tmp_path_factory.mktemp("m") / "manifest.yaml"
    path.write_text(yaml.safe_dump(_nest(flat), allow_unicode=True), encoding="utf-8")
    _check(flat, lambda: load_manifest(path, env={}))


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(KEYS, st.text(max_size=20), min_size=1, max_size=3))
def test_manifest_environment_fuzzed_fails_only_with_manifest_error_naming_the_variable(flat):
    env = {"VT_" + k.upper().replace(".", "__"): v for k, v in flat.items()}

    try:
        load_manifest(env=env)
    except ManifestError as exc:
        assert any(name in str(exc) or name.split("__")[0] in str(exc) for name in env) or any(
            k in str(exc) for k in flat), (env, str(exc))
