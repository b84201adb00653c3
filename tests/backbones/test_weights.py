"""Weights (docs/backbones.md): official layouts built from tiny random timm models by the inverse mapping, wrapped and
prefixed variants, round trips, offline errors, mismatch suggestions and safe reading."""

import argparse
import fractions
import socket

import pytest
import timm
import torch

from dinokit.backbones import CheckpointMismatchError, WeightsUnavailableError, load_backbone
from dinokit.backbones.weights import CheckpointReadError, shape_summary

TINY = ["tiny_dino", "tiny_dinov2", "tiny_dinov2_reg", "tiny_dinov3"]


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (layer scales, q/v biases, position tables)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def source(name: str, **model_kwargs):
    bb = load_backbone(name, weights="random", model_kwargs=model_kwargs or None).eval()
    _randomize(bb.model)
    return bb


def to_official(bb) -> dict[str, torch.Tensor]:
    """Inverse of timm's converters: the official DINO / DINOv2 / DINOv3 layout of a tiny timm model."""
    sd = {k: v.clone() for k, v in bb.model.state_dict().items()}
    D = bb.embed_dim
    g = torch.Generator().manual_seed(2)
    if bb.family == "dinov2":
        sd["mask_token"] = torch.randn(1, D, generator=g)
        if bb.arch.startswith("vit_giant"):  # packed SwiGLU: official w12 / w3
            sd = {k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3."): v for k, v in sd.items()}
        if "reg_token" in sd:
            sd["register_tokens"] = sd.pop("reg_token")
            pe0 = torch.randn(1, 1, D, generator=g)
            sd["pos_embed"] = torch.cat([pe0, sd["pos_embed"]], dim=1)
            with torch.no_grad():  # the source model holds timm's folded token cls + pe0
                bb.model.cls_token.copy_(sd["cls_token"] + pe0)
    elif bb.family == "dinov3":
        out = {}
        for k, v in sd.items():
            if k.endswith("attn.q_bias"):
                pre = k[: -len("q_bias")]
                kb = torch.randn(v.shape, generator=g)  # masked by bias_mask: any value
                out[pre + "qkv.bias"] = torch.cat([v, kb, sd[pre + "v_bias"]])
                out[pre + "qkv.bias_mask"] = torch.cat([torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)])
            elif k.endswith("attn.v_bias"):
                continue
            else:
                k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
                k = k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
                if "mlp.w1." in k or "mlp.w2." in k or any("fc1_g" in j for j in sd):
                    k = k.replace("mlp.fc2.", "mlp.w3.")  # SwiGLU (ViT-S+, H+): w1, w2, w3
                out[k.replace("reg_token", "storage_tokens")] = v
        dh = D // bb.num_heads
        out["rope_embed.periods"] = 100.0 ** (2 * torch.arange(dh // 4) / (dh // 2))
        out["mask_token"] = torch.randn(1, D, generator=g)
        sd = out
    return sd


def same_features(a, b, x, atol=1e-6) -> None:
    fa, fb = a.forward_features(x), b.forward_features(x)
    torch.testing.assert_close(fa.patch, fb.patch, atol=atol, rtol=0)
    torch.testing.assert_close(fa.cls, fb.cls, atol=atol, rtol=0)
    torch.testing.assert_close(fa.registers, fb.registers, atol=atol, rtol=0)


def sizes(bb):
    p = bb.patch_size
    return [torch.randn(1, 3, 4 * p, 4 * p), torch.randn(1, 3, 3 * p, 5 * p)]


@pytest.mark.parametrize("name", TINY)
def test_official_layout_loads_and_matches(name, tmp_path, caplog):
    src = source(name)
    sd = to_official(src)
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    bb = load_backbone(name, weights=str(path)).eval()  # strict: raises on any missing/unexpected key
    for x in sizes(src):
        same_features(src, bb, x)
    info = bb.weights_info
    assert info["source"] == "file" and info["layout"] == {"tiny_dino": "dino"}.get(name, src.family)
    assert len(info["sha256"]) == 64 and info["which"] == "teacher"
    if src.family != "dino":
        assert any("mask_token" in d for d in info["dropped"])
        assert torch.equal(bb.kept_tensors["mask_token"], sd["mask_token"])
    if src.family == "dinov3":
        assert any("bias_mask" in d or "blocks" in d for d in info["dropped"])
        assert any("eva.checkpoint_filter_fn" in c for c in info["conversions"])


SWIGLU = {"vit_giant_patch14_dinov2": dict(embed_dim=48, depth=2, num_heads=2, img_size=56),
          "vit_small_plus_patch16_dinov3_qkvb": dict(embed_dim=64, depth=2, num_heads=4, img_size=64)}


@pytest.mark.parametrize("arch", list(SWIGLU))
def test_official_swiglu_layouts(arch, tmp_path):
    src = source(arch, **SWIGLU[arch])
    sd = to_official(src)
    assert any(".mlp.w3." in k for k in sd)
    torch.save(sd, tmp_path / "official.pth")
    bb = load_backbone(arch, weights=str(tmp_path / "official.pth"), model_kwargs=SWIGLU[arch]).eval()
    for x in sizes(src):
        same_features(src, bb, x)
    if src.family == "dinov2":  # ViT-g official export writes w12 / w3 back
        bb.export(tmp_path / "out.pth", format="official")
        sd2 = torch.load(tmp_path / "out.pth", weights_only=True)
        assert set(sd2) == set(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def test_wrapped_variants_pick_the_right_group(tmp_path):
    src = source("tiny_dinov2")
    other = source("tiny_dinov2")
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(-1)
    sd, sd_other = to_official(src), to_official(other)
    head = {"head.mlp.0.weight": torch.randn(4, 4), "head.last_layer.weight": torch.randn(3, 4)}
    chunked = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v for k, v in sd.items()}
    variants = {
        "teacher": ({"teacher": {**_prefixed(sd, "backbone."), **head}, "epoch": 3,
                     "args": argparse.Namespace(arch="vit_small")}, {}, src),
        "student": ({"student": {**_prefixed(sd, "module.backbone."), "module.head.x": torch.ones(2)}},
                    {"which": "student"}, src),
        "lightning_teacher": ({"state_dict": {**_prefixed(sd_other, "model."), **_prefixed(sd, "teacher.")},
                               "epoch": 1, "hyper_parameters": {"lr": 0.1}}, {}, src),
        "lightning_student": ({"state_dict": {**_prefixed(sd_other, "model."), **_prefixed(sd, "teacher.")}},
                              {"which": "student"}, other),
        "model": ({"model": _prefixed(sd, "_orig_mod.")}, {}, src),
        "chunked": ({"teacher": _prefixed(chunked, "backbone.")}, {}, src),
        "key": ({"weights": {"nested": 1}, "ema": sd}, {"key": "ema"}, src),
    }
    x = sizes(src)[1]
    for label, (obj, opts, expected) in variants.items():
        path = tmp_path / f"{label}.pth"
        torch.save(obj, path)
        bb = load_backbone("tiny_dinov2", weights=str(path), **opts).eval()
        same_features(expected, bb, x)
        if label == "teacher":
            assert any(d.startswith("head") for d in bb.weights_info["dropped"]), bb.weights_info["dropped"]
        if label == "lightning_student":
            assert bb.weights_info["which"] == "student"


def test_no_state_dict_lists_top_level_keys(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "notes": {"a": 1}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"top-level keys: \['epoch', 'notes'\]"):
        load_backbone("tiny_dino", weights=str(path))


@pytest.mark.parametrize("name", ["tiny_dino", "tiny_dinov2", "tiny_dinov2_reg"])
def test_official_round_trip(name, tmp_path):
    src = source(name)
    sd = to_official(src)
    torch.save(sd, tmp_path / "in.pth")
    bb = load_backbone(name, weights=str(tmp_path / "in.pth")).eval()
    out = bb.export(tmp_path / "out.pth", format="official")
    sd2 = torch.load(out, weights_only=True)
    assert set(sd2) == set(sd)
    for k in sd:
        assert sd2[k].shape == sd[k].shape, k
        if name.endswith("reg") and k in ("cls_token", "pos_embed"):
            continue
        assert torch.equal(sd2[k], sd[k]), k
    if name.endswith("reg"):
        torch.testing.assert_close(sd2["cls_token"] + sd2["pos_embed"][:, :1], sd["cls_token"] + sd["pos_embed"][:, :1],
                                   atol=1e-6, rtol=0)
        assert torch.equal(sd2["pos_embed"][:, 0], torch.zeros_like(sd2["pos_embed"][:, 0]))
        assert torch.equal(sd2["pos_embed"][:, 1:], sd["pos_embed"][:, 1:])
    again = load_backbone(name, weights=str(out)).eval()
    x = sizes(src)[1]
    assert torch.equal(again.forward_features(x).patch, bb.forward_features(x).patch)


@pytest.mark.parametrize("name", TINY + ["resnet10t"])
def test_dinokit_format_round_trip(name, tmp_path):
    src = load_backbone(name, weights="random").eval()
    path = src.export(tmp_path / "bb.safetensors")
    bb = load_backbone(weights=str(path)).eval()  # name read from the metadata
    assert bb.name == name and bb.weights_info["layout"] == "dinokit"
    a, b = src.model.state_dict(), bb.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 64, 64) if name == "resnet10t" else sizes(src)[1]
    assert torch.equal(src.forward_features(x).patch, bb.forward_features(x).patch)


def test_dinokit_export_keeps_mask_token_and_model_kwargs(tmp_path):
    src = source("tiny_dinov2")
    torch.save(to_official(src), tmp_path / "in.pth")
    bb = load_backbone("tiny_dinov2", weights=str(tmp_path / "in.pth"))
    bb.export(tmp_path / "a.safetensors")
    bb2 = load_backbone(weights=str(tmp_path / "a.safetensors"))
    assert torch.equal(bb2.kept_tensors["mask_token"], bb.kept_tensors["mask_token"])
    bb2.export(tmp_path / "b.pth", format="official")
    assert torch.equal(torch.load(tmp_path / "b.pth", weights_only=True)["mask_token"], bb.kept_tensors["mask_token"])
    kw = dict(embed_dim=32, depth=1, num_heads=2, img_size=32)
    t = load_backbone("vit_small_patch16_224", weights="random", model_kwargs=kw)
    t.export(tmp_path / "t.safetensors")
    assert load_backbone(weights=str(tmp_path / "t.safetensors")).depth == 1


def test_dinov3_official_export_raises(tmp_path):
    with pytest.raises(ValueError, match="dinokit"):
        load_backbone("tiny_dinov3", weights="random").export(tmp_path / "x.pth", format="official")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty HF cache and torch hub dir; any socket raises."""
    def guard(*a, **k):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", guard)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hf"


@pytest.mark.parametrize("how", ["argument", "env"])
def test_offline_empty_cache_gives_the_clear_error(no_network, monkeypatch, how):
    opts = {"offline": True} if how == "argument" else {}
    if how == "env":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("DINOKIT_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as e:
        load_backbone("dino_vits16", weights="pretrained", cache_dir=str(no_network), **opts)
    msg = str(e.value)
    for part in ("timm/vit_small_patch16_224.dino", "model.safetensors", "pytorch_model.bin", str(no_network),
                 "dino_deitsmall16_pretrain.pth", "hf download timm/vit_small_patch16_224.dino",
                 'weights="/path/to/dino_deitsmall16_pretrain.pth"', 'weights="random"', "dl.fbaipublicfiles.com"):
        assert part in msg, part


def test_dinov2_offline_error_names_torch_hub_file(no_network):
    with pytest.raises(WeightsUnavailableError, match="dinov2_vits14_reg4_pretrain.pth"):
        load_backbone("dinov2_vits14_reg", cache_dir=str(no_network), offline=True)


def test_failed_download_online_gives_the_clear_error(no_network, monkeypatch):
    import huggingface_hub

    def fail(*a, **k):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(WeightsUnavailableError, match="download failed.*no route to host"):
        load_backbone("dinov3_vits16", cache_dir=str(no_network), offline=False)


KW = dict(embed_dim=32, depth=2, num_heads=2)


def test_hf_cache_hit_is_loaded_without_network(no_network, tmp_path):
    from safetensors.torch import save_file

    src = load_backbone("vit_small_patch16_224", weights="random", model_kwargs=dict(KW, img_size=64)).eval()
    snap = no_network / "models--timm--vit_small_patch16_224.dino" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (no_network / "models--timm--vit_small_patch16_224.dino" / "refs").mkdir()
    (no_network / "models--timm--vit_small_patch16_224.dino" / "refs" / "main").write_text("abc123")
    save_file(src.model.state_dict(), str(snap / "model.safetensors"))
    bb = load_backbone("vit_small_patch16_224.dino", weights="pretrained", cache_dir=str(no_network), offline=True,
                       model_kwargs=KW).eval()
    info = bb.weights_info
    assert info["source"] == "hf-cache" and info["revision"] == "abc123"
    assert info["repo_id"] == "timm/vit_small_patch16_224.dino" and info["tag"] == "dino"
    assert bb.model.patch_embed.grid_size == (4, 4)  # img_size from the stored table
    same_features(src, bb, torch.randn(1, 3, 48, 80))
    by_tag = load_backbone("vit_small_patch16_224", weights="dino", cache_dir=str(no_network), offline=True,
                           model_kwargs=KW)
    assert by_tag.tag == "dino" and by_tag.weights_info["source"] == "hf-cache"


def test_tag_string_sets_normalisation(no_network):
    with pytest.raises(WeightsUnavailableError, match=r"timm vit_large_patch16_dinov3_qkvb\.sat493m"):
        load_backbone("dinov3_vitl16", weights="sat493m", cache_dir=str(no_network), offline=True)
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        load_backbone("dinov3_vitl16", weights="nope", cache_dir=str(no_network), offline=True)


def test_torch_hub_cache_hit(no_network, tmp_path):
    src = source("tiny_dino")
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(to_official(src), hub / "dino_deitsmall16_pretrain.pth")
    bb = load_backbone("dino_vits16", tag="dino", cache_dir=str(no_network), offline=True, model_kwargs=KW).eval()
    assert bb.weights_info["source"] == "torch-hub-cache" and bb.weights_info["layout"] == "dino"
    same_features(src, bb, torch.randn(1, 3, 64, 96))


def test_plain_dinov3_arch_refuses_nonzero_qv_bias(tmp_path):
    src = source("tiny_dinov3")
    torch.save(to_official(src), tmp_path / "v3.pth")
    with pytest.raises(CheckpointMismatchError, match="q/v biases.*_qkvb"):
        load_backbone("vit_small_patch16_dinov3", weights=str(tmp_path / "v3.pth"),
                      model_kwargs=dict(embed_dim=64, depth=2, num_heads=4, img_size=64))


def _shape_only_sd(arch: str) -> dict[str, torch.Tensor]:
    """The official DINOv2 state dict of ``arch`` with real shapes at almost no storage (stride-0 tensors)."""
    with torch.device("meta"):
        m = timm.create_model(arch, pretrained=False, num_classes=0)
    z = torch.zeros(())
    sd = {k: z.expand(v.shape) for k, v in m.state_dict().items()}
    D = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.zeros(1, D)
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = z.expand(1, sd["pos_embed"].shape[1] + 1, D)
    return sd


def test_mismatch_suggests_the_right_name(tmp_path):
    torch.save(_shape_only_sd("vit_base_patch14_dinov2"), tmp_path / "b.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_backbone("dinov2_vits14", weights=str(tmp_path / "b.pth"))
    msg = str(e.value)
    assert "768-wide, 12 blocks, p 14, no registers: this is `dinov2_vitb14`" in msg
    assert "shape mismatches" in msg and "layout: dinov2" in msg and "b.pth" in msg
    assert msg.count("checkpoint (") <= 10  # at most 10 keys of each kind are listed
    text, name = shape_summary(_shape_only_sd("vit_base_patch14_reg4_dinov2"))
    assert f"{text}: this is `{name}`" == "768-wide, 12 blocks, p 14, 4 registers: this is `dinov2_vitb14_reg`"
    assert shape_summary(_shape_only_sd("vit_giant_patch14_dinov2"))[1] == "dinov2_vitg14"


def test_register_weights_need_drop_registers(tmp_path):
    src = source("tiny_dinov2_reg")
    torch.save(to_official(src), tmp_path / "reg.pth")
    with pytest.raises(CheckpointMismatchError, match="(?s)unexpected keys.*register_tokens.*drop_registers=True"):
        load_backbone("tiny_dinov2", weights=str(tmp_path / "reg.pth"))
    bb = load_backbone("tiny_dinov2", weights=str(tmp_path / "reg.pth"), drop_registers=True)
    assert bb.num_registers == 0 and "register_tokens" in bb.weights_info["dropped"]


def test_shape_summary_of_tiny_models():
    text, name = shape_summary(to_official(source("tiny_dinov3")))
    assert text == "64-wide, 2 blocks, p 16, 4 registers" and name is None


def test_transformers_layout_refused(tmp_path):
    sd = {"embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 2, 2),
          "encoder.layer.0.attention.attention.query.weight": torch.zeros(4, 4)}
    torch.save(sd, tmp_path / "hf.bin")
    with pytest.raises(CheckpointMismatchError, match="transformers layout"):
        load_backbone("tiny_dino", weights=str(tmp_path / "hf.bin"))


def test_unknown_pickle_class_needs_trust(tmp_path):
    src = load_backbone("tiny_dino", weights="random")
    path = tmp_path / "full.pth"
    torch.save({"model": src.model.state_dict(), "best": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointReadError, match=r"fractions\.Fraction.*trust_checkpoint=True"):
        load_backbone("tiny_dino", weights=str(path))
    bb = load_backbone("tiny_dino", weights=str(path), trust_checkpoint=True)
    assert torch.equal(bb.model.pos_embed, src.model.pos_embed)


def test_lightning_checkpoint_loads_without_trust(tmp_path):
    src = load_backbone("tiny_dino", weights="random").eval()
    path = tmp_path / "last.ckpt"  # Lightning stores hyper-parameters as a plain dict
    torch.save({"state_dict": _prefixed(src.model.state_dict(), "model."), "epoch": 2, "global_step": 10,
                "hyper_parameters": {"lr": 0.1, "args": argparse.Namespace(x=1)}, "hparams_name": "kwargs"}, path)
    bb = load_backbone("tiny_dino", weights=str(path), which="student").eval()
    same_features(src, bb, torch.randn(1, 3, 32, 48))


def test_unrebuildable_objects_need_trust(tmp_path):
    import collections

    path = tmp_path / "sub.pth"
    torch.save({"model": collections.UserDict(a=1), "x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointReadError, match="sub.pth.*trust_checkpoint=True"):
        load_backbone("tiny_dino", weights=str(path))


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", "truncated"])
def test_unreadable_files_are_named(content, tmp_path):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        torch.save(load_backbone("tiny_dino", weights="random").model.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointReadError, match="bad.pth"):
        load_backbone("tiny_dino", weights=str(path))
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointReadError, match="bad.safetensors"):
        load_backbone("tiny_dino", weights=str(st))


def test_missing_file_and_random_recorded(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone("tiny_dino", weights=str(tmp_path / "nope.pth"))
    bb = load_backbone("tiny_dino", weights="random")
    assert bb.weights_info["source"] == "random" and bb.weights_info["name"] == "tiny_dino"
    with pytest.raises(ValueError, match="test-only"):
        load_backbone("tiny_dino", weights="pretrained")
