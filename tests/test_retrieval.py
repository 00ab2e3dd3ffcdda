"""Retrieval baseline: exact search, filters, the LAION embedding-folder layout, serving, the embedded encoder."""

import os
import pickle

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss", reason="retrieval needs faiss (extra [retrieval])")

from fusionloader.methods.embedders import ClipEmbedder, prompt_embeddings  # noqa: E402
from fusionloader.methods.retrieval import (  # noqa: E402
    RetrievalPool,
    RetrievedVariants,
    default_pool,
    retrieved_variants,
    write_embedding_folder,
)


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(pool_x, q, k):
    sims = _unit(q) @ _unit(pool_x).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 24)).astype(np.float32) * rng.uniform(0.1, 10, (2000, 1)).astype(np.float32)
    q = rng.standard_normal((9, 24)).astype(np.float32)
    return x, q


# -- exact search -------------------------------------------------------------------------------------------


def test_flat_equals_brute_force(data):
    x, q = data
    pool = RetrievalPool(x)
    s, i = pool.search(q, 25)
    bs, bi = _brute(x, q, 25)
    assert s.shape == i.shape == (9, 25) and s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    # Rows are normalised by the pool: scaling pool rows or queries changes nothing.
    s2, i2 = RetrievalPool(x * 7.0).search(torch.from_numpy(q * 0.01), 25)
    np.testing.assert_array_equal(i2, i)


def test_streamed_laion_layout_equals_brute_force(data, tmp_path):
    x, q = data
    write_embedding_folder(str(tmp_path), [x[:500], x[500:1300], x[1300:]], shard_rows=700, dtype=np.float16)
    pool = RetrievalPool.from_embedding_folder(str(tmp_path), chunk_rows=256)
    assert pool.stream and [len(s) for s in pool.shards] == [700, 700, 600]
    assert all(isinstance(s, np.memmap) and s.dtype == np.float16 for s in pool.shards)
    s, i = pool.search(q, 40)
    bs, bi = _brute(x.astype(np.float16).astype(np.float32), q, 40)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, atol=1e-4)
    # The in-memory index over the same shards gives the same answer.
    s2, i2 = RetrievalPool(list(pool.shards), stream=False).search(q, 40)
    np.testing.assert_array_equal(i2, i)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "IVF16,Flat"])
def test_approximate_indexes(data, kind):
    x, q = data
    kw = dict(nlist=16, nprobe=16) if kind == "ivf" else dict(nprobe=16)
    pool = RetrievalPool(x, index=kind, **kw)
    _, i = pool.search(q, 10)
    _, bi = _brute(x, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, bi)])
    if kind != "hnsw":  # nprobe = nlist visits every list: exact
        assert recall == 1.0
    else:
        assert recall >= 0.9


# -- filters --------------------------------------------------------------------------------------------------


def test_threshold_keeps_exactly_the_neighbours_above_it(data):
    x, q = data
    pool = RetrievalPool(x)
    sims = _unit(q) @ _unit(x).T
    thr = float(np.quantile(sims, 0.995))
    r = pool.retrieve(q, k=len(x), min_score=thr, exclusive=False)
    for c in range(len(q)):
        expect = set(np.flatnonzero(sims[c] >= thr + 1e-6)) | (set(np.flatnonzero(sims[c] >= thr - 1e-6)) & set(r.for_class(c)))
        assert set(r.for_class(c)) == expect
    assert (r.scores >= thr - 1e-6).all() and r.removed["below_min_score"] > 0


def test_k_per_query_and_union_per_class(data):
    x, q = data
    pool = RetrievalPool(x)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    r = pool.retrieve(q, labels, k=5, exclusive=False)
    _, bi = _brute(x, q, 5)
    for c in range(3):
        assert set(r.for_class(c)) == set(bi[labels == c].ravel())
    # Labelled with the class that retrieved them; sorted by class then score.
    assert (np.diff(r.labels) >= 0).all()
    assert r.counts().sum() == len(r)


def test_exclusive_gives_an_image_to_its_best_class():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    q = np.stack([x[7] + 0.1 * x[8], x[7] + 0.5 * x[9]])  # both classes want image 7; class 0 is closer
    r = RetrievalPool(x).retrieve(q, k=3, exclusive=True)
    assert 7 in r.for_class(0) and 7 not in r.for_class(1)
    assert len(set(r.ids)) == len(r.ids) and r.removed["other_class"] >= 1
    r2 = RetrievalPool(x).retrieve(q, k=3, exclusive=False)
    assert 7 in r2.for_class(0) and 7 in r2.for_class(1)


def test_dedup_removes_near_duplicates_keeping_the_best():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((400, 16)).astype(np.float32)
    dups = base[:50] + 0.01 * rng.standard_normal((50, 16)).astype(np.float32)  # near-copies of 0..49
    x = np.concatenate([base, dups])
    q = rng.standard_normal((4, 16)).astype(np.float32)
    pool = RetrievalPool(x)
    r = pool.retrieve(q, k=200, dedup=0.98)
    v = pool.vectors(r.ids)
    sims = v @ v.T
    np.fill_diagonal(sims, -1)
    assert sims.max() < 0.98
    assert r.removed["duplicates"] > 0
    # Of each (original, copy) pair that was retrieved, the higher-scored one survived.
    qn = _unit(q)
    for j in range(50):
        a, b = j, 400 + j
        kept = {a, b} & set(r.ids.tolist())
        if kept:
            (kid,) = kept
            c = int(r.labels[r.ids == kid][0])
            other = b if kid == a else a
            assert qn[c] @ _unit(x[[kid]])[0] >= qn[c] @ _unit(x[[other]])[0] - 1e-6


def test_per_class_cap_keeps_the_best_scored(data):
    x, q = data
    pool = RetrievalPool(x)
    full = pool.retrieve(q, k=30)
    capped = pool.retrieve(q, k=30, per_class=7)
    assert capped.counts().max() == 7 and capped.removed["over_cap"] == len(full) - len(capped)
    for c in range(len(q)):
        want = full.ids[full.labels == c][:7]
        np.testing.assert_array_equal(capped.for_class(c), want)
        assert (np.diff(capped.scores[capped.labels == c]) <= 0).all()


def test_held_out_neighbours_are_removed_and_backfilled(data):
    x, q = data
    pool = RetrievalPool(x)
    _, bi = _brute(x, q, 10)
    held = x[bi[:, :4].ravel()] * 3.0  # the 4 best of every query are "test images" (scaled copies)
    r = pool.retrieve(q, k=10, exclude=held, exclude_threshold=0.999, exclusive=False)
    sims = pool.vectors(r.ids) @ _unit(held).T.astype(np.float32)
    assert sims.max() < 0.999
    assert r.counts().tolist() == [10] * len(q)  # widened to still find k per query
    assert r.removed["held_out"] >= 4 * len(q) - 5
    _, order = _brute(x, q, len(x))
    gone = set(bi[:, :4].ravel().tolist())
    for c in range(len(q)):
        expect = [i for i in order[c].tolist() if i not in gone][:10]
        assert sorted(r.for_class(c).tolist()) == sorted(expect)


# -- layout, errors -------------------------------------------------------------------------------------------


def test_laion_layout_round_trip_with_metadata_and_images(tmp_path):
    pytest.importorskip("pyarrow", reason="parquet metadata needs pyarrow (extra [retrieval])")
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(3)
    x = rng.standard_normal((23, 12)).astype(np.float32)
    os.makedirs(tmp_path / "imgs")
    paths = []
    for j in range(23):
        a = np.full((5, 6, 3), j * 10, np.uint8)
        Image.fromarray(a).save(tmp_path / "imgs" / f"{j:03d}.png")
        paths.append(f"imgs/{j:03d}.png")
    files = write_embedding_folder(str(tmp_path), x, {"image_path": paths, "caption": [f"c{j}" for j in range(23)]}, shard_rows=10, dtype=np.float32)
    assert [os.path.basename(f) for f in files] == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(os.listdir(tmp_path / "metadata")) == ["metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet"]
    pool = RetrievalPool.from_embedding_folder(str(tmp_path))
    assert len(pool) == 23 and [len(s) for s in pool.shards] == [10, 10, 3]
    np.testing.assert_allclose(pool.vectors([22, 0, 15]), _unit(x[[22, 0, 15]]), atol=1e-6)
    assert [m["caption"] for m in pool.metadata([22, 0, 15])] == ["c22", "c0", "c15"]
    # Several row groups per parquet file (as LAION's): a lookup reads only the groups it needs.
    meta0 = str(tmp_path / "metadata" / "metadata_0.parquet")
    pq.write_table(pq.read_table(meta0), meta0, row_group_size=3)
    assert pq.ParquetFile(meta0).num_row_groups == 4
    assert [m["caption"] for m in pool.metadata([9, 2, 3, 0, 15])] == ["c9", "c2", "c3", "c0", "c15"]
    img = pool.image(15)
    assert img.shape == (3, 5, 6) and torch.allclose(img, torch.full_like(img, 150 / 255))
    # Served through RetrievedVariants as paths (small, picklable).
    r = pool.retrieve(x[[15]], k=1)
    rv = pickle.loads(pickle.dumps(RetrievedVariants.from_pool(pool, r)))
    im, pid = rv.choose(0, 0, seed=1)
    assert pid == 15 and torch.equal(im, img)


def test_bad_inputs_named(data, tmp_path):
    pytest.importorskip("pyarrow", reason="parquet metadata needs pyarrow (extra [retrieval])")
    x, q = data
    pool = RetrievalPool(x)
    with pytest.raises(ValueError, match="queries: width 7 .* 24 wide"):
        pool.search(np.zeros((1, 7), np.float32), 3)
    with pytest.raises(ValueError, match="exclude: width 5"):
        pool.retrieve(q, k=2, exclude=np.zeros((2, 5)))
    nan_q = q.copy()
    nan_q[3, 1] = np.nan
    with pytest.raises(ValueError, match="queries: row 3 is not finite"):
        pool.search(nan_q, 2)
    for k in (0, -1, 1.5, True, len(x) + 1):
        with pytest.raises(ValueError, match="k must"):
            pool.search(q, k)
    with pytest.raises(ValueError, match="empty"):
        RetrievalPool(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="empty"):
        RetrievalPool([])
    with pytest.raises(ValueError, match=r"embeddings\[1\]: width 9"):
        RetrievalPool([x[:5, :8], np.zeros((3, 9), np.float32)])
    with pytest.raises(ValueError, match="2-D"):
        RetrievalPool(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="labels: 2 labels for 9 queries"):
        pool.retrieve(q, [0, 1], k=2)
    with pytest.raises(ValueError, match="min_score"):
        pool.retrieve(q, k=2, min_score=1.5)
    with pytest.raises(ValueError, match="per_class"):
        pool.retrieve(q, k=2, per_class=0)
    with pytest.raises(ValueError, match="images: 3 entries for a pool of 2000"):
        RetrievalPool(x, images=["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="img_emb"):
        RetrievalPool.from_embedding_folder(str(tmp_path))
    write_embedding_folder(str(tmp_path), x[:20], {"k": list(range(20))}, shard_rows=10)
    os.replace(tmp_path / "metadata" / "metadata_1.parquet", tmp_path / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match="metadata: 1 parquet file"):
        RetrievalPool.from_embedding_folder(str(tmp_path))
    with pytest.raises(IndexError, match="pool id 2000"):
        pool.vectors([2000])


def test_gpu_selection(monkeypatch, data):
    x, q = data
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="gpu=True"):
            RetrievalPool(x, gpu=True)
    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: moved.append(dev) or index, raising=False)
    pool = RetrievalPool(x)  # gpu=None: used when faiss has GPU support and sees a GPU
    assert moved == [0] and "gpu" in repr(pool)
    RetrievalPool(x, gpu=False)
    assert moved == [0]


# -- serving ----------------------------------------------------------------------------------------------------


def test_retrieved_variants_deterministic_and_per_class(data):
    x, q = data
    images = torch.rand(len(x), 3, 4, 4)
    pool = RetrievalPool(x, images=images)
    r = pool.retrieve(q[:3], k=6, num_classes=4)
    rv = RetrievedVariants.from_pool(pool, r)
    assert rv.counts() == [6, 6, 6, 0] and len(rv) == 18
    rv2 = pickle.loads(pickle.dumps(rv))
    assert len(pickle.dumps(rv)) < 20_000  # only the 18 retrieved images travel, not the pool
    picks = set()
    for index in range(200):
        im, pid = rv.choose(index, index % 3, seed=5)
        assert pid in set(r.for_class(index % 3)) and torch.equal(im, images[pid])
        assert rv2.pick(index, index % 3, 5) == pid == rv.pick(index, index % 3, 5)
        picks.add(pid)
    assert len(picks) == 18  # uniform over each class's images: all get served
    assert rv.choose(3, 3, seed=5) is None  # nothing retrieved for class 3: the caller falls back to real
    assert any(rv.pick(i, 0, 5) != rv.pick(i, 0, 6) for i in range(20))  # the seed matters
    with pytest.raises(ValueError, match="label 4"):
        rv.choose(0, 4, 0)


# -- embedders and the embedded default -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_embedder():
    from fusionloader.pretrained.clip_model import load_default_embedder

    return load_default_embedder()


def test_embedded_encoder_zero_shot_and_recorded_accuracy(digits_embedder):
    import json

    from fusionloader.pretrained import class_names, load_digits_splits
    from fusionloader.pretrained.clip_model import ZERO_SHOT_TEMPLATES, default_clip_path

    test = load_digits_splits().test
    qe = prompt_embeddings(digits_embedder, class_names, ZERO_SHOT_TEMPLATES)
    assert qe.shape == (10, digits_embedder.dim) and np.allclose(np.linalg.norm(qe, axis=1), 1, atol=1e-5)
    acc = float(((digits_embedder.encode_images(test.images) @ qe.T).argmax(1) == test.labels.numpy()).mean())
    with open(os.path.join(default_clip_path(), "eval.json")) as f:
        recorded = json.load(f)["zero_shot_accuracy"]["test"]
    assert acc == pytest.approx(recorded, abs=1e-6) and acc > 0.8
    assert sum(os.path.getsize(os.path.join(default_clip_path(), f)) for f in os.listdir(default_clip_path())) < 5e6


def test_default_pool_end_to_end(digits_embedder):
    from fusionloader.pretrained import class_names, load_digits_splits
    from fusionloader.pretrained.clip_model import ZERO_SHOT_TEMPLATES

    pool = default_pool(digits_embedder)
    splits = load_digits_splits()
    assert len(pool) == len(splits.generator)
    q = prompt_embeddings(digits_embedder, class_names, ZERO_SHOT_TEMPLATES)
    r = pool.retrieve(q, k=30, per_class=25, exclude=digits_embedder.encode_images(splits.test.images[:5]), exclude_threshold=0.9999)
    precision = float((splits.generator.labels.numpy()[r.ids] == r.labels).mean())
    assert precision > 0.9 and r.counts().tolist() == [25] * 10
    rv = RetrievedVariants.from_pool(pool, r)
    im, pid = rv.choose(11, 7, seed=0)
    assert im.shape == (3, 32, 32) and pid in set(rv.pool_ids(7).tolist())
    assert torch.equal(im, splits.generator.images[pid])
    with pytest.raises(TypeError, match="RetrievedVariants"):
        pickle.dumps(pool)


def test_recipe_helper_text_and_image_queries(digits_embedder):
    from fusionloader.pretrained import class_names, load_digits_splits
    from fusionloader.pretrained.clip_model import ZERO_SHOT_TEMPLATES

    splits = load_digits_splits()
    pool = default_pool(digits_embedder)
    truth = splits.generator.labels.numpy()
    by_text = retrieved_variants(pool, digits_embedder, class_names, templates=ZERO_SHOT_TEMPLATES, k=20, dedup=0.999)
    few = torch.cat([torch.nonzero(splits.train.labels == c)[:2, 0] for c in range(10)])  # 2-shot real images
    by_image = retrieved_variants(pool, digits_embedder, class_names, k=5, real_images=splits.train.images[few],
                                  real_labels=splits.train.labels[few], per_class=8, held_out_images=splits.test.images[:3])
    for rv in (by_text, by_image):
        got = [(c, pid) for c in range(10) for pid in rv.pool_ids(c).tolist()]
        assert np.mean([truth[pid] == c for c, pid in got]) > 0.9
    assert max(by_image.counts()) <= 8 and len(by_text) > 0
    with pytest.raises(ValueError, match="real_labels"):
        retrieved_variants(pool, digits_embedder, class_names, real_images=splits.train.images[:2])


def test_train_clip_script_smoke(tmp_path):
    import json

    from fusionloader.pretrained import train_clip

    out = tmp_path / "clip"
    assert train_clip.main(["--out", str(out), "--steps", "2", "--batch", "8"]) == 0
    emb = ClipEmbedder.from_pretrained(str(out))
    assert emb.dim == 64 and emb.image_size == 32
    for name in ("eval.json", "train_info.json", "config.json", "preprocessor_config.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "/work" not in text  # no absolute paths
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["zero_shot_accuracy"]) == {"generator", "train", "test"}


def test_user_clip_model_from_pretrained_and_from_folder(tmp_path):
    pytest.importorskip("pyarrow", reason="parquet metadata needs pyarrow (extra [retrieval])")
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel

    from fusionloader.testing import build_clip_tokenizer

    tok = build_clip_tokenizer(str(tmp_path / "tok"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=20,
    )
    CLIPModel(cfg).save_pretrained(str(tmp_path / "clip"))
    tok.save_pretrained(str(tmp_path / "clip"))
    emb = ClipEmbedder.from_pretrained(str(tmp_path / "clip"))
    assert emb.dim == 20 and emb.image_size == 16
    t = emb.encode_text(["a photo of a cat", "a dog"])
    assert t.shape == (2, 20) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    os.makedirs(tmp_path / "imgs" / "sub")
    rng = np.random.default_rng(0)
    for j in range(7):
        Image.fromarray(rng.integers(0, 255, (20 + j, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / ("sub" if j % 2 else "") / f"{j}.png")
    mem = RetrievalPool.from_folder(str(tmp_path / "imgs"), emb, batch_size=3)
    disk = RetrievalPool.from_folder(str(tmp_path / "imgs"), emb, batch_size=3, out=str(tmp_path / "laion"), dtype=np.float32)
    assert len(mem) == len(disk) == 7 and disk.stream
    np.testing.assert_allclose(mem.vectors(range(7)), disk.vectors(range(7)), atol=1e-6)
    _, i1 = mem.search(t, 3)
    _, i2 = disk.search(t, 3)
    np.testing.assert_array_equal(i1, i2)
    assert torch.equal(mem.image(4), disk.image(4)) and mem.image(4).shape[::2] == (3, 24)
    with pytest.raises(ValueError, match="queries: width 64"):
        mem.search(np.zeros((1, 64), np.float32), 1)  # the digits encoder's queries on this model's pool


def test_open_clip_style_model_through_the_embedder():
    # open_clip models expose encode_image / encode_text and a callable tokenizer; the real package is optional
    # (OpenClipEmbedder.from_pretrained imports it), the wrapper's preprocessing and normalisation are ours.
    from fusionloader.methods.embedders import OpenClipEmbedder

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img = torch.nn.Linear(3 * 8 * 8, 6)
            self.txt = torch.nn.Embedding(100, 6)

        def encode_image(self, x):
            assert x.shape[1:] == (3, 8, 8)
            return self.img(x.flatten(1))

        def encode_text(self, ids):
            return self.txt(ids).sum(1)

    def tokenizer(texts):
        return torch.tensor([[len(w) % 100 for w in (t.split() + ["", "", ""])[:4]] for t in texts])

    torch.manual_seed(0)
    emb = OpenClipEmbedder(Model(), tokenizer, image_size=8, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    assert emb.dim == 6
    imgs = [torch.rand(3, 12, 10), torch.rand(1, 8, 8)]  # any size, grey expands to 3 channels
    e = emb.encode_images(imgs)
    assert e.shape == (2, 6) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    x = emb.preprocess(imgs[1:])
    assert torch.allclose(x[0, 0], (imgs[1][0] - 0.5) / 0.25)
    q = prompt_embeddings(emb, ["cat", "horse"], ["a {}", "the big {}"])
    assert q.shape == (2, 6)
    with pytest.raises(ValueError, match="templates"):
        prompt_embeddings(emb, ["cat"], ["no placeholder"])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        emb.encode_images([torch.rand(4, 8, 8)])


def test_approximate_index_short_lists_are_not_ids(data):
    x, q = data
    pool = RetrievalPool(x, index="ivf", nlist=64, nprobe=1)
    _, i = pool.search(q, 300)
    assert (i < 0).any()  # one probed list holds fewer than 300 rows: faiss pads with -1
    r = pool.retrieve(q, k=300, exclude=x[:5], exclude_threshold=0.99)
    assert len(r) and (r.ids >= 0).all() and (r.ids < len(x)).all()


def test_dedup_equals_the_greedy_reference():
    # Chains a~b~c (a, c not near): greedy in score order keeps a, drops b, and keeps c again.
    rng = np.random.default_rng(4)
    base = rng.standard_normal((300, 8)).astype(np.float32)
    x = np.concatenate([base] + [base[:60] + s * rng.standard_normal((60, 8)).astype(np.float32) for s in (0.05, 0.1, 0.2)])
    q = rng.standard_normal((5, 8)).astype(np.float32)
    pool = RetrievalPool(x)
    plain = pool.retrieve(q, k=150)
    got = pool.retrieve(q, k=150, dedup=0.97)
    order = np.argsort(-plain.scores, kind="stable")
    kept: list[int] = []
    for pid in plain.ids[order].tolist():
        if not kept or (pool.vectors([pid]) @ pool.vectors(kept).T).max() < 0.97:
            kept.append(pid)
    assert sorted(got.ids.tolist()) == sorted(kept) and got.removed["duplicates"] == len(plain) - len(kept) > 0
