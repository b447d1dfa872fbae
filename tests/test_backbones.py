"""OpenCLIPBackbone: protocol, frozen weights, text path equals open_clip's own encode_text, VPT, load errors."""

import pytest
import torch

from gram_plugin.backbones import Backbone, BackboneLoadError, OpenCLIPBackbone, tiny_openclip


def test_protocol_and_frozen(bb):
    assert isinstance(bb, Backbone)
    assert (bb.ctx_dim, bb.embed_dim, bb.vision_width, bb.vision_layers) == (32, 32, 64, 2)
    assert all(not p.requires_grad for p in bb.parameters())
    assert bb.weights_id() == bb.name


def test_text_path_equals_open_clip(bb):
    ids = bb.tokenize(["a photo of a dog.", "a cat"])
    ours = bb.encode_text_embeddings(bb.embed_tokens(ids), ids)
    torch.testing.assert_close(ours, bb.clip.encode_text(ids), rtol=1e-5, atol=1e-5)


def test_text_path_drops_positions_after_the_last_eot_exactly():
    """Only the longest prompt's positions run through the tower; values and gradients equal the
    full 77-position computation through open_clip's own Transformer (a hook on ln_final counts positions)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # second derivatives of attention need the math kernel
        _check_truncated_text_path()


def _check_truncated_text_path():
    bb = tiny_openclip(0).double()
    ids = bb.tokenize(["a photo of a dog.", "a very small photo of a striped cat on a mat"])
    emb = bb.embed_tokens(ids).detach().requires_grad_(True)
    seen = []
    hook = bb.clip.ln_final.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    ours = bb.encode_text_embeddings(emb, ids)
    hook.remove()
    assert seen == [int(ids.argmax(-1).max()) + 1] and seen[0] < ids.shape[1]
    x = emb + bb.clip.positional_embedding  # the full-length reference, as open_clip computes it
    x = bb.clip.ln_final(bb.clip.transformer(x, attn_mask=bb.clip.attn_mask))
    full = x[torch.arange(2), ids.argmax(-1)] @ bb.clip.text_projection
    torch.testing.assert_close(ours, full, rtol=1e-12, atol=1e-12)
    # first and second derivatives too (the meta-gradient differentiates through a gradient)
    w = torch.randn_like(full)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), emb, create_graph=True)
    (g_full,) = torch.autograd.grad((full * w).sum(), emb, create_graph=True)
    torch.testing.assert_close(g_ours, g_full, rtol=1e-12, atol=1e-12)
    (h_ours,) = torch.autograd.grad(g_ours.pow(2).sum(), emb)
    (h_full,) = torch.autograd.grad(g_full.pow(2).sum(), emb)
    torch.testing.assert_close(h_ours, h_full, rtol=1e-10, atol=1e-12)


def test_text_blocks_run_sequence_first_unless_they_are_not_the_standard_ones():
    from gram_plugin.backbones.openclip import _plain_attention_blocks

    bb = tiny_openclip(0)
    assert _plain_attention_blocks(bb.clip.transformer)
    calls = []
    hook = bb.clip.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = bb.tokenize(["a photo of a dog."])
    fast = bb.encode_text_embeddings(bb.embed_tokens(ids), ids)
    assert calls == []  # open_clip's Transformer.forward was not used
    bb.clip.transformer.grad_checkpointing = True  # -> open_clip's own path
    assert not _plain_attention_blocks(bb.clip.transformer)
    own = bb.encode_text_embeddings(bb.embed_tokens(ids), ids)
    hook.remove()
    assert calls == [1]
    torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-6)


def test_image_path_and_vpt_shapes(bb):
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(bb.encode_image(x), bb.clip.encode_image(x))
    shallow = bb.encode_image(x, [torch.randn(5, 64)])
    deep = bb.encode_image(x, [torch.randn(5, 64), torch.randn(5, 64)])
    assert shallow.shape == deep.shape == (3, 32)
    assert not torch.allclose(shallow, bb.encode_image(x))
    with pytest.raises(ValueError, match="visual prompt layers"):
        bb.encode_image(x, [torch.randn(5, 64)] * 3)


def test_weights_id_follows_weights():
    a, b, a2 = tiny_openclip(0), tiny_openclip(1), tiny_openclip(0)
    from conftest import make_tiny_clip

    m = make_tiny_clip(0)
    id0 = OpenCLIPBackbone(m).weights_id()
    with torch.no_grad():
        m.ln_final.weight.add_(1.0)
    assert OpenCLIPBackbone(m).weights_id() != id0
    assert a.name == a2.name != b.name


def test_local_weights_file_and_clear_errors(tmp_path):
    with pytest.raises(BackboneLoadError, match="cannot load open_clip model"):
        OpenCLIPBackbone("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(BackboneLoadError, match="cannot load open_clip model"):
        OpenCLIPBackbone("no-such-model", pretrained=None)
    with pytest.raises(TypeError):
        OpenCLIPBackbone(42)


def test_text_path_under_vmap_keeps_all_positions_and_matches_the_loop():
    bb = tiny_openclip(0).double()  # float64: the loop truncates, vmap does not; sums differ in float32
    ids = torch.stack([bb.tokenize(["a dog.", "a cat on a mat"]), bb.tokenize(["a small red car", "a bird."])])
    emb = bb.embed_tokens(ids.flatten(0, 1)).unflatten(0, (2, 2))
    batched = torch.func.vmap(bb.encode_text_embeddings)(emb, ids)
    looped = torch.stack([bb.encode_text_embeddings(emb[t], ids[t]) for t in range(2)])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    # and inside a gradient transform, as the vmap benchmark nests them
    g = torch.func.grad(lambda e: torch.func.vmap(bb.encode_text_embeddings)(e, ids).sum())(emb)
    g_loop = torch.func.grad(lambda e: sum(bb.encode_text_embeddings(e[t], ids[t]).sum() for t in range(2)))(emb)
    torch.testing.assert_close(g, g_loop, rtol=1e-10, atol=1e-12)


def test_build_backbone_names_a_bad_tiny_seed():
    from gram_plugin.backbones import build_backbone

    with pytest.raises(BackboneLoadError, match=r"tiny:SEED needs a whole-number seed, got 'abc'"):
        build_backbone("tiny:abc")
