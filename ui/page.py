"""The Gradio page: question, system-prompt presets, streamed thinking and answer, stats."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import gradio as gr

from backends import (
    BackendError,
    FinishReason,
    GenerationRequest,
    Manifest,
    StreamChunk,
    Usage,
    to_sampling_params,
)
from backends.answers import (
    CheckReport,
    Consensus,
    SampleAnswer,
    SandboxUnavailable,
    extract_program,
)
from backends.answers.code import parse_test_text
from backends.types import MAX_SAMPLES

from .host import ModelHost, NotReady, Queued, QueueFull
from .messages import build_messages, mostly_chinese
from .page_views import (
    SampleState,
    answer_message,
    check_markdown,
    sample_message,
    stats_line,
    stats_many,
    status_banner,
    tally_markdown,
    thinking_message,
)
from .strings import CODE_SYSTEM_PROMPT, EXAMPLES, Lang, make_i18n, pick_language, t
from .trust import trust_for

log = logging.getLogger("ui.page")

# At most this many page updates per second while streaming: a 20,000-token reply re-rendered
# per token would freeze the browser.
UPDATE_INTERVAL_S = 0.1
QUEUE_IDLE_POLL_S = 0.02
PROGRESS_POLL_S = 0.1

LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]

CSS = """
.vt-final { border-left: 4px solid #f59e0b; background: rgba(245, 158, 11, 0.12);
            padding: 6px 12px; margin-top: 10px; border-radius: 4px; font-size: 1.05em; }
#vt-stats { font-size: 0.9em; opacity: 0.85; }
#vt-chat pre, #vt-chat pre code { white-space: pre-wrap; word-break: break-word; }
"""

PRESETS = {"math": "", "code": CODE_SYSTEM_PROMPT}


def _lang(manifest: Manifest, request: gr.Request | None) -> Lang:
    header = request.headers.get("accept-language") if request is not None else None
    return pick_language(manifest.server.language, header)


def _int_setting(value: Any, name: str, minimum: int, lang: Lang) -> int:
    if value is None or value == "":
        raise gr.Error(t(lang, "bad_setting", name=name, rule=f"≥ {minimum}"))
    number = int(value)
    if number < minimum:
        raise gr.Error(t(lang, "bad_setting", name=name, rule=f"≥ {minimum}"))
    return number


def _seed(value: Any) -> int | None:
    """-1 (or empty) = a random seed each time."""
    if value is None or value == "" or int(value) < 0:
        return None
    return int(value)


class ChatSessions:
    """Which backend request each browser session is running, so Stop can cancel it at once
    (Gradio itself can only close our generator between two updates)."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._active: dict[str, str] = {}

    def start(self, session: str, request_id: str) -> None:
        with self._lock:
            self._active[session] = request_id

    def end(self, session: str, request_id: str) -> None:
        with self._lock:
            if self._active.get(session) == request_id:
                del self._active[session]

    def stop(self, session: str) -> bool:
        with self._lock:
            request_id = self._active.pop(session, None)
        return self._host.cancel(request_id) if request_id else False


def build_page(host: ModelHost) -> tuple[gr.Blocks, gr.I18n]:
    manifest = host.manifest
    gen = manifest.generation
    i18n = make_i18n(manifest.server.language)
    sessions = ChatSessions(host)

    trust = trust_for(manifest)
    checks_pool = ThreadPoolExecutor(max_workers=manifest.solve.parallel_runs, thread_name_prefix="vt-check")

    def code_setup(lang: Lang, question: str, system: str, tests: Any) -> tuple[bool, list]:
        """(code preset?, the examples to run) — only when solve.run_code is on."""
        if not trust.run_code:
            return False, []
        try:
            extra = parse_test_text(str(tests or ""))
        except ValueError as exc:
            raise gr.Error(t(lang, "bad_tests", error=str(exc))) from None
        try:
            trust.sandbox()
        except SandboxUnavailable as exc:
            raise gr.Error(str(exc)) from None
        return (system or "").strip() == CODE_SYSTEM_PROMPT, trust.examples(question, extra)

    def respond(question: str, history: list, turns: list, system: str, temperature: float, top_p: float,
                top_k: Any, max_new_tokens: Any, thinking_budget: Any, seed: Any, samples: Any = 1,
                tests: Any = "", request: gr.Request = None) -> Iterator[tuple]:
        lang = _lang(manifest, request)
        question = (question or "").strip()
        if not question:
            gr.Warning(t(lang, "empty_question"))
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        params = to_sampling_params(
            gen,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=_int_setting(top_k, "top_k", 0, lang),
            max_new_tokens=_int_setting(max_new_tokens, "max_new_tokens", 1, lang),
            seed=_seed(seed),
        )
        budget = _int_setting(thinking_budget, "thinking_budget", 0, lang)
        params = dataclasses.replace(params, thinking_budget=budget or None)
        k = _int_setting(samples if samples not in (None, "") else 1, "samples", 1, lang)
        if k > MAX_SAMPLES:
            raise gr.Error(t(lang, "bad_setting", name="samples", rule=f"≤ {MAX_SAMPLES}"))
        code_preset, examples = code_setup(lang, question, system, tests)
        hint = t(lang, "english_hint") if mostly_chinese(question) else ""
        if hint:
            gr.Info(hint)
        base = list(history) + [gr.ChatMessage(role="user", content=question)]
        if k > 1:
            yield from respond_many(lang, question, base, turns, system, params, k, hint, code_preset, examples,
                                    request)
            return
        started = time.monotonic()
        yield base + [thinking_message(lang, "", False, 0.0, None)], turns, hint, ""

        req = GenerationRequest(
            messages=build_messages(system or "", [tuple(x) for x in turns], question), params=params
        )
        reasoning, answer = "", ""
        think_end: float | None = None
        usage: Usage | None = None
        boxed: str | None = None
        last_update = 0.0
        session = request.session_hash or req.request_id
        stream: Iterator[Any] | None = None

        def view() -> list:
            msgs = list(base)
            done = usage is not None or bool(answer)
            elapsed = (think_end or time.monotonic()) - started
            if reasoning or not answer:
                msgs.append(thinking_message(lang, reasoning, done, elapsed,
                                             usage.reasoning_tokens if usage else None))
            if answer or usage is not None:
                msgs.append(answer_message(lang, answer, boxed))
            return msgs

        try:
            stream = host.generate(req, "page")
            sessions.start(session, req.request_id)
            for item in stream:
                if isinstance(item, Queued):
                    yield view(), turns, t(lang, "queued", position=item.position), gr.skip()
                    continue
                assert isinstance(item, StreamChunk)
                reasoning += item.reasoning
                if item.answer and think_end is None:
                    think_end = time.monotonic()
                answer += item.answer
                if item.usage is not None:
                    usage, boxed = item.usage, item.boxed_answer
                    think_end = think_end or time.monotonic()
                    break
                now = time.monotonic()
                if now - last_update >= UPDATE_INTERVAL_S:
                    last_update = now
                    yield view(), turns, hint, gr.skip()
        except (NotReady, QueueFull, BackendError) as exc:
            msgs = list(base) + [gr.ChatMessage(role="assistant", content=t(lang, "error", error=str(exc)))]
            yield msgs, turns, t(lang, "error", error=str(exc)), gr.skip()
            return
        finally:
            sessions.end(session, req.request_id)
            if stream is not None:
                stream.close()
        if usage is None:
            usage = Usage(finish_reason=FinishReason.CANCELLED)
        stats = stats_line(lang, host, usage)
        if hint:
            stats = hint + "\n\n" + stats
        new_turns = list(turns)
        if usage.finish_reason != FinishReason.CANCELLED:
            new_turns.append([question, answer])
        yield view(), new_turns, stats, gr.skip()
        if trust.run_code and usage.finish_reason != FinishReason.CANCELLED and (
                code_preset or extract_program(answer) is not None):
            # The program against the examples: only with solve.run_code, after the answer is complete.
            iso = trust.sandbox().isolation
            checking = gr.ChatMessage(role="assistant", content=check_markdown(lang, None, len(examples), iso))
            yield view() + [checking], new_turns, stats, gr.skip()
            report = trust.check(answer, examples)
            done = gr.ChatMessage(role="assistant", content=check_markdown(lang, report, len(examples), iso))
            yield view() + [done], new_turns, stats, gr.skip()

    def respond_many(lang: Lang, question: str, base: list, turns: list, system: str, params: Any, k: int,
                     hint: str, code_preset: bool, examples: list, request: gr.Request) -> Iterator[tuple]:
        """k samples of one question: they stream as they come, the vote is tallied live."""
        started = time.monotonic()
        req = GenerationRequest(messages=build_messages(system or "", [tuple(x) for x in turns], question),
                                params=params, n=k)
        states = [SampleState() for _ in range(k)]
        futures: dict[int, Future] = {}
        reports: dict[int, CheckReport] = {}
        iso = trust.sandbox().isolation if trust.run_code else None
        consensus: Consensus | None = None
        session = request.session_hash or req.request_id
        stream: Iterator[Any] | None = None
        last_update = 0.0
        if not trust.run_code or not code_preset:
            trust.warm()  # math-verify's worker imports while the model thinks

        def coding() -> bool:
            return trust.run_code and (code_preset or any(
                s.usage is not None and extract_program(s.answer) is not None for s in states))

        def recount(final: bool = False) -> Consensus:
            if coding():
                for i, f in list(futures.items()):
                    if f.done():
                        reports[i] = f.result()
                finish = {i: s.finish for i, s in enumerate(states)}
                if final:
                    finish = {i: f or FinishReason.CANCELLED.value for i, f in finish.items()}
                vote = trust.code_vote(dict(reports), finish, k)
                vote.examples = vote.examples or len(examples)
                return vote
            answers = [SampleAnswer(i, s.answer, s.finish or (FinishReason.CANCELLED.value if final else None))
                       for i, s in enumerate(states)]
            return trust.vote(answers, k)

        def check_of(i: int, final: bool) -> str | None:
            if not coding() or states[i].usage is None:
                return None
            return check_markdown(lang, reports.get(i), len(examples), None)

        def label_of(i: int) -> str | None:
            """Code problems: the program's score in the sample's title."""
            if not coding() or states[i].usage is None:
                return None
            report = reports.get(i)
            if report is None:
                return t(lang, "checking", n=len(examples)) if i in futures else t(lang, "sample_no_program")
            if not report.program_found:
                return t(lang, "sample_no_program")
            mark = "✔" if report.total and report.passed == report.total else "✘"
            return f"{mark} {t(lang, 'check_title', passed=report.passed, total=report.total)}"

        def view(final: bool = False) -> list:
            msgs = list(base)
            if consensus is not None:
                shown_iso = iso if consensus.kind == "code" else None
                msgs.append(gr.ChatMessage(role="assistant", content=tally_markdown(lang, consensus, shown_iso)))
            msgs += [sample_message(lang, i, s, check_of(i, final), final, label_of(i)) for i, s in enumerate(states)]
            return msgs

        def submit_check(i: int) -> None:
            if trust.run_code and (code_preset or extract_program(states[i].answer) is not None):
                futures[i] = checks_pool.submit(trust.check, states[i].answer, examples)

        consensus = recount()
        yield view(), turns, hint, ""
        try:
            stream = host.generate(req, "page")
            sessions.start(session, req.request_id)
            for item in stream:
                if isinstance(item, Queued):
                    yield view(), turns, t(lang, "queued", position=item.position), gr.skip()
                    continue
                assert isinstance(item, StreamChunk)
                s = states[item.index]
                s.reasoning += item.reasoning
                if item.answer and s.think_end is None:
                    s.think_end = time.monotonic()
                s.answer += item.answer
                changed = False
                if item.usage is not None:
                    s.usage, s.boxed = item.usage, item.boxed_answer
                    s.think_end = s.think_end or time.monotonic()
                    submit_check(item.index)
                    changed = True
                changed = changed or any(f.done() and i not in reports for i, f in futures.items())
                if changed:
                    consensus = recount()
                now = time.monotonic()
                if changed or now - last_update >= UPDATE_INTERVAL_S:
                    last_update = now
                    yield view(), turns, hint, gr.skip()
                if all(x.usage is not None for x in states):
                    break
        except (NotReady, QueueFull, BackendError) as exc:
            msgs = list(base) + [gr.ChatMessage(role="assistant", content=t(lang, "error", error=str(exc)))]
            yield msgs, turns, t(lang, "error", error=str(exc)), gr.skip()
            return
        finally:
            sessions.end(session, req.request_id)
            if stream is not None:
                stream.close()
        for s in states:
            if s.usage is None:
                s.usage = Usage(finish_reason=FinishReason.CANCELLED)
        while futures and not all(f.done() for f in futures.values()):
            consensus = recount()
            yield view(), turns, hint, gr.skip()
            wait(list(futures.values()), timeout=0.5, return_when=FIRST_COMPLETED)
        consensus = recount(final=True)
        stats = stats_many(lang, host, states, time.monotonic() - started)
        if hint:
            stats = hint + "\n\n" + stats
        new_turns = list(turns)
        best = consensus.best_index
        if best is not None and states[best].usage.finish_reason != FinishReason.CANCELLED:
            new_turns.append([question, states[best].answer])  # the winner goes into the conversation
        yield view(final=True), new_turns, stats, gr.skip()

    def stop(request: gr.Request) -> Any:
        lang = _lang(manifest, request)
        if request.session_hash and sessions.stop(request.session_hash):
            return t(lang, "stopped")
        return gr.skip()  # nothing was running

    def stopped_view(history: list) -> list:
        """Mark a thinking section that was still pending as done after Stop."""
        out = []
        for msg in history or []:
            meta = msg.get("metadata") if isinstance(msg, dict) else None
            if meta and meta.get("status") == "pending":
                msg = {**msg, "metadata": {**meta, "status": "done"}}
            out.append(msg)
        return out

    def clear(request: gr.Request) -> tuple:
        if request.session_hash:
            sessions.stop(request.session_hash)
        return [], [], "", ""

    def refresh_status(request: gr.Request) -> tuple[str, gr.Timer]:
        lang = _lang(manifest, request)
        st = host.status()
        # An engine with a live state (a remote upstream) keeps the banner current; others stop
        # polling once loaded.
        live = st.info is not None and bool(st.info.extra.get("endpoint"))
        return status_banner(lang, host), gr.Timer(active=st.state == "loading" or (live and st.ready))

    def choose_preset(preset: str) -> Any:
        # "custom" keeps whatever is in the box.
        return PRESETS[preset] if preset in PRESETS else gr.skip()

    def edited_system(text: str) -> str:
        for name, prompt in PRESETS.items():
            if text.strip() == prompt:
                return name
        return "custom"

    with gr.Blocks(title="VibeThinker") as demo:
        gr.Markdown(i18n("title"))
        status = gr.Markdown(elem_id="vt-status")
        timer = gr.Timer(1.0)
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label=i18n("chat"), elem_id="vt-chat", height=560, latex_delimiters=LATEX_DELIMITERS,
                    buttons=["copy", "copy_all"], feedback_options=None, group_consecutive_messages=False,
                )
                stats = gr.Markdown(elem_id="vt-stats")
                question = gr.Textbox(label=i18n("question"), placeholder=i18n("question_placeholder"), lines=3,
                                      elem_id="vt-question")
                with gr.Row():
                    submit_btn = gr.Button(i18n("submit"), variant="primary", elem_id="vt-submit")
                    stop_btn = gr.Button(i18n("stop"), variant="stop", elem_id="vt-stop")
                    clear_btn = gr.Button(i18n("clear"), elem_id="vt-clear")
                gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[question], label=i18n("examples"))
            with gr.Column(scale=2):
                preset = gr.Radio(
                    choices=[(i18n("preset_math"), "math"), (i18n("preset_code"), "code"),
                             (i18n("preset_custom"), "custom")],
                    value="math", label=i18n("preset"), elem_id="vt-preset",
                )
                system = gr.Textbox(label=i18n("system_prompt"), placeholder=i18n("system_placeholder"), lines=4,
                                    value="", elem_id="vt-system")
                gr.Markdown(i18n("system_why"))
                with gr.Accordion(i18n("settings"), open=False):
                    temperature = gr.Slider(0.0, 2.0, value=gen.temperature, step=0.05, label=i18n("temperature"),
                                            elem_id="vt-temperature")
                    top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.01, label=i18n("top_p"))
                    top_k = gr.Number(value=gen.top_k, precision=0, minimum=0, label=i18n("top_k"))
                    max_new_tokens = gr.Number(value=gen.max_new_tokens, precision=0, minimum=1,
                                               label=i18n("max_new_tokens"), elem_id="vt-max-new-tokens")
                    thinking_budget = gr.Number(value=gen.thinking_budget, precision=0, minimum=0,
                                                label=i18n("thinking_budget"), elem_id="vt-thinking-budget")
                    seed = gr.Number(value=gen.seed if gen.seed is not None else -1, precision=0, minimum=-1, label=i18n("seed"), elem_id="vt-seed")
                samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label=i18n("samples"), elem_id="vt-samples")
                with gr.Accordion(i18n("code_checking"), open=False, visible=manifest.solve.run_code):
                    gr.Markdown(i18n("code_checking_why"))
                    tests = gr.Textbox(label=i18n("tests"), placeholder=i18n("tests_placeholder"), lines=4,
                                       value="", elem_id="vt-tests")

        inputs = [question, chatbot, turns, system, temperature, top_p, top_k, max_new_tokens, thinking_budget,
                  seed, samples, tests]
        outputs = [chatbot, turns, stats, question]
        ev_submit = submit_btn.click(respond, inputs, outputs, api_name="chat", show_progress="full")
        ev_enter = question.submit(respond, inputs, outputs, api_name=False, show_progress="full")
        stop_btn.click(stop, None, stats, cancels=[ev_submit, ev_enter], queue=False, api_name=False).then(
            stopped_view, chatbot, chatbot, queue=False, api_name=False)
        clear_btn.click(clear, None, [chatbot, turns, stats, question], cancels=[ev_submit, ev_enter],
                        queue=False, api_name=False)
        # .input, not .change: when typing flips the preset to Custom, the box must not be rewritten.
        preset.input(choose_preset, preset, system, queue=False, api_name=False)
        system.input(edited_system, system, preset, queue=False, api_name=False)
        timer.tick(refresh_status, None, [status, timer], queue=False, api_name=False)
        demo.load(refresh_status, None, [status, timer], queue=False, api_name=False)
    # No limit of Gradio's own: the host's line (sized to the engine's capacity) is the one queue,
    # and a page user waiting there sees its position.
    demo.queue(max_size=manifest.server.max_queue, default_concurrency_limit=None)
    calm_queue(demo)
    return demo, i18n


def calm_queue(demo: gr.Blocks) -> None:
    """Poll Gradio's queue every 20 ms instead of every 1 ms when it is idle.

    Gradio (6.x, Linux) polls its queue every 1 ms and its progress updates every 10 ms: about
    1,100 wake-ups a second of the server's event loop, each of which preempts one of the model's
    compute threads on a small CPU (measured: ~900 involuntary switches a second of the decoding
    thread on 2 cores). 20 ms before a page event starts is not noticeable; the page uses no
    gr.Progress. The attributes are Gradio's own, hence the guard.
    """
    queue = getattr(demo, "_queue", None)
    for name, seconds in (("sleep_when_free", QUEUE_IDLE_POLL_S), ("progress_update_sleep_when_free", PROGRESS_POLL_S)):
        if isinstance(getattr(queue, name, None), (int, float)):
            setattr(queue, name, max(getattr(queue, name), seconds))
        else:
            log.warning("Gradio's queue has no %s any more: it may poll more often than needed", name)
