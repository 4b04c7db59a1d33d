"""The Gradio page: question, system-prompt presets, streamed thinking and answer, stats."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from backends import BackendError, FinishReason, GenerationRequest, Manifest, StreamChunk, Usage, to_sampling_params

from .host import ModelHost, NotReady, QueueFull, Queued
from .messages import build_messages, mostly_chinese
from .strings import CODE_SYSTEM_PROMPT, EXAMPLES, Lang, make_i18n, pick_language, t

log = logging.getLogger("ui.page")

# At most this many page updates per second while streaming: a 20,000-token reply re-rendered
# per token would freeze the browser.
UPDATE_INTERVAL_S = 0.1
QUEUE_IDLE_POLL_S = 0.02
PROGRESS_POLL_S = 0.1
# While the thinking streams, only its tail is sent (the whole text once it is done).
THINKING_TAIL_CHARS = 6000

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


def _plain_block(text: str) -> str:
    """Text inside a fence shows as typed: no Markdown or LaTeX work while it streams."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def thinking_message(lang: Lang, reasoning: str, done: bool, seconds: float, tokens: int | None) -> gr.ChatMessage:
    metadata: dict[str, Any] = {"title": t(lang, "thinking"), "status": "done" if done else "pending",
                                "duration": round(seconds, 1)}
    if tokens is not None:
        metadata["log"] = t(lang, "tokens", n=tokens)
    if done:
        content = reasoning.strip() or "…"
    else:
        tail = reasoning if len(reasoning) <= THINKING_TAIL_CHARS else "…" + reasoning[-THINKING_TAIL_CHARS:]
        content = _plain_block(tail) if tail else "…"
    return gr.ChatMessage(role="assistant", content=content, metadata=metadata)  # type: ignore[arg-type]


def wrap_bare_boxed(text: str) -> str:
    """``\\boxed{4}`` written outside any maths delimiters would show as raw text: make it maths.
    Only done when the text has no delimiters at all, so real LaTeX is never touched."""
    if any(d in text for d in ("$", "\\(", "\\[")) or "\\boxed{" not in text:
        return text
    out, i = [], 0
    while (start := text.find("\\boxed{", i)) != -1:
        depth, j = 0, start + len("\\boxed")
        while j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        if depth != 0:  # unbalanced (still streaming): leave the rest as is
            break
        out.append(text[i:start] + "$" + text[start:j] + "$")
        i = j
    out.append(text[i:])
    return "".join(out)


def answer_message(lang: Lang, answer: str, boxed: str | None) -> gr.ChatMessage:
    text = wrap_bare_boxed(answer.strip())
    if boxed:
        text += f'\n\n<div class="vt-final"><b>{t(lang, "final_answer")}:</b> $\\boxed{{{boxed}}}$</div>'
    return gr.ChatMessage(role="assistant", content=text)


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def stats_line(lang: Lang, host: ModelHost, usage: Usage) -> str:
    info = host.status().info
    line = t(
        lang, "stats",
        backend=info.backend if info else "?",
        device=info.device if info else "?",
        ttft=_fmt_s(usage.time_to_first_token_s),
        prompt=usage.prompt_tokens,
        reasoning=usage.reasoning_tokens,
        answer=usage.answer_tokens,
        speed=f"{usage.decode_tokens_per_s:.1f}" if usage.decode_tokens_per_s else "-",
        finish=t(lang, f"finish_{usage.finish_reason.value}"),
    )
    if usage.detail and usage.detail != usage.finish_reason.value:
        line += f" ({usage.detail})"
    return line


def status_banner(lang: Lang, host: ModelHost) -> str:
    st = host.status()
    if st.state == "loading":
        return t(lang, "loading", pct=f"{st.fraction:.0%}", message=st.message)
    if st.state == "failed":
        return t(lang, "failed", error=st.error)
    if st.state == "draining":
        return t(lang, "draining")
    info = st.info
    assert info is not None
    problem = host.engine_problem()
    if problem:
        return t(lang, "unavailable", model=host.manifest.model.id, backend=info.backend, device=info.device,
                 reason=problem)
    return t(lang, "ready", model=host.manifest.model.id, backend=info.backend, device=info.device,
             dtype=info.dtype, context=info.context_length, reason=f" · {info.reason}" if info.reason else "")


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

    def respond(question: str, history: list, turns: list, system: str, temperature: float, top_p: float,
                top_k: Any, max_new_tokens: Any, thinking_budget: Any, seed: Any,
                request: gr.Request) -> Iterator[tuple]:
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
        hint = t(lang, "english_hint") if mostly_chinese(question) else ""
        if hint:
            gr.Info(hint)
        base = list(history) + [gr.ChatMessage(role="user", content=question)]
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
                    temperature = gr.Slider(0.0, 2.0, value=gen.temperature, step=0.05, label=i18n("temperature"))
                    top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.01, label=i18n("top_p"))
                    top_k = gr.Number(value=gen.top_k, precision=0, minimum=0, label=i18n("top_k"))
                    max_new_tokens = gr.Number(value=gen.max_new_tokens, precision=0, minimum=1,
                                               label=i18n("max_new_tokens"), elem_id="vt-max-new-tokens")
                    thinking_budget = gr.Number(value=gen.thinking_budget, precision=0, minimum=0,
                                                label=i18n("thinking_budget"), elem_id="vt-thinking-budget")
                    seed = gr.Number(value=gen.seed if gen.seed is not None else -1, precision=0, minimum=-1, label=i18n("seed"), elem_id="vt-seed")

        inputs = [question, chatbot, turns, system, temperature, top_p, top_k, max_new_tokens, thinking_budget,
                  seed]
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
