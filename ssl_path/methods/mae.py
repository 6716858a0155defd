"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377) on a timm ViT.

An asymmetric autoencoder. Each step:

1. the image's patches are embedded and given fixed 2-D sin-cos positions; a random 75 % of them
   are removed, the same number per image, by sorting per-patch noise (drawn in the data workers
   from the batch's seed, so a resumed or re-sharded run removes the same patches);
2. the encoder, any timm ``VisionTransformer`` (class and register tokens allowed), sees only the
   visible patches: a quarter of the tokens, hence a quarter of the compute of a supervised step;
3. a light decoder (512 wide, 8 blocks, 16 heads) gets the encoded visible tokens and one shared
   learned mask token in every removed place, each with its own fixed sin-cos position, and
   predicts the pixels of every patch;
4. loss = per-patch mean squared error on the removed patches only, against each target patch
   normalised by its own mean and variance (``norm_pix_loss``, on by default as in the paper).

Initialisation is MAE's: xavier-uniform linear layers and patch embedding (as a linear map),
N(0, 0.02) class, register and mask tokens, unit LayerNorms. The published encoder is the trained
encoder alone, a plain timm model; the decoder is dropped (``encoder_state``).

MAE has no schedule of its own (no ``set_step``) and no teacher; its optimiser recipe is the loop's
(``optim`` in ``mae_*.yaml``: AdamW betas 0.9/0.95, weight decay 0.05 without decay on biases and
norms, lr 1.5e-4 x batch / 256, 40 warm-up epochs of 800, half-cosine to 0). Defaults are those of
the paper and of ``facebookresearch/mae`` PRETRAIN.md; each is a config value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.data import default_collate

from ssl_path.core.errors import ConfigError, UserError
from ssl_path.data.transforms import SingleViewAugment, SingleViewConfig, eval_transform, key_entropy
from ssl_path.encoder.info import patch_size
from ssl_path.methods.backbone import MaskedViT, ModelConfig, build_vit, published_encoder
from ssl_path.methods.base import PretrainingMethod
from ssl_path.methods.losses import normalized_patches, pixel_reconstruction_loss
from ssl_path.methods.masking import random_masking
from ssl_path.training.config import TrainConfig

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


@dataclass(frozen=True)
class MAEConfig:
    view: SingleViewConfig = field(default_factory=SingleViewConfig)
    mask_ratio: float = 0.75  # the share of patches removed
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"mask_ratio must be in (0, 1), not {self.mask_ratio}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ConfigError(
                f"decoder_dim {self.decoder_dim} must be a multiple of decoder_heads ({self.decoder_heads}) and of 4 "
                "(2-D sin-cos positions)"
            )
        if self.decoder_mlp_ratio <= 0:
            raise ConfigError(f"decoder_mlp_ratio must be > 0, not {self.decoder_mlp_ratio}")


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches in row-major order, each pixel-major (MAE's layout)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """The inverse of :func:`patchify`: [B, P, p*p*C] -> [B, C, H, W]."""
    b, (gh, gw) = patches.shape[0], grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def sincos_positions(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embeddings [H*W, dim] of a patch grid (timm's, as MAE's up to channel order)."""
    return build_sincos2d_pos_embed(list(grid), dim)


def predicted_patches(prediction: Tensor, target: Tensor, norm_pix: bool) -> Tensor:
    """The decoder's ``prediction`` in the input's units: with ``norm_pix`` it is in per-patch
    normalised units, so it gets back each target patch's own mean and spread (plotted as it is, it
    looks like colourful noise)."""
    if not norm_pix:
        return prediction
    _, mean, std = normalized_patches(target)
    return prediction * std + mean


class MAEDecoder(nn.Module):
    """Encoded visible tokens + mask tokens in the removed places -> predicted pixels of every patch."""

    def __init__(self, embed_dim: int, cfg: MAEConfig, patch: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        # "layers", not "blocks": the optimiser's layer-wise rules count a module's "blocks" as the trunk.
        self.layers = nn.Sequential(
            *(
                Block(cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM)
                for _ in range(cfg.decoder_depth)
            )
        )
        self.norm = LAYER_NORM(cfg.decoder_dim)
        self.predict = nn.Linear(cfg.decoder_dim, patch * patch * 3)
        self.grid = grid
        self.register_buffer("positions", sincos_positions(grid, cfg.decoder_dim), persistent=False)

    def forward(self, prefix: Tensor, visible: Tensor, restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """Encoded prefix [B, prefix, D] and visible patch tokens [B, K, D], ``restore`` [B, P] -> pixels [B, P, p*p*3]."""
        n_prefix = prefix.shape[1]
        x = self.embed(torch.cat([prefix, visible], dim=1))
        prefix, visible = x[:, :n_prefix], x[:, n_prefix:]
        b, n_visible, dim = visible.shape
        n_patches = restore.shape[1]
        x = torch.cat([visible, self.mask_token.to(x.dtype).expand(b, n_patches - n_visible, dim)], dim=1)
        x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, dim))  # back to patch order
        positions = self.positions if grid == self.grid else sincos_positions(grid, dim).to(x.device)
        # Prefix tokens get no position, as MAE's class token gets an all-zero one.
        x = torch.cat([prefix, x + positions.to(x.dtype)], dim=1)
        x = self.norm(self.layers(x))
        return self.predict(x[:, n_prefix:])


class MAECollate:
    """Stacks the views and draws the masking noise [B, P] from the batch's own seed."""

    def __init__(self, seed: int, n_patches: int) -> None:
        self.seed, self.n_patches = seed, n_patches

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        first = samples[0]
        rng = np.random.default_rng([self.seed, int(first["index"]), key_entropy(first["key"])])
        noise = rng.random((len(samples), self.n_patches), dtype=np.float32)
        return {"images": default_collate([s["image"] for s in samples]), "noise": torch.from_numpy(noise)}


class MAE(PretrainingMethod):
    """Encoder (a timm ViT seeing visible patches only), decoder and pixel loss; see the module docstring."""

    name = "mae"
    title = "MAE (masked autoencoder: pixel reconstruction of 75 % removed patches)"
    citation = """@inproceedings{he2022mae,
  title     = {Masked Autoencoders Are Scalable Vision Learners},
  author    = {He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\'a}r, Piotr and Girshick, Ross},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""
    published = "the MAE encoder (decoder dropped)"
    known = (
        "MAE features are made for fine-tuning: frozen, in kNN and linear probes, they trail those of "
        "self-distillation methods such as DINOv2 (the MAE paper's linear probe on ImageNet: 68.0 % for ViT-B/16 "
        "against 83.6 % fine-tuned), so judge this encoder by fine-tuning a head rather than by its frozen probes."
    )
    figure = "reconstruction.png"

    def __init__(self, cfg: MAEConfig, model: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.model_cfg, self.seed = cfg, model, seed
        vit = build_vit(model)
        if getattr(vit, "pos_embed", None) is None:
            raise UserError(f"model.arch {model.arch!r} has no absolute position embedding; MAE needs one")
        self.patch = patch_size(vit)
        if cfg.view.size % self.patch:
            raise UserError(f"mae.view.size {cfg.view.size} must be a multiple of the patch size {self.patch}")
        if vit.embed_dim % 4:
            raise UserError(f"MAE's 2-D sin-cos positions need an embed_dim divisible by 4, not {vit.embed_dim}")
        self.grid = (cfg.view.size // self.patch, cfg.view.size // self.patch)
        self.n_patches = self.grid[0] * self.grid[1]
        self.n_keep = int(self.n_patches * (1 - cfg.mask_ratio))
        if not 1 <= self.n_keep < self.n_patches:
            raise UserError(
                f"mae.mask_ratio={cfg.mask_ratio} keeps {self.n_keep} of {self.n_patches} patches; it must keep some "
                "and remove some"
            )
        self.encoder = MaskedViT(vit, mask_token=False)  # it only subsamples; the decoder holds the mask token
        self.decoder = MAEDecoder(vit.embed_dim, cfg, self.patch, self.grid)
        self._initialise()

    @torch.no_grad()
    def _initialise(self) -> None:
        vit = self.encoder.vit
        self.apply(_init_linear_and_norm)
        weight = vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # the patch embedding is a linear map
        if vit.patch_embed.proj.bias is not None:
            nn.init.zeros_(vit.patch_embed.proj.bias)
        for token in (vit.cls_token, getattr(vit, "reg_token", None), self.decoder.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        # Fixed positions: prefix slots (timm's original layout puts class and register tokens there) stay 0.
        positions = vit.pos_embed
        n_prefix_slots = positions.shape[1] - self.n_patches
        positions.zero_()
        positions[0, n_prefix_slots:] = sincos_positions(self.grid, vit.embed_dim)
        positions.requires_grad_(False)

    # ----------------------------------------------------------------- loop hooks

    def data_transform(self) -> Any:
        return SingleViewAugment(self.cfg.view, seed=self.seed).sample

    def collate_fn(self) -> MAECollate:
        return MAECollate(self.seed, self.n_patches)

    def encoder_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """The encoder as the published model; ``model_state``: this module's whole state dict."""
        view = self.cfg.view
        return published_encoder(
            self.encoder.vit, self.model_cfg, model_state, "encoder.vit.", view.size, view.mean, view.std
        )

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.encoder.vit.blocks, *self.decoder.layers, self.encoder, self.decoder]

    # ----------------------------------------------------------------- step

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["images"]
        prediction, removed = self.reconstruct(images, batch["noise"].to(images.device))
        target = patchify(images, self.patch)
        return {"loss": pixel_reconstruction_loss(prediction, target, removed, self.cfg.norm_pix_loss)}

    def reconstruct(self, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted patches [B, P, p*p*3] (in the loss's space) and the removed-patch mask [B, P]."""
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        n_keep = int(grid[0] * grid[1] * (1 - self.cfg.mask_ratio))
        keep, removed, restore = random_masking(noise, n_keep)
        prefix, visible = self.encoder(images, keep=keep)
        return self.decoder(prefix, visible, restore, grid), removed

    # ----------------------------------------------------------------- figure

    @torch.no_grad()
    def figure_panels(self, images: Sequence[Tensor]) -> dict[str, Tensor]:
        """Input, masked input, reconstruction, and reconstruction pasted into the visible patches."""
        view = self.cfg.view
        transform = eval_transform(view.size, view.mean, view.std)
        x = torch.stack([transform(image) for image in images])
        noise = torch.rand(x.shape[0], self.n_patches, generator=torch.Generator().manual_seed(self.seed))
        prediction, removed = self.reconstruct(x, noise)
        target = patchify(x, self.patch)
        prediction = predicted_patches(prediction, target, self.cfg.norm_pix_loss)
        shown = removed.unsqueeze(-1)
        mean_t = torch.tensor(view.mean).view(1, 3, 1, 1)
        std_t = torch.tensor(view.std).view(1, 3, 1, 1)

        def pixels(patches: Tensor) -> Tensor:
            return (unpatchify(patches, self.patch, self.grid) * std_t + mean_t).clamp(0, 1)

        grey = torch.zeros_like(target)  # normalised 0: the mean colour
        return {
            "input": pixels(target),
            f"masked ({self.cfg.mask_ratio:.0%} removed)": pixels(torch.where(shown, grey, target)),
            "reconstruction": pixels(prediction),
            "reconstruction + visible": pixels(torch.where(shown, prediction, target)),
        }


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build(cfg: MAEConfig, model: ModelConfig, train: TrainConfig, seed: int, device: torch.device) -> MAE:
    return MAE(cfg, model, seed=seed)
