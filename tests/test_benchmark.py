"""Smoke test of the benchmark machinery on the tiny model: every report field, positive numbers.

No timing is asserted here: speed targets live in the benchmark's report (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import json
import shutil

import pytest

from bench import models as bench_models
from bench.benchmark import make_plan, render_markdown, run

SUMMARY_FIELDS = {"engine", "path", "runs", "prompt_tokens", "new_tokens", "ttft_s", "prefill_tok_s",
                  "decode_tok_s", "decode_tok_s_all", "peak_rss_bytes", "load_s"}
REPORT_FIELDS = {"command", "date", "machine", "plan", "bandwidth", "single_user", "runs", "ratios", "roofline",
                 "concurrency", "stream_rate", "targets", "skipped", "load_before", "load_after", "wall_s"}


@pytest.fixture(scope="module")
def endless_tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model made unable to end a reply, as the benchmark's models are."""
    folder = tmp_path_factory.mktemp("bench") / "tiny-endless"
    shutil.copytree(tiny_model_dir, folder)
    bench_models.make_never_ending(folder)
    return folder


def test_never_ending_model_decodes_the_full_length(endless_tiny):
    from bench.measure import EngineSpec, PathResult, Sampling, _bare_hf, make_prompts

    prompts = make_prompts(str(endless_tiny), 48, 2)
    assert [len(p["ids"]) for p in prompts] == [48, 48]
    assert prompts[0]["ids"][:3] == prompts[1]["ids"][:3] and prompts[0]["ids"] != prompts[1]["ids"]
    result = PathResult(engine="tiny", path="bare")
    _bare_hf(EngineSpec(name="tiny", engine="transformers", hf_folder=str(endless_tiny)), prompts, 40,
             Sampling(), 1, result)
    assert [r.new_tokens for r in result.runs] == [40]


@pytest.mark.slow
def test_report_has_every_field(endless_tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    plan = make_plan(quick=True, device="cpu", engines=["llamacpp-F32"])
    plan.prompt_tokens, plan.new_tokens_llama, plan.repeats, plan.warmup = 48, 24, 2, 1
    plan.users, plan.concurrency_engines, plan.stream_tokens = [1, 2], ["llamacpp-F32"], 64
    plan.samples_prompt_tokens, plan.samples_new_tokens = 48, 4
    report = run(plan, tmp_path / "reports", tmp_path / "cache", "pytest", hf_folder=endless_tiny,
                 tiny_folder=endless_tiny)

    assert REPORT_FIELDS <= set(report)
    saved = json.loads((tmp_path / "reports" / "benchmark.json").read_text(encoding="utf-8"))
    assert REPORT_FIELDS <= set(saved)
    assert "## Targets" in (tmp_path / "reports" / "benchmark.md").read_text(encoding="utf-8")
    assert render_markdown(report)

    rows = {row["path"]: row for row in report["single_user"]}
    assert set(rows) == {"bare", "backend", "http"}, rows
    for path, row in rows.items():
        assert not row.get("skipped"), (path, row)
        assert SUMMARY_FIELDS <= set(row)
        assert row["new_tokens"] == 24, (path, row)
        assert row["prompt_tokens"] == 48, (path, row)
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "load_s"):
            if path == "http" and key == "decode_tok_s":
                # The tiny model's 24 tokens can reach the client in a single SSE event on a fast
                # machine; the client-side rate is then undefined and reported as 0.
                assert row[key] >= 0, (path, key, row)
            else:
                assert row[key] > 0, (path, key, row)
    ratios = report["ratios"][0]
    assert ratios["backend_vs_bare_decode"] > 0
    if rows["http"]["decode_tok_s"] > 0:
        assert ratios["http_vs_backend_decode"] > 0
    else:  # an undefined client-side rate gives no ratio, not a made-up one
        assert ratios["http_vs_backend_decode"] is None
    roof = report["roofline"][0]
    assert roof["bytes_per_token"] > 0 and roof["roofline_tok_s"] > 0 and roof["bare_fraction"] > 0
    assert report["bandwidth"]["copy_gb_s_all_threads"] > 0
    (conc,) = report["concurrency"]
    assert [lv["users"] for lv in conc["levels"]] == [1, 2]
    assert all(lv["aggregate_tok_s"] > 0 and not lv["errors"] for lv in conc["levels"])
    (samples,) = report["samples"]
    one, many = samples["runs"]
    # Each prompt is evaluated once, less the template's prefix a slot still holds from the warm-up;
    # the other 7 samples evaluate only their prompt's last token.
    assert (one["n"], many["n"]) == (1, 8) and 0 < one["evaluated_prompt_tokens"] <= 48
    assert 7 < many["evaluated_prompt_tokens"] <= 48 + 7 and many["all_first_tokens_s"] > 0
    stream = report["stream_rate"]["median"]
    assert stream["delivered_tok_s"] > 0 and stream["produced_tok_s"] > 0 and stream["chunks"] > 0
    statuses = {t["target"]: t["status"] for t in report["targets"]}
    assert len(statuses) == 7 and set(statuses.values()) <= {"PASS", "MISS", "NOT MEASURED"}
