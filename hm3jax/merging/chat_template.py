"""`chat_template` of a recipe: the chat template written into the output tokenizer, as mergekit 0.1.5 does.

The value is a named template (one of NAMED: alpaca, chatml, exaone, llama3, mistral), "auto" (the
template most of the input models' tokenizers carry; on a tie, the first of them in recipe order;
none: the tokenizer is saved without one), or a literal Jinja template (a string with "{" of at least
20 characters). The output tokenizer (the base model's, else the first model's, or the one built for
`tokenizer` / `tokenizer_source`) is then loaded with transformers and saved with `save_pretrained`
(not copied file by file), its `chat_template` set. When that model has no tokenizer, the merge
still succeeds without one, with a warning (mergekit logs an error and continues likewise).
"""

from __future__ import annotations

import warnings
from collections import Counter

NAMED = {
    'alpaca': "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if (messages|selectattr('role', 'equalto', 'system')|list) else '' }}\n\n{% for message in messages %}\n{% if message['role'] == 'user' %}\n### Instruction:\n{{ message['content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n{% elif message['role'] == 'assistant' %}\n### Response:\n{{ message['content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n{% elif message['role'] == 'user_context' %}\n### Input:\n{{ message['content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n{% endif %}\n{% endfor %}\n{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n### Response:\n{% endif %}\n",
    'chatml': "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n",
    'exaone': "{% for message in messages %}\n    {% if loop.first and message['role'] != 'system' %}\n        {{ '[|system|][|endofturn|]\\n' }}\n    {% endif %}\n    {{ '[|' + message['role'] + '|]' + message['content'] }}\n    {% if message['role'] == 'user' %}\n        {{ '\\n' }}\n    {% else %}\n        {{ '[|endofturn|]\\n' }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n    {{ '[|assistant|]' }}\n{% endif %}\n",
    'llama3': "{% set loop_messages = messages %}\n{% for message in loop_messages %}\n{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}\n{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n{{ content }}\n{% endfor %}\n{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n",
    'mistral': "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n",
}


class ChatTemplateError(ValueError):
    """A `chat_template` value that is neither a named template, "auto" nor a Jinja template."""


def check_chat_template(value) -> str:
    """The recipe's value, checked (a named template, "auto" or a literal Jinja template)."""
    if not isinstance(value, str) or not value:
        raise ChatTemplateError(f"recipe: key 'chat_template' must be a non-empty string, got {value!r}")
    if value == "auto" or _named(value) is not None:
        return value
    if len(value) < 20 or "{" not in value:
        raise ChatTemplateError(f"recipe: key 'chat_template': {value!r} is not a named template "
                                f"({', '.join(NAMED)}), 'auto' or a Jinja template (>= 20 characters with '{{')")
    return value


def _named(value: str) -> str | None:
    if len(value) < 256 and "\n" not in value and "{" not in value:
        return NAMED.get(value)
    return None


def _template_of(path: str) -> str | None:
    # hm3jax.merging needs only jax, numpy, ml_dtypes, pyyaml at import (pyproject.toml): loaded where used
    import transformers

    from hm3jax.io.paths import check_tokenizer_files

    check_tokenizer_files(path)  # refused, not skipped: a FIFO would block from_pretrained
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # mergekit skips a model whose tokenizer does not load
        warnings.warn(f"chat_template auto: no tokenizer loaded from {path} ({type(e).__name__})", stacklevel=3)
        return None
    t = tok.chat_template
    if isinstance(t, dict):
        t = t.get("default")
    return t.strip() if t else None


def resolve_chat_template(value: str, model_paths: list[str]) -> str | None:
    """The template text for a checked `chat_template` value; "auto" reads the models' tokenizers
    (`model_paths`: the recipe's models, base first, each once) and gives None when none has one."""
    if value == "auto":
        found = [t for t in (_template_of(p) for p in dict.fromkeys(model_paths)) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return _named(value) or value


def save_with_template(tokenizer_or_path, template: str | None, out_dir: str) -> bool:
    """Save a tokenizer (a transformers tokenizer, or the directory to load one from) into `out_dir`
    with `template` as its chat template (None: as it is). False, with a warning, when none loads."""
    tok = tokenizer_or_path
    if isinstance(tok, str):
        # hm3jax.merging needs only jax, numpy, ml_dtypes, pyyaml at import (pyproject.toml): loaded where used
        import transformers

        from hm3jax.io.paths import check_tokenizer_files

        check_tokenizer_files(tok)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(tok)
        except Exception as e:  # the merge is still written, as mergekit does
            warnings.warn(f"chat_template: no tokenizer could be loaded from {tokenizer_or_path} "
                          f"({type(e).__name__}); the output has no tokenizer", stacklevel=3)
            return False
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(out_dir)
    return True
