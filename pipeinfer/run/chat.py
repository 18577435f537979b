"""Chat messages -> the text and token ids stage 0 runs, with exactly the special tokens intended.

A prompt is a plain string (raw text) or a list of {"role": ..., "content": ...} messages. Messages
are rendered with the checkpoint's chat template (or chat_template, a Jinja file) and
add_generation_prompt=True, or, when the last message is the assistant's (a prefilled answer),
continue_final_message=True, which ends the text inside that message so the model continues it;
then tokenized with add_special_tokens=False: the template writes its own BOS and headers, as
apply_chat_template(..., tokenize=True) does. A plain string is tokenized
as the tokenizer intends (with its BOS, where it adds one), except when the text already starts with
the BOS token's text, as a prompt rendered by hand from a template does: then the tokenizer adds
nothing, so that stage 0 never sees two BOS tokens.
"""

from __future__ import annotations

from pipeinfer.config import ConfigError, first_line


def check_messages(where: str, messages: object) -> list[dict]:
    """A non-empty list of {"role": str, "content": str}; ConfigError naming the message otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: message {j} is {type(m).__name__}, not an object: write "
                              f"{{\"role\": \"user\", \"content\": \"...\"}}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"{type(m[key]).__name__}, not a string"
                raise ConfigError(f"{where}: message {j} \"{key}\" is {got}: each message needs a \"role\" "
                                  f"(\"system\", \"user\", \"assistant\") and a \"content\" string")
        if not m["role"]:
            raise ConfigError(f"{where}: message {j} has an empty \"role\": use \"system\", \"user\" or \"assistant\"")
    return messages


def read_template(path: str) -> str:
    """The Jinja text of a chat_template file (a .jinja file, or the template string alone)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not UTF-8"
        raise ConfigError(f"chat_template={path!r} cannot be read ({why}): give a readable Jinja template file") \
            from None
    if not text.strip():
        raise ConfigError(f"chat_template={path!r} is empty: give a Jinja chat template")
    return text


def render(tokenizer, messages: list[dict], template: str | None, system_prompt: str | None, where: str) -> str:
    """The text of `messages` as the template renders it, ending with the assistant's header, or inside
    the assistant's own last message, which the model then continues."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where} is a list of messages but the checkpoint's tokenizer has no chat template: set "
                          f"chat_template to a Jinja template file, or give the prompt as a plain string")
    if system_prompt is not None and messages[0]["role"] != "system":  # a prompt's own system message wins
        messages = [{"role": "system", "content": system_prompt}, *messages]
    # A new assistant header after the assistant's own message would have the model answer anew,
    # not go on with the answer it was given (transformers refuses the two flags together).
    go_on = messages[-1]["role"] == "assistant"
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=not go_on,
                                             continue_final_message=go_on, tokenize=False)
    except Exception as e:  # Jinja's TemplateError, or whatever the template's own code raises
        said = first_line(e, 160)
        source = "chat_template file" if template is not None else "checkpoint's chat template"
        raise ConfigError(f"{where}: the {source} does not render these messages ({type(e).__name__}: {said}): "
                          f"fix the template or the messages") from None
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where}: the chat template rendered nothing: fix the template")
    return text


def encode(tokenizer, text: str, rendered: bool) -> list[int]:
    """Token ids for stage 0. rendered: the text came from a chat template, which wrote its specials."""
    bos = tokenizer.bos_token
    add = not rendered and not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])
