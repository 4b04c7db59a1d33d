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
    "samples": "Samples (k): 1 = one answer; more = the model answers k times and the answers vote",
    "code_checking": "Code checking",
    "tests": "Your tests (input, a line ---, expected output; separate tests with a line ===)",
    "tests_placeholder": "1 2\n---\n3\n===\n10 20\n---\n30",
    "code_checking_why": "With the Competitive programming preset (or when an answer ends with a Python code "
    "block) the final program is run against the examples stated in the question and these tests, isolated "
    "and limited.",
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
    "samples": "采样数 (k)：1 = 一个回答；更多 = 模型回答 k 次，再由这些回答投票",
    "code_checking": "代码检验",
    "tests": "自定义测试（输入，一行 ---，期望输出；多个测试之间用一行 === 分隔）",
    "tests_placeholder": "1 2\n---\n3\n===\n10 20\n---\n30",
    "code_checking_why": "使用“算法竞赛”预设（或回答以 Python 代码块结尾）时，最终程序会在隔离和资源限制下，"
    "用题目中给出的样例和这里的测试运行检验。",
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
        "agree": "{votes} of {samples} samples agree: {answer}",
        "agree_so_far": "So far {votes} of {done} finished samples agree: {answer}",
        "no_votes": "No sample has given a boxed answer",
        "no_votes_yet": "No boxed answer yet",
        "others": "Other answers: {answers}",
        "apart_no_answer": "no boxed answer: {n}",
        "apart_cut_off": "cut off at the length limit: {n}",
        "apart_failed": "stopped or failed: {n}",
        "apart_running": "still running: {n}",
        "apart": "Not counted: {items}",
        "notes": "Notes: {notes}",
        "tie": "tie",
        "sample": "Sample {i}",
        "sample_running": "thinking…",
        "sample_answering": "answering…",
        "sample_no_answer": "no boxed answer",
        "sample_no_program": "no program",
        "answer_label": "Answer",
        "programs_pass": "{votes} of {samples} programs pass all {total} examples",
        "programs_pass_so_far": "So far {votes} of {done} checked programs pass all {total} examples",
        "no_program_passes": "No program passes all {total} examples",
        "no_programs": "No sample has given a Python program",
        "no_programs_yet": "No program yet",
        "no_examples": "No examples found in the question: add tests under “Code checking”.",
        "no_program": "No Python code block in the answer: nothing to run.",
        "check_title": "Examples: {passed} of {total} pass",
        "checking": "Running the program on {n} example(s)…",
        "isolation_bubblewrap": "Isolation: bubblewrap sandbox (no network, own processes, read-only system, "
        "private folder); limits: {limits}",
        "isolation_process": "Isolation: process limits only ({details}); limits: {limits}",
        "isolation_net": "no network",
        "isolation_hook": "sockets and writes outside its folder refused by an audit hook only",
        "isolation_user": "own user id",
        "code_off": "Code checking is off on this server (solve.run_code: false).",
        "bad_tests": "Your tests cannot be read: {error}",
        "expected_got": "{name}: expected (−) and got (+)",
        "stderr": "{name}: error output",
        "stats_many": "{backend} · {device} · {k} samples · prompt {prompt} · thinking {reasoning} · answer {answer} "
        "tokens in all · {speed} tok/s together · finish: {finishes}",
        "verdict_passed": "passed",
        "verdict_wrong_answer": "wrong answer",
        "verdict_runtime_error": "runtime error",
        "verdict_time_limit": "time limit",
        "verdict_memory_limit": "memory limit",
        "verdict_output_limit": "output limit",
        "verdict_blocked": "blocked",
        "verdict_compile_error": "syntax error",
        "verdict_sandbox_error": "sandbox error",
        "verdict_skipped": "skipped",
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
        "agree": "{samples} 个采样中有 {votes} 个一致：{answer}",
        "agree_so_far": "目前已完成的 {done} 个采样中有 {votes} 个一致：{answer}",
        "no_votes": "没有采样给出方框答案",
        "no_votes_yet": "还没有方框答案",
        "others": "其他答案：{answers}",
        "apart_no_answer": "无方框答案：{n}",
        "apart_cut_off": "达到长度上限被截断：{n}",
        "apart_failed": "已停止或出错：{n}",
        "apart_running": "仍在生成：{n}",
        "apart": "未计票：{items}",
        "notes": "说明：{notes}",
        "tie": "平票",
        "sample": "采样 {i}",
        "sample_running": "思考中…",
        "sample_answering": "回答中…",
        "sample_no_answer": "无方框答案",
        "sample_no_program": "无程序",
        "answer_label": "回答",
        "programs_pass": "{samples} 个程序中有 {votes} 个通过全部 {total} 个样例",
        "programs_pass_so_far": "目前已检验的 {done} 个程序中有 {votes} 个通过全部 {total} 个样例",
        "no_program_passes": "没有程序通过全部 {total} 个样例",
        "no_programs": "没有采样给出 Python 程序",
        "no_programs_yet": "还没有程序",
        "no_examples": "题目中没有找到样例：请在“代码检验”中添加测试。",
        "no_program": "回答中没有 Python 代码块：没有可运行的程序。",
        "check_title": "样例：通过 {passed} / {total}",
        "checking": "正在用 {n} 个样例运行程序…",
        "isolation_bubblewrap": "隔离：bubblewrap 沙箱（无网络、独立进程空间、系统只读、私有目录）；限制：{limits}",
        "isolation_process": "隔离：仅进程限制（{details}）；限制：{limits}",
        "isolation_net": "无网络",
        "isolation_hook": "套接字与目录外写入仅由审计钩子拒绝",
        "isolation_user": "独立用户 ID",
        "code_off": "本服务未开启代码检验（solve.run_code: false）。",
        "bad_tests": "无法读取自定义测试：{error}",
        "expected_got": "{name}：期望输出 (−) 与实际输出 (+)",
        "stderr": "{name}：错误输出",
        "stats_many": "{backend} · {device} · {k} 个采样 · 提示 {prompt} · 思考 {reasoning} · 回答 {answer} tokens（合计）· "
        "合计 {speed} tok/s · 结束：{finishes}",
        "verdict_passed": "通过",
        "verdict_wrong_answer": "答案错误",
        "verdict_runtime_error": "运行错误",
        "verdict_time_limit": "超时",
        "verdict_memory_limit": "超内存",
        "verdict_output_limit": "输出超限",
        "verdict_blocked": "被拦截",
        "verdict_compile_error": "语法错误",
        "verdict_sandbox_error": "沙箱错误",
        "verdict_skipped": "未运行",
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
