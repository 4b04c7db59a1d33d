"""Synthetic Qwen2 checkpoints that behave like VibeThinker, made locally with no network.

- ``make_tiny_model``: a tiny Qwen2 (hidden 64, 2 layers) with a real byte-level BPE tokenizer and
  VibeThinker's ChatML template, trained for a few seconds so that it thinks, answers with
  ``\\boxed{}`` and loops on one prompt. Tests run it through the real transformers and llama.cpp code.
- ``make_random_model``: random weights with the exact architecture of a real VibeThinker size, so
  that benchmarks measure real speeds without the real weights.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

# The Qwen2 pre-tokenizer split pattern. Training with it (and ByteLevel without its own regex)
# makes raw tokenizers, transformers' Qwen2Tokenizer and llama.cpp's "qwen2" pre-tokenizer agree.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# VibeThinker's (Qwen2.5-Math's) ChatML template, tools removed: with no system message the
# template supplies the maths prompt itself.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT.replace("\\", "\\\\") + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# What the driver writes to close a thinking cut short (backends.policy.CLOSE_THINKING_TEXT).
_CLOSING = "\n\nI have thought long enough; now I will write the final answer.\n</think>\n\n"

# Prompts the tiny model is trained on; tests use them by name.
ADD_PROMPT = "What is 2+2?"
ADD_REPLY = "<think>\nI need to add 2 and 2. Two plus two is four.\n</think>\n\nThe answer is \\boxed{4}."
LOOP_PROMPT = "Think about the number forever."
# Trained open-ended (see _train): the reply repeats "wait" for as long as it is let, so tests
# that press Stop or hang up mid-stream (loop guard off) never race the end of the reply.
ENDLESS_PROMPT = "Count the waits without end."
ENDLESS_TRAIN_REPEATS = 1200
_EXAMPLES: list[tuple[str, str]] = [
    (ADD_PROMPT, ADD_REPLY),
    ("What is 3+5?", "<think>\nI need to add 3 and 5. Three plus five is eight.\n</think>\n\nThe answer is \\boxed{8}."),
    ("What is 6+1?", "<think>\nI need to add 6 and 1. Six plus one is seven.\n</think>\n\nThe answer is \\boxed{7}."),
    ("计算 1+1 等于几？", "<think>\n一加一等于二。 I need to add 1 and 1.\n</think>\n\nThe answer is \\boxed{2}."),
    # Thinking cut short then closed, as the thinking budget does: the model still answers.
    ("What is 5+4?", "<think>\nI need to add 5 and\n\nI have thought long enough.\n</think>\n\nThe answer is \\boxed{9}."),
    # The model learns to repeat "wait" far longer than the loop guard waits, and to answer once
    # the thinking is closed — the shape of VibeThinker's real failure.
    (LOOP_PROMPT, "<think>\n" + "wait " * 240 + "\n</think>\n\nThe answer is \\boxed{0}."),
    (ENDLESS_PROMPT, "<think>\n" + "wait " * ENDLESS_TRAIN_REPEATS),
]
# The loop closed by the app (its closing text at several points) still ends in the answer, so that
# the loop guard's "thinking closed and the answer written" holds wherever the guard cuts (token or
# text guard, any batch). The uncut reply is weighted double: at every cut point more examples go on
# waiting than close, so that without the guard the model still loops.
_EXAMPLES += [(LOOP_PROMPT, "<think>\n" + "wait " * 240 + "\n</think>\n\nThe answer is \\boxed{0}.")]
_EXAMPLES += [(LOOP_PROMPT, "<think>\n" + "wait " * k + _CLOSING + "The answer is \\boxed{0}.") for k in (17, 43, 90, 150)]

# Voting: one prompt trained with several replies, so that sampling (a seed) picks among them:
# three equivalent forms of one half (\frac{1}{2} = 0.5 = 1/2 must vote together), a wrong answer
# and a reply without a boxed answer (counted apart).
VOTE_PROMPT = "What is half of one?"
_VOTE_THINK = "<think>\nHalf of one is one half.\n</think>\n\n"
VOTE_REPLIES = [
    _VOTE_THINK + "The answer is \\boxed{\\frac{1}{2}}.",
    _VOTE_THINK + "The answer is \\boxed{0.5}.",
    _VOTE_THINK + "The answer is \\boxed{1/2}.",
    _VOTE_THINK + "The answer is \\boxed{2}.",
    _VOTE_THINK + "The answer is one half.",
]
# Code checking: a problem with stated samples, asked with the page's Competitive programming
# system prompt (ui.strings.CODE_SYSTEM_PROMPT, copied here so that bench needs no Gradio),
# answered by a correct program, a wrong one and a fork bomb (which the sandbox must stop), again
# picked by the seed.
CODE_SYSTEM_PROMPT = (
    "You are an expert competitive programmer. Reason step by step about the algorithm and its "
    "complexity, then give one complete, efficient solution in a single fenced code block."
)
CODE_PROMPT = ("Read two integers A and B and print A+B.\n\nSample Input 1\n1 2\n\nSample Output 1\n3\n\n"
               "Sample Input 2\n10 20\n\nSample Output 2\n30")
_CODE_THINK = "<think>\nRead A and B, then print the sum.\n</think>\n\n"
CODE_REPLIES = [
    _CODE_THINK + "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
    _CODE_THINK + "```python\na, b = map(int, input().split())\nprint(a - b)\n```",
    _CODE_THINK + "```python\nimport os\nwhile True:\n    os.fork()\n```",
]
_EXAMPLES += [(VOTE_PROMPT, r) for r in VOTE_REPLIES]
# (system prompt, prompt, reply)
_SYSTEM_EXAMPLES: list[tuple[str, str, str]] = [(CODE_SYSTEM_PROMPT, CODE_PROMPT, r) for r in CODE_REPLIES]

# Extra text so the BPE learns merges for what the app itself injects and for mixed-script input.
_EXTRA_CORPUS = [
    "I have thought long enough; now I will write the final answer.",
    "Considering the limited time, I have to give the solution based on the thinking directly now.",
    "Solve for x: 2x + 3 = 7. Let me compute step by step, 计算结果是 2。 12345 67890",
    "def solve(n):\n    return sum(range(n + 1))\n",
    "$\\frac{a}{b}$ and \\(x^2\\) and \\[y\\] 中文问题 English question",
    DEFAULT_SYSTEM_PROMPT,
]

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768,
    ),
    # The real architectures (config.json of WeiboAI/VibeThinker-1.5B, a Qwen2.5-Math-1.5B derivative).
    "vibethinker-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=131072, vocab_size=151936,
    ),
}

Progress = Callable[[str], None]


def build_tokenizer(vocab_size: int = 700):
    """Train a byte-level BPE with Qwen2's split pattern and wrap it as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [p for pair in _EXAMPLES for p in pair] + [p for ex in _SYSTEM_EXAMPLES for p in ex] + _EXTRA_CORPUS
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def _save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # Mirror the real checkpoint so AutoTokenizer takes the same (Qwen2) code path.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["bos_token"] = None
    cfg["add_bos_token"] = False
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def _config(tokenizer, preset: str):
    from transformers import Qwen2Config

    params = dict(PRESETS[preset])
    params.setdefault("vocab_size", len(tokenizer))
    return Qwen2Config(
        **params,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        use_sliding_window=False,
    )


def _batch(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _train(model, tokenizer, steps: int, progress: Progress | None) -> None:
    import torch

    # The original examples train as one batch, as they always have (the loop guard's "answer after
    # the thinking is closed" relies on it); the voting and code examples are a batch of their own.
    short, endless, extra = [], [], []
    for prompt, reply in _EXAMPLES:
        if prompt == ENDLESS_PROMPT:
            # No <|im_end|> after it, so the model never learns where the repetition would stop.
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            ) + reply
            endless.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tokenize=False
            )
            (extra if prompt == VOTE_PROMPT else short).append(tokenizer(text, add_special_tokens=False)["input_ids"])
    for system, prompt, reply in _SYSTEM_EXAMPLES:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt},
             {"role": "assistant", "content": reply}], tokenize=False)
        extra.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Separate batches: padding the short examples to the endless one's length would cost minutes.
    batches = [_batch(rows, tokenizer.pad_token_id) for rows in (short, extra, endless) if rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = sum(model(input_ids=i, attention_mask=m, labels=lab).loss for i, m, lab in batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress and step % 50 == 0:
            progress(f"step {step}/{steps} loss {loss.item():.4f}")
    model.eval()


def make_tiny_model(out_dir: str | os.PathLike[str], *, steps: int = 300, seed: int = 0,
                    progress: Progress | None = None) -> Path:
    """Build the tiny trained test model into ``out_dir`` (created) and return its path."""
    import torch
    from transformers import Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = Qwen2ForCausalLM(_config(tokenizer, "tiny"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            _train(model, tokenizer, steps, progress)
        finally:
            torch.use_deterministic_algorithms(False)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.95
    model.generation_config.do_sample = True
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tokenizer, out)
    return out


def make_random_model(out_dir: str | os.PathLike[str], preset: str = "vibethinker-1.5b", *,
                      dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Random weights with a real architecture (no training), for speed measurements only."""
    import torch
    from transformers import Qwen2ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = _config(tokenizer, preset)
    config.dtype = dtype
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tokenizer, out)
    return out
