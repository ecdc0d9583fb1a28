"""Prompt rendering for instruct and chat models: system prompt, instruction, few-shot turns,
the tokenizer's chat template (or plain text), Qwen3's ``enable_thinking``, and the tokens
that end a reply.

A chat model ends its turn with the template's end-of-turn token (``<|im_end|>`` for ChatML),
which is not always the tokenizer's EOS (Qwen3-Base's EOS is ``<|endoftext|>``; Llama 3's turn
ends in ``<|eot_id|>``): a rollout that stops only on EOS runs past the reply, and the text it
appends can hold a second, different answer. ``stop_token_ids`` gives both.
"""
from __future__ import annotations

from dataclasses import dataclass

_SENTINEL = "\u2063lora-engine-reply\u2063"  # invisible separator: never part of a real template


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes prompt tokens.

    ``instruction`` is appended to every question after a space (or placed by ``{question}`` in
    it); ``few_shot`` holds ``(question, reply)`` pairs shown first, as chat turns or as plain
    text; ``chat_template``: True, False or ``"auto"`` (use it when the tokenizer has one).
    ``enable_thinking`` is passed to the template (Qwen3 reads it; other templates ignore it).
    """

    system_prompt: str = ""
    instruction: str = ""
    chat_template: bool | str = "auto"
    enable_thinking: bool = True
    few_shot: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.chat_template not in (True, False, "auto"):
            raise ValueError(f"chat_template must be true, false or \"auto\", got {self.chat_template!r}")
        shots = tuple(tuple(s) for s in self.few_shot)
        if any(len(s) != 2 or not all(isinstance(x, str) for x in s) for s in shots):
            raise ValueError('few_shot_examples must be [question, reply] string pairs, e.g. '
                             'few_shot_examples = [["What is 2 + 2?", "2 + 2 = 4. The answer is \\\\boxed{4}."]]')
        object.__setattr__(self, "few_shot", shots)

    def question(self, text: str) -> str:
        """The user turn for ``text``: the question with the instruction."""
        if not self.instruction:
            return text
        if "{question}" in self.instruction:
            return self.instruction.replace("{question}", text)
        return f"{text} {self.instruction}"

    def uses_chat(self, tokenizer) -> bool:
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template is True and not has:
            raise ValueError("chat_template = true but the tokenizer has no chat template: set chat_template = "
                             "false (plain text) or use a tokenizer that ships one (chat_template.jinja)")
        return has if self.chat_template == "auto" else bool(self.chat_template)

    def messages(self, text: str) -> list[dict]:
        """The chat messages for question ``text``: system, few-shot turns, the question."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for q, reply in self.few_shot:
            msgs += [{"role": "user", "content": self.question(q)}, {"role": "assistant", "content": reply}]
        return msgs + [{"role": "user", "content": self.question(text)}]

    def render(self, tokenizer, text: str) -> str:
        """The prompt text for question ``text`` (with the chat template's special tokens)."""
        if self.uses_chat(tokenizer):
            return tokenizer.apply_chat_template(self.messages(text), add_generation_prompt=True, tokenize=False,
                                                 enable_thinking=self.enable_thinking)
        # Plain text: blocks separated by a blank line, each shot as question then reply.
        blocks = [self.system_prompt] if self.system_prompt else []
        blocks += [f"{self.question(q)}\n{reply}" for q, reply in self.few_shot]
        blocks.append(self.question(text) + ("\n" if self.few_shot else ""))
        return "\n\n".join(blocks)

    def encode(self, tokenizer, text: str) -> list[int]:
        """Token ids of the prompt for question ``text``.

        A rendered chat prompt already holds the template's BOS (if any), so it is tokenized
        without special tokens; ``apply_chat_template(tokenize=True)`` is not used because it
        returns a dict in transformers 5 and a list in 4.x. Plain text gets the tokenizer's BOS.
        """
        chat = self.uses_chat(tokenizer)
        return tokenizer(self.render(tokenizer, text), add_special_tokens=not chat)["input_ids"]

    def stop_token_ids(self, tokenizer) -> list[int]:
        """EOS, and with the chat template its end-of-turn token when that is another token."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if self.uses_chat(tokenizer):
            eot = end_of_turn_token_id(tokenizer)
            if eot is not None and eot not in ids:
                ids.append(eot)
        if not ids:
            raise ValueError("the tokenizer has neither an EOS token nor a chat template end-of-turn token: set "
                             "tokenizer.eos_token (e.g. in tokenizer_config.json) so generation can stop")
        return ids


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant reply, or None.

    Found by rendering a reply and reading the first token after it (``<|im_end|>`` for ChatML,
    ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma); only a special (added) token
    counts, so a template that closes a turn with a bare newline yields None.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    convo = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(convo, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation has no answer here
        return None
    if _SENTINEL not in text:
        return None
    tail = text.split(_SENTINEL, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids[0] in special else None
