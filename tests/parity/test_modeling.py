"""CellSAM modules: shapes, the RCDA/attention maths, anchor handling, and the `sam` property."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cellsam_export.build import (CONFIGS, build_cellsam, config_from_dict,  # noqa: E402
                                  config_to_dict, resolve_config)
from cellsam_export.checkpoint import random_state_dict, read_tsv  # noqa: E402
from cellsam_export.modeling.anchor_detr import (QueryAttention, inverse_sigmoid,  # noqa: E402
                                                 pos2posemb1d, pos2posemb2d)
from cellsam_export.modeling.rcda import MultiheadRCDA  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    """Tiny CellSAM with sane random weights and a model_cp."""
    model = build_cellsam("tiny", with_model_cp=True)
    model.load_state_dict(random_state_dict("tiny", with_model_cp=True, seed=0))
    return model


def test_tiny_forward_shapes_and_ranges(tiny):
    cfg = CONFIGS["tiny"]
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = tiny.sam.image_encoder(x)
        logits, boxes = tiny.cellfinder(x)
    assert emb.shape == (2, cfg.prompt_dim, 16, 16) == (2, cfg.prompt_dim, cfg.embedding_size, cfg.embedding_size)
    assert logits.shape == (2, cfg.num_queries, 2)
    assert boxes.shape == (2, cfg.num_queries, 4)
    assert torch.isfinite(emb).all() and torch.isfinite(logits).all()
    assert (boxes > 0).all() and (boxes < 1).all()
    # Different images must give different detections (the head does look at the image).
    assert not torch.allclose(logits[0], logits[1])


def test_tiny_decoder_mask_size(tiny):
    cfg = CONFIGS["tiny"]
    sam = tiny.sam
    emb = torch.randn(1, cfg.prompt_dim, cfg.embedding_size, cfg.embedding_size)
    box = torch.tensor([[20.0, 30.0, 120.0, 90.0]])
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        masks, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
    assert masks.shape == (1, 1, cfg.mask_size, cfg.mask_size) == (1, 1, 64, 64)
    assert iou.shape == (1, 1)
    assert torch.isfinite(masks).all()


def test_batch_items_are_independent(tiny):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lb, bb = tiny.cellfinder(x)
        l1, b1 = tiny.cellfinder(x[1:])
    torch.testing.assert_close(lb[1:], l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bb[1:], b1, atol=1e-5, rtol=1e-5)


def test_sam_property_and_model_cp():
    plain = build_cellsam("tiny")
    assert not plain.has_model_cp and plain.model_cp is None and plain.sam is plain.model
    assert not any(k.startswith("model_cp.") for k in plain.state_dict())
    cp = build_cellsam("tiny", with_model_cp=True)
    assert cp.has_model_cp and cp.sam is cp.model_cp and cp.sam is not cp.model
    keys = cp.state_dict().keys()
    assert {k[len("model_cp."):] for k in keys if k.startswith("model_cp.")} == \
        {k[len("model."):] for k in keys if k.startswith("model.")}
    assert not cp.training and not plain.training


def test_pixel_mean_is_not_in_state_dict():
    model = build_cellsam("tiny")
    keys = model.state_dict().keys()
    assert not any("pixel_mean" in k or "pixel_std" in k for k in keys)
    torch.testing.assert_close(model.sam.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))


def test_full_head_config_has_the_full_head_shapes(tsv_path):
    model = build_cellsam("full_head")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if k.startswith("cellfinder.decode_head.transformer.")}
    want = {k: s for k, _, s in read_tsv(tsv_path) if k.startswith("cellfinder.decode_head.transformer.")}
    assert got == want
    assert model.cellfinder.num_queries == 3500


def test_configs_round_trip_through_dicts():
    for name, cfg in CONFIGS.items():
        assert config_from_dict(config_to_dict(cfg)) == cfg, name
        assert resolve_config(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown config"):
        resolve_config("nope")
    full = CONFIGS["full"]
    assert (full.image_size, full.embedding_size, full.mask_size, full.num_queries) == (1024, 64, 256, 3500)


def _naive_rcda(m: MultiheadRCDA, q_row, q_col, k_row, k_col, value):
    """RCDA written out densely: weight(q, y, x) = a_col(q, y) * a_row(q, x) over the whole map."""
    e, nh = m.embed_dim, m.num_heads
    hd = e // nh
    w, b = m.in_proj_weight, m.in_proj_bias
    proj = [lambda t, i=i: t @ w[i * e:(i + 1) * e].T + b[i * e:(i + 1) * e] for i in range(5)]
    qr, qc = proj[0](q_row), proj[1](q_col)
    kr, kc = proj[2](k_row).mean(1), proj[3](k_col).mean(2)  # project, then average (reference order)
    v = proj[4](value)
    out = []
    for h in range(nh):
        s = slice(h * hd, (h + 1) * hd)
        ar = torch.softmax(torch.einsum("blc,bxc->blx", qr[..., s], kr[..., s]) / hd ** 0.5, -1)
        ac = torch.softmax(torch.einsum("blc,byc->bly", qc[..., s], kc[..., s]) / hd ** 0.5, -1)
        out.append(torch.einsum("bly,blx,byxc->blc", ac, ar, v[..., s]))
    return m.out_proj(torch.cat(out, -1))


@pytest.mark.parametrize("hw", [(5, 5), (3, 6), (6, 3)])
def test_rcda_matches_dense_formulation(hw):
    g = torch.Generator().manual_seed(0)
    m = MultiheadRCDA(16, 4)
    with torch.no_grad():
        m.in_proj_bias.normal_(generator=g)
        m.out_proj.bias.normal_(generator=g)
    h, w = hw
    q_row, q_col = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    k_row, k_col, v = (torch.randn(2, h, w, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(m(q_row, q_col, k_row, k_col, v),
                                   _naive_rcda(m, q_row, q_col, k_row, k_col, v), atol=1e-5, rtol=1e-5)


def test_query_attention_matches_torch_multihead_attention():
    g = torch.Generator().manual_seed(0)
    ours = QueryAttention(32, 4)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2, generator=g)
    ref.load_state_dict(ours.state_dict())
    q, v = torch.randn(3, 9, 32, generator=g), torch.randn(3, 9, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(q, q, v), ref(q, q, v, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_sine_embeddings():
    pos = torch.tensor([0.0, 0.25, 1.0])
    e = pos2posemb1d(pos, 8)
    assert e.shape == (3, 8)
    # Pair i of (sin, cos) uses frequency 2*pi / 10000**(2i/8).
    freq = 2 * torch.pi / 10000 ** (torch.arange(4) * 2 / 8)
    torch.testing.assert_close(e[:, 0::2], torch.sin(pos[:, None] * freq))
    torch.testing.assert_close(e[:, 1::2], torch.cos(pos[:, None] * freq))
    pts = torch.tensor([[0.1, 0.7]])
    e2 = pos2posemb2d(pts, 4)
    torch.testing.assert_close(e2[:, :4], pos2posemb1d(pts[:, 1], 4))  # y first, then x
    torch.testing.assert_close(e2[:, 4:], pos2posemb1d(pts[:, 0], 4))
    torch.testing.assert_close(inverse_sigmoid(torch.tensor([0.5, 0.0, 1.0])),
                               torch.tensor([0.0, -11.512925, 11.512925]))


def test_boxes_are_anchor_plus_box_head_offset():
    """With the last box head zeroed, centres are the anchors and sizes sigmoid(0) = 0.5."""
    model = build_cellsam("tiny")
    model.load_state_dict(random_state_dict("tiny", with_model_cp=False, seed=3))
    head = model.cellfinder.decode_head.transformer
    with torch.no_grad():
        head.bbox_embed[-1].layers[-1].weight.zero_()
        head.bbox_embed[-1].layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
        _, boxes = model.cellfinder(torch.randn(1, 3, 256, 256))
    torch.testing.assert_close(boxes[0, :, :2], head.position.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes[0, :, 2], torch.full((50,), 0.5))
    torch.testing.assert_close(boxes[0, :, 3], torch.full((50,), torch.sigmoid(torch.tensor(1.0)).item()))
    # Only the last decoder layer's heads matter at inference.
    with torch.no_grad():
        before = model.cellfinder(torch.zeros(1, 3, 256, 256))
        head.class_embed[0].weight.add_(1.0)
        head.bbox_embed[0].layers[0].weight.add_(1.0)
        after = model.cellfinder(torch.zeros(1, 3, 256, 256))
    torch.testing.assert_close(before, after)
