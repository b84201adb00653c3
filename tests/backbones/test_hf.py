"""Hugging Face transformers DINOv2 / DINOv2-with-registers / DINOv3 checkpoints through ``load_backbone``.

Tiny random transformers models are saved with ``save_pretrained`` and loaded into tiny timm architectures; the
CLS, register and patch tokens must equal transformers' own ``last_hidden_state`` (after its final layernorm,
token order [CLS, registers, patches]).
"""

import json
import socket

import pytest
import torch
from safetensors.torch import save_file

from dinokit.backbones import CheckpointMismatchError, WeightsUnavailableError, load_backbone

transformers = pytest.importorskip("transformers")

D2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56)  # tiny_dinov2
D3 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, patch_size=16,
          image_size=64, num_register_tokens=4)  # tiny_dinov3


def randomise(model, skip=()):
    """Every parameter random (norm weights around 1), so a swapped or missed tensor changes the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in skip):
                continue
            if "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def hf_model(kind: str, **over):
    cfg = {"dinov2": (transformers.Dinov2Config, transformers.Dinov2Model, D2),
           "dinov2_reg": (transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel,
                          dict(D2, num_register_tokens=4)),
           "dinov3": (transformers.DINOv3ViTConfig, transformers.DINOv3ViTModel, D3)}[kind]
    return randomise(cfg[1](cfg[0](**dict(cfg[2], **over))))


def assert_same_tokens(hf, bb, H, W, tol=1e-5):
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        f = bb.eval().forward_features(x)
    R = bb.num_registers
    assert ref.shape[1] == 1 + R + f.patch.shape[1] * f.patch.shape[2]
    torch.testing.assert_close(f.cls, ref[:, 0], atol=tol, rtol=0)
    torch.testing.assert_close(f.registers, ref[:, 1:1 + R], atol=tol, rtol=0)
    torch.testing.assert_close(f.patch.flatten(1, 2), ref[:, 1 + R:], atol=tol, rtol=0)


@pytest.mark.parametrize("kind,name,sizes", [
    ("dinov2", "tiny_dinov2", [(56, 56)]),
    ("dinov2_reg", "tiny_dinov2_reg", [(56, 56)]),
    ("dinov3", "tiny_dinov3", [(64, 64), (48, 80)]),  # RoPE: any grid matches
])
def test_tokens_equal_transformers(tmp_path, kind, name, sizes):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "m")
    bb = load_backbone(name, weights=str(tmp_path / "m"))
    for H, W in sizes:
        assert_same_tokens(hf, bb, H, W)
    info = bb.weights_info
    assert info["source"] == "file" and info["path"] == str(tmp_path / "m" / "model.safetensors")
    assert info["hf_model_type"] == hf.config.model_type and info["hf_config"]["hidden_size"] == hf.config.hidden_size
    assert info["conversions"][0].startswith(f"transformers {hf.config.model_type} -> official")
    assert info["layout"] == ("dinov3" if kind == "dinov3" else "dinov2") and "mask_token" in info["dropped"]
    assert ("RoPE" if kind == "dinov3" else "pos_interp") in info["interpolation"]
    if kind != "dinov3":  # the DINOv2 mask token is kept aside for the official export
        torch.testing.assert_close(bb.kept_tensors["mask_token"], hf.embeddings.mask_token, atol=0, rtol=0)
        assert bb.model.patch_embed.grid_size == (4, 4)  # built at the stored grid: no resampling at load


def test_current_transformers_names_and_weights_file(tmp_path):
    """``state_dict()`` names of current transformers (q_proj/o_proj, ``model.layer.``) and a weights-file path."""
    hf = hf_model("dinov3")
    (tmp_path / "m").mkdir()
    hf.config.to_json_file(str(tmp_path / "m" / "config.json"))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "m" / "model.safetensors"))
    assert any(k.startswith("model.layer.0.attention.q_proj") for k in hf.state_dict())
    bb = load_backbone("tiny_dinov3", weights=str(tmp_path / "m" / "model.safetensors"))
    assert_same_tokens(hf, bb, 32, 48)


def test_swiglu_and_gated_mlps(tmp_path):
    g = hf_model("dinov2", hidden_size=48, image_size=28, use_swiglu_ffn=True)  # ViT-g MLP: weights_in/weights_out
    g.save_pretrained(tmp_path / "g")
    bb = load_backbone("vit_giant_patch14_dinov2", weights=str(tmp_path / "g"),
                       model_kwargs=dict(embed_dim=48, depth=2, num_heads=2))
    assert_same_tokens(g, bb, 28, 28)
    p = hf_model("dinov3", use_gated_mlp=True, hidden_act="silu")  # DINOv3 S+/H+: gate/up/down
    p.save_pretrained(tmp_path / "p")
    bb = load_backbone("vit_small_plus_patch16_dinov3_qkvb", weights=str(tmp_path / "p"),
                       model_kwargs=dict(embed_dim=64, depth=2, num_heads=4))
    assert_same_tokens(p, bb, 32, 48)


def test_classification_head_dropped_and_bin_file(tmp_path):
    hf = randomise(transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**D2, num_labels=3)))
    (tmp_path / "m").mkdir()
    hf.config.to_json_file(str(tmp_path / "m" / "config.json"))
    torch.save(hf.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    bb = load_backbone("tiny_dinov2", weights=str(tmp_path / "m"))
    assert_same_tokens(hf.dinov2, bb, 56, 56)
    assert "classifier.* (2 tensors)" in bb.weights_info["dropped"]
    assert bb.weights_info["conversions"][0].startswith("base model 'dinov2.'")


def test_sharded_checkpoint(tmp_path):
    hf = hf_model("dinov2_reg")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    keys = sorted(sd)
    (tmp_path / "m").mkdir()
    hf.config.to_json_file(str(tmp_path / "m" / "config.json"))
    parts = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for f, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / "m" / f))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    bb = load_backbone("tiny_dinov2_reg", weights=str(tmp_path / "m"))
    assert_same_tokens(hf, bb, 56, 56)


# ---------------------------------------------------------------------------------------------------- repo ids
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    def guard(*a, **k):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", guard)
    return tmp_path / "hf"


def fake_cache(cache, repo: str, rev: str, model) -> None:
    """The huggingface_hub cache layout: models--<owner>--<name>/{refs/main, snapshots/<rev>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    model.save_pretrained(root / "snapshots" / rev)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)


@pytest.mark.parametrize("how", ["cache_dir", "HF_HUB_CACHE"])
def test_repo_id_found_in_the_cache(no_network, monkeypatch, how):
    hf = hf_model("dinov2_reg")
    fake_cache(no_network, "facebook/dinov2-with-registers-tiny", "c0ffee", hf)
    opts = {"cache_dir": str(no_network)}
    if how == "HF_HUB_CACHE":
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_CACHE", str(no_network))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(no_network))
        opts = {}
    bb = load_backbone("tiny_dinov2_reg", weights="facebook/dinov2-with-registers-tiny", offline=True, **opts)
    assert_same_tokens(hf, bb, 56, 56)
    info = bb.weights_info
    assert info["source"] == "hf-cache" and info["revision"] == "c0ffee" and info["file"] == "model.safetensors"
    assert info["repo_id"] == "facebook/dinov2-with-registers-tiny"


def test_repo_id_offline_nothing_cached(no_network):
    with pytest.raises(WeightsUnavailableError) as e:
        load_backbone("dinov2_vits14", weights="facebook/dinov2-small", cache_dir=str(no_network), offline=True)
    msg = str(e.value)
    for part in ("facebook/dinov2-small", str(no_network), "config.json", "model.safetensors", "pytorch_model.bin",
                 "offline mode and nothing found in the cache", "hf download facebook/dinov2-small",
                 'weights="/path/to/folder"', 'weights="random"'):
        assert part in msg, part
    assert isinstance(e.value, FileNotFoundError)


def test_repo_id_config_cached_but_no_weights(no_network):
    root = no_network / "models--facebook--dinov2-small"
    (root / "snapshots" / "r1").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("r1")
    transformers.Dinov2Config(**D2).to_json_file(str(root / "snapshots" / "r1" / "config.json"))
    with pytest.raises(WeightsUnavailableError, match="config.json but none of model.safetensors"):
        load_backbone("tiny_dinov2", weights="facebook/dinov2-small", cache_dir=str(no_network), offline=True)


def test_repo_id_failed_download(no_network, monkeypatch):
    import huggingface_hub

    def fail(*a, **k):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(WeightsUnavailableError, match="download failed.*config.json: OSError: no route to host"):
        load_backbone("dinov2_vits14", weights="facebook/dinov2-small", cache_dir=str(no_network), offline=False)


def test_missing_local_path_is_not_a_repo_id(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        load_backbone("tiny_dinov2", weights=str(tmp_path / "runs" / "model"))
    assert not isinstance(e.value, WeightsUnavailableError)


# ---------------------------------------------------------------------------------------------------- checks
def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value,shown", [
    ("hidden_size", 48, "hidden_size=48 but the weights hold 32"),
    ("num_hidden_layers", 3, "num_hidden_layers=3 but the weights hold 2"),
    ("patch_size", 7, r"patch_size=\(7, 7\) but the weights hold \(14, 14\)"),
    ("num_register_tokens", 2, "num_register_tokens=2 but the weights hold 4"),
    ("image_size", 112, r"image_size=112 \(64 positions\) but the weights hold 16 positions"),
])
def test_config_against_weights_names_the_field(tmp_path, field, value, shown):
    hf_model("dinov2_reg").save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", **{field: value})
    with pytest.raises(ValueError, match=shown):
        load_backbone("tiny_dinov2_reg", weights=str(tmp_path / "m"))


def test_architecture_mismatch_of_shapes_is_refused(tmp_path):
    hf_model("dinov2_reg").save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointMismatchError, match="(?s)does not fit tiny_dinov2 .*register_tokens"):
        load_backbone("tiny_dinov2", weights=str(tmp_path / "m"))
    hf_model("dinov3", hidden_size=32, num_attention_heads=2, intermediate_size=128).save_pretrained(tmp_path / "w")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_backbone("tiny_dinov3", weights=str(tmp_path / "w"))


@pytest.mark.parametrize("kind,over,field", [
    ("dinov2", dict(num_attention_heads=4), "num_attention_heads"),
    ("dinov2", dict(layer_norm_eps=1e-5), "layer_norm_eps"),
    ("dinov2", dict(hidden_act="gelu_pytorch_tanh"), "hidden_act"),
    ("dinov3", dict(rope_theta=10000.0), "rope_theta"),
])
def test_check_architecture_names_the_field(tmp_path, kind, over, field):
    """Fields no tensor shape shows (heads, eps, activation, RoPE base) against the created timm model."""
    import timm

    from dinokit.backbones.hf import check_architecture, read_config

    hf_model(kind, **over).save_pretrained(tmp_path / "m")
    cfg = read_config(tmp_path / "m" / "config.json")
    spec = {"dinov2": ("vit_small_patch14_dinov2", dict(embed_dim=32, depth=2, num_heads=2, img_size=56)),
            "dinov3": ("vit_small_patch16_dinov3_qkvb", dict(embed_dim=64, depth=2, num_heads=4))}[kind]
    model = timm.create_model(spec[0], pretrained=False, **spec[1])
    with pytest.raises(ValueError, match=f"transformers config {field}=.* does not match the architecture"):
        check_architecture(cfg, model, "m", spec[0])
    hf_model(kind).config.to_json_file(str(tmp_path / "ok.json"))
    check_architecture(read_config(tmp_path / "ok.json"), model, "ok", spec[0])  # the matching config passes


def test_head_count_mismatch_is_refused_by_load_backbone(tmp_path):
    hf_model("dinov2", num_attention_heads=4).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_backbone("tiny_dinov2", weights=str(tmp_path / "m"))


def test_nonzero_key_bias_is_refused_zero_key_bias_loads(tmp_path):
    hf_model("dinov3", key_bias=True).save_pretrained(tmp_path / "k")
    with pytest.raises(CheckpointMismatchError, match="non-zero, unmasked key bias"):
        load_backbone("tiny_dinov3", weights=str(tmp_path / "k"))
    zero = hf_model("dinov3", key_bias=True, query_bias=False)
    torch.nn.init.zeros_(zero.model.layer[0].attention.k_proj.bias)
    torch.nn.init.zeros_(zero.model.layer[1].attention.k_proj.bias)
    zero.save_pretrained(tmp_path / "z")
    bb = load_backbone("tiny_dinov3", weights=str(tmp_path / "z"))
    assert_same_tokens(zero, bb, 64, 64)
    assert "no q projection bias: zeros in attn.qkv.bias" in bb.weights_info["conversions"]


def test_unsupported_model_type_and_unknown_keys(tmp_path):
    hf_model("dinov2").save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", model_type="vit")
    with pytest.raises(ValueError, match="model_type 'vit' is not supported"):
        load_backbone("tiny_dinov2", weights=str(tmp_path / "m"))
    hf = hf_model("dinov2")
    (tmp_path / "u").mkdir()
    hf.config.to_json_file(str(tmp_path / "u" / "config.json"))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd["encoder.layer.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "u" / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"no DINOv2 mapping \(1\): encoder.layer.0.extra.weight"):
        load_backbone("tiny_dinov2", weights=str(tmp_path / "u"))


def test_folder_without_transformers_config_is_read_as_its_file(tmp_path):
    src = load_backbone("tiny_dinov2", weights="random").eval()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2"}))  # timm
    save_file(src.model.state_dict(), str(tmp_path / "t" / "model.safetensors"))
    bb = load_backbone("tiny_dinov2", weights=str(tmp_path / "t")).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_features(x).patch, src.forward_features(x).patch, atol=0, rtol=0)
    assert bb.weights_info["layout"] == "timm" and bb.weights_info["source"] == "file"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without any of model.safetensors"):
        load_backbone("tiny_dinov2", weights=str(tmp_path / "empty"))
