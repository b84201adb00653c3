"""Short names of the DINO family and test-only tiny models, mapped to timm architectures."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: timm ``arch``, default ``tag``, ``family`` and creation overrides."""

    arch: str
    tag: str | None
    family: str  # dino | dinov2 | dinov3 | resnet
    default_input_size: int
    kwargs: dict = field(default_factory=dict)
    random_only: bool = False


def _dinov2(size: str) -> dict[str, ModelSpec]:
    out = {}
    for reg in (False, True):
        arch = f"vit_{size}_patch14_{'reg4_' if reg else ''}dinov2"
        out[f"dinov2_vit{size[0]}14{'_reg' if reg else ''}"] = ModelSpec(arch, "lvd142m", "dinov2", 518)
    return out


REGISTRY: dict[str, ModelSpec] = {
    "dino_vits16": ModelSpec("vit_small_patch16_224", "dino", "dino", 224),
    "dino_vits8": ModelSpec("vit_small_patch8_224", "dino", "dino", 224),
    "dino_vitb16": ModelSpec("vit_base_patch16_224", "dino", "dino", 224),
    "dino_vitb8": ModelSpec("vit_base_patch8_224", "dino", "dino", 224),
    **_dinov2("small"),
    **_dinov2("base"),
    **_dinov2("large"),
    **_dinov2("giant"),
    "dinov3_vits16": ModelSpec("vit_small_patch16_dinov3_qkvb", "lvd1689m", "dinov3", 256),
    "dinov3_vits16plus": ModelSpec("vit_small_plus_patch16_dinov3_qkvb", "lvd1689m", "dinov3", 256),
    "dinov3_vitb16": ModelSpec("vit_base_patch16_dinov3_qkvb", "lvd1689m", "dinov3", 256),
    "dinov3_vitl16": ModelSpec("vit_large_patch16_dinov3_qkvb", "lvd1689m", "dinov3", 256),
    "dinov3_vith16plus": ModelSpec("vit_huge_plus_patch16_dinov3_qkvb", "lvd1689m", "dinov3", 256),
    "dinov3_vit7b16": ModelSpec("vit_7b_patch16_dinov3", "lvd1689m", "dinov3", 256),
    "resnet50": ModelSpec("resnet50", "tv2_in1k", "resnet", 224),
    # test-only tiny models: the same timm architectures, random init only
    "tiny_dino": ModelSpec("vit_small_patch16_224", None, "dino", 64,
                           dict(embed_dim=32, depth=2, num_heads=2, img_size=64), True),
    "tiny_dinov2": ModelSpec("vit_small_patch14_dinov2", None, "dinov2", 56,
                             dict(embed_dim=32, depth=2, num_heads=2, img_size=56), True),
    "tiny_dinov2_reg": ModelSpec("vit_small_patch14_reg4_dinov2", None, "dinov2", 56,
                                 dict(embed_dim=32, depth=2, num_heads=2, img_size=56), True),
    "tiny_dinov3": ModelSpec("vit_small_patch16_dinov3_qkvb", None, "dinov3", 64,
                             dict(embed_dim=64, depth=2, num_heads=4, img_size=64), True),
    # the demo's small ViT: patch 8 on 64-px synthetic scenes (an 8x8 grid), learned absolute positions; its
    # "synthetic" weights are pretrained by dinokit itself and shipped in the package (see ASSETS)
    "demo_vit": ModelSpec("vit_small_patch8_224", "synthetic", "dino", 64,
                          dict(embed_dim=96, depth=4, num_heads=3, img_size=64)),
}

# (short name, tag) -> weights file shipped in dinokit/backbones/assets/ (with its provenance JSON beside it);
# resolved offline, before any cache or download. Regenerate them with
# `dinokit pretrain --config configs/demo/pretrain.yaml`.
ASSETS: dict[tuple[str, str], str] = {("demo_vit", "synthetic"): "demo_vit.safetensors"}

UNSUPPORTED: dict[str, str] = {
    "dinov3_vitl16plus": "the official ViT-L+/16 DINOv3 has no timm architecture",
}


def family_of_arch(arch: str) -> str:
    """Guess the family of an arbitrary timm architecture name."""
    if "dinov3" in arch:
        return "dinov3"
    if "dinov2" in arch:
        return "dinov2"
    if arch.startswith("resnet"):
        return "resnet"
    return "dino"


def supported_names() -> list[str]:
    """Short names a user may pass (tiny test names excluded)."""
    return [k for k, v in REGISTRY.items() if not v.random_only or k == "demo_vit"]


# (embed dim, depth, patch size, registers, swiglu MLP) of the published models: used to suggest the right short
# name when a checkpoint's shapes do not fit the requested architecture
SHAPES: dict[str, tuple[int, int, int, int, bool]] = {
    "dino_vits16": (384, 12, 16, 0, False), "dino_vits8": (384, 12, 8, 0, False),
    "dino_vitb16": (768, 12, 16, 0, False), "dino_vitb8": (768, 12, 8, 0, False),
    "dinov2_vits14": (384, 12, 14, 0, False), "dinov2_vits14_reg": (384, 12, 14, 4, False),
    "dinov2_vitb14": (768, 12, 14, 0, False), "dinov2_vitb14_reg": (768, 12, 14, 4, False),
    "dinov2_vitl14": (1024, 24, 14, 0, False), "dinov2_vitl14_reg": (1024, 24, 14, 4, False),
    "dinov2_vitg14": (1536, 40, 14, 0, True), "dinov2_vitg14_reg": (1536, 40, 14, 4, True),
    "dinov3_vits16": (384, 12, 16, 4, False), "dinov3_vits16plus": (384, 12, 16, 4, True),
    "dinov3_vitb16": (768, 12, 16, 4, False), "dinov3_vitl16": (1024, 24, 16, 4, False),
    "dinov3_vith16plus": (1280, 32, 16, 4, True), "dinov3_vit7b16": (4096, 40, 16, 4, True),
}
