"""The process reward model's step-boundary deposits (both PRM kinds) on a hand-made example,
and the distillation reward against the explicit fp64 log-softmax difference for a teacher of
another size; the teacher must share the student's vocabulary."""
import json

import pytest
import torch
import transformers

from helpers import assert_close
from lora_engine.rl.distill import Teacher, distillation_rewards
from lora_engine.rl.prm import ProcessRewardModel, deposits, step_ends, step_texts
from lora_engine.rl.rollout import Rollouts, left_pad
from lora_engine.rl.tiny_judges import build_tiny_prm, build_tiny_teacher
from lora_engine.rl.tiny_model import build_tokenizer


def _qwen3(tok, hidden, seed, cls=transformers.Qwen3ForCausalLM, **kw):
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64, pad_token_id=tok.pad_token_id, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(cfg).eval()


def _completion(tok, text, pad=2):
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = torch.tensor([ids + [tok.pad_token_id] * pad])
    return row, (torch.arange(row.shape[1]) < len(ids))[None]


def test_step_ends_on_a_hand_made_completion():
    tok = build_tokenizer()
    # a b \n c d \n \n e f <eos> <pad> <pad>: the blank line joins the last step, EOS ends it
    ids, mask = _completion(tok, "ab\ncd\n\nef")
    ends = step_ends(tok, ids, mask, "\n")
    assert ends == [[2, 5, 9]]
    assert step_texts(tok, ids, ends) == [["ab\n", "cd\n", "\nef"]]
    # one step when the separator never occurs; none for an empty row
    assert step_ends(tok, ids, mask, "{") == [[9]]
    assert step_ends(tok, ids, torch.zeros_like(mask), "\n") == [[]]


def test_math_shepherd_deposits_equal_plus_vs_minus_at_each_tag():
    tok = build_tokenizer()
    prm = ProcessRewardModel(_qwen3(tok, 32, 0), tok, "math_shepherd", step_tag="#", separator="\n")
    ids, mask = _completion(tok, "ab\ncd\n\nef")
    values, placed = deposits(prm, tok, ["1+2="], ids, mask)
    assert placed[0].nonzero().squeeze(1).tolist() == [2, 5, 9]
    # the explicit Math-Shepherd reading: softmax over the logits of "+" and "-" after each tag
    text = "1+2=" + "ab#\n" + "cd#\n" + "\nef#"
    x = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    tags = (x[0] == tok.convert_tokens_to_ids("#")).nonzero().squeeze(1)
    logits = prm.model.double()(input_ids=x).logits[0, tags].double()
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    expected = logits[:, [plus, minus]].softmax(-1)[:, 0]
    prm.model.float()
    assert_close(values[0, [2, 5, 9]].double(), expected, torch.float32, "step scores")
    assert (values[~placed] == 0).all()


def test_classifier_prm_scores_each_prefix():
    tok = build_tokenizer()
    model = _qwen3(tok, 32, 1, cls=transformers.Qwen3ForSequenceClassification, num_labels=1)
    prm = ProcessRewardModel(model, tok, "classifier", separator="\n", batch_size=2)  # batches split rows
    rows = [_completion(tok, t, pad=p) for t, p in (("ab\ncd", 3), ("x\ny\nz", 3))]
    ids = torch.cat([r[0] for r in rows])
    mask = torch.cat([r[1] for r in rows])
    values, placed = deposits(prm, tok, ["1+2=", "3+4="], ids, mask)
    prefixes = [["1+2=ab\n", "1+2=ab\ncd"], ["3+4=x\n", "3+4=x\ny\n", "3+4=x\ny\nz"]]
    for b, ps in enumerate(prefixes):
        got = values[b][placed[b]]
        want = [torch.sigmoid(model(input_ids=torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])).logits[0, 0])
                for p in ps]
        assert_close(got, torch.stack(want), torch.float32, f"row {b}")


def test_tiny_prm_builds_and_loads_with_its_own_tag_and_separator(tmp_path):
    path = build_tiny_prm(cache_dir=tmp_path, steps=2, init="random", progress=False)
    meta = json.loads((tmp_path / path.split("/")[-1] / "prm.json").read_text())
    prm = ProcessRewardModel.load(path, device="cpu")
    assert (prm.kind, prm.step_tag, prm.separator) == (meta["kind"], "#", "{")
    tok = build_tokenizer()
    ids, mask = _completion(tok, "\\boxed{85}")
    values, placed = deposits(prm, tok, ["40+45="], ids, mask)
    assert placed[0].nonzero().squeeze(1).tolist() == [0, 4]  # "\boxed{" (0), then "85}" + EOS (1-4)
    assert ((values[placed] > 0) & (values[placed] < 1)).all()


def _rollouts(tok):
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("12+3=", "7+8=", "1+1=")]
    comps = ["\\boxed{15}", "\\boxed{1", "2}"]
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id, "cpu")
    c = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in comps]
    C = max(map(len, c)) + 1
    c_ids = torch.full((3, C), tok.pad_token_id)
    c_mask = torch.zeros(3, C, dtype=torch.long)
    for i, row in enumerate(c):
        c_ids[i, :len(row)], c_mask[i, :len(row)] = torch.tensor(row), 1
    return Rollouts(input_ids=torch.cat([p_ids, c_ids], 1), attention_mask=torch.cat([p_mask, c_mask], 1),
                    completion_ids=c_ids, completion_mask=c_mask, sampling_logp=torch.zeros(3, C),
                    truncated=torch.zeros(3, dtype=torch.bool), adapter_ids=torch.zeros(3, dtype=torch.long),
                    prompt_len=p_ids.shape[1], prompt_tokens=p_mask.sum(1))


def _explicit_logp(model, ro, T):
    """fp64 log_softmax(logits / T) of every completion token from full logits, one unpadded row
    at a time through a float64 copy (no padding, no masks: nothing shared with the fused path)."""
    m = model.double()
    out = torch.zeros(ro.completion_mask.shape, dtype=torch.float64)
    for b in range(out.shape[0]):
        x = ro.input_ids[b][ro.attention_mask[b].bool()][None]
        n = int(ro.completion_mask[b].sum())
        logits = m(input_ids=x).logits.double()[0]
        lp = torch.log_softmax(logits[:-1] / T, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
        out[b, :n] = lp[-n:]
    model.float()
    return out


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_distillation_reward_is_the_log_softmax_difference(tmp_path, T):
    tok = build_tokenizer()
    student = _qwen3(tok, 32, 0)
    teacher = Teacher.load(build_tiny_teacher(cache_dir=tmp_path, steps=0, progress=False), tok, device="cpu")
    assert teacher.model.config.hidden_size != student.config.hidden_size
    ro = _rollouts(tok)
    s_lp = _explicit_logp(student, ro, T)
    r = distillation_rewards(teacher, ro, s_lp.float(), T)
    t_lp = _explicit_logp(teacher.model, ro, T)
    # r_t = log pi_T - log pi: the difference of two ~-4.5 log-probs is ~0.3, so compare the teacher
    # term it carries (fp32 accuracy of one log-prob) rather than divide rounding by the cancellation
    assert_close(r.double() + s_lp.float().double(), t_lp, torch.float32, "log pi_T(o_t) recovered from r_t")
    assert (r.double() - (t_lp - s_lp)).abs().max() < 1e-5
    assert (r[ro.completion_mask == 0] == 0).all() and (r[ro.completion_mask == 1] != 0).all()


def test_teacher_with_another_vocabulary_is_refused():
    tok, other = build_tokenizer(), build_tokenizer()
    other.add_tokens(["<think>"])
    with pytest.raises(ValueError, match="vocabulary differs"):
        Teacher(_qwen3(other, 32, 0), other, tok)
    with pytest.raises(ValueError, match="neither 'tiny' nor a local folder"):
        Teacher.load("/no/such/teacher", tok)
