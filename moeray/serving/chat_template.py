"""Chat messages to a prompt, as transformers does: the checkpoint's chat template (the
tokenizer's, chat_template.jinja, or tokenizer_config.json's) rendered in a sandboxed jinja2."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer HF checkpoints keep the template in its own file


def load_chat_template(checkpoint: str | Path, tokenizer=None) -> str | None:
    """The checkpoint's chat template: the tokenizer's own if it loaded one, else chat_template.jinja,
    else tokenizer_config.json's "chat_template" (a string, or a list of named templates: "default").
    None when the checkpoint has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return template
    directory = Path(checkpoint)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text()
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = json.loads(config_path.read_text()).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text, as transformers' apply_chat_template renders it (sandboxed jinja2, trimmed
    blocks, a generation prompt for the assistant's turn). ValueError when the template refuses
    the messages (its raise_exception) or fails."""
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise RuntimeError(f"chat templates need jinja2 (pip install jinja2): {exc}") from None

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                                                eos_token=eos_token)
    except TemplateError as exc:
        raise ValueError(f"the chat template refused the messages: {exc}") from None
