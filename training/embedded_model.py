"""Train the embedded default: a small PixArt-architecture text-to-image model on synthetic scenes.

Three Lightning stages, each resumable from its own ``last.ckpt``:

1. ``VaeModule``: a small ``AutoencoderKL`` (scale factor 8) trained on random 64x64 crops. It is fully
   convolutional, so it is then used at 256x256; the crops make a step ~16x cheaper.
2. ``DecoderModule``: the decoder alone tuned on whole 256x256 images (the training set is encoded between
   stages 1 and 2, so the latents do not change).
3. ``TextToImageModule``: a ``PixArtTransformer2DModel`` and a 2-layer ``T5EncoderModel`` trained jointly on
   latents encoded once, with caption dropout for classifier-free guidance and an EMA of the weights.

The result is a stock ``PixArtAlphaPipeline`` folder (``save_pretrained``) plus ``provenance.json``.

Run::

    dit-cache-train-embedded --config training/configs/embedded_model.yaml
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline
from diffusers import PixArtTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from dit_cache.toy.tokenizers import word_tokenizer

from dit_cache.toy import shapes

# Token positions are measured in patches of this many latent pixels whatever the patch size, so weights
# transfer across patch sizes (``transfer_weights``).
POSITION_UNIT = 4
CAPTION_TOKENS = 16  # longest caption ("a red circle, a blue square and a green triangle") is 13 pieces + EOS


def build_tokenizer() -> T5Tokenizer:
    """The embedded model's tokenizer: the caption vocabulary as whole-word pieces."""
    return word_tokenizer(["a", "and", *shapes.COLORS, *shapes.SHAPES])


@dataclass
class VaeStage:
    steps: int = 900
    batch_size: int = 32
    crop: int = 64
    learning_rate: float = 5e-4
    kl_weight: float = 1e-6
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)


@dataclass
class DecoderStage:
    """Full-resolution fine-tuning of the decoder alone (the encoder, hence the latents, stay fixed).

    GroupNorm statistics of a 64x64 crop differ from those of a mostly-background 256x256 image: a VAE trained
    on crops alone shifts colors at full size (purple came out brown). Tuning the decoder at 256 fixes it.
    """

    steps: int = 300
    batch_size: int = 4
    learning_rate: float = 2e-4


@dataclass
class TextToImageStage:
    steps: int = 3600
    batch_size: int = 64
    learning_rate: float = 6e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    num_layers: int = 8
    num_attention_heads: int = 3
    attention_head_dim: int = 64
    text_width: int = 128
    text_layers: int = 2
    # Latent pixels per token side; sample_size 32 is fixed by the stock pipeline's resolution binning.
    patch_size: int = 4
    # A pipeline folder (or hub id) whose transformer and text encoder start this stage, e.g. the shipped model;
    # a different patch size is bridged by ``transfer_weights``.
    init_from: str | None = None
    # v-prediction: with epsilon-prediction, the tiny model's ~0.006 eps error at t ~ 999 becomes an x0 error
    # of ~10 standard deviations under the linear schedule (SNR 4e-5), and DPM-Solver samples diverged.
    prediction_type: str = "v_prediction"

    def __post_init__(self):
        if self.patch_size < 1 or POSITION_UNIT % self.patch_size:
            raise ValueError(f"patch_size must divide {POSITION_UNIT}, got {self.patch_size}")


@dataclass
class SceneMix:
    """Shares of the training scenes with two and three objects; the rest have one."""

    two_objects: float = shapes.TWO_OBJECT_FRACTION
    three_objects: float = shapes.THREE_OBJECT_FRACTION

    def __post_init__(self):
        # Checked here so a bad config fails when it is parsed, not after the autoencoder stages have run.
        shapes.check_object_fractions(self.two_objects, self.three_objects, "scene_mix fractions")


def build_vae(stage: VaeStage) -> AutoencoderKL:
    depth = len(stage.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(stage.block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.IMAGE_SIZE,
    )


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], NCHW."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class VaeModule(L.LightningModule):
    def __init__(self, stage: VaeStage, seed: int):
        super().__init__()
        self.stage = stage
        self.seed = seed
        self.vae = build_vae(stage)

    def training_step(self, batch, batch_index):
        crops = batch
        posterior = self.vae.encode(crops).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        reconstruction_loss = F.mse_loss(reconstruction, crops)
        loss = reconstruction_loss + self.stage.kl_weight * posterior.kl().mean()
        self.log("vae/mse", reconstruction_loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.stage.learning_rate)
        # Cosine decay: at a constant rate this small VAE diverged late in training (MSE 0.006 -> 0.3).
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.stage.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class DecoderModule(L.LightningModule):
    def __init__(self, vae: AutoencoderKL, stage: DecoderStage):
        super().__init__()
        self.stage = stage
        self.vae = vae.requires_grad_(False)
        self.vae.decoder.requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)

    def training_step(self, batch, batch_index):
        with torch.no_grad():
            latents = self.vae.encode(batch).latent_dist.mean
        reconstruction_loss = F.mse_loss(self.vae.decode(latents).sample, batch)
        self.log("decoder/mse", reconstruction_loss, prog_bar=True)
        return reconstruction_loss

    def configure_optimizers(self):
        params = [p for p in self.vae.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.stage.learning_rate)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.stage.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class RandomCrops(torch.utils.data.IterableDataset):
    """Endless random crops of freshly rendered scenes; seeded per worker so a run is reproducible."""

    def __init__(self, seed: int, crop: int, batch_size: int):
        self.seed, self.crop, self.batch_size = seed, crop, batch_size

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            scenes = shapes.sample_scenes(int(rng.integers(2**31)), self.batch_size)
            images = images_to_tensor([shapes.render(scene) for scene in scenes])
            # Bias crops toward objects: a crop of pure background teaches nothing.
            crops = []
            for image, scene in zip(images, scenes):
                obj = scene.objects[int(rng.integers(len(scene.objects)))]
                jitter = rng.integers(-self.crop // 2, self.crop // 2 + 1, size=2)
                left = int(np.clip(obj.center[0] - self.crop // 2 + jitter[0], 0, image.shape[-1] - self.crop))
                top = int(np.clip(obj.center[1] - self.crop // 2 + jitter[1], 0, image.shape[-2] - self.crop))
                crops.append(image[:, top : top + self.crop, left : left + self.crop])
            yield torch.stack(crops)


@torch.no_grad()
def transfer_weights(source: str, transformer: PixArtTransformer2DModel, text_encoder: T5EncoderModel) -> None:
    """Start from another pipeline's transformer and text encoder, also across patch sizes.

    Everything but the patch embedding and the output projection is per token, so it copies unchanged. A smaller
    patch keeps what the larger one computed on locally constant latents: the new patch kernel sums the old
    kernel over the sub-blocks it replaces, and the new output averages the old outputs over them. Both models
    are checked before either is written, so a mismatch leaves the targets untouched.
    """
    old = PixArtTransformer2DModel.from_pretrained(source, subfolder="transformer")
    old_patch, new_patch = old.config.patch_size, transformer.config.patch_size
    if old_patch % new_patch:
        raise ValueError(f"cannot transfer {source}'s patch size {old_patch} to {new_patch}: it must divide it")
    k, channels = old_patch // new_patch, old.out_channels
    state = old.state_dict()
    kernel = state["pos_embed.proj.weight"]  # (hidden, in, p, p)
    state["pos_embed.proj.weight"] = kernel.unflatten(2, (new_patch, k)).unflatten(4, (new_patch, k)).sum((3, 5))
    for name in ("proj_out.weight", "proj_out.bias"):  # rows ordered (p, q, channel)
        rows = state[name].unflatten(0, (new_patch, k, new_patch, k, channels))
        state[name] = rows.mean((1, 3)).flatten(0, 2)
    text_state = T5EncoderModel.from_pretrained(source, subfolder="text_encoder").state_dict()
    for name, target, weights in (("transformer", transformer, state), ("text_encoder", text_encoder, text_state)):
        expected = {key: value.shape for key, value in target.state_dict().items()}
        if {key: value.shape for key, value in weights.items()} != expected:
            raise ValueError(f"{source}'s {name} has another architecture than this stage; set num_layers, "
                             "num_attention_heads, attention_head_dim, text_width and text_layers to its values")
    transformer.load_state_dict(state)
    text_encoder.load_state_dict(text_state)


class TextToImageModule(L.LightningModule):
    def __init__(self, stage: TextToImageStage, vocab_size: int):
        super().__init__()
        self.stage = stage
        hidden = stage.num_attention_heads * stage.attention_head_dim
        self.transformer = PixArtTransformer2DModel(
            sample_size=shapes.IMAGE_SIZE // 8,
            patch_size=stage.patch_size,
            in_channels=4,
            out_channels=4,
            num_layers=stage.num_layers,
            num_attention_heads=stage.num_attention_heads,
            attention_head_dim=stage.attention_head_dim,
            cross_attention_dim=hidden,
            caption_channels=stage.text_width,
            use_additional_conditions=False,
            interpolation_scale=POSITION_UNIT // stage.patch_size,
        )
        self.text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=vocab_size,
                d_model=stage.text_width,
                d_kv=stage.text_width // 4,
                d_ff=stage.text_width * 2,
                num_layers=stage.text_layers,
                num_heads=4,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
            )
        )
        if stage.init_from:
            transfer_weights(stage.init_from, self.transformer, self.text_encoder)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                             prediction_type=stage.prediction_type)
        # The EMA copy is what gets exported; it is not trained, only averaged.
        self.ema = torch.nn.ModuleDict(
            {"transformer": copy.deepcopy(self.transformer), "text_encoder": copy.deepcopy(self.text_encoder)}
        ).requires_grad_(False)

    def training_step(self, batch, batch_index):
        latents, input_ids, attention_mask, empty_ids, empty_mask = batch
        drop = torch.rand(latents.shape[0], device=latents.device) < self.stage.caption_dropout
        input_ids = torch.where(drop[:, None], empty_ids, input_ids)
        attention_mask = torch.where(drop[:, None], empty_mask, attention_mask)
        text = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.transformer(
            noisy,
            encoder_hidden_states=text,
            encoder_attention_mask=attention_mask,
            timestep=timesteps,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        if self.stage.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction, target)
        self.log("t2i/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_index):
        decay = min(self.stage.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        for name in ("transformer", "text_encoder"):
            ema_params = list(self.ema[name].parameters())
            live_params = [p.detach() for p in getattr(self, name).parameters()]
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)

    def configure_optimizers(self):
        params = list(self.transformer.parameters()) + list(self.text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.stage.learning_rate, weight_decay=0.0)
        warmup, total = self.stage.warmup_steps, self.stage.steps

        def schedule(step):  # linear warmup, then cosine decay to 10%
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class LatentBatches(torch.utils.data.IterableDataset):
    """Endless shuffled batches of (latent, caption tokens), plus the empty caption for dropout."""

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int):
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        count = self.tensors["latents"].shape[0]
        batch_empty_ids = self.tensors["empty_ids"].expand(self.batch_size, -1)
        batch_empty_mask = self.tensors["empty_mask"].expand(self.batch_size, -1)
        while True:
            order = torch.randperm(count, generator=generator)
            for start in range(0, count - self.batch_size + 1, self.batch_size):
                index = order[start : start + self.batch_size]
                yield (
                    self.tensors["latents"][index],
                    self.tensors["input_ids"][index],
                    self.tensors["attention_mask"][index],
                    batch_empty_ids,
                    batch_empty_mask,
                )


def encode_training_set(vae: AutoencoderKL, tokenizer, num_scenes: int, seed: int, path: Path,
                        scene_mix: SceneMix | None = None) -> dict:
    """Render and encode the training scenes once; cached as safetensors so a resumed run skips it.

    The latents are standardized per channel (see ``standardize_latent_space``); their mean and standard
    deviation are stored with them.
    """
    mix = scene_mix or SceneMix()
    recipe = {"num_scenes": str(num_scenes), "seed": str(seed), **{k: str(v) for k, v in asdict(mix).items()}}
    if path.exists():
        with safe_open(path, "pt") as stored:
            stored_recipe = stored.metadata() or {}  # files written before the recipe was recorded have none
        changed = {k: f"{stored_recipe[k]} -> {v}" for k, v in recipe.items() if stored_recipe.get(k, v) != v}
        if changed:
            raise ValueError(f"{path} holds a training set encoded with other settings ({changed}); delete it, or "
                             "use another run_dir, to encode the new one")
        return load_file(path)
    scenes = shapes.sample_scenes(seed, num_scenes, mix.two_objects, mix.three_objects)
    latents = []
    with torch.no_grad():
        for start in tqdm(range(0, num_scenes, 64), desc="encoding training scenes"):
            images = images_to_tensor([shapes.render(s) for s in scenes[start : start + 64]])
            latents.append(vae.encode(images).latent_dist.mean)
    latents = torch.cat(latents)
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    tokens = tokenizer([s.caption for s in scenes], padding="max_length", max_length=CAPTION_TOKENS,
                       truncation=True, return_tensors="pt")
    empty = tokenizer([""], padding="max_length", max_length=CAPTION_TOKENS, return_tensors="pt")
    tensors = {
        "latents": ((latents - mean[:, None, None]) / std[:, None, None]).contiguous(),
        "latent_mean": mean,
        "latent_std": std,
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
        "empty_ids": empty.input_ids,
        "empty_mask": empty.attention_mask,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=recipe)
    return tensors


@torch.no_grad()
def standardize_latent_space(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> AutoencoderKL:
    """Fold a per-channel standardization of the latents into the VAE's 1x1 quant convolutions.

    The stock pipelines only divide latents by one ``scaling_factor``. Our latents have channel means of up to
    1.3 standard deviations, which a small diffusion model learns slowly (its high-noise predictions drifted).
    Rewriting ``quant_conv`` / ``post_quant_conv`` makes the encoder emit standardized latents and the decoder
    accept them, exactly, so ``scaling_factor`` becomes 1 and any stock pipeline samples in the normal space.
    """
    channels = mean.numel()
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:channels] /= std[:, None, None, None]
    quant.bias[:channels] = (quant.bias[:channels] - mean) / std
    quant.bias[channels:] -= 2 * std.log()  # log-variance of the rescaled posterior
    post.bias += (post.weight[:, :, 0, 0] @ mean)
    post.weight *= std[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)
    return vae


def _fit(module: L.LightningModule, data, steps: int, run_dir: Path, name: str) -> None:
    """Fit with checkpoints every 100 steps; resumes from ``last.ckpt`` when one exists."""
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / name, save_last=True, every_n_train_steps=100, save_top_k=0
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger(run_dir, name=name),
        callbacks=[checkpoints],
        log_every_n_steps=20,
        gradient_clip_val=1.0,
        enable_model_summary=False,
    )
    last = run_dir / name / "last.ckpt"
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None, weights_only=True)


def _train_autoencoder(vae: VaeStage, decoder: DecoderStage, tokenizer, num_scenes: int, seed: int, run: Path,
                       latents_path: Path, scene_mix: SceneMix) -> tuple[AutoencoderKL, dict]:
    """Stages 1 and 2; the training set is encoded in between, so the decoder stage cannot move the latents."""
    vae_folder = run / "vae_final"
    if not vae_folder.exists():
        vae_module = VaeModule(vae, seed)
        _fit(vae_module, RandomCrops(seed, vae.crop, vae.batch_size), vae.steps, run, "vae")
        vae_module.vae.save_pretrained(vae_folder)
    autoencoder = AutoencoderKL.from_pretrained(vae_folder).eval()

    tensors = encode_training_set(autoencoder, tokenizer, num_scenes, seed + 1, latents_path, scene_mix)

    decoder_folder = run / "vae_decoder_final"
    if not decoder_folder.exists():
        decoder_module = DecoderModule(autoencoder, decoder)
        crops = RandomCrops(seed + 2, shapes.IMAGE_SIZE, decoder.batch_size)  # a full-size "crop": whole images
        _fit(decoder_module, crops, decoder.steps, run, "decoder")
        decoder_module.vae.save_pretrained(decoder_folder)
    return AutoencoderKL.from_pretrained(decoder_folder).eval(), tensors


def train_embedded_model(
    output_dir: str = "dit_cache/assets/embedded_model",
    run_dir: str = "runs/embedded_model",
    vae: VaeStage | None = None,
    decoder: DecoderStage | None = None,
    text_to_image: TextToImageStage | None = None,
    num_scenes: int = 8000,
    scene_mix: SceneMix | None = None,
    seed: int = 0,
    vae_from: str | None = None,
):
    """Train the embedded model end to end and save it as a stock PixArtAlphaPipeline folder.

    Args:
        output_dir: where the diffusers pipeline folder is written.
        run_dir: checkpoints, logs and the encoded training set; rerun the same command to resume.
        vae: the autoencoder stage (random crops).
        decoder: the decoder's full-resolution stage.
        text_to_image: the transformer + text encoder stage.
        num_scenes: rendered training scenes, encoded to latents once.
        scene_mix: how many of them have two or three objects (default 25% and 5%).
        seed: seeds scene sampling, crops, initialization and batching.
        vae_from: a pipeline folder or hub id whose ``vae`` is reused instead of training one (skips the
            autoencoder and decoder stages), e.g. to retrain only the text-to-image stage of the shipped model.
    """
    vae = vae or VaeStage()
    decoder = decoder or DecoderStage()
    text_to_image = text_to_image or TextToImageStage()
    scene_mix = scene_mix or SceneMix()
    run, output = Path(run_dir), Path(output_dir)
    started = time.time()
    L.seed_everything(seed)
    tokenizer = build_tokenizer()

    # Read before training: the output folder may be the source (refining the shipped model in place).
    source = text_to_image.init_from or vae_from
    source_provenance = Path(source, "provenance.json") if source else None
    initialized_from = (json.loads(source_provenance.read_text())
                        if source_provenance and source_provenance.exists() else None)

    latents_path = run / "training_latents.safetensors"
    if vae_from:
        # Latents of a reused VAE are standardized again below: an already standardized VAE folds to ~identity.
        autoencoder = AutoencoderKL.from_pretrained(vae_from, subfolder="vae").eval()
        tensors = encode_training_set(autoencoder, tokenizer, num_scenes, seed + 1, latents_path, scene_mix)
    else:
        autoencoder, tensors = _train_autoencoder(vae, decoder, tokenizer, num_scenes, seed, run, latents_path,
                                                  scene_mix)
    standardize_latent_space(autoencoder, tensors["latent_mean"], tensors["latent_std"])

    t2i = TextToImageModule(text_to_image, vocab_size=len(tokenizer))
    _fit(t2i, LatentBatches(tensors, text_to_image.batch_size, seed), text_to_image.steps, run, "text_to_image")

    pipeline = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=t2i.ema["text_encoder"],
        vae=autoencoder,
        transformer=t2i.ema["transformer"],
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                              prediction_type=text_to_image.prediction_type),
    )
    pipeline.save_pretrained(output)
    provenance = {
        "what": "dit-cache embedded default: PixArt-architecture text-to-image model trained on synthetic scenes",
        **({"vae_from": vae_from} if vae_from else {"vae": asdict(vae), "decoder": asdict(decoder)}),
        "text_to_image": asdict(text_to_image),
        "num_scenes": num_scenes,
        "scene_mix": asdict(scene_mix),
        "seed": seed,
        "transformer_parameters": sum(p.numel() for p in t2i.transformer.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in t2i.text_encoder.parameters()),
        "wall_time_seconds_this_run": round(time.time() - started, 1),
        "torch": torch.__version__,
        **({"initialized_from": initialized_from} if initialized_from else {}),
    }
    (output / "provenance.json").write_text(json.dumps(provenance, indent=2))
    print(f"saved the embedded model to {output}")


def main():
    from jsonargparse import CLI

    CLI(train_embedded_model, as_positional=False)


if __name__ == "__main__":
    main()
