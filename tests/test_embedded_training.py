"""The embedded model's training: starting from another pipeline (``transfer_weights``), the scene mix."""

import json

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from transformers import T5EncoderModel

from dit_cache.toy import shapes
from dit_cache.testing import tiny_pixart_pipeline, tiny_vae
from dit_cache.training.embedded_model import (POSITION_UNIT, SceneMix, TextToImageStage, build_tokenizer,
                                               encode_training_set, train_embedded_model,
                                               transfer_weights)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source")
    pipe = tiny_pixart_pipeline()  # patch size 4
    pipe.save_pretrained(folder)
    return folder, pipe


def targets(pipe, patch_size: int, **overrides):
    torch.manual_seed(123)  # weights unlike the source's
    config = {**pipe.transformer.config, "patch_size": patch_size, "interpolation_scale": POSITION_UNIT // patch_size,
              **overrides}
    return PixArtTransformer2DModel.from_config(config).eval(), T5EncoderModel(pipe.text_encoder.config).eval()


def run(transformer, latents):
    text = torch.randn(1, 5, transformer.config.caption_channels, generator=torch.Generator().manual_seed(1))
    return transformer(latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def test_same_patch_size_copies_the_source_exactly(source):
    folder, pipe = source
    transformer, text_encoder = targets(pipe, patch_size=4, interpolation_scale=None)
    transfer_weights(str(folder), transformer, text_encoder)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(run(transformer, latents), run(pipe.transformer, latents))
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.equal(text_encoder(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state)


def test_smaller_patch_keeps_what_the_source_computes_on_locally_constant_latents(source):
    folder, pipe = source
    transformer, text_encoder = targets(pipe, patch_size=2)
    transfer_weights(str(folder), transformer, text_encoder)
    with torch.no_grad():
        # Constant within each 4x4 block: every 2x2 token of a block embeds like the block's 4x4 token.
        blocks = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        latents = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
        old_tokens = pipe.transformer.pos_embed.proj(latents)  # (1, hidden, 8, 8)
        new_tokens = transformer.pos_embed.proj(latents)  # (1, hidden, 16, 16)
        expected = old_tokens.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(new_tokens, expected, rtol=1e-5, atol=1e-5)
        # A token's output patch is the source's output averaged over each 2x2 sub-block.
        hidden = torch.randn(3, transformer.inner_dim)
        channels = transformer.out_channels
        old_patches = pipe.transformer.proj_out(hidden).view(3, 4, 4, channels)
        new_patches = transformer.proj_out(hidden).view(3, 2, 2, channels)
        pooled = old_patches.view(3, 2, 2, 2, 2, channels).mean((2, 4))
        torch.testing.assert_close(new_patches, pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patch_size, overrides, message", [
    (3, {"interpolation_scale": 1}, "must divide"),
    (2, {"num_layers": 3}, "another architecture"),
])
def test_mismatch_is_refused_and_leaves_the_targets_untouched(source, patch_size, overrides, message):
    folder, pipe = source
    transformer, text_encoder = targets(pipe, patch_size, **overrides)
    before = [p.clone() for p in [*transformer.parameters(), *text_encoder.parameters()]]
    with pytest.raises(ValueError, match=message):
        transfer_weights(str(folder), transformer, text_encoder)
    after = [*transformer.parameters(), *text_encoder.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("patch_size", [0, 3, 8])
def test_stage_refuses_a_patch_size_that_does_not_divide_the_position_unit(patch_size):
    with pytest.raises(ValueError, match=f"patch_size must divide {POSITION_UNIT}"):
        TextToImageStage(patch_size=patch_size)


@pytest.mark.parametrize("mix, objects", [(SceneMix(two_objects=1.0, three_objects=0.0), {2}),
                                          (SceneMix(two_objects=0.0, three_objects=0.0), {1})])
def test_scene_mix_sets_how_many_objects_the_training_captions_name(tmp_path, mix, objects):
    tokenizer = build_tokenizer()
    tensors = encode_training_set(tiny_vae(), tokenizer, num_scenes=6, seed=0, path=tmp_path / "latents.safetensors",
                                  scene_mix=mix)
    captions = tokenizer.batch_decode(tensors["input_ids"], skip_special_tokens=True)
    assert {len(shapes.parse_caption(caption)) for caption in captions} == objects


def test_a_bad_scene_mix_fails_when_the_config_is_built():
    with pytest.raises(ValueError, match="scene_mix fractions must be >= 0 and sum to <= 1"):
        SceneMix(two_objects=0.9, three_objects=0.2)
    with pytest.raises(ValueError, match="scene_mix"):
        SceneMix(two_objects=-0.1)


def test_a_cached_training_set_is_reused_only_with_the_settings_it_was_encoded_with(tmp_path):
    path, tokenizer, vae = tmp_path / "latents.safetensors", build_tokenizer(), tiny_vae()
    first = encode_training_set(vae, tokenizer, num_scenes=4, seed=0, path=path, scene_mix=SceneMix(1.0, 0.0))
    again = encode_training_set(vae, tokenizer, num_scenes=4, seed=0, path=path, scene_mix=SceneMix(1.0, 0.0))
    assert torch.equal(first["latents"], again["latents"])
    with pytest.raises(ValueError, match=r"two_objects.*1.0 -> 0.25.*delete it, or use another run_dir"):
        encode_training_set(vae, tokenizer, num_scenes=4, seed=0, path=path)
    with pytest.raises(ValueError, match="num_scenes"):
        encode_training_set(vae, tokenizer, num_scenes=8, seed=0, path=path, scene_mix=SceneMix(1.0, 0.0))


def test_training_writes_a_stock_pipeline_whose_provenance_nests_each_source(tmp_path):
    source = tmp_path / "source"
    tiny_pixart_pipeline().save_pretrained(source)
    (source / "provenance.json").write_text(json.dumps({"what": "the source model"}))
    stage = dict(steps=2, batch_size=2, warmup_steps=1, num_layers=1, num_attention_heads=1, attention_head_dim=8,
                 text_width=8, text_layers=1, patch_size=4)
    first, second = tmp_path / "first", tmp_path / "second"
    train_embedded_model(output_dir=str(first), run_dir=str(tmp_path / "run_first"), num_scenes=4,
                         vae_from=str(source), text_to_image=TextToImageStage(**stage))
    train_embedded_model(output_dir=str(second), run_dir=str(tmp_path / "run_second"), num_scenes=4,
                         vae_from=str(first), text_to_image=TextToImageStage(**stage, init_from=str(first)))

    pipe = PixArtAlphaPipeline.from_pretrained(second)  # the stock class loads what training wrote
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
    provenance = json.loads((second / "provenance.json").read_text())
    assert provenance["text_to_image"]["init_from"] == str(first)
    assert provenance["initialized_from"]["vae_from"] == str(source)
    assert provenance["initialized_from"]["initialized_from"] == {"what": "the source model"}
