"""Item text, MiniLM content vectors (cache), the ONNX content encoder's parity, and a sanity
check that SIDs built from real movie text group movies by genre."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from sidrec.content_encoder import ContentEncoder
from sidrec.item_text import item_text
from sidrec.offline import content
from sidrec.offline.data.dataset import Catalog
from sidrec.offline.sids import build_sids, default_sid_shape, sid_report

ML100K = Path("/work/shared/data/ml-100k/u.item")
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip

LONG_TEXT = " ".join(
    f"Chapter {i}: the detective returns to the harbour and questions the fisherman again."
    for i in range(40)
)  # ~600 tokens, so truncation at 256 matters
PARITY_TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    "Heat (1995). Director: Michael Mann. Cast: Al Pacino, Robert De Niro.",
    "",
    " ",
    "a",
    "!!!",
    "1995",
    LONG_TEXT,
    "Le fabuleux destin d'Amélie Poulain (2001). Genres: Comédie, Romance.",
    "千と千尋の神隠し (2001). Spirited Away. Genres: Animation, Fantasy.",
    "Movie with emoji 🎬🍿 and tabs\tand\nnewlines.",
    "A very very very very very very very very very very repetitive title",
    "Schindler's List (1993). Genres: Drama, War. Plot: In German-occupied Poland during World "
    "War II, industrialist Oskar Schindler gradually becomes concerned for his Jewish workforce.",
    "THE MATRIX (1999) ALL CAPS",
    "x" * 300,
    "Genres: Documentary.",
    "Casablanca",
    "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War.",
    "Item 12345, SKU A-77/B, price $19.99 - blue cotton t-shirt, size M.",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, ContentEncoder]:
    out_dir = tmp_path_factory.mktemp("bundle")
    info = content.export_content_encoder(out_dir)
    encoder = ContentEncoder(out_dir / "content_encoder.onnx", out_dir / "tokenizer.json")
    return out_dir, info, encoder


def test_item_text_template() -> None:
    fields = {
        "plot": "A cowboy doll is threatened by a new spaceman figure.",
        "poster": "https://image.example.org/toy-story.jpg",
        "cast": "Tom Hanks, Tim Allen",
        "language": "English",
        "genres": "Animation|Comedy",
        "year": "1995",
        "director": "John Lasseter",
        "tagline": "",
        "country": "USA",
    }
    text = item_text("Toy Story", fields)
    assert text == (
        "Toy Story (1995). Genres: Animation, Comedy. Director: John Lasseter. "
        "Cast: Tom Hanks, Tim Allen. Country: USA. Language: English. "
        "Plot: A cowboy doll is threatened by a new spaceman figure."
    )
    # Insertion order does not matter.
    assert item_text("Toy Story", dict(reversed(fields.items()))) == text


def test_item_text_edge_cases() -> None:
    # ML titles carry the year already; URL fields and empty fields vanish.
    movielens = {"year": "1995", "genres": "Action, Thriller", "imdb_url": "http://us.imdb.com/x"}
    assert item_text("GoldenEye (1995)", movielens) == (
        "GoldenEye (1995). Genres: Action, Thriller."
    )
    assert item_text("  Heat  ", {"Genre": " Crime ", "video": "   "}) == "Heat. Genres: Crime."
    assert item_text("Untitled", {"homepage": "www.example.org"}) == "Untitled."
    assert item_text("", {"text": "Blue cotton t-shirt.\n\nSize M"}) == (
        "Text: Blue cotton t-shirt. Size M."
    )
    assert item_text("", {}) == ""


def test_service_modules_are_torch_free() -> None:
    code = (
        "import sys, sidrec.item_text, sidrec.sid_codebook, sidrec.content_encoder; "
        "bad = {'torch', 'pandas', 'sentence_transformers'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encode_texts_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["Heat (1995). Genres: Crime.", "Casablanca (1942).", "Heat (1995). Genres: Crime."]
    cache = tmp_path / "cache"
    first = content.encode_texts(texts, cache)
    assert first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first[0], first[2])
    assert content.encode_texts([], None).shape == (0, 384)

    shards = list(cache.glob("content-*.npz"))
    assert len(shards) == 1
    with np.load(shards[0]) as z:  # the repeated text is encoded and stored once
        assert sorted(z["keys"].tolist()) == sorted({content.text_key(t) for t in texts})

    def model_must_not_run() -> None:
        raise AssertionError("the model ran although every text was cached")

    with monkeypatch.context() as m:
        m.setattr(content, "load_sentence_model", model_must_not_run)
        np.testing.assert_array_equal(content.encode_texts(texts, cache), first)
    assert list(cache.glob("content-*.npz")) == shards

    # One changed item re-encodes only itself.
    changed = [texts[0], "Casablanca (1942). Genres: Drama, Romance."]
    second = content.encode_texts(changed, cache)
    new_shards = set(cache.glob("content-*.npz")) - set(shards)
    assert len(new_shards) == 1
    with np.load(new_shards.pop()) as z:
        assert z["keys"].tolist() == [content.text_key(changed[1])]
    np.testing.assert_array_equal(second[0], first[0])
    assert float(second[1] @ first[1]) < 0.999  # the text changed, so did the vector


def test_encode_catalog_uses_item_text(tmp_path: Path) -> None:
    catalog = Catalog(
        ids=["1", "2"],
        titles=["Toy Story (1995)", "Heat"],
        fields=[{"genres": "Animation, Comedy"}, {"year": "1995", "director": "Michael Mann"}],
        genres=[("Animation", "Comedy"), ()],
    )
    vectors = content.encode_catalog(catalog, tmp_path)
    expected = content.encode_texts(
        ["Toy Story (1995). Genres: Animation, Comedy.", "Heat (1995). Director: Michael Mann."],
        None,
    )
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


def test_exported_files(exported: tuple[Path, dict, ContentEncoder]) -> None:
    out_dir, info, encoder = exported
    assert info == {"model": "all-MiniLM-L6-v2", "dim": 384, "max_tokens": 256, "precision": "fp32"}
    # One self-contained graph (no external-data side files) and its tokenizer.
    assert sorted(p.name for p in out_dir.iterdir()) == ["content_encoder.onnx", "tokenizer.json"]
    graph = onnx.load(str(out_dir / "content_encoder.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["embeddings"]
    for tensor in graph.input:
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param for d in tensor.type.tensor_type.shape.dim)  # [B, T] dynamic
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == 384
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    assert tokenizer.truncation["max_length"] == 256
    assert tokenizer.padding is not None and tokenizer.padding["length"] is None  # to longest
    assert encoder.dim == 384 and encoder.max_tokens == 256
    assert encoder.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    # BERT's eager attention, not sdpa's export with its fully-masked-row guard (IsNaN +
    # Where over every [B, 12, T, T] score tensor): ~13% of the CPU of one ingest.
    ops = Counter(node.op_type for node in graph.node)
    assert ops["IsNaN"] == 0 and ops["Where"] <= 1 and ops["Softmax"] == 6, ops  # 1: the mask
    # The shared sentence-transformers model is left as it was loaded.
    bert = content.load_sentence_model()[0].auto_model
    assert bert.config._attn_implementation != "eager"


def test_onnx_encoder_matches_sentence_transformers(
    exported: tuple[Path, dict, ContentEncoder],
) -> None:
    _, _, encoder = exported
    assert len(encoder.tokenizer.encode(LONG_TEXT).ids) == 256  # truncated
    reference = content.encode_texts(PARITY_TEXTS, None)  # [20, 384]
    batched = encoder.encode(PARITY_TEXTS)  # one padded batch of mixed lengths
    assert batched.shape == (len(PARITY_TEXTS), 384) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    cosine = (batched * reference).sum(axis=1)
    assert cosine.min() > 0.999, dict(zip(PARITY_TEXTS, cosine.round(5), strict=True))
    # Per component of the L2-normalised vectors: ONNX Runtime and PyTorch differ by float32
    # rounding only (measured: < 1e-6), so the bundle's codebooks see the same vectors.
    np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-5)
    # Alone (no padding) gives the same vector as inside a padded batch.
    for i in (0, 3, 8):
        single = encoder.encode([PARITY_TEXTS[i]])[0]
        np.testing.assert_allclose(single, reference[i], rtol=0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_content_encoder_threads_give_the_same_vectors(
    exported: tuple[Path, dict, ContentEncoder],
) -> None:
    # SIDREC_CONTENT_THREADS: the service's session options with two intra-op threads.
    from sidrec.service.runtime import CPU, session_options

    out_dir, _, _ = exported
    one, two = (
        ContentEncoder(
            out_dir / "content_encoder.onnx",
            out_dir / "tokenizer.json",
            [CPU],
            session_options=session_options(threads),
        )
        for threads in (1, 2)
    )
    np.testing.assert_allclose(two.encode(PARITY_TEXTS), one.encode(PARITY_TEXTS), atol=1e-6)


def test_int8_encoder_is_one_graph_for_the_catalog_and_the_service(
    tmp_path: Path, exported: tuple[Path, dict, ContentEncoder]
) -> None:
    out_dir, info, _ = exported
    graphs = tmp_path / "graphs"  # a cache holding the fixture's fp32 export, as the pipeline's
    fp32_dir = graphs / f"content_encoder-{content.EXPORT_FORM}"
    fp32_dir.mkdir(parents=True)
    for name in ("content_encoder.onnx", "tokenizer.json"):
        shutil.copy2(out_dir / name, fp32_dir / name)
    (fp32_dir / "info.json").write_text(json.dumps(info))
    folder, int8_info = content.content_encoder_files(graphs, "int8")
    assert info["precision"] == "fp32"
    assert int8_info == {**info, "model": "all-MiniLM-L6-v2/int8", "precision": "int8"}
    ops = Counter(n.op_type for n in onnx.load(str(folder / "content_encoder.onnx")).graph.node)
    assert ops["MatMulInteger"] >= 36 and ops["DynamicQuantizeLinear"] > 0, ops  # 6 x 6 weights
    assert (folder / "content_encoder.onnx").stat().st_size < 0.4 * (
        fp32_dir / "content_encoder.onnx"
    ).stat().st_size

    service = ContentEncoder(
        folder / "content_encoder.onnx", folder / "tokenizer.json", quantized=True
    )
    vectors = service.encode(PARITY_TEXTS)  # [20, 384], one text per run
    alone = np.concatenate([service.encode([t]) for t in PARITY_TEXTS])
    np.testing.assert_array_equal(vectors, alone)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Close to the fp32 vectors, not equal: what quantising the weights costs.
    reference = content.encode_texts(PARITY_TEXTS, None)
    cosine = (vectors * reference).sum(axis=1)
    assert cosine.min() > 0.95 and np.abs(vectors - reference).max() > 1e-4, cosine.round(4)

    # The offline pipeline's int8 vectors are the service's, cached apart from fp32 ones.
    cache = tmp_path / "vectors"
    offline = content.encode_texts(PARITY_TEXTS, cache, precision="int8", graphs=graphs)
    np.testing.assert_allclose(offline, vectors, rtol=0, atol=1e-6)
    assert content.text_key("a", "int8") != content.text_key("a")
    np.testing.assert_allclose(content.encode_texts(PARITY_TEXTS, cache), reference, atol=1e-6)
    np.testing.assert_array_equal(
        content.encode_texts(PARITY_TEXTS, cache, precision="int8", graphs=graphs), offline
    )
    with pytest.raises(ValueError, match="expected one of fp32, int8"):
        content.encode_texts(["a"], None, precision="fp16")


def read_ml100k_items(limit: int) -> tuple[list[str], list[tuple[str, ...]]]:
    titles, genres = [], []
    for line in ML100K.read_text(encoding="latin-1").splitlines()[:limit]:
        cols = line.split("|")
        flags = cols[5:24]
        titles.append(cols[1])
        genres.append(tuple(g for g, f in zip(ML100K_GENRES, flags, strict=True) if f == "1"))
    return titles, genres


@pytest.mark.skipif(not ML100K.exists(), reason=f"shared data {ML100K} is absent")
def test_movie_sids_group_genres(tmp_path: Path) -> None:
    titles, genres = read_ml100k_items(300)
    catalog = Catalog(
        ids=[str(i + 1) for i in range(len(titles))],
        titles=titles,
        fields=[{"genres": ", ".join(g)} for g in genres],
        genres=genres,
    )
    vectors = content.encode_catalog(catalog, tmp_path)
    layers, codes = default_sid_shape(len(titles))
    books, sids = build_sids(vectors, layers, codes, seed=0)
    report = sid_report(sids, genres, books)
    first = report["genre_coherence"]["prefix_1"]
    # Movies that share a first code share a genre much more often than random pairs.
    assert first["same_prefix"] > first["random"] + 0.2, first
    assert report["unique_full_sids"]
