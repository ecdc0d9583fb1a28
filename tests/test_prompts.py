"""Prompt rendering: ChatML and Qwen3-style templates built here (no hub), plain text, few-shot,
instructions, enable_thinking, and the stop tokens (EOS and the template's end of turn)."""
import pytest

from lora_engine.rl.prompts import PromptFormat, end_of_turn_token_id
from lora_engine.rl.tiny_model import build_tokenizer

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
# Qwen3's switch, reduced to its effect: thinking off pre-fills an empty think block.
QWEN3 = CHATML.replace("{{'<|im_start|>assistant\n'}}", "{{'<|im_start|>assistant\n'}}{% if enable_thinking is "
                       "defined and enable_thinking is false %}{{'<think>\n\n</think>\n\n'}}{% endif %}")
LLAMA3 = ("{% for m in messages %}{{'<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + "
          "'<|eot_id|>'}}{% endfor %}{% if add_generation_prompt %}{{'<|start_header_id|>assistant<|end_header_id|>"
          "\n\n'}}{% endif %}")


def _tokenizer(template=CHATML, specials=("<|im_start|>", "<|im_end|>")):
    tok = build_tokenizer()  # character-level, EOS "<eos>"
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    return tok


def test_chatml_rendering_with_system_instruction_and_few_shot():
    tok = _tokenizer()
    fmt = PromptFormat(system_prompt="Be brief.", instruction="Put the answer in \\boxed{}.",
                       few_shot=(("1+1?", "\\boxed{2}"),))
    text = fmt.render(tok, "2+3?")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\n1+1? Put the answer in \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n\\boxed{2}<|im_end|>\n"
                    "<|im_start|>user\n2+3? Put the answer in \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = fmt.encode(tok, "2+3?")
    assert tok.decode(ids) == text and ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 4
    assert fmt.stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_instruction_placeholder_and_default_format():
    tok = _tokenizer()
    assert PromptFormat(instruction="Q: {question}\nA:").question("2+2") == "Q: 2+2\nA:"
    assert PromptFormat().render(tok, "7+1?") == "<|im_start|>user\n7+1?<|im_end|>\n<|im_start|>assistant\n"


def test_plain_text_when_the_chat_template_is_off():
    tok = _tokenizer()
    fmt = PromptFormat(system_prompt="Add.", few_shot=(("1+1=", "\\boxed{2}"),), chat_template=False)
    assert fmt.render(tok, "2+3=") == "Add.\n\n1+1=\n\\boxed{2}\n\n2+3=\n"
    assert fmt.stop_token_ids(tok) == [tok.eos_token_id]  # no template, no end-of-turn token
    bare = build_tokenizer()
    assert PromptFormat().encode(bare, "2+3=") == bare("2+3=")["input_ids"]  # "auto": no template, plain
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat(chat_template=True).render(bare, "1")


def test_enable_thinking_reaches_the_template():
    tok = _tokenizer(QWEN3)
    on = PromptFormat().render(tok, "1+1?")
    off = PromptFormat(enable_thinking=False).render(tok, "1+1?")
    assert on.endswith("<|im_start|>assistant\n") and off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("template, specials, token", [
    pytest.param(CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", id="chatml"),
    pytest.param(LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>", id="llama3"),
    pytest.param("{% for m in messages %}{{m['content'] + '\n'}}{% endfor %}", (), None, id="newline-only"),
])
def test_end_of_turn_token(template, specials, token):
    tok = _tokenizer(template, specials)
    want = None if token is None else tok.convert_tokens_to_ids(token)
    assert end_of_turn_token_id(tok) == want


@pytest.mark.parametrize("kw, match", [
    pytest.param({"chat_template": "yes"}, "chat_template must be", id="chat-template"),
    pytest.param({"few_shot": (("only a question",),)}, "pairs", id="few-shot-shape"),
])
def test_bad_formats_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        PromptFormat(**kw)


def test_config_prompt_fields_reach_the_task(tmp_path):
    pytest.importorskip("reasoning_gym")
    from lora_engine.rl.config import config_from_dict
    from lora_engine.rl.tasks import task_from_config

    cfg = config_from_dict({"adapters": [{"rank": 1}], "task": "reasoning_gym:basic_arithmetic",
                            "task_options": {"size": 50}, "system_prompt": "S", "instruction": "Box it.",
                            "enable_thinking": False, "few_shot_examples": [["1+1?", "\\boxed{2}"]], "few_shot": 1})
    task = task_from_config(cfg)
    assert task.prompt.system_prompt == "S" and task.prompt.instruction == "Box it."
    assert task.prompt.enable_thinking is False and len(task.prompt.few_shot) == 2
    assert task.prompt.few_shot[0] == ("1+1?", "\\boxed{2}")
    tok = _tokenizer()
    text = tok.decode(task.encode_prompt(tok, task.eval_set(1)[0]))
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1? Box it.") and "Box it." in text
