"""Named chat templates for bases whose tokenizer has none.

Each marks assistant turns with `{% generation %}` so transformers can return the assistant-token
mask that trl's `assistant_only_loss` needs.
"""

from __future__ import annotations

CHAT_TEMPLATES: dict[str, str] = {
    # "Role: content" lines; needs no special tokens beyond BOS/EOS.
    "plain": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}"
        "Assistant:{% generation %} {{ m['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}{{ '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
    # ChatML, as used by Qwen and others (<|im_start|>/<|im_end|> must be in the vocabulary).
    "chatml": (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}"
        "<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def chat_template(name: str) -> str:
    """The template called `name`; ValueError lists the known names."""
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(CHAT_TEMPLATES))
        raise ValueError(f"unknown chat template {name!r}; known: {known}") from None
