"""ProS face representation: a ViT-S/16 backbone with attribute, expression and landmark heads.

The backbone is timm's VisionTransformer written in plain torch with timm's
parameter names (`patch_embed.proj`, `blocks.N.attn.qkv`, `fc_norm`, ...), global
average pooling over patch tokens then `fc_norm`, as in the ProS/DINO face
fine-tuning harness; the 40 CelebA attribute heads are `linear00`..`linear39`, each
Linear(dim, 2) whose softmax's second entry is the probability the attribute is
present. `expression` (RAF-DB's 7 classes, or AffectNet's 8) and `landmarks`
(68 points, sigmoid to [0, 1] crop coordinates) are the extra heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from migserve.contract import DimRange, FacePostprocessing, ImagePreprocessing, Size, TensorSpec

from .base import IMAGENET_MEAN, IMAGENET_STD, ModelDef, OptionError, batch_dim

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
RAFDB_EXPRESSIONS = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
AFFECTNET_EXPRESSIONS = ("Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
LANDMARKS = 68


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    expression_classes: int = 7


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ProSFace(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.fc_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        for i in range(len(CELEBA_ATTRIBUTES)):
            self.add_module(f"linear{i:02d}", nn.Linear(cfg.dim, 2))
        self.expression = nn.Linear(cfg.dim, cfg.expression_classes)
        self.landmarks = nn.Linear(cfg.dim, LANDMARKS * 2)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        embedding = self.fc_norm(x[:, 1:].mean(dim=1))
        logits = torch.stack([getattr(self, f"linear{i:02d}")(embedding) for i in range(len(CELEBA_ATTRIBUTES))], dim=1)
        attributes = logits.softmax(dim=-1)[..., 1]
        expression = self.expression(embedding).softmax(dim=-1)
        landmarks = self.landmarks(embedding).sigmoid().reshape(-1, LANDMARKS, 2)
        return embedding, attributes, expression, landmarks


class FacePros(ModelDef[ViTConfig]):
    name = "face-pros"
    family = "face"
    variant = "pros-vit-s16"
    description = "ProS face representation (ViT-S/16): embedding, 40 CelebA attributes, expression, 68 landmarks."

    def config(self, size: Size) -> ViTConfig:
        return ViTConfig() if size == "paper" else ViTConfig(dim=48, depth=2, heads=3)

    def validate(self, cfg: ViTConfig) -> None:
        if cfg.expression_classes not in (7, 8):
            raise OptionError("expression_classes must be 7 (RAF-DB) or 8 (AffectNet)")
        if cfg.dim % cfg.heads or cfg.image_size % cfg.patch_size:
            raise OptionError("dim must divide by heads and image_size by patch_size")

    def build(self, cfg: ViTConfig) -> nn.Module:
        return ProSFace(cfg)

    def inputs(self, cfg: ViTConfig) -> tuple[TensorSpec, ...]:
        side = cfg.image_size
        return (
            TensorSpec(
                name="image", dtype="float32", shape=("batch", 3, side, side), description="aligned face crop, RGB, ImageNet-normalised"
            ),
        )

    def outputs(self, cfg: ViTConfig) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(name="embedding", dtype="float32", shape=("batch", cfg.dim), description="fc_norm of the mean patch token"),
            TensorSpec(
                name="attributes",
                dtype="float32",
                shape=("batch", len(CELEBA_ATTRIBUTES)),
                description="probability each attribute is present",
            ),
            TensorSpec(name="expression", dtype="float32", shape=("batch", cfg.expression_classes), description="class probabilities"),
            TensorSpec(name="landmarks", dtype="float32", shape=("batch", LANDMARKS, 2), description="(x, y) in [0, 1] crop coordinates"),
        )

    def dims(self, cfg: ViTConfig) -> dict[str, DimRange]:
        return {"batch": batch_dim(self.max_batch_size)}

    def preprocessing(self, cfg: ViTConfig) -> ImagePreprocessing:
        side = cfg.image_size
        return ImagePreprocessing(height=side, width=side, mean=IMAGENET_MEAN, std=IMAGENET_STD, face_crop_margin=0.2)

    def postprocessing(self, cfg: ViTConfig) -> FacePostprocessing:
        labels = RAFDB_EXPRESSIONS if cfg.expression_classes == 7 else AFFECTNET_EXPRESSIONS
        return FacePostprocessing(attribute_names=CELEBA_ATTRIBUTES, expression_labels=labels, landmark_count=LANDMARKS)
