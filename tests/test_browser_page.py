"""A real headless Chromium on the page, directly and through nginx at a sub-path."""
from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest

from bench.synthetic import ENDLESS_PROMPT
from helpers.server import ServerProcess, free_port, read_metric, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PREFIX = "/proxy/8080"
BARE = "/bare/8080"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # Greedy and no loop guard: the looping prompt streams a few hundred tokens to press Stop on.
    with ServerProcess(["--backend", "transformers", "--model", str(tiny_model_dir),
                        "--set", "generation.temperature=0",
                        "--set", "generation.loop_guard.enabled=false"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def nginx(server, tmp_path_factory):
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    work = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        pid {work}/nginx.pid;
        error_log {work}/error.log info;
        events {{ worker_connections 256; }}
        http {{
          access_log {work}/access.log;
          client_body_temp_path {work}/body;
          proxy_temp_path {work}/proxy;
          fastcgi_temp_path {work}/fastcgi;
          uwsgi_temp_path {work}/uwsgi;
          scgi_temp_path {work}/scgi;
          map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
          server {{
            listen 127.0.0.1:{port};
            location {PREFIX}/ {{
              proxy_pass http://127.0.0.1:{server.port}/;
              proxy_http_version 1.1;
              proxy_set_header Host $http_host;
              proxy_set_header Upgrade $http_upgrade;
              proxy_set_header Connection $connection_upgrade;
              proxy_set_header X-Forwarded-Prefix {PREFIX};
              proxy_set_header X-Forwarded-Proto $scheme;
              proxy_buffering off;
              proxy_cache off;
              proxy_read_timeout 3600s;
            }}
            # A bare proxy: no X-Forwarded-Prefix and an internal Host (what some platforms do).
            location {BARE}/ {{
              proxy_pass http://127.0.0.1:{server.port}/;
              proxy_http_version 1.1;
              proxy_set_header Host internal-notebook:8080;
              proxy_buffering off;
              proxy_read_timeout 3600s;
            }}
          }}
        }}
    """))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}{PREFIX}/"

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stdout.read().decode() if proc.stdout else ''}")
            try:
                return httpx.get(url + "health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=30, what="nginx to proxy /health")
        yield {"url": url, "bare_url": f"http://127.0.0.1:{port}{BARE}/", "access_log": work / "access.log"}
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    from helpers.browser import launch

    with playwright.sync_playwright() as p:
        b = launch(p, CHROMIUM)
        try:
            yield b
        finally:
            b.close()


def _wait_text(page, element: str, text: str) -> None:
    """Wait until ``element`` shows ``text``; on failure say what it showed instead."""
    try:
        page.wait_for_selector(f"{element} :text('{text}')", timeout=TIMEOUT_MS)
    except Exception as exc:
        shown = page.inner_text(element) if page.locator(element).count() else "(missing)"
        raise AssertionError(f"{element} never showed {text!r}; it shows: {shown!r}") from exc


def _ask(page, question: str) -> None:
    page.fill("#vt-question textarea", question)
    page.click("#vt-submit")


def _clear(page) -> None:
    """Press Clear and wait until it has taken effect. Clear also stops this session's running
    request on the server, so a question sent before the clear lands would be stopped and wiped."""
    page.click("#vt-clear")
    page.wait_for_function(
        "() => document.querySelectorAll('#vt-chat .message-row').length === 0"
        " && document.querySelector('#vt-stats').innerText.trim() === ''",
        timeout=TIMEOUT_MS)


def _conversation(page, base_url: str, metrics_url: str) -> None:
    page.goto(base_url)
    _wait_text(page, "#vt-status", "Ready")
    # 1. A question is answered: a collapsible thinking section and a highlighted final answer.
    _ask(page, "What is 2+2?")
    page.wait_for_selector("#vt-chat .vt-final", timeout=TIMEOUT_MS)
    chat = page.locator("#vt-chat")
    assert chat.get_by_text("Thinking").count() >= 1
    assert "The answer is" in chat.inner_text()
    _wait_text(page, "#vt-stats", "finish: stop")
    assert page.locator("#vt-chat .vt-final .katex").count() == 1  # \boxed{4} rendered by KaTeX

    # 2. A long reply is stopped mid-stream, and the backend really stops.
    cancelled = {"source": "page", "finish_reason": "cancelled"}
    page.get_by_text("Generation settings").click()
    page.fill("#vt-max-new-tokens input", "20000")
    for attempt in range(3):
        # The endless prompt streams ~1200 tokens; should a very fast machine still finish before
        # the click lands, the stats line says so ("finish: stop") and we try again.
        before = read_metric(metrics_url, "vibethinker_requests_total", cancelled)
        _clear(page)
        _ask(page, ENDLESS_PROMPT)
        _wait_text(page, "#vt-chat", "wait wait")
        page.click("#vt-stop")
        page.wait_for_selector("#vt-stats :text('cancelled'), #vt-stats :text('finish: stop')", timeout=TIMEOUT_MS)
        if "cancelled" in page.inner_text("#vt-stats"):
            break
    else:
        raise AssertionError("the looping reply always finished before Stop took effect")
    wait_for(lambda: read_metric(metrics_url, "vibethinker_requests_total", cancelled) == before + 1,
             what="the backend to record the cancelled generation")
    wait_for(lambda: read_metric(metrics_url, "vibethinker_requests_running") == 0, what="nothing running")
    assert page.locator("#vt-chat .vt-final").count() == 0  # the stopped reply never reached its answer


def test_page_direct(browser, server):
    page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
    try:
        _conversation(page, server.url + "/", server.url)
    finally:
        page.close()


def test_page_through_nginx_sub_path(browser, server, nginx):
    page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
    try:
        _conversation(page, nginx["url"], server.url)
    finally:
        page.close()
    log = nginx["access_log"].read_text()
    # The page's assets and its queue calls (streaming) went through the prefix.
    assert f"{PREFIX}/gradio_api/queue/join" in log
    assert f"{PREFIX}/gradio_api/queue/data" in log
    assert f"{PREFIX}/assets/" in log or f"{PREFIX}/static/" in log
    # And the API works through the same prefix.
    r = httpx.post(nginx["url"] + "v1/chat/completions", timeout=120,
                   json={"model": "vibethinker-1.5b", "temperature": 0, "max_tokens": 100,
                         "messages": [{"role": "user", "content": "What is 2+2?"}]})
    assert r.status_code == 200 and "\\boxed{4}" in r.json()["choices"][0]["message"]["content"]


def test_page_through_a_bare_proxy(browser, server, nginx):
    """No prefix header, Host rewritten: the page still finds its way back through the proxy."""
    page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
    try:
        page.goto(nginx["bare_url"])
        _wait_text(page, "#vt-status", "Ready")
        _ask(page, "What is 2+2?")
        page.wait_for_selector("#vt-chat .vt-final", timeout=TIMEOUT_MS)
    finally:
        page.close()
    assert f"{BARE}/gradio_api/queue/join" in nginx["access_log"].read_text()


def test_system_prompt_presets(browser, server):
    from ui.strings import CODE_SYSTEM_PROMPT

    page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
    try:
        page.goto(server.url + "/")
        _wait_text(page, "#vt-status", "Ready")
        system = page.locator("#vt-system textarea")
        assert system.input_value() == ""  # Math = the template's default prompt
        page.locator("#vt-preset").get_by_text("Competitive programming").click()
        page.wait_for_function("t => document.querySelector('#vt-system textarea').value === t", arg=CODE_SYSTEM_PROMPT)
        system.click()
        page.keyboard.press("End")
        page.keyboard.type(" Be brief.")  # typing your own prompt selects Custom
        page.wait_for_selector("#vt-preset input[value=custom][aria-checked=true]", timeout=TIMEOUT_MS)
        page.wait_for_timeout(500)  # let any late update land before reading the box
        assert system.input_value() == CODE_SYSTEM_PROMPT + " Be brief."  # nothing typed was lost
        page.locator("#vt-preset").get_by_text("Math").click()
        page.wait_for_function("() => document.querySelector('#vt-system textarea').value === ''")
    finally:
        page.close()


def test_page_in_chinese(browser, server):
    page = browser.new_page(locale="zh-CN", viewport={"width": 1280, "height": 900})
    try:
        page.goto(server.url + "/")
        _wait_text(page, "#vt-status", "已就绪")
        assert page.locator("#vt-submit").inner_text().strip() == "提交"
        _ask(page, "2加2等于几？")
        _wait_text(page, "#vt-stats", "英文提问")  # the English hint
        assert page.locator("#vt-chat").get_by_text("思考过程").count() >= 1
    finally:
        page.close()


def test_screenshot_script(browser, server, tmp_path):
    from helpers.browser import shoot

    out = shoot(browser, server.url + "/", tmp_path / "shot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# -- voting and code checks (a server with solve.run_code on, sampling at temperature 1) ----------

VOTE_WATCH = """() => {
  window.vtTallies = [];
  const seen = () => document.querySelectorAll('#vt-chat .vt-vote').forEach(e => {
    const text = e.innerText.trim();
    if (text && window.vtTallies[window.vtTallies.length - 1] !== text) window.vtTallies.push(text);
  });
  new MutationObserver(seen).observe(document.querySelector('#vt-chat'),
                                     {subtree: true, childList: true, characterData: true});
}"""


def test_voting_view_tallies_live(browser, trust_server):
    import re

    from bench.synthetic import VOTE_PROMPT
    from helpers.browser import set_samples

    page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
    try:
        page.goto(trust_server.url + "/")
        _wait_text(page, "#vt-status", "Ready")
        set_samples(page, 8)
        page.evaluate(VOTE_WATCH)
        _ask(page, VOTE_PROMPT)
        _wait_text(page, "#vt-stats", "8 samples")
        tally = page.inner_text("#vt-chat .vt-vote")
        m = re.search(r"(\d+) of 8 samples agree", tally)
        assert m, tally
        assert page.locator("#vt-chat .vt-vote .katex").count() == 1  # the winner, rendered
        # The tally was live: it counted finished samples while others still ran.
        seen = page.evaluate("window.vtTallies")
        assert len(seen) >= 3 and any("So far" in s for s in seen), seen
        titles = [page.locator(f"#vt-chat :text('Sample {i} ·')").first.inner_text() for i in range(1, 9)]
        halves = [t for t in titles if re.search(r"· (\\frac\{1\}\{2\}|0\.5|1/2) ·", t)]
        twos = [t for t in titles if " · 2 · " in t]
        # Each sample picks its reply by its seed: the halves (1/2, 0.5 and \frac{1}{2}, one group)
        # usually win, "2" sometimes does; either way the winner's count is its group's size.
        assert int(m.group(1)) == max(len(halves), len(twos)), titles
        chat = page.inner_text("#vt-chat")
        if len(halves) >= 2 and len(halves) != int(m.group(1)):  # voted together among the others
            assert f"× {len(halves)}" in chat, chat
        if len(halves) < 8:  # the rest: other answers with their counts, or counted apart
            assert "Not counted" in chat or "Other answers" in chat, chat
    finally:
        page.close()


def test_code_checks_in_the_page(browser, trust_server):
    from bench.synthetic import CODE_PROMPT
    from helpers.browser import set_samples

    page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
    try:
        page.goto(trust_server.url + "/")
        _wait_text(page, "#vt-status", "Ready")
        page.locator("#vt-preset").get_by_text("Competitive programming").click()
        set_samples(page, 3)
        _ask(page, CODE_PROMPT)
        _wait_text(page, "#vt-stats", "3 samples")
        page.wait_for_function("() => !document.querySelector('#vt-chat').innerText.includes('Running the program')",
                               timeout=TIMEOUT_MS)
        tally = page.inner_text("#vt-chat .vt-vote")
        assert "programs pass all 2 examples" in tally or "No program passes all 2 examples" in tally, tally
        assert "Isolation:" in page.inner_text("#vt-chat")
        page.locator("#vt-chat").get_by_text("Sample 1").first.click()
        _wait_text(page, "#vt-chat", "Examples:")
    finally:
        page.close()
