"""Every text the page shows, in English and Chinese.

Static labels go through ``gr.I18n`` (the browser's language picks); texts made at run time
(status banner, stats line, thinking title) use :func:`pick_language` on the request instead,
because Gradio translates component labels, not the contents of chat messages.
"""
from __future__ import annotations

from typing import Literal

import gradio as gr

Lang = Literal["en", "zh"]

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

CODE_SYSTEM_PROMPT = (
    "You are an expert competitive programmer. Reason step by step about the algorithm and its "
    "complexity, then give one complete, efficient solution in a single fenced code block."
)

EXAMPLES = [
    "What is 2+2?",
    "Find all real numbers $x$ such that $x^2 - 5x + 6 = 0$.",
    "Let $f(x) = \\frac{x+1}{x-1}$. Compute $f(f(3))$.",
    "How many positive integers $n \\le 100$ satisfy $\\gcd(n, 100) = 1$?",
    "Write a Python function that returns the length of the longest strictly increasing "
    "subsequence of a list of integers in $O(n \\log n)$ time.",
]

EN: dict[str, str] = {
    "title": "# VibeThinker\nA small model for maths and competitive-programming reasoning. "
    "It thinks first (collapsible), then answers with a boxed result.",
    "question": "Question",
    "question_placeholder": "Ask a maths or algorithm question (English works best)…",
    "submit": "Submit",
    "stop": "Stop",
    "clear": "Clear",
    "examples": "Examples",
    "preset": "System prompt preset",
    "preset_math": "Math",
    "preset_code": "Competitive programming",
    "preset_custom": "Custom",
    "system_prompt": "System prompt",
    "system_placeholder": "Empty = the model's default: " + DEFAULT_SYSTEM_PROMPT,
    "system_why": "VibeThinker was trained with a fixed system prompt and is sensitive to it: the "
    "default (Math, empty box) asks for step-by-step reasoning and a `\\boxed{}` answer. Change it "
    "only when you want a different kind of answer.",
    "settings": "Generation settings",
    "temperature": "Temperature (model card: 0.6; 0 = greedy)",
    "top_p": "Top-p (model card: 0.95)",
    "top_k": "Top-k (0 = off, as the model card recommends)",
    "max_new_tokens": "Max new tokens (thinking + answer)",
    "thinking_budget": "Thinking budget in tokens (0 = unlimited)",
    "seed": "Seed (-1 = random)",
    "chat": "Conversation",
}

ZH: dict[str, str] = {
    "title": "# VibeThinker\n擅长数学与算法竞赛推理的小模型。它先思考（可折叠），再给出带方框的最终答案。",
    "question": "问题",
    "question_placeholder": "输入数学或算法问题（用英文提问效果更好）…",
    "submit": "提交",
    "stop": "停止",
    "clear": "清空",
    "examples": "示例",
    "preset": "系统提示词预设",
    "preset_math": "数学",
    "preset_code": "算法竞赛",
    "preset_custom": "自定义",
    "system_prompt": "系统提示词",
    "system_placeholder": "留空 = 模型默认：" + DEFAULT_SYSTEM_PROMPT,
    "system_why": "VibeThinker 训练时使用固定的系统提示词，对它很敏感：默认（数学，留空）要求逐步推理并把答案放进 "
    "`\\boxed{}`。只有想要另一种回答方式时才修改。",
    "settings": "生成参数",
    "temperature": "温度（模型卡推荐 0.6；0 = 贪心）",
    "top_p": "Top-p（模型卡推荐 0.95）",
    "top_k": "Top-k（0 = 关闭，模型卡推荐）",
    "max_new_tokens": "最大生成 token 数（思考 + 回答）",
    "thinking_budget": "思考预算 token 数（0 = 不限）",
    "seed": "随机种子（-1 = 随机）",
    "chat": "对话",
}

# Texts built at run time, keyed by language.
RUNTIME: dict[Lang, dict[str, str]] = {
    "en": {
        "thinking": "Thinking",
        "final_answer": "Final answer",
        "loading": "Loading the model… {pct}: {message}",
        "failed": "✖ The model failed to load: {error}\n\nFix the problem above and start again (`bash 1键推理.sh`).",
        "ready": "✔ Ready: **{model}** · {backend} · {device} · {dtype} · context {context}{reason}",
        "unavailable": "⚠ **{model}** · {backend} · {device} cannot answer right now: {reason}\n\nNothing to "
        "restart here: it is ready again as soon as the engine answers.",
        "draining": "■ The server is shutting down.",
        "queued": "Waiting in line: position {position}",
        "empty_question": "Type a question first.",
        "bad_setting": "Invalid setting: {name} must be {rule}.",
        "english_hint": "Tip: VibeThinker works better with English questions.",
        "stopped": "■ Stopped by you (finish reason: cancelled).",
        "stats": "{backend} · {device} · TTFT {ttft} · prompt {prompt} · thinking {reasoning} · answer {answer} tokens · "
        "{speed} tok/s · finish: {finish}",
        "finish_stop": "stop",
        "finish_length": "length — hit max new tokens or the context window; raise Max new tokens for a full answer",
        "finish_budget": "budget — the thinking budget ran out, so the thinking was closed and the answer written",
        "finish_loop": "loop — a repetition loop was detected and cut",
        "finish_cancelled": "cancelled",
        "finish_error": "error",
        "error": "✖ Generation failed: {error}",
        "tokens": "{n} tokens",
    },
    "zh": {
        "thinking": "思考过程",
        "final_answer": "最终答案",
        "loading": "正在加载模型… {pct}：{message}",
        "failed": "✖ 模型加载失败：{error}\n\n请按上面的提示修正后重新启动（`bash 1键推理.sh`）。",
        "ready": "✔ 已就绪：**{model}** · {backend} · {device} · {dtype} · 上下文 {context}{reason}",
        "unavailable": "⚠ **{model}** · {backend} · {device} 暂时无法回答：{reason}\n\n无需重启：推理引擎恢复应答后即自动就绪。",
        "draining": "■ 服务正在关闭。",
        "queued": "排队中：第 {position} 位",
        "empty_question": "请先输入问题。",
        "bad_setting": "参数无效：{name} 必须{rule}。",
        "english_hint": "提示：VibeThinker 用英文提问效果更好。",
        "stopped": "■ 已停止（结束原因：cancelled）。",
        "stats": "{backend} · {device} · 首字延迟 {ttft} · 提示 {prompt} · 思考 {reasoning} · 回答 {answer} tokens · "
        "{speed} tok/s · 结束：{finish}",
        "finish_stop": "stop",
        "finish_length": "length —— 达到最大生成长度或上下文上限；调大“最大生成 token 数”可得到完整回答",
        "finish_budget": "budget —— 思考预算用完，已结束思考并写出回答",
        "finish_loop": "loop —— 检测到重复循环并已截断",
        "finish_cancelled": "cancelled（已取消）",
        "finish_error": "error（出错）",
        "error": "✖ 生成失败：{error}",
        "tokens": "{n} tokens",
    },
}


def make_i18n(language: str) -> gr.I18n:
    """``auto``: the browser's language; ``zh``/``en``: that language for everyone."""
    if language == "zh":
        return gr.I18n(en=ZH, zh=ZH, **{"zh-CN": ZH, "zh-TW": ZH})
    if language == "en":
        return gr.I18n(en=EN, zh=EN, **{"zh-CN": EN, "zh-TW": EN})
    return gr.I18n(en=EN, zh=ZH, **{"zh-CN": ZH, "zh-TW": ZH})


def pick_language(setting: str, accept_language: str | None) -> Lang:
    if setting in ("zh", "en"):
        return setting  # type: ignore[return-value]
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag:
            return "en"
    return "en"


def t(lang: Lang, key: str, **values: object) -> str:
    text = RUNTIME[lang][key]
    return text.format(**values) if values else text
