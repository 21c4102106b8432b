"""ONNX graphs vs PyTorch: what the service runs must equal what was trained and evaluated."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sidrec.model.hstu import HSTU, UserEncoder
from sidrec.model.item_embedding import ItemEmbedding
from sidrec.offline.onnx_export import export_sid_to_vector, export_user_encoder

D, MAX_LEN = 50, 200


def reference_hstu(
    use_time: bool,
    attn_norm: str = "padded",
    ffn_mult: int = 0,
    scoring: str = "cosine",
    attention: str = "silu",
    norm: str = "pre",
    num_blocks: int = 2,
) -> HSTU:
    torch.manual_seed(0)
    model = HSTU(
        d=D,
        num_blocks=num_blocks,
        num_heads=2,
        dqk=25,
        dv=25,
        use_time=use_time,
        attn_norm=attn_norm,
        ffn_mult=ffn_mult,
        scoring=scoring,
        attention=attention,
        norm=norm,
    )
    # Trained-looking bias tables (the std 0.02 init would hide indexing mistakes).
    with torch.no_grad():
        for block in model.blocks:
            block.rel_bias.pos_w.normal_(0, 0.5)
            block.rel_bias.ts_w.normal_(0, 0.5)
    return model.train()  # export must switch to eval itself


def ragged_batch(b: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, size=b)
    lengths[0] = n  # one full row
    mask = np.arange(n)[None, :] < lengths[:, None]
    item_vectors = rng.normal(0, 0.1, (b, n, D)).astype(np.float32)
    item_vectors[~mask] = rng.normal(0, 100, (int((~mask).sum()), D))  # garbage padding
    gaps = rng.integers(0, 10**7, (b, n))
    timestamps = (900_000_000 + gaps.cumsum(1)).astype(np.int64)
    query_time = (timestamps.max(1) + rng.integers(0, 10**6, b)).astype(np.int64)
    return {
        "item_vectors": item_vectors,
        "timestamps": timestamps,
        "mask": mask,
        "query_time": query_time,
    }


@pytest.mark.parametrize(
    ("use_time", "attn_norm", "ffn_mult", "scoring", "attention", "norm", "num_blocks"),
    [
        (True, "padded", 0, "cosine", "silu", "pre", 2),
        (False, "padded", 0, "cosine", "silu", "pre", 2),
        (True, "length", 0, "cosine", "silu", "pre", 2),
        (True, "length", 4, "dot", "silu", "pre", 2),
        (True, "length", 0, "dot", "softmax", "pre", 2),
        (True, "length", 4, "dot", "silu", "post", 2),
        (True, "length", 0, "dot", "silu", "pre", 4),  # the default on ML-1M-sized data
    ],
)
def test_user_encoder_parity(
    tmp_path: Path,
    use_time: bool,
    attn_norm: str,
    ffn_mult: int,
    scoring: str,
    attention: str,
    norm: str,
    num_blocks: int,
) -> None:
    hstu = reference_hstu(use_time, attn_norm, ffn_mult, scoring, attention, norm, num_blocks)
    path = tmp_path / "user_encoder.onnx"
    export_user_encoder(hstu, D, path, MAX_LEN)
    assert hstu.training  # the caller's model is left as it was

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {
        "item_vectors": ("tensor(float)", ["batch", "length", D]),
        "timestamps": ("tensor(int64)", ["batch", "length"]),
        "mask": ("tensor(bool)", ["batch", "length"]),
        "query_time": ("tensor(int64)", ["batch"]),
    }
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("user_vectors", ["batch", D])]

    encoder = UserEncoder(hstu).eval()
    # Export used N = 7; check other N, up to max_len, and batch sizes.
    for seed, (b, n) in enumerate([(1, 1), (3, 5), (8, 64), (4, MAX_LEN), (2, 7)]):
        feeds = ragged_batch(b, n, seed)
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            want = encoder(*(torch.from_numpy(feeds[k]) for k in feeds)).numpy()
        assert got.shape == (b, D)
        assert np.abs(got - want).max() < 1e-4, (b, n)
        if scoring == "cosine":
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        else:  # LayerNorm'd: zero mean, unit variance per row
            np.testing.assert_allclose(got.mean(1), 0.0, atol=1e-5)
            np.testing.assert_allclose(got.std(1), 1.0, atol=1e-3)


def test_user_encoder_position_bias_is_folded_at_load(tmp_path: Path) -> None:
    # Block 0 needs the whole N x N position bias; its table depends on the weights only, so
    # ONNX Runtime must fold it at load, leaving the final block's one-row lookup as the only
    # run-time gather from a position table.
    hstu = reference_hstu(use_time=True, attn_norm="length", scoring="dot")
    path, optimized = tmp_path / "user_encoder.onnx", tmp_path / "optimized.onnx"
    export_user_encoder(hstu, D, path, MAX_LEN)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def position_gathers(graph: onnx.GraphProto) -> int:
        tables = {
            t.name for t in graph.initializer if list(t.dims)[:1] == [2 * hstu.padded_len - 1]
        }
        return sum(n.op_type == "Gather" and n.input[0] in tables for n in graph.node)

    assert position_gathers(onnx.load(str(path)).graph) == len(hstu.blocks)
    assert position_gathers(onnx.load(str(optimized)).graph) == 1


def test_user_encoder_rejects_max_len_beyond_padded_len(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_len"):
        export_user_encoder(HSTU(padded_len=20), 50, tmp_path / "x.onnx", max_len=21)
    with pytest.raises(ValueError, match="d=64"):
        export_user_encoder(HSTU(padded_len=20), 64, tmp_path / "x.onnx", max_len=20)


@pytest.mark.parametrize(
    ("variant", "fusion"),
    [("id", "alpha"), ("sid-prefixn", "alpha"), ("sid-rqsum", "alpha"), ("hybrid", "alpha"),
     ("hybrid", "switch")],
)  # fmt: skip
def test_sid_to_vector_parity(tmp_path: Path, variant: str, fusion: str) -> None:
    num_items, k, layers = 300, 64, 3
    gen = torch.Generator().manual_seed(0)
    sids = torch.randint(0, k, (num_items + 1, layers + 1), generator=gen)
    sids[:, layers] = 0
    sids[0] = 0
    torch.manual_seed(0)
    embedding = ItemEmbedding(variant, num_items, D, sids=sids, codes_per_layer=k, fusion=fusion)
    # As offline/export.py does: the table first (it records the SID rows trained items
    # read, which the SID -> vector graph then uses), then the graph.
    trained = torch.rand(num_items + 1, generator=gen) < 0.5
    table = embedding.table(trained).numpy()
    path = tmp_path / "sid_to_vector.onnx"
    export_sid_to_vector(embedding, path)

    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["codes"]
    assert session.get_inputs()[0].type == "tensor(int64)"
    assert [o.name for o in session.get_outputs()] == ["vectors"]
    for b in (1, 17):
        codes = torch.randint(0, k, (b, layers + 1), generator=gen)
        (got,) = session.run(None, {"codes": codes.numpy()})
        with torch.no_grad():
            want = embedding.from_sid(codes).numpy()
        assert got.shape == (b, D)
        assert np.abs(got - want).max() < 1e-5
    # What the service computes for a cold item equals the offline table row for it.
    cold = (~trained[1:]).nonzero().flatten() + 1
    (got,) = session.run(None, {"codes": sids[cold].numpy()})
    assert np.abs(got - table[cold]).max() < 1e-5


@pytest.mark.parametrize(
    "options",
    [
        {"prefix_table": "hashed", "unknown_id": "learned", "trained_rows_only": False},
        {"prefix_table": "exact", "unknown_id": "zero", "trained_rows_only": True},
        {"hybrid_sid": "rqsum", "unknown_id": "zero", "trained_rows_only": True},
    ],
)
def test_sid_to_vector_parity_for_new_tuples(tmp_path: Path, options: dict) -> None:
    # Codes from a small alphabet on the first layers, so new tuples mostly share a prefix
    # with the catalog and the exact table's "prefix unknown below here" path is exercised.
    num_items, k, layers = 300, 32, 3
    gen = torch.Generator().manual_seed(0)
    sids = torch.randint(0, k, (num_items + 1, layers + 1), generator=gen)
    sids[:, 0] %= 6
    sids[:, layers] = 0
    sids[0] = 0
    torch.manual_seed(0)
    embedding = ItemEmbedding("hybrid", num_items, D, sids=sids, codes_per_layer=k, **options)
    trained = torch.rand(num_items + 1, generator=gen) < 0.7
    table = embedding.table(trained).numpy()  # marks the SID rows trained items read
    path = tmp_path / "sid_to_vector.onnx"
    export_sid_to_vector(embedding, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    new = torch.randint(0, k, (64, layers + 1), generator=gen)
    new[:32, 0] %= 6  # known first code, mostly unknown longer prefixes
    (got,) = session.run(None, {"codes": new.numpy()})
    with torch.no_grad():
        want = embedding.from_sid(new).numpy()
    assert np.abs(got - want).max() < 1e-5
    untrained = (~trained).nonzero().flatten()
    untrained = untrained[untrained > 0]
    (got,) = session.run(None, {"codes": sids[untrained].numpy()})
    assert np.abs(got - table[untrained]).max() < 1e-5
    if options.get("prefix_table") == "exact":
        rows = embedding._sid_rows(new)
        assert (rows[:32, 0] > 0).all() and (rows[:32, 2] == 0).any() and (rows[32:] == 0).any()


@pytest.mark.parametrize("sid_gate, part", [(False, "ridge"), (True, "ridge"),
                                            (False, "neighbours"),
                                            (False, "centred neighbours")])  # fmt: skip
def test_sid_to_vector_with_a_content_part_reads_content(
    tmp_path: Path, sid_gate: bool, part: str
) -> None:
    num_items, k, layers, c = 200, 16, 3, 24
    gen = torch.Generator().manual_seed(0)
    sids = torch.randint(0, k, (num_items + 1, layers + 1), generator=gen)
    sids[:, layers] = 0
    sids[0] = 0
    torch.manual_seed(0)
    embedding = ItemEmbedding(
        "hybrid", num_items, D, sids=sids, codes_per_layer=k, sid_gate=sid_gate
    )
    if sid_gate:  # a trained frequency gate: new items read bucket 0's
        embedding.set_gate_buckets(torch.randint(0, 5000, (num_items + 1,), generator=gen))
        with torch.no_grad():
            embedding.sid_gate.copy_(torch.rand(len(embedding.sid_gate), generator=gen) - 0.5)
    content = torch.randn(num_items, c, generator=gen)
    trained = torch.rand(num_items + 1, generator=gen) < 0.7
    if part == "ridge":
        embedding.attach_content_map(torch.randn(c, D, generator=gen), torch.randn(D), content)
    else:  # the trained items' content vectors and id rows, read inside the graph
        warm = trained[1:].nonzero().flatten() + 1
        keys, values = content[warm - 1], embedding.id_emb.weight.detach()[warm]
        centre = None
        if part == "centred neighbours":  # the catalog's mean unit vector, inside the graph
            centre = torch.nn.functional.normalize(content, dim=-1).mean(0)
        embedding.attach_content_neighbours(keys, values, 5, 0.05, content, centre)
    table = embedding.table(trained).numpy()
    path = tmp_path / "sid_to_vector.onnx"
    export_sid_to_vector(embedding, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["codes", "content"]
    # the service's vector for a cold item is the offline table's row for it
    cold = (~trained[1:]).nonzero().flatten() + 1
    feeds = {"codes": sids[cold].numpy(), "content": content[cold - 1].numpy()}
    (got,) = session.run(None, feeds)
    assert np.abs(got - table[cold]).max() < 1e-5
    # one code tuple, two texts: two vectors
    twins = {"codes": sids[[1, 1]].numpy(), "content": content[[0, 1]].numpy()}
    (got,) = session.run(None, twins)
    assert np.abs(got[0] - got[1]).max() > 1e-3
