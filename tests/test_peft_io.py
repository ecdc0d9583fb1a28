"""PEFT format both ways (PEFT loads our export, we load PEFT's), the sidecar, errors, and the
vLLM side of an exported directory (rank mapping, validity; vLLM itself only where it imports)."""
import json
import warnings

import pytest
import torch
import transformers

import lora_engine as le
from helpers import assert_close
from lora_engine.engine import peft_format
from lora_engine.interop import vllm as le_vllm
from models import randomize_b, tiny_model

peft = pytest.importorskip("peft")

SPECS = [
    pytest.param("qwen3", le.AdapterSpec(rank=4, alpha=16, seed=1), "all-linear", id="qwen3-lora-all"),
    pytest.param("llama", le.AdapterSpec(rank=3, alpha=8, scaling="rslora", seed=2), "all-linear",
                 id="llama-rslora-all"),
    pytest.param("qwen2", le.AdapterSpec(rank=2, alpha=4, seed=3, target_modules=("q_proj", "v_proj")),
                 "all-linear", id="qwen2-subset"),
    pytest.param("qwen3", le.AdapterSpec(rank=4, alpha=8, seed=4, rank_pattern={"down_proj": 2},
                                         alpha_pattern={"q_proj": 3.0}), "all-linear", id="qwen3-rank-pattern"),
    pytest.param("llama", le.AdapterSpec(rank=3, alpha=6, seed=5, method="dora", layers=(1,)), "all-linear",
                 id="llama-dora-layer1"),
    pytest.param("qwen3", le.AdapterSpec(rank=2, alpha=4, seed=6, method="pissa", target_modules=("o_proj",)),
                 "all-linear", id="qwen3-pissa-as-converted-lora"),
    pytest.param("qwen3", le.AdapterSpec(rank=4, seed=7, method="vera", target_modules=("q_proj", "up_proj")),
                 "all-linear", id="qwen3-vera"),
]


def _engine(family, spec, targets="all-linear"):
    """One adapter with every tensor perturbed (B = 0 or d/b at init would make it a no-op)."""
    engine = le.MultiLoRAModel(tiny_model(family), [spec], target_modules=targets)
    randomize_b(engine, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in engine.bank.named_parameters_of(0).items():
            if not name.endswith(("lora_A0", "lora_B0")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return engine


def _ids(B=3, L=11, seed=0):
    return torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,spec,targets", SPECS)
def test_peft_loads_our_export_with_same_logits(tmp_path, family, spec, targets):
    engine = _engine(family, spec, targets)
    ids = _ids()
    with torch.no_grad():
        ours = engine(ids, adapter_ids=torch.zeros(3, dtype=torch.long)).logits
    engine.save_adapter(0, tmp_path, base_model_name="tiny-test")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an unknown config key would warn here
        pm = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path))
    adapted = sorted(n.split("base_model.model.", 1)[1] for n, m in pm.named_modules()
                     if "default" in getattr(m, "lora_A", getattr(m, "vera_lambda_d", {})))
    assert adapted == engine.bank.modules_of(0), "PEFT adapted other modules than ours"
    with torch.no_grad():
        theirs = pm(ids).logits
    assert_close(theirs, ours, torch.float32, "PEFT logits on our export")


def test_config_holds_only_lora_config_fields(tmp_path):
    engine = _engine("qwen3", le.AdapterSpec(rank=4, lr=3e-4, seed=7, name="a"))
    engine.save_adapter(0, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    lc = peft.LoraConfig(**cfg)  # a key LoraConfig does not know would raise TypeError
    assert lc.r == 4 and lc.lora_alpha == 32 and not lc.use_rslora
    assert "lora_engine" not in cfg
    side = json.loads((tmp_path / "lora_engine.json").read_text())
    assert side["spec"]["lr"] == 3e-4 and side["spec"]["name"] == "a"


@pytest.mark.parametrize("family,peft_kw", [
    pytest.param("qwen3", dict(r=4, lora_alpha=8, target_modules="all-linear"), id="qwen3-all-linear"),
    pytest.param("llama", dict(r=5, lora_alpha=10, target_modules=["q_proj", "down_proj"], use_rslora=True),
                 id="llama-rslora-subset"),
    pytest.param("qwen2", dict(r=3, lora_alpha=6, target_modules=["k_proj"], layers_to_transform=[1]),
                 id="qwen2-one-layer"),
    pytest.param("qwen3", dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2},
                               alpha_pattern={"layers.1.mlp.up_proj": 2}), id="qwen3-rank-alpha-pattern"),
    pytest.param("qwen3", dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], use_dora=True),
                 id="qwen3-dora"),
    pytest.param("llama", dict(peft_type="VERA", r=4, target_modules=["q_proj", "up_proj"],
                               projection_prng_key=3, save_projection=True), id="llama-vera"),
])
def test_we_load_peft_adapter_with_same_logits(tmp_path, family, peft_kw):
    torch.manual_seed(0)
    kw = dict(peft_kw)
    if kw.pop("peft_type", "LORA") == "VERA":
        cfg = peft.VeraConfig(vera_dropout=0.0, **kw)
    else:
        cfg = peft.LoraConfig(lora_dropout=0.0, **kw)
    pm = peft.get_peft_model(tiny_model(family), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(tmp_path))
    ids = _ids(seed=1)
    with torch.no_grad():
        theirs = pm(ids).logits
    engine = le.MultiLoRAModel(tiny_model(family), [le.AdapterSpec(rank=1, seed=9)])
    i = engine.load_adapter(tmp_path)
    assert i == 1 and engine.adapter_spec(i).rank == peft_kw["r"]
    assert engine.adapter_spec(i).method == ("dora" if peft_kw.get("use_dora") else
                                             "vera" if peft_kw.get("peft_type") == "VERA" else "lora")
    with torch.no_grad():
        ours = engine(ids, adapter_ids=torch.full((3,), i)).logits
    assert_close(ours, theirs, torch.float32, "our logits on a PEFT adapter")


def test_round_trip_keeps_spec_and_weights(tmp_path):
    spec = le.AdapterSpec(rank=4, alpha=8, scaling="rslora", seed=11, lr=1e-3, lora_plus_ratio=4.0, name="x",
                          target_modules=("q_proj", "o_proj"))
    engine = _engine("qwen3", spec)
    peft_format.save_adapter(engine, 0, tmp_path)
    j = engine.load_adapter(tmp_path)
    assert engine.adapter_spec(j) == spec
    a, b = engine.bank.named_parameters_of(0), engine.bank.named_parameters_of(j)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_old_directory_with_spec_inside_config_loads(tmp_path):
    spec = le.AdapterSpec(rank=2, seed=4, lr=5e-4)
    engine = _engine("qwen3", spec)
    engine.save_adapter(0, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_engine"] = json.loads((tmp_path / "lora_engine.json").read_text())["spec"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "lora_engine.json").unlink()
    assert engine.adapter_spec(engine.load_adapter(tmp_path)) == spec


def test_load_into_engine_with_fewer_default_targets(tmp_path):
    """A spec saved with target_modules=None ('the engine's targets') still loads into an engine
    whose targets are wider: the modules in the file decide."""
    small = _engine("qwen3", le.AdapterSpec(rank=2), targets=["q_proj", "v_proj"])
    small.save_adapter(0, tmp_path)
    wide = le.MultiLoRAModel(tiny_model("qwen3"), [], target_modules="all-linear")
    i = wide.load_adapter(tmp_path)
    assert sorted(wide.bank.named_parameters_of(i)) == sorted(small.bank.named_parameters_of(0))
    ids = _ids(seed=2)
    with torch.no_grad():
        assert_close(wide(ids, adapter_ids=torch.full((3,), i)).logits,
                     small(ids, adapter_ids=torch.zeros(3, dtype=torch.long)).logits, torch.float32, "logits")


# --- errors ------------------------------------------------------------------------------------

def _peft_dir(tmp_path, **cfg_overrides):
    """A PEFT-made all-linear r=2 adapter directory, config fields overridden."""
    pm = peft.get_peft_model(tiny_model("qwen3"), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    pm.save_pretrained(str(tmp_path))
    if cfg_overrides:
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg.update(cfg_overrides)
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("overrides,needle", [
    pytest.param(dict(init_lora_weights="pissa"), "path_initial_model_for_weight_conversion", id="pissa-residual"),
    pytest.param(dict(fan_in_fan_out=True), "Conv1D", id="fan-in-fan-out"),
    pytest.param(dict(bias="all"), "bias", id="bias"),
    pytest.param(dict(modules_to_save=["lm_head"]), "modules_to_save", id="modules-to-save"),
    pytest.param(dict(peft_type="PREFIX_TUNING"), "PREFIX_TUNING.*not supported", id="not-supported-type"),
])
def test_unsupported_peft_features_are_clear_errors(tmp_path, overrides, needle):
    d = _peft_dir(tmp_path, **overrides)
    engine = le.MultiLoRAModel(tiny_model("qwen3"), [])
    with pytest.raises(ValueError, match=needle):
        engine.load_adapter(d)
    assert engine.adapter_ids == []


def test_rank_pattern_inconsistent_with_tensors_is_clear_error(tmp_path):
    d = _peft_dir(tmp_path, rank_pattern={"q_proj": 3})
    engine = le.MultiLoRAModel(tiny_model("qwen3"), [])
    with pytest.raises(ValueError, match="shape"):
        engine.load_adapter(d)
    assert engine.adapter_ids == []


def test_full_fine_tuning_round_trips_without_peft_config(tmp_path):
    engine = _engine("qwen3", le.AdapterSpec(rank=1, method="full", target_modules=("o_proj",)))
    engine.save_adapter(0, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    j = engine.load_adapter(tmp_path)
    a, b = engine.bank.named_parameters_of(0), engine.bank.named_parameters_of(j)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_target_module_is_clear_error(tmp_path):
    d = _peft_dir(tmp_path)
    engine = le.MultiLoRAModel(tiny_model("qwen3"), [], target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="not LoRA-wrapped"):
        engine.load_adapter(d)
    assert engine.adapter_ids == []


def test_mismatched_base_is_clear_error(tmp_path):
    engine = _engine("qwen3", le.AdapterSpec(rank=2))
    engine.save_adapter(0, tmp_path)
    cfg = transformers.Qwen3Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    bigger = le.MultiLoRAModel(transformers.AutoModelForCausalLM.from_config(cfg), [le.AdapterSpec(rank=1)])
    with pytest.raises(ValueError, match="another base model"):
        bigger.load_adapter(tmp_path)
    assert bigger.adapter_ids == [0]
    with pytest.raises(ValueError, match="another base model"):
        peft_format.load_adapter_weights(bigger, 0, tmp_path)


def test_pickle_is_never_read(tmp_path):
    d = _peft_dir(tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    engine = le.MultiLoRAModel(tiny_model("qwen3"), [])
    with pytest.raises(ValueError, match="pickle"):
        engine.load_adapter(d)


def test_foreign_tensor_key_is_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _peft_dir(tmp_path)
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 97)
    save_file(t, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA/DoRA/VeRA weight"):
        le.MultiLoRAModel(tiny_model("qwen3"), []).load_adapter(d)


# --- vLLM: rank mapping and directory validity -------------------------------------------------

@pytest.mark.parametrize("ranks,expected", [
    pytest.param([1], 8, id="r1->8"), pytest.param([8], 8, id="r8"), pytest.param([1, 9], 16, id="r9->16"),
    pytest.param([33, 4], 64, id="r33->64"), pytest.param([300], 320, id="r300->320"),
    pytest.param([321, 2], 512, id="r321->512"), pytest.param([512], 512, id="r512"),
])
def test_vllm_max_lora_rank(ranks, expected):
    assert le_vllm.vllm_max_lora_rank(ranks) == expected


@pytest.mark.parametrize("ranks", [[513], [], [0]])
def test_vllm_max_lora_rank_errors(ranks):
    with pytest.raises(ValueError):
        le_vllm.vllm_max_lora_rank(ranks)


def test_exported_adapters_are_valid_lora_request_dirs(tmp_path):
    engine = le.MultiLoRAModel(tiny_model("qwen3"), [le.AdapterSpec(rank=1), le.AdapterSpec(rank=12, alpha=24.5),
                                                     le.AdapterSpec(rank=4, scaling="rslora",
                                                                    target_modules=("q_proj",))])
    dirs = le_vllm.export_adapters(engine, tmp_path, base_model_name="tiny")
    assert sorted(dirs) == [0, 1, 2]
    max_rank = le_vllm.vllm_max_lora_rank([engine.adapter_spec(i).rank for i in dirs])
    assert max_rank == 16
    for i, d in dirs.items():
        cfg = le_vllm.check_lora_request_dir(d, max_lora_rank=max_rank)
        assert cfg["r"] == engine.adapter_spec(i).rank
    with pytest.raises(ValueError, match="max_lora_rank"):
        le_vllm.check_lora_request_dir(dirs[1], max_lora_rank=8)


@pytest.mark.parametrize("spec,rank", [
    pytest.param(le.AdapterSpec(rank=4, rank_pattern={"q_proj": 12}), 12, id="rank-pattern"),
    pytest.param(le.AdapterSpec(rank=4, method="pissa"), 8, id="pissa-2r"),
    pytest.param(le.AdapterSpec(rank=4, method="dora"), None, id="dora"),
])
def test_served_rank(spec, rank):
    if rank is None:
        with pytest.raises(ValueError, match="vLLM"):
            le_vllm.served_rank(spec)
    else:
        assert le_vllm.served_rank(spec) == rank


def test_lora_request_dir_check_rejects_bad_dirs(tmp_path):
    d = _peft_dir(tmp_path / "a", use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        le_vllm.check_lora_request_dir(d, max_lora_rank=8)
    d = _peft_dir(tmp_path / "b", rank_pattern={"q_proj": 16})
    with pytest.raises(ValueError, match="max_lora_rank"):
        le_vllm.check_lora_request_dir(d, max_lora_rank=8)
    with pytest.raises(ValueError, match="adapter_config.json"):
        le_vllm.check_lora_request_dir(tmp_path / "missing", max_lora_rank=8)


def test_vllm_accepts_exported_dir(tmp_path):
    pytest.importorskip("vllm")
    from vllm.config import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    engine = _engine("qwen3", le.AdapterSpec(rank=12))
    engine.save_adapter(0, tmp_path)
    helper = PEFTHelper.from_local_dir(str(tmp_path), max_position_embeddings=128)
    helper.validate_legal(LoRAConfig(max_lora_rank=le_vllm.vllm_max_lora_rank([12])))


def test_vllm_top_p_log_probs_are_recomputed_over_the_full_distribution():
    """vLLM renormalises processed log-probs over the nucleus when top_p < 1: VLLMRollout refuses
    to return them without an engine, and recompute_sampling_logp gives the temperature-scaled
    log-probs rollout.generate reports."""
    from lora_engine.rl.rollout import generate

    engine = le.MultiLoRAModel(tiny_model("qwen3"), [le.AdapterSpec(rank=2, seed=0), le.AdapterSpec(rank=4, seed=1)])
    with torch.no_grad():
        for p in engine.bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ro = generate(engine, [[5, 6, 7], [8, 9]], [0, 1], eos_id=1, pad_id=0, max_new_tokens=5, temperature=0.7,
                  top_p=0.8, seeds={0: 1, 1: 2})
    got = le_vllm.recompute_sampling_logp(engine, ro, temperature=0.7)
    mask = ro.completion_mask.bool()
    assert_close(got[mask], ro.sampling_logp[mask], torch.float32, "sampling log-probs")
    assert bool((got[~mask] == 0).all())
    rollout = le_vllm.VLLMRollout.__new__(le_vllm.VLLMRollout)  # no vLLM here: the check comes first
    rollout.requests = {0: object()}
    with pytest.raises(ValueError, match="renormalised over the nucleus"):
        rollout.generate([[5]], [0], eos_id=1, pad_id=0, max_new_tokens=2, top_p=0.9)
