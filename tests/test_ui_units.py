"""Fast checks of the UI's pure parts: the fair line, prompts, languages, text helpers."""
from __future__ import annotations

import threading

import pytest

from backends import ChatMessage, load_manifest
from ui.limiter import FairLimiter, LimiterClosed, QueueFull
from ui.messages import build_messages, mostly_chinese, strip_thinking
from ui.page_views import _plain_block, wrap_bare_boxed
from ui.server import check_auth, security_warnings
from ui.strings import EN, RUNTIME, ZH, pick_language


def test_limiter_grants_in_arrival_order_and_caps_the_waiting_line():
    lim = FairLimiter(concurrency=1, max_queue=2)
    first = lim.enter()
    assert first.granted
    second, third = lim.enter(), lim.enter()
    assert not second.granted and (second.position(), third.position()) == (0, 1)
    with pytest.raises(QueueFull, match="server.max_queue"):
        lim.enter()
    first.release()
    assert second.granted and not third.granted and third.position() == 0
    second.release()
    assert third.granted
    third.release()
    third.release()  # releasing twice is harmless
    assert (lim.running, lim.waiting) == (0, 0)


def test_limiter_waiting_ticket_that_gives_up_leaves_the_line():
    lim = FairLimiter(concurrency=1, max_queue=4)
    running = lim.enter()
    quitter, patient = lim.enter(), lim.enter()
    quitter.release()
    assert patient.position() == 0
    running.release()
    assert patient.granted and not quitter.granted


def test_limiter_wait_blocks_until_granted():
    lim = FairLimiter(concurrency=1, max_queue=1)
    running = lim.enter()
    waiting = lim.enter()
    assert not waiting.wait(0.01)
    threading.Timer(0.05, running.release).start()
    assert waiting.wait(30)


def test_limiter_close_refuses_new_and_drops_waiting():
    lim = FairLimiter(concurrency=1, max_queue=2)
    running = lim.enter()
    waiting = lim.enter()
    assert lim.close() == [waiting]
    with pytest.raises(LimiterClosed):
        waiting.wait(0.01)
    with pytest.raises(LimiterClosed):
        lim.enter()
    assert running.granted and lim.running == 1


def test_previous_answers_go_back_without_their_thinking():
    msgs = build_messages("", [("q1", "<think>long reasoning</think>The answer is 4.")], "q2")
    assert msgs == (ChatMessage("user", "q1"), ChatMessage("assistant", "The answer is 4."), ChatMessage("user", "q2"))
    assert build_messages("Be brief.", [], "q")[0] == ChatMessage("system", "Be brief.")
    assert strip_thinking("<think>unfinished") == ""


def test_chinese_detection():
    assert mostly_chinese("2加2等于几？")
    assert not mostly_chinese("What is 2+2? 谢谢")
    assert not mostly_chinese("1+1")


def test_language_follows_the_browser_unless_fixed():
    assert pick_language("auto", "zh-CN,zh;q=0.9,en;q=0.8") == "zh"
    assert pick_language("auto", "en-US,en;q=0.9") == "en"
    assert pick_language("auto", None) == "en"
    assert pick_language("zh", "en-US") == "zh"


def test_every_text_exists_in_both_languages():
    assert EN.keys() == ZH.keys()
    assert RUNTIME["en"].keys() == RUNTIME["zh"].keys()


def test_bare_boxed_becomes_maths_but_real_latex_is_untouched():
    assert wrap_bare_boxed("The answer is \\boxed{4}.") == "The answer is $\\boxed{4}$."
    assert wrap_bare_boxed("So $x = \\boxed{4}$.") == "So $x = \\boxed{4}$."
    assert wrap_bare_boxed("\\boxed{\\frac{1}{2}}") == "$\\boxed{\\frac{1}{2}}$"
    assert wrap_bare_boxed("\\boxed{3") == "\\boxed{3"  # still streaming


def test_streaming_thinking_is_plain_text_even_with_fences_inside():
    block = _plain_block("code:\n```py\nx\n```")
    assert block.startswith("````text\n") and block.endswith("\n````")


def test_open_bind_without_protection_warns():
    open_ = load_manifest(env={}, overrides={"server.host": "0.0.0.0"})
    assert "VT_API_KEY" in security_warnings(open_)[0]
    keyed = load_manifest(env={}, overrides={"server.host": "0.0.0.0", "server.auth.api_key": "k"})
    assert "page" in security_warnings(keyed)[0]  # the key does not cover the page
    login = load_manifest(env={}, overrides={"server.host": "0.0.0.0", "server.auth.username": "u",
                                             "server.auth.password": "p"})
    assert "VT_API_KEY" in security_warnings(login)[0]  # API clients have no page session
    both = load_manifest(env={}, overrides={"server.host": "0.0.0.0", "server.auth.api_key": "k",
                                            "server.auth.username": "u", "server.auth.password": "p"})
    assert security_warnings(both) == []
    assert security_warnings(load_manifest(env={}, overrides={"server.host": "127.0.0.1"})) == []


def test_half_login_is_a_configuration_error():
    from backends import ManifestError

    with pytest.raises(ManifestError, match="server.auth.password"):
        check_auth(load_manifest(env={}, overrides={"server.auth.username": "me"}))


def test_shutdown_stops_the_loader_at_its_next_progress_report():
    from backends import LoadProgress
    from ui.host import ModelHost

    reports = []
    release = threading.Event()

    class SlowLoad:
        capacity = 1

        def load(self, progress=None):
            for step in range(1000):  # a conversion reporting progress per tensor
                progress(LoadProgress(step / 1000, f"tensor {step}"))
                reports.append(step)
                release.wait(0.01)
            raise AssertionError("the load ran to its end")

        def close(self):
            pass

    host = ModelHost(load_manifest(env={}), backend_factory=lambda m: SlowLoad())
    host.start_loading()
    while len(reports) < 3:
        release.wait(0.01)
    host.close(loader_timeout_s=30)
    assert not host._thread.is_alive()
    assert len(reports) < 1000
    status = host.status()
    assert status.state == "failed" and "shutting down" in status.error
