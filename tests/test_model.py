"""HSTU, item embeddings and loss: behaviour the reference implementation guarantees."""

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sidrec.model.hstu import HSTU, RelativeBias, UserEncoder, time_buckets
from sidrec.model.item_embedding import (
    ItemEmbedding,
    SidContentToVector,
    SidToVector,
    gate_buckets,
    prefix_rows,
    prefix_trie,
    trie_rows,
)
from sidrec.model.loss import MASKED_LOGIT, sample_negatives, sampled_softmax_loss

D = 16
P = 30  # padded length of the small test model


def small_hstu(use_time: bool = True, seed: int = 0, **options: Any) -> HSTU:
    torch.manual_seed(seed)
    model = HSTU(
        d=D, num_blocks=2, num_heads=2, dqk=8, dv=8, padded_len=P, use_time=use_time, **options
    )
    # Random init bias tables are tiny (std 0.02); make them matter so tests can see them.
    with torch.no_grad():
        for block in model.blocks:
            block.rel_bias.pos_w.normal_(0, 1.0)
            block.rel_bias.ts_w.normal_(0, 1.0)
    return model.eval()


def random_batch(b: int, n: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, D, generator=gen) * 0.1
    gaps = torch.randint(1, 10**6, (b, n), generator=gen)
    ts = 1_000_000_000 + gaps.cumsum(1)
    next_ts = torch.cat([ts[:, 1:], ts[:, -1:] + 3600], dim=1)
    return x, ts, next_ts


# ---------------------------------------------------------------- HSTU


def test_default_size_matches_reference() -> None:
    # GR's ML-1M HSTU: 234k parameters of which 3,953 x 50 = 197,650 are the item table.
    n_params = sum(p.numel() for p in HSTU().parameters())
    assert n_params == 36_750
    assert n_params + 3953 * 50 == 234_400


def test_time_bucket_values() -> None:
    seconds = torch.tensor([60, 3600, 86400, 7 * 86400, 365 * 86400])
    assert time_buckets(seconds, 128).tolist() == [13, 27, 37, 44, 57]
    # sign does not matter, gaps below a second go to bucket 0, huge gaps clamp to the top
    assert time_buckets(torch.tensor([-3600, 0, 1, 10**18]), 128).tolist() == [
        27,
        0,
        0,
        128,
    ]


def test_relative_bias_matches_naive_loop() -> None:
    torch.manual_seed(0)
    n, padded = 6, 9
    bias = RelativeBias(padded, num_buckets=128, use_time=True)
    _, ts, next_ts = random_batch(2, n)
    got = bias(ts, next_ts)  # [2, n, n]
    for b in range(2):
        for i in range(n):
            for j in range(n):
                dt = abs(int(next_ts[b, i]) - int(ts[b, j]))
                bucket = min(max(int(math.log(max(dt, 1)) / 0.301), 0), 128)
                want = bias.pos_w[padded - 1 + j - i] + bias.ts_w[bucket]
                assert torch.isclose(got[b, i, j], want, atol=1e-6)
    bias.use_time = False
    no_time = bias(ts, next_ts)
    assert no_time.shape == (1, n, n)
    assert no_time[0, 2, 5] == bias.pos_w[padded - 1 + 3]


def test_output_is_unit_norm_and_shaped() -> None:
    model = small_hstu()
    x, ts, next_ts = random_batch(3, 11)
    mask = torch.ones(3, 11, dtype=torch.bool)
    out = model(x, ts, next_ts, mask)
    assert out.shape == (3, 11, D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 11))


# SASRec's pieces as options: a feed-forward layer per block, a LayerNorm'd output for dot
# scoring, dropout on the attention weights, softmax attention
SASREC_PIECES = {"ffn_mult": 4, "scoring": "dot", "attn_dropout": 0.5, "attention": "softmax"}


def test_feed_forward_and_dot_output() -> None:
    model = small_hstu(**SASREC_PIECES)
    extra = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in small_hstu().parameters()
    )
    # per block: LayerNorm (2d) + d x 4d + 4d + 4d x d + d; once: the output LayerNorm (2d)
    assert extra == 2 * (2 * D + 8 * D * D + 5 * D) + 2 * D
    x, ts, next_ts = random_batch(3, 11)
    out = model(x, ts, next_ts, torch.ones(3, 11, dtype=torch.bool))
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 11), atol=1e-5, rtol=0)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(3, 11))
    with pytest.raises(ValueError, match="scoring"):
        HSTU(scoring="euclid")
    with pytest.raises(ValueError, match="attention"):
        HSTU(attention="relu")
    # attention dropout acts in training only: eval outputs are deterministic
    again = model(x, ts, next_ts, torch.ones(3, 11, dtype=torch.bool))
    torch.testing.assert_close(again, out)
    model.train()
    a = model(x, ts, next_ts, torch.ones(3, 11, dtype=torch.bool))
    assert not torch.allclose(a, model(x, ts, next_ts, torch.ones(3, 11, dtype=torch.bool)))


def test_post_norm_normalises_the_embeddings_and_every_residual_sum() -> None:
    # SASRec's layout: a LayerNorm on the embeddings and after each residual sum (2d each)
    pre, post = small_hstu(ffn_mult=4), small_hstu(ffn_mult=4, norm="post")
    extra = sum(p.numel() for p in post.parameters()) - sum(p.numel() for p in pre.parameters())
    assert extra == (1 + 2 * len(post.blocks)) * 2 * D
    x, ts, next_ts = random_batch(3, 11)
    mask = torch.ones(3, 11, dtype=torch.bool)
    rows: list[torch.Tensor] = []
    post.blocks[0].register_forward_hook(lambda _m, _i, out: rows.append(out))
    post(x, ts, next_ts, mask)
    # what the first block hands on is unit-scale per row (affine weights start at 1 and 0)
    torch.testing.assert_close(rows[0].mean(-1), torch.zeros(3, 11), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        rows[0].var(-1, unbiased=False), torch.ones(3, 11), atol=1e-3, rtol=0
    )
    with pytest.raises(ValueError, match="norm"):
        HSTU(norm="sandwich")


@pytest.mark.parametrize("options", [{}, SASREC_PIECES, {**SASREC_PIECES, "norm": "post"}])
def test_causality(options: dict[str, Any]) -> None:
    model = small_hstu(**options)
    x, ts, next_ts = random_batch(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    before = model(x, ts, next_ts, mask)
    # Change everything from position 7 on: item, its timestamp, what it predicts.
    x2, ts2, next_ts2 = x.clone(), ts.clone(), next_ts.clone()
    x2[:, 7:] = torch.randn(2, 5, D)
    ts2[:, 7:] += 12345
    next_ts2[:, 7:] += 999
    after = model(x2, ts2, next_ts2, mask)
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 7:], before[:, 7:], atol=1e-3)


def test_next_ts_feeds_time_bias_only_when_use_time() -> None:
    x, ts, next_ts = random_batch(1, 5)
    mask = torch.ones(1, 5, dtype=torch.bool)
    later = next_ts.clone()
    later[0, 2] += 30 * 86400
    with_time = small_hstu(use_time=True)
    a, b = with_time(x, ts, next_ts, mask), with_time(x, ts, later, mask)
    assert not torch.allclose(a[0, 2], b[0, 2], atol=1e-4)
    torch.testing.assert_close(a[0, :2], b[0, :2], rtol=0, atol=1e-6)
    no_time = small_hstu(use_time=False)
    torch.testing.assert_close(no_time(x, ts, next_ts, mask), no_time(x, ts, later, mask))


@pytest.mark.parametrize("options", [{}, {"attention": "softmax"}, {"norm": "post"}])
def test_padding_to_longer_n_changes_nothing(options: dict[str, Any]) -> None:
    model = small_hstu(**options)
    x, ts, next_ts = random_batch(2, 7)
    short = model(x, ts, next_ts, torch.ones(2, 7, dtype=torch.bool))
    extra = 20
    x_long = torch.cat([x, torch.randn(2, extra, D) * 50], dim=1)
    x_long[0, 9] = float("nan")  # even NaN garbage in padding must not leak
    ts_long = torch.cat([ts, torch.randint(0, 2**40, (2, extra))], dim=1)
    next_long = torch.cat([next_ts, torch.randint(0, 2**40, (2, extra))], dim=1)
    mask = torch.arange(7 + extra)[None].expand(2, -1) < 7
    long = model(x_long, ts_long, next_long, mask)
    torch.testing.assert_close(long[:, :7], short, rtol=0, atol=1e-6)
    assert torch.isfinite(long).all()


@pytest.mark.parametrize("options", [{}, {"attention": "softmax"}, {"norm": "post"}])
def test_key_padding_masks_garbage_in_the_middle(options: dict[str, Any]) -> None:
    model = small_hstu(**options)
    x, ts, next_ts = random_batch(1, 10)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 4] = False
    out = model(x, ts, next_ts, mask)
    x2, ts2 = x.clone(), ts.clone()
    x2[0, 4] = 1e3
    ts2[0, 4] = 7
    out2 = model(x2, ts2, next_ts, mask)
    real = mask[0]
    torch.testing.assert_close(out2[0, real], out[0, real], rtol=0, atol=1e-6)


def test_attention_divides_by_padded_len_not_n() -> None:
    # Same weights, different padded_len: outputs must differ even though N is the same.
    a = small_hstu()
    b = HSTU(d=D, num_blocks=2, num_heads=2, dqk=8, dv=8, padded_len=P + 10).eval()
    state = a.state_dict()
    for key, value in b.state_dict().items():
        if key.endswith("pos_w"):  # 2P - 1 entries: centre the old table in the new one
            value.zero_()
            value[10 : 10 + 2 * P - 1] = state[key]
        elif key == "pos_emb.weight":
            value.zero_()
            value[:P] = state[key]
        else:
            value.copy_(state[key])
    x, ts, next_ts = random_batch(1, 6)
    mask = torch.ones(1, 6, dtype=torch.bool)
    for block_a, block_b in zip(a.blocks, b.blocks, strict=True):
        assert block_b.rel_bias.pos_w[P + 9] == block_a.rel_bias.pos_w[P - 1]  # offset 0
    assert not torch.allclose(a(x, ts, next_ts, mask), b(x, ts, next_ts, mask), atol=1e-4)


def test_length_normalisation_divides_by_the_real_length() -> None:
    # Every block gets the divisor: padded_len for the reference, each row's real length
    # for attn_norm="length". The attention output then goes through a LayerNorm, which
    # removes a per-row scale except through its eps: so the two differ most on short
    # histories, whose 1/211-scaled attention falls below eps (docs/results).
    torch.manual_seed(0)
    kwargs = {"d": D, "num_blocks": 2, "num_heads": 1, "dqk": 8, "dv": 8, "padded_len": P}
    ref = HSTU(**kwargs).eval()
    length = HSTU(**kwargs, attn_norm="length").eval()
    length.load_state_dict(ref.state_dict())
    x, ts, next_ts = random_batch(2, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False  # second sequence: 5 real items
    seen: dict[str, list] = {"ref": [], "length": []}
    for name, model in (("ref", ref), ("length", length)):
        for block in model.blocks:
            block.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[3]))
    with torch.no_grad():
        ref(x * 1e-3, ts, next_ts, mask)
        length(x * 1e-3, ts, next_ts, mask)
    assert seen["ref"] == [float(P), float(P)]
    for divisor in seen["length"]:
        assert divisor.shape == (2, 1, 1, 1)
        assert divisor.flatten().tolist() == [9.0, 5.0]
    with pytest.raises(ValueError, match="attn_norm"):
        HSTU(**kwargs, attn_norm="softmax")


def test_length_normalisation_ignores_padding() -> None:
    torch.manual_seed(0)
    model = HSTU(d=D, num_blocks=2, num_heads=2, dqk=8, dv=8, padded_len=P, attn_norm="length")
    model.eval()
    x, ts, next_ts = random_batch(1, 6)
    short = model(x, ts, next_ts, torch.ones(1, 6, dtype=torch.bool))
    pad = torch.zeros(1, 4, D)
    long = model(
        torch.cat([x, pad], 1),
        torch.cat([ts, ts[:, -1:].expand(1, 4)], 1),
        torch.cat([next_ts, next_ts[:, -1:].expand(1, 4)], 1),
        torch.arange(10)[None] < 6,
    )
    torch.testing.assert_close(long[:, :6], short, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [{}, SASREC_PIECES])
def test_gradients_reach_every_parameter(options: dict[str, Any]) -> None:
    model = small_hstu(**options).train()
    x, ts, next_ts = random_batch(4, 10)
    x.requires_grad_(True)
    mask = torch.arange(10)[None].expand(4, -1) < torch.tensor([[10], [3], [7], [1]])
    out = model(x, ts, next_ts, mask)
    (out[mask] * torch.randn(int(mask.sum()), D)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad[mask].abs().sum() > 0
    assert (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("options", [{}, {"use_time": False}, SASREC_PIECES])
def test_one_query_row_equals_that_row_of_the_full_output(options: dict[str, Any]) -> None:
    # Serving computes only the position it reads in the last block (one query row, its bias
    # row); that must be the full forward's row, for any position and length.
    model = small_hstu(**options)
    x, ts, next_ts = random_batch(4, 9)
    mask = torch.arange(9)[None] < torch.tensor([[9], [4], [1], [7]])
    query = torch.tensor([8, 3, 0, 2])  # the last real position, and one in the middle
    full = model(x, ts, next_ts, mask)
    one = model(x, ts, next_ts, mask, query=query)
    assert one.shape == (4, D)
    torch.testing.assert_close(one, full[torch.arange(4), query], rtol=0, atol=1e-6)


def test_user_encoder_reads_last_real_position_with_query_time() -> None:
    model = small_hstu()
    encoder = UserEncoder(model)
    x, ts, _ = random_batch(3, 8)
    lengths = torch.tensor([8, 3, 1])
    mask = torch.arange(8)[None] < lengths[:, None]
    query_time = ts.max(1).values + 86400
    got = encoder(x, ts, mask, query_time)
    assert got.shape == (3, D)
    for row, n in enumerate(lengths.tolist()):
        next_ts = torch.cat([ts[row, 1:n], query_time[row : row + 1]])[None]
        want = model(x[row : row + 1, :n], ts[row : row + 1, :n], next_ts, mask[row : row + 1, :n])
        torch.testing.assert_close(got[row], want[0, n - 1], rtol=0, atol=1e-6)
    # The request time moves the user vector (it biases the last position's attention).
    moved = encoder(x, ts, mask, query_time + 365 * 86400)
    assert not torch.allclose(moved, got, atol=1e-4)
    # A user with no history yet gets a finite (meaningless) vector, not NaN or an error.
    empty = encoder(x[:1], ts[:1], torch.zeros(1, 8, dtype=torch.bool), query_time[:1])
    assert torch.isfinite(empty).all()


# ---------------------------------------------------------------- item embeddings

N_ITEMS, K, L = 40, 8, 3


def make_sids(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    sids = torch.randint(0, K, (N_ITEMS + 1, L + 1), generator=gen)
    sids[:, L] = 0
    sids[5, :L] = sids[4, :L]  # a collision: item 5 is item 4's twin with dedup digit 1
    sids[5, L] = 1
    sids[0] = 0
    return sids


def make_embedding(variant: str, **kwargs: object) -> ItemEmbedding:
    torch.manual_seed(0)
    return ItemEmbedding(variant, N_ITEMS, D, sids=make_sids(), codes_per_layer=K, **kwargs)


ALL_VARIANTS = ["id", "sid-prefixn", "sid-rqsum", "hybrid"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_embedding_shapes_and_padding_row(variant: str) -> None:
    emb = make_embedding(variant)
    rows = torch.tensor([[1, 2, 0], [N_ITEMS, 0, 0]])
    out = emb(rows)
    assert out.shape == (2, 3, D)
    assert (out[rows == 0] == 0).all()
    assert (out[rows != 0].abs().sum(-1) > 0).all()
    assert emb.uses_sid == (variant != "id")
    table = emb.table(torch.ones(N_ITEMS + 1, dtype=torch.bool))
    assert table.shape == (N_ITEMS + 1, D)
    assert (table[0] == 0).all()
    torch.testing.assert_close(table[1:], emb.eval()(torch.arange(1, N_ITEMS + 1)))


def test_prefix_hash_distinguishes_prefix_lengths() -> None:
    big = 10**9  # no mod collisions, so distinct prefixes must get distinct rows
    rows = prefix_rows(torch.tensor([[3, 0, 0], [0, 3, 0]]), codes_per_layer=K, table_size=big)
    assert len(set(rows.flatten().tolist())) == 6
    # bijective base-K numbering: (c1) -> c1 + 1, (c1, c2) -> (c1 + 1) K + c2 + 1, mod table
    rows = prefix_rows(torch.tensor([[2, 5, 7]]), codes_per_layer=K, table_size=97)
    h1 = 3
    h2 = h1 * K + 6
    h3 = h2 * K + 8
    assert rows.tolist() == [[h1 % 97, h2 % 97, h3 % 97]]


def test_prefixn_sums_prefix_rows_and_ignores_dedup_digit() -> None:
    emb = make_embedding("sid-prefixn", prefix_table="hashed", prefix_table_size=101).eval()
    sids = make_sids()
    want = emb.sid_emb.weight[prefix_rows(sids[7, :L], K, 101)].sum(0)
    torch.testing.assert_close(emb(torch.tensor([7]))[0], want)
    # Items 4 and 5 differ only in the dedup digit, so a pure-SID model cannot tell them apart.
    torch.testing.assert_close(emb(torch.tensor([4]))[0], emb(torch.tensor([5]))[0])
    assert emb.table_size == 101
    hashed = make_embedding("sid-prefixn", prefix_table="hashed")
    assert hashed.table_size == 41  # smallest prime >= N_ITEMS + 1


def test_rqsum_uses_layer_offsets() -> None:
    emb = make_embedding("sid-rqsum").eval()
    codes = make_sids()[9, :L]
    want = sum(emb.sid_emb.weight[int(codes[i]) + i * K] for i in range(L))
    torch.testing.assert_close(emb(torch.tensor([9]))[0], want)
    assert emb.sid_emb.num_embeddings == L * K


def test_sid_layers_uses_only_the_first_codes() -> None:
    emb = make_embedding("sid-prefixn", sid_layers=2).eval()
    codes = make_sids()[[7]]
    other = codes.clone()
    other[0, 2] = (other[0, 2] + 1) % K
    torch.testing.assert_close(emb.from_sid(codes), emb.from_sid(other))


@pytest.mark.parametrize("variant", ["id", "hybrid"])
def test_id_dropout(variant: str) -> None:
    rows = torch.randint(1, N_ITEMS + 1, (6, 9))
    sid_only = make_embedding(variant).from_sid(make_sids()[rows].view(-1, L + 1)).view(6, 9, D)
    always = make_embedding(variant, id_dropout=1.0).train()
    torch.testing.assert_close(always(rows), sid_only)
    never = make_embedding(variant, id_dropout=0.0).train()
    assert not torch.allclose(never(rows), sid_only)
    torch.testing.assert_close(never(rows), always.eval()(rows))  # eval never drops
    # p = 0.5: some items dropped, some kept, and every occurrence of an item alike.
    torch.manual_seed(3)
    half = make_embedding(variant, id_dropout=0.5).train()
    full = half.eval()(torch.arange(1, N_ITEMS + 1))
    half.train()
    out = half(torch.arange(1, N_ITEMS + 1).repeat(2))
    first, second = out[:N_ITEMS], out[N_ITEMS:]
    torch.testing.assert_close(first, second)
    dropped = (first - full).abs().sum(-1) > 0
    assert 0 < int(dropped.sum()) < N_ITEMS


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_table_and_from_sid_agree_for_untrained_items(variant: str) -> None:
    emb = make_embedding(variant, fusion="alpha")
    with torch.no_grad():
        if emb.alpha is not None:
            emb.alpha.fill_(0.3)
    trained = torch.rand(N_ITEMS + 1, generator=torch.Generator().manual_seed(1)) < 0.5
    table = emb.table(trained)
    sids = make_sids()
    untrained = (~trained).nonzero().flatten()
    untrained = untrained[untrained > 0]
    torch.testing.assert_close(table[untrained], emb.from_sid(sids[untrained]))
    trained_rows = trained.nonzero().flatten()
    trained_rows = trained_rows[trained_rows > 0]
    torch.testing.assert_close(table[trained_rows], emb.eval()(trained_rows))
    torch.testing.assert_close(SidToVector(emb)(sids[untrained]), table[untrained])
    if variant == "id":  # no SID and no id: nothing to go on
        assert (table[untrained] == 0).all()


def test_hybrid_fusions() -> None:
    summed = make_embedding("hybrid", fusion="sum").eval()
    assert summed.alpha is None
    rows = torch.tensor([3])
    sid_part = summed.sid_emb(summed.sid_rows[rows]).sum(-2)
    torch.testing.assert_close(summed(rows), sid_part + summed.id_emb(rows))

    mixed = make_embedding("hybrid", fusion="alpha")
    assert mixed.alpha.item() == 0.5
    assert any(p is mixed.alpha for p in mixed.parameters())
    optimizer = torch.optim.SGD(mixed.parameters(), lr=0.1)
    mixed(torch.tensor([1, 2, 3])).pow(2).sum().backward()
    assert mixed.alpha.grad is not None and mixed.alpha.grad != 0
    optimizer.step()
    assert mixed.alpha.item() != 0.5


def test_switch_fusion_uses_the_id_where_known_and_the_sid_only_for_the_rest() -> None:
    emb = make_embedding("hybrid", fusion="switch", id_dropout=0.5)
    sids = make_sids()
    trained = torch.rand(N_ITEMS + 1, generator=torch.Generator().manual_seed(2)) < 0.5
    trained[0] = False
    table = emb.table(trained)
    warm, cold = trained.nonzero().flatten(), (~trained).nonzero().flatten()[1:]
    # Warm items: exactly their id row, no SID rows mixed in (the ML-1M finding).
    torch.testing.assert_close(table[warm], emb.id_emb(warm))
    # Cold items: their SID vector, the same one a newly ingested item gets.
    torch.testing.assert_close(table[cold], emb.from_sid(sids[cold]))
    assert not torch.equal(emb.from_sid(sids[warm]), table[warm])
    # Training: a dropped id makes that item's every occurrence its SID vector.
    emb.train()
    torch.manual_seed(0)
    rows = torch.arange(1, N_ITEMS + 1)
    out = emb(rows)
    sid_vectors = emb.sid_emb(emb.sid_rows[rows]).sum(-2)
    is_sid = (out - sid_vectors).abs().amax(-1) < 1e-7
    is_id = (out - emb.id_emb(rows)).abs().amax(-1) < 1e-7
    assert (is_sid ^ is_id).all() and 0 < int(is_sid.sum()) < N_ITEMS
    emb.eval()
    torch.testing.assert_close(emb(rows), emb.id_emb(rows))


def test_prefix_trie_gives_each_catalog_prefix_one_row_and_novel_prefixes_none() -> None:
    codes = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 2], [4, 1, 2], [4, 1, 2]])
    child, num_rows = prefix_trie(codes, codes_per_layer=K)
    rows = trie_rows(codes, child)
    # distinct prefixes: (0) (4) | (0,1) (0,2) (4,1) | (0,1,2) (0,1,3) (0,2,2) (4,1,2)
    assert num_rows == 1 + 2 + 3 + 4
    assert sorted(set(rows.flatten().tolist())) == list(range(1, num_rows))
    assert rows[0, 0] == rows[1, 0] == rows[2, 0] != rows[3, 0]  # (0) shared, (4) not
    assert rows[0, 1] == rows[1, 1] != rows[3, 1]  # (0, 1) is not (4, 1)
    assert torch.equal(rows[3], rows[4])  # twins share every row
    # A tuple nobody has: its known prefixes keep their rows, the first unknown one and
    # everything below it get row 0 (even where a longer code path exists elsewhere).
    novel = trie_rows(torch.tensor([[0, 1, 5], [0, 5, 2], [5, 1, 2], [4, 2, 2]]), child)
    assert novel.tolist() == [
        [rows[0, 0], rows[0, 1], 0],
        [rows[0, 0], 0, 0],
        [0, 0, 0],
        [rows[3, 0], 0, 0],
    ]


def catalog_and_novel_codes() -> tuple[torch.Tensor, torch.Tensor]:
    """make_sids' catalog and one SID per catalog item whose last code no item has."""
    sids = make_sids()
    novel = sids[1:].clone()
    taken = {tuple(s[:L].tolist()) for s in sids[1:]}
    for s in novel:
        s[L - 1] = next(c for c in range(K) if (*s[: L - 1].tolist(), c) not in taken)
    return sids, novel


def test_exact_prefix_table_falls_back_to_shared_prefixes() -> None:
    emb = make_embedding("sid-prefixn", prefix_table="exact").eval()
    sids, novel = catalog_and_novel_codes()
    # one row per distinct catalog prefix plus row 0, which stays zero
    distinct = sum(len({tuple(s[:p].tolist()) for s in sids[1:]}) for p in range(1, L + 1))
    assert emb.table_size == distinct + 1
    assert (emb.sid_emb.weight[0] == 0).all()
    # a catalog item reads the rows of its own prefixes, no two prefixes share a row
    rows = emb.sid_rows[1:]
    pairs = {
        (p, tuple(s[: p + 1].tolist())): int(r)
        for s, rr in zip(sids[1:], rows, strict=True)
        for p, r in enumerate(rr)
    }
    assert len(set(pairs.values())) == len(pairs)
    # a new tuple is the sum of its shared shorter prefixes' rows, nothing else
    got = emb.from_sid(novel)
    shared = emb.sid_rows[1:, : L - 1]  # novel[i] shares item i + 1's first L - 1 codes
    torch.testing.assert_close(got, emb.sid_emb.weight[shared].sum(-2))
    # an existing tuple gives the catalog item's vector; an unknown first code gives zeros
    torch.testing.assert_close(emb.from_sid(sids[1:]), emb(torch.arange(1, N_ITEMS + 1)))
    # a first code no catalog item starts with: no prefix matches, the SID part is zero
    sids_no_last_code = sids.clone()
    sids_no_last_code[:, 0] %= K - 1
    torch.manual_seed(0)
    emb = ItemEmbedding(
        "sid-prefixn", N_ITEMS, D, sids=sids_no_last_code, codes_per_layer=K, prefix_table="exact"
    )
    unknown_first = sids[1:3].clone()
    unknown_first[:, 0] = K - 1
    assert (emb.from_sid(unknown_first) == 0).all()


def test_zero_unknown_id_leaves_the_sid_part_alone() -> None:
    emb = make_embedding("hybrid", unknown_id="zero", trained_rows_only=False)
    assert emb.id_emb.num_embeddings == N_ITEMS + 1  # no unknown row to learn
    rows = torch.arange(1, N_ITEMS + 1)
    sid_part = emb.sid_emb(emb.sid_rows[rows]).sum(-2)
    emb.id_dropout = 1.0
    torch.testing.assert_close(emb.train()(rows), sid_part)  # dropped = SID part only
    trained = torch.arange(N_ITEMS + 1) % 2 == 0
    table = emb.table(trained)
    torch.testing.assert_close(table[1::2], sid_part[0::2])
    torch.testing.assert_close(emb.from_sid(make_sids()[1::2]), sid_part[0::2])
    # the id model has nothing but the id: a cold item is the zero vector
    id_only = make_embedding("id", unknown_id="zero")
    assert (id_only.table(trained)[1::2] == 0).all()
    assert (id_only.from_sid(make_sids()[1:4]) == 0).all()
    # the learned unknown row is still there on request
    learned = make_embedding("hybrid", unknown_id="learned")
    assert learned.id_emb.num_embeddings == N_ITEMS + 2
    unknown = learned.id_emb.weight[N_ITEMS + 1]
    learned_sid_part = learned.sid_emb(learned.sid_rows[1]).sum(-2)
    torch.testing.assert_close(learned.from_sid(make_sids()[1:2])[0], learned_sid_part + unknown)


@pytest.mark.parametrize("prefix_table", ["exact", "hashed"])
def test_untrained_sid_rows_contribute_nothing(prefix_table: str) -> None:
    # (a roomy hashed table, so that some rows are read by untrained items only)
    kwargs = {"prefix_table": prefix_table, "unknown_id": "zero", "prefix_table_size": 1009}
    emb = make_embedding("hybrid", trained_rows_only=True, **kwargs)
    sids = make_sids()
    trained = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    trained[[0, 7, 4, 5]] = False  # 4 and 5 are twins: their full tuple is nobody else's
    read_by_trained = set(emb.sid_rows[trained].flatten().tolist())
    only_untrained = sorted(set(emb.sid_rows[[4, 7]].flatten().tolist()) - read_by_trained)
    assert only_untrained  # the test needs such rows
    before = emb.table(trained)
    cold_before = emb.from_sid(sids[[4, 7]])
    with torch.no_grad():
        emb.sid_emb.weight[only_untrained] += 100.0  # what training never touched
    torch.testing.assert_close(emb.table(trained), before)
    torch.testing.assert_close(emb.from_sid(sids[[4, 7]]), cold_before)
    torch.testing.assert_close(SidToVector(emb)(sids[[4, 7]]), before[[4, 7]])
    # the cold vector is the sum of the rows trained items read
    rows = emb.sid_rows[[4, 7]]
    keep = torch.tensor([[int(r) in read_by_trained for r in rr] for rr in rows])
    want = (emb.sid_emb.weight[rows] * keep[..., None]).sum(-2)
    torch.testing.assert_close(before[[4, 7]], want)
    # trained items are untouched, and without trained_rows_only every row counts
    torch.testing.assert_close(before[trained], emb.eval()(trained.nonzero().flatten()))
    plain = make_embedding("hybrid", trained_rows_only=False, **kwargs)
    plain_before = plain.table(trained)
    with torch.no_grad():
        plain.sid_emb.weight[only_untrained] += 100.0
    assert not torch.allclose(plain.table(trained)[[4, 7]], plain_before[[4, 7]])


def test_trained_rows_record_is_saved_with_the_weights() -> None:
    emb = make_embedding("hybrid")
    assert (emb.unknown_id, emb.prefix_table, emb.trained_rows_only) == ("zero", "exact", True)
    trained = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    trained[[4, 5, 7]] = False
    emb.table(trained)
    state = emb.state_dict()
    assert not state["sid_row_trained"].all()
    codes = make_sids()[[4, 7]]
    fresh = make_embedding("hybrid")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.from_sid(codes), emb.from_sid(codes))
    # a checkpoint from before the record loads, with every row counting as before
    del state["sid_row_trained"]
    old = make_embedding("hybrid")
    old.load_state_dict(state)
    assert old.sid_row_trained.all()


def test_content_part_replaces_only_the_missing_id_part() -> None:
    emb = make_embedding("hybrid").eval()
    sids = make_sids()
    C = 6
    content = torch.randn(N_ITEMS, C, generator=torch.Generator().manual_seed(3))
    weight, bias = torch.randn(C, D), torch.randn(D)
    trained = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    trained[[4, 5, 9]] = False
    before = emb.table(trained)
    emb.attach_content_map(weight, bias, content)
    table = emb.table(trained)
    warm = trained.nonzero().flatten()
    torch.testing.assert_close(table[warm], before[warm])  # warm items lose nothing
    cold = torch.tensor([4, 5, 9])
    # a cold item: its SID part plus the content's guess of its id row
    torch.testing.assert_close(table[cold], before[cold] + content[cold - 1] @ weight + bias)
    torch.testing.assert_close(emb.from_sid(sids[cold], content[cold - 1]), table[cold])
    torch.testing.assert_close(SidContentToVector(emb)(sids[cold], content[cold - 1]), table[cold])
    # items 4 and 5 share their code tuple: the SID alone gave them one vector, content parts
    # with different texts do not
    torch.testing.assert_close(before[4], before[5])
    assert not torch.allclose(table[4], table[5])
    with pytest.raises(ValueError, match="needs content"):
        emb.from_sid(sids[cold])
    # saved with the weights: a fresh embedding built from the same arguments loads it
    fresh = make_embedding("hybrid")
    fresh.load_state_dict(emb.state_dict())
    assert fresh.has_content_part
    torch.testing.assert_close(fresh.table(trained), table)


def untrained_4_5_9(
    emb: ItemEmbedding,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trained [n + 1] with items 4, 5 and 9 untrained, emb's table before a content part,
    the trained rows [m], their id rows [m, d])."""
    trained = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    trained[[4, 5, 9]] = False
    warm = trained.nonzero().flatten()
    warm = warm[warm > 0]
    return trained, emb.table(trained), warm, emb.id_emb.weight.detach()[warm]


def test_content_neighbours_part_is_the_weighted_id_rows_of_the_nearest_trained_items() -> None:
    emb = make_embedding("hybrid").eval()
    sids = make_sids()
    C, k, temperature = 6, 3, 0.1
    gen = torch.Generator().manual_seed(4)
    content = torch.randn(N_ITEMS, C, generator=gen)
    content[3] = content[5] * 2.5 + 0.01 * torch.randn(C, generator=gen)  # item 4 ~ item 6
    trained, before, warm, id_rows = untrained_4_5_9(emb)
    emb.attach_content_neighbours(content[warm - 1], id_rows, k, temperature, content)
    table = emb.table(trained)
    torch.testing.assert_close(table[warm], before[warm])  # warm items lose nothing
    # brute force: every untrained item's k most cosine-similar trained items
    unit = torch.nn.functional.normalize(content, dim=-1)
    for row in (4, 5, 9):
        cosine = unit[warm - 1] @ unit[row - 1]
        top = cosine.argsort(descending=True)[:k]
        weights = torch.softmax(cosine[top] / temperature, 0)
        guess = (weights[:, None] * id_rows[top]).sum(0)
        torch.testing.assert_close(table[row], before[row] + guess)
    # the near-duplicate takes most of its id part from item 6, whatever its length
    assert torch.cosine_similarity(table[4] - before[4], emb.id_emb.weight[6].detach(), 0) > 0.9
    cold = torch.tensor([4, 5, 9])
    torch.testing.assert_close(emb.from_sid(sids[cold], content[cold - 1]), table[cold])
    torch.testing.assert_close(SidContentToVector(emb)(sids[cold], content[cold - 1]), table[cold])
    assert not torch.allclose(table[4], table[5])  # one code tuple, two texts: two vectors
    # saved with the weights, k and the temperature included; a ridge map replaces it
    fresh = make_embedding("hybrid")
    fresh.load_state_dict(emb.state_dict())
    assert fresh.has_content_part and fresh.content_k == k and fresh.content_dim == C
    torch.testing.assert_close(fresh.table(trained), table)
    weight, bias = torch.randn(C, D, generator=gen), torch.randn(D, generator=gen)
    fresh.attach_content_map(weight, bias, content)
    assert fresh.content_keys is None and fresh.content_dim == C
    torch.testing.assert_close(fresh.table(trained)[4], before[4] + content[3] @ weight + bias)
    with pytest.raises(ValueError, match="0 < k"):
        emb.attach_content_neighbours(content[warm - 1], id_rows, len(warm) + 1, 0.1, content)


def test_centred_content_neighbours_are_the_nearest_about_the_centre() -> None:
    emb = make_embedding("hybrid").eval()
    sids = make_sids()
    C, k, temperature = 6, 3, 0.1
    gen = torch.Generator().manual_seed(5)
    # every vector shares one large direction, as one catalog's text vectors do
    content = torch.randn(N_ITEMS, C, generator=gen) + 4 * torch.eye(C)[0]
    trained, before, warm, id_rows = untrained_4_5_9(emb)
    unit = torch.nn.functional.normalize(content, dim=-1)
    centre = unit.mean(0)
    emb.attach_content_neighbours(content[warm - 1], id_rows, k, temperature, content, centre)
    table = emb.table(trained)
    torch.testing.assert_close(table[warm], before[warm])
    # brute force: the k most similar trained items by the cosine about the centre
    centred = torch.nn.functional.normalize(unit - centre, dim=-1)
    differ = 0  # items whose neighbours the plain cosine would choose otherwise
    for row in (4, 5, 9):
        cosine = centred[warm - 1] @ centred[row - 1]
        top = cosine.argsort(descending=True)[:k]
        weights = torch.softmax(cosine[top] / temperature, 0)
        torch.testing.assert_close(
            table[row], before[row] + (weights[:, None] * id_rows[top]).sum(0)
        )
        plain = (unit[warm - 1] @ unit[row - 1]).argsort(descending=True)[:k]
        differ += set(plain.tolist()) != set(top.tolist())
    assert differ
    cold = torch.tensor([4, 5, 9])
    torch.testing.assert_close(SidContentToVector(emb)(sids[cold], content[cold - 1]), table[cold])
    # saved with the weights; a ridge map or an uncentred part drops it
    fresh = make_embedding("hybrid")
    fresh.load_state_dict(emb.state_dict())
    torch.testing.assert_close(fresh.content_centre, centre)
    torch.testing.assert_close(fresh.table(trained), table)
    fresh.attach_content_neighbours(content[warm - 1], id_rows, k, temperature, content)
    assert fresh.content_centre is None
    assert not torch.allclose(fresh.table(trained)[cold], table[cold])


@pytest.mark.parametrize("variant", ["sid-prefixn", "hybrid"])
def test_untrained_codes_change_only_untrained_rows_and_are_saved(variant: str) -> None:
    emb = make_embedding(variant).eval()
    sids = make_sids()
    trained = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    trained[[4, 9]] = False
    before = emb.table(trained)
    codes = sids.clone()
    codes[4, :L] = sids[7, :L]  # item 4 reads trained item 7's path, item 9 keeps its own
    emb.attach_untrained_codes(codes[:, :L])
    table = emb.table(trained)
    warm = trained.nonzero().flatten()
    torch.testing.assert_close(table[warm], before[warm])
    torch.testing.assert_close(table[9], before[9])
    # item 4 has no id part (untrained), so its vector is item 7's SID part alone
    torch.testing.assert_close(table[4], emb.from_sid(codes[7:8])[0])
    torch.testing.assert_close(table[4], emb.from_sid(codes[4:5])[0])
    fresh = make_embedding(variant)
    fresh.load_state_dict(emb.state_dict())
    torch.testing.assert_close(fresh.table(trained), table)
    with pytest.raises(ValueError, match="num_items"):
        emb.attach_untrained_codes(codes[:5, :L])


@pytest.mark.parametrize("variant, fusion", [("hybrid", "switch"), ("sid-prefixn", "sum")])
def test_content_part_is_for_hybrid_sum_only(variant: str, fusion: str) -> None:
    emb = make_embedding(variant, fusion=fusion)
    with pytest.raises(ValueError, match="hybrid-sum"):
        emb.attach_content_map(torch.zeros(4, D), torch.zeros(D), torch.zeros(N_ITEMS, 4))


def test_frequency_gate_scales_the_sid_part_by_training_count() -> None:
    assert gate_buckets(torch.tensor([0, 1, 2, 3, 6, 7, 100, 10**9])).tolist() == [
        0, 1, 1, 2, 2, 3, 6, 15,
    ]  # fmt: skip
    emb = make_embedding("hybrid", sid_gate=True, id_dropout=1.0)
    counts = torch.arange(N_ITEMS + 1) ** 2  # rows 1..40 spread over buckets 1-10
    counts[[4, 9]] = 0  # untrained
    emb.set_gate_buckets(counts)
    with torch.no_grad():
        emb.sid_gate.copy_(torch.linspace(-0.5, 1.0, len(emb.sid_gate)))
    trained = counts > 0
    sids = make_sids()
    rows = torch.arange(N_ITEMS + 1)
    sid_part = emb.sid_emb(emb.sid_rows).sum(-2)  # every row here is trained but 4 and 9's own
    gate = 1 + emb.sid_gate[gate_buckets(counts)]
    table = emb.table(trained)
    warm = trained.nonzero().flatten()
    torch.testing.assert_close(table[warm], emb.id_emb(warm) + gate[warm, None] * sid_part[warm])
    torch.testing.assert_close(emb.eval()(warm), table[warm])
    # untrained items read bucket 0, in the table and as a new item (the ONNX graph's path)
    cold = torch.tensor([4, 9])
    torch.testing.assert_close(table[cold], emb.from_sid(sids[cold]))
    torch.testing.assert_close(SidToVector(emb)(sids[cold]), emb.from_sid(sids[cold]))
    torch.testing.assert_close(
        emb.from_sid(sids[[7]]), (1 + emb.sid_gate[0]) * emb._sid_vectors(emb.sid_rows[[7]])
    )
    # an id-dropped item in training looks new: bucket 0, and the gate learns from it
    emb.train()
    out = emb(rows[1:])
    torch.testing.assert_close(out, (1 + emb.sid_gate[0]) * sid_part[1:])
    out.sum().backward()
    assert emb.sid_gate.grad[0] != 0 and (emb.sid_gate.grad[1:] == 0).all()
    # kept ids train each item's own bucket
    emb.zero_grad()
    emb.id_dropout = 0.0
    emb(rows[1:]).sum().backward()
    read = gate_buckets(counts[1:]).unique()
    assert (emb.sid_gate.grad[read] != 0).all()
    # gate and buckets are saved with the weights
    fresh = make_embedding("hybrid", sid_gate=True)
    fresh.load_state_dict(emb.state_dict())
    torch.testing.assert_close(fresh.table(trained), emb.table(trained))
    # a plain sum at the start: the gate changes nothing until trained
    plain, gated = make_embedding("hybrid"), make_embedding("hybrid", sid_gate=True)
    gated.set_gate_buckets(counts)
    torch.testing.assert_close(gated.table(trained), plain.table(trained))
    with pytest.raises(ValueError, match="hybrid-sum"):
        make_embedding("hybrid", fusion="switch", sid_gate=True)
    with pytest.raises(ValueError, match="no frequency gate"):
        plain.set_gate_buckets(counts)


def test_hybrid_with_rqsum_sid_part() -> None:
    emb = make_embedding("hybrid", hybrid_sid="rqsum").eval()
    assert emb.sid_emb.num_embeddings == L * K
    codes = make_sids()[9, :L]
    want = sum(emb.sid_emb.weight[int(codes[i]) + i * K] for i in range(L)) + emb.id_emb.weight[9]
    torch.testing.assert_close(emb(torch.tensor([9]))[0], want)


def test_embedding_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="variant"):
        ItemEmbedding("sid", N_ITEMS, D)
    with pytest.raises(ValueError, match="sids"):
        ItemEmbedding("hybrid", N_ITEMS, D)
    with pytest.raises(ValueError, match="fusion"):
        make_embedding("hybrid", fusion="mlp")
    with pytest.raises(ValueError, match="sid_layers"):
        make_embedding("sid-rqsum", sid_layers=L + 1)


# ---------------------------------------------------------------- loss


def test_loss_matches_hand_computation() -> None:
    user = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    pos = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    neg = F.normalize(torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]]), dim=-1)
    t = 0.5
    loss = sampled_softmax_loss(user, pos, neg, torch.tensor([1]), torch.tensor([[2, 3]]), t)
    cos_pos, cos_negs = 1 / math.sqrt(2), [0.0, -1.0]
    want = -cos_pos / t + math.log(math.exp(cos_pos / t) + sum(math.exp(c / t) for c in cos_negs))
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_loss_masks_negative_equal_to_positive_and_averages() -> None:
    torch.manual_seed(0)
    user = F.normalize(torch.randn(3, D), dim=-1)
    pos = F.normalize(torch.randn(3, D), dim=-1)
    neg = F.normalize(torch.randn(3, 4, D), dim=-1)
    pos_rows = torch.tensor([5, 6, 7])
    neg_rows = torch.tensor([[1, 2, 3, 4], [6, 2, 6, 4], [1, 2, 3, 4]])
    neg[1, 0] = pos[1]  # the sampler drew the positive itself, twice
    neg[1, 2] = pos[1]
    loss = sampled_softmax_loss(user, pos, neg, pos_rows, neg_rows)
    per_row = [
        sampled_softmax_loss(user[[0]], pos[[0]], neg[[0]], pos_rows[[0]], neg_rows[[0]]),
        sampled_softmax_loss(
            user[[1]], pos[[1]], neg[[1]][:, [1, 3]], pos_rows[[1]], neg_rows[[1]][:, [1, 3]]
        ),
        sampled_softmax_loss(user[[2]], pos[[2]], neg[[2]], pos_rows[[2]], neg_rows[[2]]),
    ]
    assert loss.item() == pytest.approx(sum(x.item() for x in per_row) / 3, rel=1e-5)
    assert MASKED_LOGIT == -5e4


def test_loss_gradient_flows() -> None:
    torch.manual_seed(0)
    user = torch.randn(4, D, requires_grad=True)
    pos = torch.randn(4, D, requires_grad=True)
    neg = torch.randn(4, 5, D, requires_grad=True)
    loss = sampled_softmax_loss(
        F.normalize(user, dim=-1),
        F.normalize(pos, dim=-1),
        F.normalize(neg, dim=-1),
        torch.arange(4),
        torch.randint(10, 20, (4, 5)),
    )
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (user, pos, neg))


def test_sample_negatives_uniform_over_candidates() -> None:
    candidates = torch.tensor([3, 9, 11, 20])
    gen = torch.Generator().manual_seed(0)
    drawn = sample_negatives(candidates, (500, 8), gen)
    assert drawn.shape == (500, 8)
    counts = torch.stack([(drawn == c).sum() for c in candidates])
    assert int(counts.sum()) == 4000  # nothing outside the candidates
    assert (counts > 850).all() and (counts < 1150).all()  # ~1000 each
    again = sample_negatives(candidates, (500, 8), torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
