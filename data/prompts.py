"""Prompt text of an ECInstruct row: eCeLLM's Alpaca template byte for byte, or the model's chat template.

eCeLLM (templates/alpaca.json + utils/prompter.py) fills one of two templates with str.format,
inserting every field as it is (no stripping, no re-serialising):

    with options (options is a non-empty string; eCeLLM tests `if options:`):
        Below is an instruction that describes a task, paired with an input that provides further
        context. Write a response that appropriately completes the request.\\n\\n
        ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Options:\\n{options}\\n\\n### Response:\\n
    without (options null or ""):
        ... ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n

(the first line is one line; it is wrapped here). The answer follows "### Response:\\n" directly.

1-shot rows (settings *_1-shot) carry `few_shot_example`, which eCeLLM's notebooks write as
json.dumps({"input": ..., ["options": ...,] "output": ...}) of a training item. eCeLLM's code has no
template for it (1-shot was only used for API baselines), so ours is: the worked example goes
between the instruction and the input, in the same "### " section style,

    ### Instruction:\\n{instruction}\\n\\n
    ### Example input:\\n{ex_input}\\n\\n[### Example options:\\n{ex_options}\\n\\n]### Example response:\\n{ex_output}\\n\\n
    ### Input:\\n{input}\\n\\n ...

(the options section only when the example has non-empty options). A `few_shot_example` that is not
such a JSON object is inserted raw as "### Example:\\n{few_shot_example}\\n\\n". Rows whose
few_shot_example is null or "" render exactly as eCeLLM's template.

Chat template ("chat", for instruct checkpoints): one user message whose content is the Alpaca
prompt without its final "\\n\\n### Response:\\n", rendered by tokenizer.apply_chat_template with
the generation prompt; the answer follows the assistant header.
"""

from __future__ import annotations

import json

ALPACA_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n")
# eCeLLM templates/alpaca.json, "prompt_input" and "prompt_no_options", verbatim.
ALPACA_PROMPT_INPUT = (ALPACA_PREAMBLE + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                       "### Options:\n{options}\n\n### Response:\n")
ALPACA_PROMPT_NO_OPTIONS = ALPACA_PREAMBLE + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
RESPONSE_SPLIT = "### Response:"        # eCeLLM's response_split: the answer is the text after it
TEMPLATES = ("alpaca", "chat")


def render_few_shot(example: str | None) -> str:
    """The worked-example sections for a few_shot_example string ('' when there is none)."""
    if not example:
        return ""
    try:
        ex = json.loads(example)
    except json.JSONDecodeError:
        ex = None
    if not (isinstance(ex, dict) and isinstance(ex.get("input"), str) and isinstance(ex.get("output"), str)):
        return f"### Example:\n{example}\n\n"
    options = ex.get("options")
    options_part = f"### Example options:\n{options}\n\n" if isinstance(options, str) and options else ""
    return f"### Example input:\n{ex['input']}\n\n{options_part}### Example response:\n{ex['output']}\n\n"


def render_alpaca(row: dict, input_text: str | None = None) -> str:
    """eCeLLM's Alpaca prompt for `row`, up to and including "### Response:\\n".

    `input_text` replaces row["input"] (truncation shortens the input field only).
    """
    input_text = row["input"] if input_text is None else input_text
    template = ALPACA_PROMPT_INPUT if row.get("options") else ALPACA_PROMPT_NO_OPTIONS
    shot = render_few_shot(row.get("few_shot_example"))
    if shot:   # the worked example goes right before the input section
        template = template.replace("### Input:\n", "{shot}### Input:\n", 1)
    return template.format(instruction=row["instruction"], input=input_text, options=row.get("options"), shot=shot)


def render_prompt(row: dict, template: str = "alpaca", tokenizer=None, *, input_text: str | None = None) -> str:
    """The prompt text of `row` up to where the answer starts.

    template "alpaca": eCeLLM's template (ends with "### Response:\\n"); "chat": the tokenizer's own
    chat template with one user message (see the module docstring). `input_text` overrides the
    input field (used by truncation).
    """
    text = render_alpaca(row, input_text)
    if template == "alpaca":
        return text
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template (an instruct checkpoint); "
                             "use template 'alpaca' for base models")
        content = text[: -len("\n\n" + RESPONSE_SPLIT + "\n")]
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
